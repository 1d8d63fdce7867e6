"""Decoder yes/no rerankers (Qwen3-Reranker, MemReranker): score = logit("yes") − logit("no") at the last token.

The head is folded into the graph: the last real position's hidden state is gathered and dotted, in fp32, with
``W_yes − W_no``, so the graph emits ONE logit per row and no full-vocabulary logits anywhere. The already
converted ``Qwen3ForSequenceClassification`` ("-seq-cls") checkpoints carry that vector as their ``score`` row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from memrerank.export.families import register_family
from memrerank.export.families.base import Family

__all__ = ["DecoderYesNoFamily", "PREFIX", "SUFFIX", "DEFAULT_INSTRUCTION", "format_body"]

# The official Qwen3-Reranker recipe (model card of Qwen/Qwen3-Reranker-*), verbatim.
PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
# The body "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}" cut after each ">:" (see
# memrerank.runtime.encoding for why these cut points give exactly the whole-string token ids).
INSTRUCTION_PIECE = "<Instruct>: {instruction}\n<Query>:"
QUERY_PIECE = " {query}\n<Document>:"
DOCUMENT_PIECE = " {document}"
DEFAULT_MAX_LENGTH = 8192


def format_body(instruction: str, query: str, document: str) -> str:
    """The official body string (what the recipe tokenizes in one call)."""
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"


class _FoldedYesNo:
    """Builds the export module lazily so importing this file needs no torch."""

    @staticmethod
    def build(body: Any, head: Any, config: Any) -> Any:
        import torch

        class FoldedYesNo(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.body = body
                self.config = config  # Optimum's exporter reads model.config
                self.register_buffer("head", head.detach().to(torch.float32).reshape(-1, 1))

            def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
                length = input_ids.shape[1]
                keep = attention_mask.to(torch.bool)
                # Positions count real tokens only, so left and right padding give the same RoPE phases.
                position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
                causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
                allowed = causal[None, None, :, :] & keep[:, None, None, :]
                # A finite minimum, not -inf: fully masked pad rows then stay finite instead of NaN, and NaN in a
                # pad row's values would leak into real rows through 0 * NaN in the attention product.
                dtype = next(self.body.parameters()).dtype
                bias = torch.zeros(allowed.shape, dtype=dtype, device=input_ids.device)
                bias = bias.masked_fill(~allowed, torch.finfo(dtype).min)
                hidden = self.body(input_ids=input_ids, attention_mask=bias, position_ids=position_ids,
                                   use_cache=False).last_hidden_state
                positions = torch.arange(length, device=input_ids.device)
                last = (attention_mask * positions).argmax(-1)
                picked = hidden[torch.arange(hidden.shape[0], device=input_ids.device), last]
                return picked.to(torch.float32) @ self.head

        return FoldedYesNo().eval()


@register_family("Qwen3ForCausalLM", "Qwen3ForSequenceClassification")
class DecoderYesNoFamily(Family):
    """Qwen3-Reranker / MemReranker and their "-seq-cls" conversions."""

    name = "decoder-yes-no"
    padding_side = "left"  # as the official recipe
    padding_sides = ("left", "right")  # positions count real tokens only, so both sides give the same scores

    def load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        self.is_seq_cls = self.config.architectures[0].endswith("ForSequenceClassification")
        cls = AutoModelForSequenceClassification if self.is_seq_cls else AutoModelForCausalLM
        # eager attention: the export passes its own 4-D additive mask, which eager uses as given.
        self.model = cls.from_pretrained(self.source, revision=self.revision, dtype=torch.float32,
                                         attn_implementation="eager",
                                         trust_remote_code=self.trust_remote_code).eval()
        self.tokenizer = self._tokenizer()
        self.tokenizer.padding_side = "left"
        if self.is_seq_cls and getattr(self.model.config, "num_labels", 1) != 1:
            raise ValueError(f"{self.source}: a -seq-cls reranker must have one label, has {self.model.config.num_labels}")

    def _yes_no_ids(self) -> tuple[int, int]:
        yes = self.tokenizer.convert_tokens_to_ids("yes")
        no = self.tokenizer.convert_tokens_to_ids("no")
        unk = self.tokenizer.unk_token_id
        if yes in (None, unk) or no in (None, unk):
            raise ValueError(f"{self.source}: the tokenizer has no single 'yes'/'no' tokens; not a yes/no reranker")
        return int(yes), int(no)

    def _head(self) -> Any:
        if self.is_seq_cls:
            score = self.model.score
            if getattr(score, "bias", None) is not None:
                raise ValueError(f"{self.source}: score layer with a bias is not supported")
            return score.weight[0]
        yes, no = self._yes_no_ids()
        lm_head = self.model.get_output_embeddings()
        if getattr(lm_head, "bias", None) is not None:
            raise ValueError(f"{self.source}: lm_head with a bias is not supported")
        weight = lm_head.weight.detach().float()
        return weight[yes] - weight[no]

    def template(self) -> tuple[dict[str, Any], dict[str, Any]]:
        backend = self.backend()
        enc = self.tokenizer

        def ids(text: str) -> list[int]:
            return backend.encode(text, add_special_tokens=False).ids

        prefix_ids, suffix_ids = ids(PREFIX), ids(SUFFIX)
        max_length = int(self.max_length or DEFAULT_MAX_LENGTH)
        instruction = self.instruction if self.instruction is not None else DEFAULT_INSTRUCTION
        yes, no = (None, None) if self.is_seq_cls else self._yes_no_ids()
        probe = "Memories: I moved to Lisbon in 2021, naïve café ☕."
        template = {
            "prefix": PREFIX,
            "instruction_piece": INSTRUCTION_PIECE,
            "query_piece": QUERY_PIECE,
            "document_piece": DOCUMENT_PIECE,
            "suffix": SUFFIX,
            "body": "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}",
            "default_instruction": instruction,
            "prefix_ids": prefix_ids,
            "suffix_ids": suffix_ids,
            "truncation": "document tokens are cut from the end; prefix, instruction, query and suffix never",
            "id_checks": {PREFIX: prefix_ids, SUFFIX: suffix_ids, probe: ids(probe)},
        }
        pad_id = enc.pad_token_id if enc.pad_token_id is not None else enc.eos_token_id
        tokens = {
            "yes_id": yes,
            "no_id": no,
            "score": "logit(yes) - logit(no) at the last real token" if not self.is_seq_cls else "score head logit",
            "pad_id": int(pad_id),
            "padding_side": self.padding_side,
            "max_length": max_length,
        }
        if max_length <= len(prefix_ids) + len(suffix_ids) + 16:
            raise ValueError(f"--max-length {max_length} leaves no room for query and document after the template")
        if yes is not None:  # the runtime re-checks these so a swapped tokenizer.json is refused
            template["id_checks"].update({"yes": [yes], "no": [no]})
        return template, tokens

    def graph_module(self) -> Any:
        body = self.model.model  # the decoder stack with its final norm
        return _FoldedYesNo.build(body, self._head(), self.model.config)

    def onnx_config(self) -> Any:
        from optimum.exporters.onnx.config import TextEncoderOnnxConfig
        from optimum.utils import NormalizedTextConfig

        class FoldedYesNoOnnxConfig(TextEncoderOnnxConfig):
            NORMALIZED_CONFIG_CLASS = NormalizedTextConfig
            DEFAULT_ONNX_OPSET = 17

            @property
            def inputs(self) -> dict[str, dict[int, str]]:
                return {"input_ids": {0: "batch_size", 1: "sequence_length"},
                        "attention_mask": {0: "batch_size", 1: "sequence_length"}}

            @property
            def outputs(self) -> dict[str, dict[int, str]]:
                return {"logits": {0: "batch_size"}}

        return FoldedYesNoOnnxConfig(self.model.config, task="text-classification")

    def reference(self, query: str, documents: Sequence[str], instruction: str | None) -> np.ndarray:
        """The official recipe: whole body tokenized at once, prefix/suffix ids around it, left padding."""
        import torch

        instruction = self.instruction if instruction is None else instruction
        instruction = DEFAULT_INSTRUCTION if instruction is None else instruction
        tok = self.tokenizer
        prefix_ids = tok.encode(PREFIX, add_special_tokens=False)
        suffix_ids = tok.encode(SUFFIX, add_special_tokens=False)
        max_length = int(self.max_length or DEFAULT_MAX_LENGTH)
        bodies = [format_body(instruction, query, d) for d in documents]
        enc = tok(bodies, padding=False, truncation="longest_first", return_attention_mask=False,
                  max_length=max_length - len(prefix_ids) - len(suffix_ids))
        rows = [prefix_ids + ids + suffix_ids for ids in enc["input_ids"]]
        out = []
        with torch.no_grad():
            if self.is_seq_cls:  # one row at a time: the seq-cls pooling looks for pad ids in input_ids
                for ids in rows:
                    out.append(float(self.model(input_ids=torch.tensor([ids])).logits[0, 0]))
                return np.asarray(out, dtype=np.float64)
            padded = tok.pad({"input_ids": rows}, padding=True, return_tensors="pt")
            logits = self.model(**padded, logits_to_keep=1).logits[:, -1, :].float()
            yes, no = self._yes_no_ids()
            return (logits[:, yes] - logits[:, no]).double().numpy()
