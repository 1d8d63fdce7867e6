"""Decoder yes/no rerankers (Qwen3-Reranker, MemReranker, Qwen2-based ones): score = logit(yes) − logit(no) at the
last token.

The head is folded into the graph: the last real position's hidden state is gathered and dotted, in fp32, with
``W_yes − W_no``, so the graph emits ONE logit per row and no full-vocabulary logits anywhere. The already
converted ``Qwen3ForSequenceClassification`` ("-seq-cls") checkpoints carry that vector as their ``score`` row.

The prompt around the body is a :class:`YesNoPrompt`: by default the Qwen3-Reranker recipe's for Qwen3 models
(:data:`QWEN3_RERANKER`) and the same without its think block for Qwen2 models (:data:`QWEN2_YES_NO`: Qwen2
tokenizers have no think tokens). Another Qwen2/Qwen3-based yes/no reranker passes its own system prompt, suffix
and answer tokens (``export_model(..., prompt=YesNoPrompt.chatml(system, ...))``, ``memrerank export
--system-prompt/--prompt-suffix/--yes-token/--no-token``); the manifest records the text and the ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from memrerank.export.families.base import Family
from memrerank.export.families.registry import register_family
from memrerank.manifest import DECODER_YES_NO, CacheLayout, DecoderTemplate, Tokens

__all__ = ["DecoderYesNoFamily", "YesNoPrompt", "QWEN3_RERANKER", "QWEN2_YES_NO", "PREFIX", "SUFFIX",
           "DEFAULT_INSTRUCTION", "format_body"]

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


@dataclass(frozen=True)
class YesNoPrompt:
    """The text around a decoder yes/no reranker's body and its two answer tokens.

    A field left ``None`` keeps the checkpoint's default (:meth:`over`): ``YesNoPrompt.chatml("You rank
    memories.")`` changes only the system message, whatever the model type's suffix.

    Attributes:
        prefix: everything before ``<Instruct>: …`` (system turn and the user turn's opening).
        suffix: everything after the document, up to where the answer token would be generated.
        yes: the answer token whose logit counts for (one vocabulary token, e.g. ``"yes"``).
        no: the answer token whose logit counts against.
        name: what the manifest calls this prompt.

    Raises:
        ValueError: an empty piece, or the same token for yes and no.
    """

    prefix: str | None = None
    suffix: str | None = None
    yes: str | None = None
    no: str | None = None
    name: str = "custom"

    def __post_init__(self) -> None:
        for field in ("prefix", "suffix", "yes", "no", "name"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"YesNoPrompt.{field} must be a non-empty string, got {value!r}")
        if self.yes is not None and self.yes == self.no:
            raise ValueError(f"YesNoPrompt: yes and no are the same token {self.yes!r}")

    @classmethod
    def chatml(cls, system: str | None = None, *, suffix: str | None = None, yes: str | None = None,
               no: str | None = None) -> YesNoPrompt:
        """A prompt whose system message is ``system``, written into the ChatML prefix
        ``<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n``; other fields as given."""
        prefix = None if system is None else f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"
        return cls(prefix, suffix, yes, no)

    def over(self, default: YesNoPrompt) -> YesNoPrompt:
        """This prompt with its ``None`` fields taken from ``default`` (named after ``default`` when nothing
        differs from it)."""
        merged = [getattr(self, f) if getattr(self, f) is not None else getattr(default, f)
                  for f in ("prefix", "suffix", "yes", "no")]
        same = merged == [default.prefix, default.suffix, default.yes, default.no]
        return YesNoPrompt(*merged, name=default.name if same else self.name)


#: The official Qwen3-Reranker recipe (Qwen3-Reranker, MemReranker).
QWEN3_RERANKER = YesNoPrompt(PREFIX, SUFFIX, "yes", "no", "qwen3-reranker")
#: The same prompt without the think block, for Qwen2 models (their tokenizers have no think tokens).
QWEN2_YES_NO = YesNoPrompt(PREFIX, "<|im_end|>\n<|im_start|>assistant\n", "yes", "no",
                           "qwen3-reranker, no think block")


def format_body(instruction: str, query: str, document: str) -> str:
    """The official body string (what the recipe tokenizes in one call)."""
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"


class _FoldedYesNo:
    """Builds the export module lazily so importing this file needs no torch.

    The graph has optional past inputs, so one set of weights serves three uses (issue: shared-prefix reuse):

    * full scoring: ``input_ids``/``attention_mask`` hold whole pairs and the past is empty (length 0);
    * prefix pass: batch 1, the ids shared by every pair of a query; ``present_key.i``/``present_value.i`` (row 0's
      keys and values per layer, after RoPE) are that prefix's cache;
    * suffix pass: batch N of document + template-suffix ids attending to the batch-1 past by broadcasting (no
      per-row copy of the cache) and causally to their own tokens; positions continue after the past.

    Attention is written out here (not the transformers module's) because the cache is shared across rows: grouped
    queries are reshaped to ``(B, kv_heads, group, S, d)`` so the 1-row past multiplies every row through MatMul
    broadcasting, and softmax runs over the concatenated past and own scores.
    """

    @staticmethod
    def build(body: Any, head: Any, config: Any) -> Any:
        import torch

        layer_types = getattr(config, "layer_types", None) or []
        if any(t != "full_attention" for t in layer_types):
            from memrerank.errors import UnsupportedModelError

            raise UnsupportedModelError("sliding-window attention layers are not supported by the decoder export")
        n_heads = config.num_attention_heads
        n_kv = config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        group = n_heads // n_kv

        def rotate_half(x: torch.Tensor) -> torch.Tensor:
            half = x.shape[-1] // 2
            return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

        class FoldedYesNo(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.body = body
                self.config = config  # Optimum's exporter reads model.config
                self.register_buffer("head", head.detach().to(torch.float32).reshape(-1, 1))

            def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, past_key: list[torch.Tensor],
                        past_value: list[torch.Tensor]) -> tuple[Any, ...]:
                batch, length = input_ids.shape[0], input_ids.shape[1]
                past_len = past_key[0].shape[2]
                keep = attention_mask.to(torch.bool)
                # Positions count real tokens only (left and right padding give the same RoPE phases) and
                # continue after the past.
                position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0) + past_len
                causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
                allowed = causal[None, :, :] & keep[:, None, :]  # (B, S, S)
                dtype = next(self.body.parameters()).dtype
                # A finite minimum, not -inf: fully masked pad rows stay finite instead of NaN (NaN in a pad
                # row's values would leak into real rows through 0 * NaN in the attention product).
                bias = torch.zeros(allowed.shape, dtype=dtype, device=input_ids.device)
                bias = bias.masked_fill(~allowed, torch.finfo(dtype).min)[:, None, None, :, :]  # (B,1,1,S,S)
                hidden = self.body.embed_tokens(input_ids)
                cos, sin = self.body.rotary_emb(hidden, position_ids)
                cos, sin = cos[:, None], sin[:, None]  # (B, 1, S, d)
                presents_k, presents_v = [], []
                for i, layer in enumerate(self.body.layers):
                    attn = layer.self_attn
                    residual = hidden
                    h = layer.input_layernorm(hidden)
                    shape = (batch, length, -1, head_dim)
                    q, k = attn.q_proj(h).view(shape), attn.k_proj(h).view(shape)
                    if hasattr(attn, "q_norm"):  # Qwen3 normalises each head of q and k; Qwen2 does not
                        q, k = attn.q_norm(q), attn.k_norm(k)
                    q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, S, d), (B, kv, S, d)
                    v = attn.v_proj(h).view(shape).transpose(1, 2)
                    q = q * cos + rotate_half(q) * sin
                    k = k * cos + rotate_half(k) * sin
                    presents_k.append(k[:1])
                    presents_v.append(v[:1])
                    q5 = q.reshape(batch, n_kv, group, length, head_dim) * attn.scaling
                    own = torch.matmul(q5, k[:, :, None].transpose(-1, -2)) + bias  # (B, kv, g, S, S)
                    shared = torch.matmul(q5, past_key[i][:, :, None].transpose(-1, -2))  # (B, kv, g, S, P)
                    weights = torch.softmax(torch.cat([shared, own], dim=-1), dim=-1, dtype=torch.float32).to(dtype)
                    out = torch.matmul(weights[..., past_len:], v[:, :, None]) + torch.matmul(
                        weights[..., :past_len], past_value[i][:, :, None])  # (B, kv, g, S, d)
                    out = out.reshape(batch, n_heads, length, head_dim).transpose(1, 2).reshape(batch, length, -1)
                    hidden = residual + attn.o_proj(out)
                    residual = hidden
                    hidden = residual + layer.mlp(layer.post_attention_layernorm(hidden))
                hidden = self.body.norm(hidden)
                positions = torch.arange(length, device=input_ids.device)
                last = (attention_mask * positions).argmax(-1)
                picked = hidden[torch.arange(batch, device=input_ids.device), last]
                return (picked.to(torch.float32) @ self.head, presents_k, presents_v)

        module = FoldedYesNo().eval()
        module.cache_shape = (n_kv, head_dim, len(body.layers))
        return module


@register_family("Qwen3ForCausalLM", "Qwen3ForSequenceClassification", "Qwen2ForCausalLM",
                 "Qwen2ForSequenceClassification")
class DecoderYesNoFamily(Family):
    """Qwen3-Reranker / MemReranker, Qwen2-based yes/no rerankers, and their "-seq-cls" conversions.

    Qwen2 differs in the layers (q/k/v projections with a bias, no q/k norms; tied or untied embeddings) and in
    its default prompt (:data:`QWEN2_YES_NO`); ``prompt`` (a :class:`YesNoPrompt`) replaces the default.
    """

    name = DECODER_YES_NO
    #: Right padding: a row's real tokens sit at the same places whatever the width of its batch, so a score does
    #: not move with its neighbours (left padding shifts a row inside the attention reductions by an ulp, which an
    #: int8 activation code can turn into 3e-2 on the 0.6B shape). The official recipe pads left; the graph counts
    #: positions over real tokens only, so both sides give the recipe's scores (both are validated at export).
    padding_side = "right"
    padding_sides = ("left", "right")

    def default_prompt(self) -> YesNoPrompt:
        """The prompt of this checkpoint's model type when none was given."""
        return QWEN2_YES_NO if getattr(self.config, "model_type", "") == "qwen2" else QWEN3_RERANKER

    def load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        if self.prompt is not None and not isinstance(self.prompt, YesNoPrompt):
            raise TypeError(f"prompt must be a YesNoPrompt, got {type(self.prompt).__name__}")
        self.prompt = (self.prompt or YesNoPrompt()).over(self.default_prompt())
        self.is_seq_cls = self.config.architectures[0].endswith("ForSequenceClassification")
        cls = AutoModelForSequenceClassification if self.is_seq_cls else AutoModelForCausalLM
        # eager attention: the export passes its own 4-D additive mask, which eager uses as given.
        self.model = self._from_pretrained(cls, dtype=self.load_dtype or torch.float32,
                                           attn_implementation="eager").eval()
        self.tokenizer = self._tokenizer()
        self.tokenizer.padding_side = "left"
        if self.is_seq_cls and getattr(self.model.config, "num_labels", 1) != 1:
            raise ValueError(f"{self.source}: a -seq-cls reranker must have one label, has {self.model.config.num_labels}")

    def _yes_no_ids(self) -> tuple[int, int]:
        yes = self.tokenizer.convert_tokens_to_ids(self.prompt.yes)
        no = self.tokenizer.convert_tokens_to_ids(self.prompt.no)
        unk = self.tokenizer.unk_token_id
        if yes in (None, unk) or no in (None, unk):
            raise ValueError(f"{self.source}: the tokenizer has no single {self.prompt.yes!r}/{self.prompt.no!r} "
                             "tokens; not a yes/no reranker with these answers (--yes-token/--no-token)")
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

    def template(self) -> tuple[DecoderTemplate, Tokens]:
        backend = self.backend()
        enc = self.tokenizer

        def ids(text: str) -> tuple[int, ...]:
            return tuple(backend.encode(text, add_special_tokens=False).ids)

        prompt = self.prompt
        prefix_ids, suffix_ids = ids(prompt.prefix), ids(prompt.suffix)
        max_length = int(self.max_length or DEFAULT_MAX_LENGTH)
        instruction = self.instruction if self.instruction is not None else DEFAULT_INSTRUCTION
        yes, no = (None, None) if self.is_seq_cls else self._yes_no_ids()
        if max_length <= len(prefix_ids) + len(suffix_ids) + 16:
            raise ValueError(f"--max-length {max_length} leaves no room for query and document after the template")
        probe = "Memories: I moved to Lisbon in 2021, naïve café ☕."
        id_checks = {prompt.prefix: prefix_ids, prompt.suffix: suffix_ids, probe: ids(probe)}
        if yes is not None:  # the runtime re-checks these so a swapped tokenizer.json is refused
            for token, token_id in ((prompt.yes, yes), (prompt.no, no)):
                text = enc.convert_tokens_to_string([token])  # "Ġyes" is the text " yes"
                if ids(text) == (token_id,):
                    id_checks[text] = (token_id,)
        template = DecoderTemplate(
            prefix=prompt.prefix, suffix=prompt.suffix, instruction_piece=INSTRUCTION_PIECE, query_piece=QUERY_PIECE,
            document_piece=DOCUMENT_PIECE, default_instruction=instruction, prefix_ids=prefix_ids,
            suffix_ids=suffix_ids, id_checks=id_checks,
            extra={"body": "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}",
                   "prompt": prompt.name, "answer_tokens": {"yes": prompt.yes, "no": prompt.no},
                   "truncation": "document tokens are cut from the end; prefix, instruction, query and "
                                 "suffix never"},
        )
        pad_id = enc.pad_token_id if enc.pad_token_id is not None else enc.eos_token_id
        score = "logit(yes) - logit(no) at the last real token" if not self.is_seq_cls else "score head logit"
        tokens = Tokens(pad_id=int(pad_id), padding_side=self.padding_side, max_length=max_length, yes_id=yes,
                        no_id=no, extra={"score": score})
        return template, tokens

    def graph_module(self) -> Any:
        body = self.model.model  # the decoder stack with its final norm
        return _FoldedYesNo.build(body, self._head(), self.model.config)

    def cache_layout(self) -> CacheLayout:
        config = self.model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return CacheLayout(
            layers=int(config.num_hidden_layers),
            kv_heads=int(config.num_key_value_heads),
            head_dim=int(head_dim),
            past_batch=1,
            extra={"past_inputs": ["past_key.{i}", "past_value.{i}"],
                   "present_outputs": ["present_key.{i}", "present_value.{i}"],
                   "shared": "template prefix + instruction + query (context included); documents and the "
                             "template suffix go in the suffix pass"},
        )

    def onnx_config(self) -> Any:
        import torch
        from optimum.exporters.onnx.config import TextEncoderOnnxConfig
        from optimum.utils import NormalizedTextConfig

        config = self.model.config
        n_layers = config.num_hidden_layers
        n_kv = config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

        class FoldedYesNoOnnxConfig(TextEncoderOnnxConfig):
            NORMALIZED_CONFIG_CLASS = NormalizedTextConfig
            DEFAULT_ONNX_OPSET = 17

            @property
            def inputs(self) -> dict[str, dict[int, str]]:
                axes = {"input_ids": {0: "batch_size", 1: "sequence_length"},
                        "attention_mask": {0: "batch_size", 1: "sequence_length"}}
                for kind in ("key", "value"):  # batch 1: the cache one query's pairs share
                    axes.update({f"past_{kind}.{i}": {2: "past_length"} for i in range(n_layers)})
                return axes

            @property
            def outputs(self) -> dict[str, dict[int, str]]:
                axes = {"logits": {0: "batch_size"}}
                for kind in ("key", "value"):
                    axes.update({f"present_{kind}.{i}": {2: "sequence_length"} for i in range(n_layers)})
                return axes

            def generate_dummy_inputs(self, framework: str = "pt", **kwargs: Any) -> dict[str, Any]:
                gen = torch.Generator().manual_seed(0)
                ids = torch.randint(0, config.vocab_size, (2, 7), generator=gen)
                mask = torch.ones(2, 7, dtype=torch.int64)
                mask[1, :2] = 0

                def past() -> list[Any]:
                    return [torch.randn(1, n_kv, 5, head_dim, generator=gen) for _ in range(n_layers)]

                dummy = {"input_ids": ids, "attention_mask": mask, "past_key": past(), "past_value": past()}
                if framework == "np":  # Optimum's fix_dynamic_axes runs the graph with numpy inputs
                    return {k: [t.numpy() for t in v] if isinstance(v, list) else v.numpy()
                            for k, v in dummy.items()}
                return dummy

        return FoldedYesNoOnnxConfig(config, task="text-classification")

    def reference(self, query: str, documents: Sequence[str], instruction: str | None) -> np.ndarray:
        """The official recipe: whole body tokenized at once, prefix/suffix ids around it, left padding."""
        import torch

        instruction = self.instruction if instruction is None else instruction
        instruction = DEFAULT_INSTRUCTION if instruction is None else instruction
        tok = self.tokenizer
        prefix_ids = tok.encode(self.prompt.prefix, add_special_tokens=False)
        suffix_ids = tok.encode(self.prompt.suffix, add_special_tokens=False)
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
