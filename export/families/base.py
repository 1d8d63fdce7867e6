"""What every family provides to the export pipeline."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["Family"]


class Family:
    """One reranker family; subclasses register with ``@register_family`` (``families.registry``).

    Attributes:
        name: the manifest ``family`` value.
        padding_side: padding the runtime uses for this family.
        padding_sides: padding sides the exported graph handles (validated at export).
    """

    name: str = ""
    padding_side: str = "right"
    #: Padding sides the graph is valid for (and validated with); the manifest records ``padding_side``.
    padding_sides: tuple[str, ...] = ("right",)

    def __init__(self, source: str, config: Any, *, revision: str | None, trust_remote_code: bool,
                 instruction: str | None, max_length: int | None) -> None:
        self.source = source
        self.config = config
        self.revision = revision
        self.trust_remote_code = trust_remote_code
        self.instruction = instruction
        self.max_length = max_length
        self.model: Any = None
        self.tokenizer: Any = None

    def load(self) -> None:
        """Load the PyTorch model (fp32, eval) and the fast tokenizer."""
        raise NotImplementedError

    def template(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Return the manifest's ``template`` and ``tokens`` blocks."""
        raise NotImplementedError

    def graph_module(self) -> Any:
        """An ``nn.Module`` taking the graph inputs and returning logits of shape (batch, 1)."""
        raise NotImplementedError

    def onnx_config(self) -> Any:
        """The Optimum OnnxConfig describing the graph's inputs and outputs."""
        raise NotImplementedError

    def cache_layout(self) -> dict[str, Any] | None:
        """The manifest's ``prefix_reuse`` block when the graph takes a shared past (decoder families), else None."""
        return None

    def reference(self, query: str, documents: Sequence[str], instruction: str | None) -> np.ndarray:
        """PyTorch reference logits for one query and its documents, computed the way the model's authors do."""
        raise NotImplementedError

    def backend(self) -> Any:
        """A copy of the fast tokenizer's ``tokenizers.Tokenizer`` with padding and truncation off, as the
        runtime uses it (checkpoints often save fixed padding/truncation into tokenizer.json)."""
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(self.tokenizer.backend_tokenizer.to_str())
        backend.no_padding()
        backend.no_truncation()
        return backend

    def _tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.source, revision=self.revision, use_fast=True,
                                            trust_remote_code=self.trust_remote_code)
        if not tok.is_fast:
            raise ValueError(f"{self.source}: memrerank needs a fast tokenizer (tokenizer.json); none was found")
        return tok
