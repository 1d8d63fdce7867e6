"""What every family provides to the export pipeline."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from memrerank.errors import UnsafeCheckpointError
from memrerank.manifest import CacheLayout, Template, Tokens

__all__ = ["Family"]


class Family:
    """One reranker family; subclasses register with ``@register_family`` (``families.registry``).

    Attributes:
        name: the manifest ``family`` value, one of :data:`memrerank.manifest.FAMILIES`.
        padding_side: padding the runtime uses for this family.
        padding_sides: padding sides the exported graph handles (validated at export).
    """

    name: str = ""
    padding_side: str = "right"
    #: Padding sides the graph is valid for (and validated with); the manifest records ``padding_side``.
    padding_sides: tuple[str, ...] = ("right",)

    def __init__(self, source: str, config: Any, *, revision: str | None, trust_remote_code: bool,
                 instruction: str | None, max_length: int | None, allow_pickle: bool = False,
                 prompt: Any = None) -> None:
        self.source = source
        self.config = config
        self.revision = revision
        self.trust_remote_code = trust_remote_code
        self.instruction = instruction
        self.max_length = max_length
        self.allow_pickle = allow_pickle
        #: Decoder yes/no families: the prompt (``YesNoPrompt``) replacing the checkpoint's default.
        self.prompt = prompt
        self.model: Any = None
        self.tokenizer: Any = None
        #: The dtype :meth:`load` gives the PyTorch model: ``None`` = float32 (the reference an fp32 graph is
        #: checked against); ``"auto"`` = the checkpoint's own (the streaming export: a bf16 4B model in 8 GB).
        self.load_dtype: Any = None

    def load(self) -> None:
        """Load the PyTorch model (fp32, eval; through :meth:`_from_pretrained`) and the fast tokenizer."""
        raise NotImplementedError

    def release(self) -> None:
        """Free the PyTorch model (the export reads only the graph files after validating fp32)."""
        import gc

        self.model = None
        gc.collect()

    def _from_pretrained(self, cls: Any, **kwargs: Any) -> Any:
        """``cls.from_pretrained`` of the checkpoint, reading its weights from safetensors only.

        Unpickling a ``pytorch_model.bin`` can run code (torch.load with ``weights_only`` still unpickles),
        so a checkpoint without safetensors is refused unless ``allow_pickle`` was given.

        Raises:
            UnsafeCheckpointError: the weights exist only as a pickle; the message names the file and how to
                convert it.
        """
        if not self.allow_pickle:
            root = Path(self.source)
            if root.is_dir() and not any(root.glob("*.safetensors")):
                pickled = sorted(p.name for p in root.glob("pytorch_model*.bin*"))
                if pickled:
                    where = root.resolve() / pickled[0]
                    found = f"{where}: the weights are a pickle ({', '.join(pickled)}), with no *.safetensors"
                    raise UnsafeCheckpointError(self._pickle_message(cls, found))
        try:
            return cls.from_pretrained(self.source, revision=self.revision,
                                       trust_remote_code=self.trust_remote_code,
                                       use_safetensors=None if self.allow_pickle else True, **kwargs)
        except OSError as exc:  # a hub checkpoint: transformers found no model.safetensors there
            if self.allow_pickle or "safetensors" not in str(exc):
                raise
            raise UnsafeCheckpointError(self._pickle_message(
                cls, f"{self.source}: no safetensors weights ({exc})")) from exc

    def _pickle_message(self, cls: Any, found: str) -> str:
        """``found``, then why it is refused and the lines that convert the checkpoint to safetensors."""
        local = Path(self.source).is_dir()
        src = str(Path(self.source).resolve()) if local else self.source
        dst = src if local else f"{self.source.rsplit('/', 1)[-1]}-safetensors"
        name = cls.__name__
        lines = [f"from transformers import {name}" + ("" if local else ", AutoTokenizer"),
                 f"{name}.from_pretrained({src!r}, use_safetensors=False).save_pretrained({dst!r}, "
                 "safe_serialization=True)"]
        if not local:
            lines.append(f"AutoTokenizer.from_pretrained({src!r}).save_pretrained({dst!r})")
        snippet = "".join(f"\n    {line}" for line in lines)
        return (f"{found}. memrerank loads safetensors only: unpickling a checkpoint can run arbitrary code. "
                f"Convert it once (this unpickles it: only for a checkpoint you trust):{snippet}\n"
                f"then export {dst}; or pass --allow-pickle (the allow_pickle argument) to load the pickle as "
                "it is.")

    def template(self) -> tuple[Template, Tokens]:
        """Return the manifest's ``template`` (the type :data:`memrerank.manifest.FAMILY_TEMPLATES` names for
        :attr:`name`) and ``tokens`` blocks."""
        raise NotImplementedError

    def graph_module(self) -> Any:
        """An ``nn.Module`` taking the graph inputs and returning logits of shape (batch, 1)."""
        raise NotImplementedError

    def onnx_config(self) -> Any:
        """The Optimum OnnxConfig describing the graph's inputs and outputs."""
        raise NotImplementedError

    def cache_layout(self) -> CacheLayout | None:
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
