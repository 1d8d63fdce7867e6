"""The one public entry point: :class:`Reranker`."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from memrerank.calibration import Calibrator
from memrerank.errors import ArtifactError
from memrerank.manifest import (
    PRECISIONS,
    TOKENIZER_NAME,
    model_files,
    pick_auto_precision,
    read_manifest,
    verify_files,
)
from memrerank.kernels import DEFAULT_CALL_OVERHEAD, pack_pairs
from memrerank.runtime.backends.onnxruntime import PROVIDER_ALIASES, OrtBackend, resolve_providers
from memrerank.runtime.encoding import SplitPairs, make_encoder

__all__ = ["Reranker", "RankHit", "DEFAULT_BATCH_SIZE", "DEFAULT_MAX_BATCH_TOKENS"]

#: Most rows per model call.
DEFAULT_BATCH_SIZE = 32
#: Most padded tokens per model call (rows × width). Bounds activation memory: with the int8 0.6B-shaped decoder,
#: 1,000 candidates × 512 tokens stay under 1.5 GB peak RSS (bench/memory.py).
DEFAULT_MAX_BATCH_TOKENS = 2048
_NO_HEAD = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class RankHit:
    """One ranked document.

    Attributes:
        index: position of the document in the list the caller passed.
        score: calibrated probability in [0, 1].
        logit: the raw model logit.
        text: the document as passed.
        truncated: whether the document was shortened to fit the model's max length.
    """

    index: int
    score: float
    logit: float
    text: str
    truncated: bool


def _check_text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be str, got {type(value).__name__}")
    return value


def _check_context(context: Any) -> tuple[str, ...]:
    if context is None:
        return ()
    if isinstance(context, (str, bytes)) or not isinstance(context, Sequence):
        raise TypeError("context must be a sequence of previous turns (str), oldest first, or None")
    return tuple(_check_text(t, f"context[{i}]") for i, t in enumerate(context))


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class Reranker:
    """Scores (query, document) pairs with an exported artifact; imports no torch or transformers.

    Thread safety: one instance may be shared by threads; onnxruntime sessions are thread-safe for ``run`` and
    the instance keeps no per-call state apart from a bounded instruction-id cache.
    """

    def __init__(self, root: Path, manifest: dict[str, Any], precision: str, backend: OrtBackend,
                 tokenizer: Tokenizer, batch_size: int, max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
                 prefix_reuse: bool = False) -> None:
        self.root = root
        self.manifest = manifest
        self.precision = precision
        self.backend = backend
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.prefix_reuse = prefix_reuse
        #: Per-call cost, in padded-token equivalents, the packer weighs against padding when cutting batches.
        self.call_overhead = DEFAULT_CALL_OVERHEAD
        self.family: str = manifest["family"]
        self.padding_side: str = manifest["tokens"]["padding_side"]
        self.pad_id: int = int(manifest["tokens"]["pad_id"])
        self.encoder = make_encoder(manifest, tokenizer)
        self.calibrator = Calibrator.from_block(manifest.get("calibration", {}).get(precision))

    @classmethod
    def load(cls, path: str | Path, precision: str = "fp32", providers: Sequence[str] | str | None = None,
             batch_size: int = DEFAULT_BATCH_SIZE, threads: int | None = None, *,
             max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS, prefix_reuse: bool | None = None) -> Reranker:
        """Open an artifact directory written by ``memrerank export``.

        Args:
            path: the artifact directory.
            precision: one of the exported precisions (see ``memrerank info``), or ``"auto"``: the fastest
                exported precision for the first provider that met its fidelity budget at export.
            providers: onnxruntime providers or aliases (``"cpu"``, ``"cuda"``, ``"tensorrt"``); ``None`` = CPU.
            batch_size: most rows per model call.
            threads: intra-op threads for onnxruntime (``None`` = onnxruntime's default).
            max_batch_tokens: most padded tokens (rows × width) per model call; bounds peak memory.
            prefix_reuse: decoder artifacts: run the part every pair of a query shares (template, instruction,
                context, query) once and score the documents against its cached keys/values. ``None`` = on
                where the artifact supports it; ``False`` scores whole pairs. Same scores either way (1e-4, fp32).

        Raises:
            ArtifactError: missing/corrupted files or an unknown schema, with what to do.
            ProviderError: an unavailable provider was asked for.
        """
        if precision not in PRECISIONS and precision != "auto":
            raise ValueError(f"precision: unknown {precision!r}; choose one of {', '.join(PRECISIONS)} or 'auto'")
        _positive_int(batch_size, "batch_size")
        _positive_int(max_batch_tokens, "max_batch_tokens")
        if prefix_reuse not in (None, True, False):
            raise ValueError(f"prefix_reuse must be True, False or None, got {prefix_reuse!r}")
        root = Path(path)
        manifest = read_manifest(root)
        if precision == "auto":
            precision = pick_auto_precision(manifest, resolve_providers(providers)[0])
        files = model_files(manifest, precision)
        verify_files(root, files)
        verify_files(root, manifest["tokenizer"]["files"])
        tokenizer = Tokenizer.from_file(str(root / TOKENIZER_NAME))
        tokenizer.no_truncation()
        tokenizer.no_padding()
        _check_tokenizer(tokenizer, manifest)
        graph = root / manifest["precisions"][precision]["graph"]
        engine = manifest.get("engines", {}).get(precision)
        if engine is not None and _wants_tensorrt(providers):
            backend = _tensorrt_backend(root, precision, engine, manifest)
        else:
            backend = OrtBackend(graph, providers=providers, threads=threads)
        supported = bool(manifest.get("prefix_reuse")) and backend.has_past
        if prefix_reuse and not supported:
            raise ArtifactError(
                f"{root}: prefix_reuse=True needs a decoder artifact whose graph takes a shared past; this one "
                f"({manifest['family']}) has none. Re-export it with this memrerank version "
                "(`memrerank export MODEL -o OUT --force`) or pass prefix_reuse=False")
        meant_for = manifest["precisions"][precision].get("providers", [])
        if meant_for and backend.providers[0] not in meant_for:
            warnings.warn(
                f"precision {precision!r} is meant for {', '.join(meant_for)}; on {backend.providers[0]} it runs "
                "correctly but is not expected to be faster than fp32", stacklevel=2)
        return cls(root, manifest, precision, backend, tokenizer, batch_size, max_batch_tokens,
                   supported if prefix_reuse is None else prefix_reuse)

    # ------------------------------------------------------------------ scoring
    def _score_groups(self, groups: Iterable[tuple[str, list[int], list[str]]], n: int, instruction: str | None,
                      context: Sequence[str] = (), stats: dict[str, float] | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
        """Score every group's pairs; returns logits and truncation flags in the caller's order.

        Groups of two or more documents reuse their shared prefix when ``prefix_reuse`` is on; the others are
        packed together as whole pairs. ``stats`` (if given) accumulates seconds spent tokenizing, packing and
        in the model, and token/pad counts.
        """
        clock = time.perf_counter
        t0 = clock()
        splits: list[tuple[np.ndarray, SplitPairs]] = [
            (np.asarray(idx, dtype=np.int64), self.encoder.split(q, docs, instruction, context))
            for q, idx, docs in groups]
        t_tok = clock() - t0
        t_pack = t_model = 0.0
        tokens = padded = 0
        logits = np.empty(n, dtype=np.float32)
        truncated = np.zeros(n, dtype=bool)
        left = self.padding_side == "left"
        whole: list[tuple[np.ndarray, SplitPairs]] = []

        def run(packed: Any, where: np.ndarray, past: dict[str, np.ndarray] | None = None) -> float:
            t = clock()
            for b in packed:
                logits[where[b.rows]] = self.backend(b.input_ids, b.attention_mask, b.token_type_ids, past=past)
            return clock() - t

        for where, sp in splits:
            if not (self.prefix_reuse and len(sp.docs) >= 2):
                whole.append((where, sp))
                continue
            t = clock()
            past = self.backend.prefix(sp.head)
            t_model += clock() - t
            t = clock()
            packed = pack_pairs([_NO_HEAD], np.zeros(len(sp.docs), np.int64), sp.docs, sp.tail, [sp.budget],
                                pad_id=self.pad_id, left=left, max_rows=self.batch_size,
                                max_tokens=self.max_batch_tokens, call_overhead=self.call_overhead)
            t_pack += clock() - t
            truncated[where] = packed.truncated
            tokens += int(packed.lengths.sum()) + len(sp.head)
            padded += int(packed.offsets[-1]) + len(sp.head)
            t_model += run(packed, where, past)
        if whole:
            t = clock()
            where = np.concatenate([w for w, _ in whole])
            row_head = np.concatenate([np.full(len(sp.docs), g, np.int64) for g, (_, sp) in enumerate(whole)])
            docs = [d for _, sp in whole for d in sp.docs]
            with_types = whole[0][1].head_types is not None
            packed = pack_pairs([sp.head for _, sp in whole], row_head, docs, whole[0][1].tail,
                                [sp.budget for _, sp in whole], pad_id=self.pad_id, left=left,
                                max_rows=self.batch_size, max_tokens=self.max_batch_tokens,
                                head_types=[sp.head_types for _, sp in whole] if with_types else None,
                                doc_type=whole[0][1].doc_type, tail_types=whole[0][1].tail_types,
                                call_overhead=self.call_overhead)
            t_pack += clock() - t
            truncated[where] = packed.truncated
            tokens += int(packed.lengths.sum())
            padded += int(packed.offsets[-1])
            t_model += run(packed, where)
        if stats is not None:
            for key, value in (("tokenize_s", t_tok), ("pack_s", t_pack), ("model_s", t_model),
                               ("tokens", tokens), ("padded_tokens", padded)):
                stats[key] = stats.get(key, 0) + value
        return logits, truncated

    def predict(self, pairs: Sequence[tuple[str, str]], raw: bool = False, instruction: str | None = None,
                return_truncated: bool = False, *, context: Sequence[str] | None = None,
                stats: dict[str, float] | None = None) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Score pairs.

        Args:
            pairs: ``(query, document)`` tuples; pairs sharing a query are tokenized together.
            raw: return the model logit instead of the calibrated probability.
            instruction: decoder family only; ``None`` uses the artifact's default instruction.
            return_truncated: also return a bool array telling which documents were shortened.
            context: previous dialogue turns, oldest first, added to every pair's query side.
            stats: a dict that receives seconds spent tokenizing / packing / in the model and token counts.

        Returns:
            float32 array, one score per pair, in the order given.
        """
        if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
            raise TypeError("pairs must be a sequence of (query, document) tuples")
        by_query: dict[str, tuple[list[int], list[str]]] = {}
        for i, pair in enumerate(pairs):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise TypeError(f"pairs[{i}] must be a (query, document) tuple, got {pair!r:.80}")
            q = _check_text(pair[0], f"pairs[{i}][0] (query)")
            d = _check_text(pair[1], f"pairs[{i}][1] (document)")
            slot = by_query.setdefault(q, ([], []))
            slot[0].append(i)
            slot[1].append(d)
        if instruction is not None:
            _check_text(instruction, "instruction")
        context = _check_context(context)
        n = len(pairs)
        if n == 0:
            empty = np.zeros(0, dtype=np.float32)
            return (empty, np.zeros(0, dtype=bool)) if return_truncated else empty
        logits, truncated = self._score_groups(((q, idx, docs) for q, (idx, docs) in by_query.items()), n,
                                               instruction, context, stats)
        scores = logits if raw else self.calibrator(logits)
        return (scores, truncated) if return_truncated else scores

    def rank(self, query: str, documents: Sequence[str], top_k: int | None = None, threshold: float | None = None,
             instruction: str | None = None, context: Sequence[str] | None = None, *,
             stats: dict[str, float] | None = None) -> list[RankHit]:
        """Rank documents for one query, best first.

        Args:
            query: the question.
            documents: candidate memories (not modified).
            top_k: keep at most this many hits (``None`` = all).
            threshold: keep hits whose calibrated probability is ``>= threshold`` (in [0, 1]).
            instruction: decoder family only; ``None`` uses the artifact's default instruction.
            context: previous dialogue turns, oldest first, that disambiguate the question ("what about her
                sister?"). They join the query side (the reused prefix, for decoders), most recent kept first
                when space runs out; the question itself is never cut.
            stats: a dict that receives seconds spent tokenizing / packing / in the model / post-processing
                and token counts.
        """
        _check_text(query, "query")
        if isinstance(documents, (str, bytes)) or not isinstance(documents, Sequence):
            raise TypeError("documents must be a sequence of str")
        if len(documents) == 0:
            raise ValueError("documents: empty list; pass at least one document")
        docs = [_check_text(d, f"documents[{i}]") for i, d in enumerate(documents)]
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0):
            raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
        if threshold is not None:
            if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not (
                    math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
                raise ValueError(f"threshold must be a probability in [0, 1] or None, got {threshold!r}")
        if instruction is not None:
            _check_text(instruction, "instruction")
        context = _check_context(context)
        logits, truncated = self._score_groups([(query, list(range(len(docs))), docs)], len(docs), instruction,
                                               context, stats)
        t = time.perf_counter()
        probs = self.calibrator(logits)
        order = np.argsort(-logits, kind="stable")
        if threshold is not None:
            order = order[probs[order] >= threshold]
        if top_k is not None:
            order = order[:top_k]
        hits = [RankHit(int(i), float(probs[i]), float(logits[i]), docs[i], bool(truncated[i])) for i in order]
        if stats is not None:
            stats["post_s"] = stats.get("post_s", 0.0) + time.perf_counter() - t
        return hits

    def __repr__(self) -> str:
        return (f"Reranker({str(self.root)!r}, family={self.family!r}, precision={self.precision!r}, "
                f"providers={self.backend.providers})")


def _wants_tensorrt(providers: Sequence[str] | str | None) -> bool:
    """Whether the first provider asked for is TensorRT (alias or onnxruntime name, as resolve_providers reads)."""
    names = [providers] if isinstance(providers, str) else list(providers or [])
    first = str(names[0]) if names else ""
    return PROVIDER_ALIASES.get(first.lower(), first) == PROVIDER_ALIASES["tensorrt"]


def _tensorrt_backend(root: Path, precision: str, engine: dict[str, Any], manifest: dict[str, Any]) -> Any:
    """The artifact's TensorRT engine for ``precision`` (built by ``memrerank build-engine``)."""
    from memrerank.errors import ProviderError
    from memrerank.runtime.backends.tensorrt import TensorRTBackend

    verify_files(root, engine["files"])
    try:
        return TensorRTBackend(root, precision, engine, manifest)
    except RuntimeError as exc:
        raise ProviderError(f"providers: 'tensorrt' asked for, but {exc}") from exc


def _check_tokenizer(tokenizer: Tokenizer, manifest: dict[str, Any]) -> None:
    """Refuse a tokenizer whose ids disagree with the manifest (a swapped or edited tokenizer.json)."""
    tpl = manifest["template"]
    checks = tpl.get("id_checks", {})
    for text, ids in checks.items():
        got = tokenizer.encode(text, add_special_tokens=False).ids
        if got != ids:
            raise ArtifactError(
                f"tokenizer.json tokenizes {text!r} as {got}, the manifest records {ids}: the tokenizer does not "
                "belong to this artifact; re-export with `memrerank export MODEL -o OUT --force`"
            )
