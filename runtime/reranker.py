"""The one public entry point: :class:`Reranker`."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from memrerank.calibration import Calibrator
from memrerank.errors import ArtifactError
from memrerank.kernels import DEFAULT_CALL_OVERHEAD, pack_pairs
from memrerank.manifest import PRECISIONS, TOKENIZER_NAME, Manifest, read_manifest, verify_files
from memrerank.runtime.backends import Backend, open_backend, resolve_providers, wants_tensorrt
from memrerank.runtime.backends.onnxruntime import provider_name
from memrerank.runtime.encoding import SplitPairs, make_encoder
from memrerank.runtime.hub import resolve_artifact

__all__ = ["Reranker", "RankHit", "BatchBudget", "BATCH_BUDGETS", "DEFAULT_BATCH_SIZE", "DEFAULT_MAX_BATCH_TOKENS"]

#: Most rows per model call.
DEFAULT_BATCH_SIZE = 32
#: Most padded tokens per model call (rows × width). Bounds activation memory: with the int8 0.6B-shaped decoder,
#: 1,000 candidates × 512 tokens stay under 1.5 GB peak RSS (bench/memory.py).
DEFAULT_MAX_BATCH_TOKENS = 2048
_NO_HEAD = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class BatchBudget:
    """How the packer cuts pairs into model calls on one kind of device.

    Attributes:
        batch_size: most rows per call.
        max_batch_tokens: most padded tokens (rows × width) per call.
        call_overhead: what one more call costs, in padded-token equivalents, weighed against padding.
    """

    batch_size: int
    max_batch_tokens: int
    call_overhead: int


#: Per provider (the first one a backend runs on). The CPU budget bounds activation memory; on a GPU a call costs
#: kernel launches and a host sync, so a typical request (up to 64 candidates of up to 512 tokens) is one call.
BATCH_BUDGETS = {
    "CPUExecutionProvider": BatchBudget(DEFAULT_BATCH_SIZE, DEFAULT_MAX_BATCH_TOKENS, DEFAULT_CALL_OVERHEAD),
    "CUDAExecutionProvider": BatchBudget(64, 64 * 512, 4096),
    "TensorrtExecutionProvider": BatchBudget(64, 64 * 512, 4096),
    "TensorRT engine": BatchBudget(64, 64 * 512, 4096),
}


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

    Public hooks (what a benchmark or an embedding application may set after loading): ``batch_size``,
    ``max_batch_tokens``, ``prefix_reuse``, ``padding_side``, ``call_overhead`` (the packer's per-call cost in
    padded-token equivalents) and ``packer`` (the function that cuts pairs into batches, with
    :func:`memrerank.kernels.pack_pairs`'s signature; e.g. ``memrerank.kernels.pack_numpy``). To tokenize once
    and score later (after looking at the token ids): ``encoder.split(query, documents)`` then :meth:`score_split`.
    """

    def __init__(self, root: Path, manifest: Manifest, precision: str, backend: Backend,
                 tokenizer: Tokenizer, batch_size: int = DEFAULT_BATCH_SIZE,
                 max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS, prefix_reuse: bool = False) -> None:
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
        #: Cuts pairs into padded batches (native kernel when built, else numpy).
        self.packer: Callable[..., Any] = pack_pairs
        self.family: str = manifest.family
        self.padding_side: str = manifest.tokens.padding_side
        self.pad_id: int = manifest.tokens.pad_id
        self.encoder = make_encoder(manifest, tokenizer)
        calibration = manifest.calibration.get(precision)
        self.calibrator = Calibrator.from_params(calibration.method, calibration.params) if calibration \
            else Calibrator()

    @classmethod
    def load(cls, path: str | Path, precision: str = "fp32", providers: Sequence[str] | str | None = None,
             batch_size: int | None = None, threads: int | None = None, *,
             max_batch_tokens: int | None = None, prefix_reuse: bool | None = None,
             allow_tf32: bool = False, io_binding: bool | None = None) -> Reranker:
        """Open an artifact directory written by ``memrerank export``.

        Args:
            path: the artifact directory — or a hub id (``"Qwen/Qwen3-Reranker-0.6B"``) or a Hugging Face checkpoint
                directory, exported on first use into the cache (``$MEMRERANK_CACHE``, default
                ``~/.cache/memrerank``; needs the export extra and, for a hub id, the network) and loaded from
                there afterwards (:mod:`memrerank.runtime.hub`).
            precision: one of the exported precisions (see ``memrerank info``), or ``"auto"``: the fastest
                exported precision for the first provider that met its fidelity budget at export. With
                ``providers=["tensorrt"]`` a TensorRT engine precision (``build-engine``) loads on its own.
            providers: onnxruntime providers or aliases (``"cpu"``, ``"cuda"``, ``"tensorrt"``); ``None`` = CPU.
            batch_size: most rows per model call (``None``: the provider's :data:`BATCH_BUDGETS` entry, 32 on
                the CPU, 64 on a GPU).
            threads: intra-op threads for onnxruntime (``None`` = onnxruntime's default).
            max_batch_tokens: most padded tokens (rows × width) per model call; bounds peak memory (``None``:
                the provider's budget, 2,048 on the CPU, 32,768 on a GPU).
            prefix_reuse: decoder artifacts: run the part every pair of a query shares (template, instruction,
                context, query) once and score the documents against its cached keys/values. ``None`` = on
                where the artifact supports it; ``False`` scores whole pairs. Same scores either way (1e-4, fp32).
            allow_tf32: CUDA provider: let fp32 products use TF32 (faster; logits move by ~1e-3). Off by default.
            io_binding: bind inputs and outputs on the provider's device, the prefix cache staying there between
                batches; ``None`` = on for GPU providers, off on the CPU (same scores either way).

        Raises:
            ArtifactError: missing/corrupted files or an unknown schema, with what to do.
            ProviderError: an unavailable provider was asked for, or one onnxruntime could not start.
        """
        if precision not in PRECISIONS and precision != "auto":
            raise ValueError(f"precision: unknown {precision!r}; choose one of {', '.join(PRECISIONS)} or 'auto'")
        if batch_size is not None:
            _positive_int(batch_size, "batch_size")
        if max_batch_tokens is not None:
            _positive_int(max_batch_tokens, "max_batch_tokens")
        if prefix_reuse not in (None, True, False):
            raise ValueError(f"prefix_reuse must be True, False or None, got {prefix_reuse!r}")
        # the provider only picks what a hub id exports; availability is checked where the backend opens
        first = providers.split(",")[0] if isinstance(providers, str) else (list(providers)[0] if providers else None)
        root = resolve_artifact(path, precision, provider_name(first.strip()) if isinstance(first, str)
                                else "CPUExecutionProvider")
        manifest = read_manifest(root)
        if precision == "auto":
            precision = manifest.pick_auto(resolve_providers(providers)[0])
        elif not (precision in manifest.engines and wants_tensorrt(providers)):
            manifest.precision(precision)  # raises naming the exported precisions
        verify_files(root, manifest.tokenizer_files)
        tokenizer = Tokenizer.from_file(str(root / TOKENIZER_NAME))
        tokenizer.no_truncation()
        tokenizer.no_padding()
        _check_tokenizer(tokenizer, manifest)
        backend = open_backend(root, manifest, precision, providers, threads, allow_tf32=allow_tf32,
                               io_binding=io_binding)
        supported = manifest.prefix_reuse is not None and backend.has_past
        if prefix_reuse and not supported:
            raise ArtifactError(
                f"{root}: prefix_reuse=True needs a decoder artifact whose graph takes a shared past; this one "
                f"({manifest.family}{', TensorRT engine' if precision in manifest.engines and wants_tensorrt(providers) else ''}) "
                "has none. Re-export it with this memrerank version "
                "(`memrerank export MODEL -o OUT --force`) or pass prefix_reuse=False")
        entry = manifest.precisions.get(precision)
        meant_for = entry.providers if entry is not None and not wants_tensorrt(providers) else ()
        if meant_for and backend.providers[0] not in meant_for:
            warnings.warn(
                f"precision {precision!r} is meant for {', '.join(meant_for)}; on {backend.providers[0]} it runs "
                "correctly but is not expected to be faster than fp32", stacklevel=2)
        budget = BATCH_BUDGETS.get(backend.providers[0], BATCH_BUDGETS["CPUExecutionProvider"])
        reranker = cls(root, manifest, precision, backend, tokenizer, batch_size or budget.batch_size,
                       max_batch_tokens or budget.max_batch_tokens, supported if prefix_reuse is None else prefix_reuse)
        reranker.call_overhead = budget.call_overhead
        return reranker

    # ------------------------------------------------------------------ scoring
    def _score_groups(self, groups: Iterable[tuple[str, list[int], list[str]]], n: int, instruction: str | None,
                      context: Sequence[str] = (), stats: dict[str, float] | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
        """Tokenize every group's pairs and score them; returns logits and truncation flags in the caller's order.

        ``stats`` (if given) accumulates seconds spent tokenizing, packing and in the model, and token/pad counts.
        """
        t0 = time.perf_counter()
        splits: list[tuple[np.ndarray, SplitPairs]] = [
            (np.asarray(idx, dtype=np.int64), self.encoder.split(q, docs, instruction, context))
            for q, idx, docs in groups]
        if stats is not None:
            stats["tokenize_s"] = stats.get("tokenize_s", 0) + time.perf_counter() - t0
        return self._score_splits(splits, n, stats)

    def _score_splits(self, splits: list[tuple[np.ndarray, SplitPairs]], n: int,
                      stats: dict[str, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Score tokenized groups; ``splits`` pairs each group with where its rows go in the ``n`` results.

        With ``prefix_reuse`` on, every query group (one document included) runs its shared prefix once and its
        documents on top of it, so a document takes the same path, and gets the same score, whatever else shares
        the call; with it off, all pairs are packed together as whole pairs.
        """
        clock = time.perf_counter
        t_pack = t_model = 0.0
        tokens = padded = 0
        logits = np.empty(n, dtype=np.float32)
        truncated = np.zeros(n, dtype=bool)
        left = self.padding_side == "left"
        whole: list[tuple[np.ndarray, SplitPairs]] = []

        def run(packed: Any, where: np.ndarray, past: Any = None) -> float:
            t = clock()
            for b in packed:
                logits[where[b.rows]] = self.backend.score(b.input_ids, b.attention_mask, b.token_type_ids, past)
            return clock() - t

        for where, sp in splits:
            if not self.prefix_reuse:
                whole.append((where, sp))
                continue
            t = clock()
            past = self.backend.prefix(sp.head)
            t_model += clock() - t
            t = clock()
            packed = self.packer([_NO_HEAD], np.zeros(len(sp.docs), np.int64), sp.docs, sp.tail, [sp.budget],
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
            packed = self.packer([sp.head for _, sp in whole], row_head, docs, whole[0][1].tail,
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
            for key, value in (("pack_s", t_pack), ("model_s", t_model),
                               ("tokens", tokens), ("padded_tokens", padded)):
                stats[key] = stats.get(key, 0) + value
        return logits, truncated

    def _group_pairs(self, pairs: Sequence[tuple[str, str]]) -> dict[str, tuple[list[int], list[str]]]:
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
        return by_query

    def predict_with_truncation(self, pairs: Sequence[tuple[str, str]], raw: bool = False,
                                instruction: str | None = None, *, context: Sequence[str] | None = None,
                                stats: dict[str, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """As :meth:`predict`, and also which documents were shortened to fit the model's max length.

        Returns:
            ``(scores, truncated)``: float32 scores and a bool array, one each per pair, in the order given.
        """
        by_query = self._group_pairs(pairs)
        if instruction is not None:
            _check_text(instruction, "instruction")
        context = _check_context(context)
        n = len(pairs)
        if n == 0:
            return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=bool)
        logits, truncated = self._score_groups(((q, idx, docs) for q, (idx, docs) in by_query.items()), n,
                                               instruction, context, stats)
        return (logits if raw else self.calibrator(logits)), truncated

    def score_split(self, splits: Sequence[SplitPairs], raw: bool = False, *,
                    stats: dict[str, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Score documents tokenized beforehand by ``self.encoder.split(query, documents)``, one split per query.

        For a caller that needs the token ids before scoring and should not tokenize twice: ``memrerank serve``
        tokenizes each request once, off its event loop, checks the per-document token limit on the ids and
        may keep only each document's first tokens (``split.docs[i][:n]``), then merges requests into one call
        here. Scores equal :meth:`predict_with_truncation` on the same pairs.

        Args:
            splits: :class:`~memrerank.runtime.encoding.SplitPairs` made by this reranker's ``encoder``.
            raw: return the model logit instead of the calibrated probability.
            stats: as in :meth:`predict` (no tokenizing time: that happened before).

        Returns:
            ``(scores, truncated)``: one float32 score and one bool per document, split after split.

        Raises:
            TypeError: an item is not a ``SplitPairs``.
        """
        if isinstance(splits, SplitPairs) or not isinstance(splits, Sequence):
            raise TypeError("splits must be a sequence of SplitPairs (from reranker.encoder.split)")
        where, start = [], 0
        for i, sp in enumerate(splits):
            if not isinstance(sp, SplitPairs):
                raise TypeError(f"splits[{i}] must be a SplitPairs (from reranker.encoder.split), got "
                                f"{type(sp).__name__}")
            where.append((np.arange(start, start + len(sp.docs), dtype=np.int64), sp))
            start += len(sp.docs)
        if start == 0:
            return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=bool)
        logits, truncated = self._score_splits([w for w in where if len(w[0])], start, stats)
        return (logits if raw else self.calibrator(logits)), truncated

    def predict(self, pairs: Sequence[tuple[str, str]], raw: bool = False, instruction: str | None = None, *,
                context: Sequence[str] | None = None, stats: dict[str, float] | None = None) -> np.ndarray:
        """Score pairs.

        Args:
            pairs: ``(query, document)`` tuples; pairs sharing a query are tokenized together.
            raw: return the model logit instead of the calibrated probability.
            instruction: decoder family only; ``None`` uses the artifact's default instruction.
            context: previous dialogue turns, oldest first, added to every pair's query side.
            stats: a dict that receives seconds spent tokenizing / packing / in the model and token counts.

        Returns:
            float32 array, one score per pair, in the order given (empty for no pairs). Which documents were
            truncated: :meth:`predict_with_truncation`.
        """
        return self.predict_with_truncation(pairs, raw, instruction, context=context, stats=stats)[0]

    def rank(self, query: str, documents: Sequence[str], top_k: int | None = None, threshold: float | None = None,
             instruction: str | None = None, *, context: Sequence[str] | None = None,
             stats: dict[str, float] | None = None) -> list[RankHit]:
        """Rank documents for one query, best first.

        Args:
            query: the question.
            documents: candidate memories (not modified); an empty list gives ``[]``.
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
        if not docs:
            return []
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


def _check_tokenizer(tokenizer: Tokenizer, manifest: Manifest) -> None:
    """Refuse a tokenizer whose ids disagree with the manifest (a swapped or edited tokenizer.json)."""
    for text, ids in manifest.template.id_checks.items():
        got = tokenizer.encode(text, add_special_tokens=False).ids
        if tuple(got) != ids:
            raise ArtifactError(
                f"tokenizer.json tokenizes {text!r} as {got}, the manifest records {list(ids)}: the tokenizer does not "
                "belong to this artifact; re-export with `memrerank export MODEL -o OUT --force`"
            )
