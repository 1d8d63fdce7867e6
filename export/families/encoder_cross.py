"""Encoder cross-encoders: ``*ForSequenceClassification`` with one label; the classifier stays as trained."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from memrerank.export.families.base import Family
from memrerank.export.families.registry import register_family
from memrerank.manifest import ENCODER_CROSS, EncoderTemplate, Tokens

__all__ = ["EncoderCrossFamily"]


@register_family(
    "BertForSequenceClassification",
    "XLMRobertaForSequenceClassification",
    "RobertaForSequenceClassification",
    "ElectraForSequenceClassification",
)
class EncoderCrossFamily(Family):
    """BERT / RoBERTa / XLM-R / ELECTRA rerankers (ms-marco-MiniLM, bge-reranker-base/large, …)."""

    name = ENCODER_CROSS
    padding_side = "right"  # absolute position embeddings: real tokens must start at position 0

    def load(self) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification

        if self.prompt is not None:
            raise ValueError(f"{self.source}: an encoder cross-encoder has no prompt; --system-prompt, "
                             "--prompt-suffix, --yes-token and --no-token are for decoder yes/no rerankers")
        self.model = self._from_pretrained(AutoModelForSequenceClassification, dtype=torch.float32).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(
                f"{self.source}: a cross-encoder reranker has one output label, this one has "
                f"{self.model.config.num_labels}; memrerank scores relevance with a single logit"
            )
        self.tokenizer = self._tokenizer()

    def _max_length(self) -> int:
        limit = int(getattr(self.model.config, "max_position_embeddings", 512))
        if self.model.config.model_type in ("roberta", "xlm-roberta"):
            limit -= 2  # positions start after padding_idx
        tok_max = int(getattr(self.tokenizer, "model_max_length", limit) or limit)
        wanted = int(self.max_length) if self.max_length else min(limit, tok_max)
        if wanted > limit:
            raise ValueError(f"--max-length {wanted} exceeds the model's {limit} positions")
        return wanted

    def template(self) -> tuple[EncoderTemplate, Tokens]:
        if self.instruction is not None:
            raise ValueError("--instruction applies to decoder rerankers only; encoder cross-encoders take none")
        backend = self.backend()
        qa, da = "alpha", "beta"
        q_ids = backend.encode(qa, add_special_tokens=False).ids
        d_ids = backend.encode(da, add_special_tokens=False).ids
        pair = backend.encode(qa, da, add_special_tokens=True)
        ids, types = pair.ids, pair.type_ids
        # Locate the query and document ids inside the post-processed pair to read off the template pieces.
        qi = next(i for i in range(len(ids)) if ids[i:i + len(q_ids)] == q_ids)
        di = next(i for i in range(qi + len(q_ids), len(ids)) if ids[i:i + len(d_ids)] == d_ids)
        lead, middle, trail = ids[:qi], ids[qi + len(q_ids):di], ids[di + len(d_ids):]
        uses_types = "token_type_ids" in self.tokenizer.model_input_names and self.model.config.type_vocab_size > 1
        probe = "Memories: I moved to Lisbon in 2021, naïve café ☕."
        template = EncoderTemplate(
            lead_ids=tuple(lead),
            middle_ids=tuple(middle),
            trail_ids=tuple(trail),
            uses_type_ids=bool(uses_types),
            query_type_id=int(types[qi]),
            document_type_id=int(types[di]),
            lead_type_ids=tuple(types[:qi]),
            middle_type_ids=tuple(types[qi + len(q_ids):di]),
            trail_type_ids=tuple(types[di + len(d_ids):]),
            id_checks={probe: tuple(backend.encode(probe, add_special_tokens=False).ids)},
            extra={"truncation": "document tokens are cut from the end; the query never"},
        )
        tokens = Tokens(pad_id=int(self.tokenizer.pad_token_id), padding_side=self.padding_side,
                        max_length=self._max_length())
        return template, tokens

    def graph_module(self) -> Any:
        return self.model

    def onnx_config(self) -> Any:
        import optimum.exporters.onnx.model_configs  # noqa: F401  (registers Optimum's ONNX configs)
        from optimum.exporters.tasks import TasksManager

        ctor = TasksManager.get_exporter_config_constructor(exporter="onnx", model=self.model,
                                                            task="text-classification", library_name="transformers")
        return ctor(self.model.config)

    def reference(self, query: str, documents: Sequence[str], instruction: str | None) -> np.ndarray:
        """As sentence-transformers' CrossEncoder: tokenizer(query, doc) pairs, one logit."""
        import torch

        enc = self.tokenizer([query] * len(documents), list(documents), padding=True, truncation="only_second",
                             max_length=self._max_length(), return_tensors="pt")
        with torch.no_grad():
            return self.model(**enc).logits[:, 0].double().numpy()
