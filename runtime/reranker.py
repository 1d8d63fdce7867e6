"""The one public entry point: :class:`Reranker`."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from memrerank.calibration import Calibrator
from memrerank.errors import ArtifactError
from memrerank.manifest import TOKENIZER_NAME, Manifest, load_verified, read_manifest
from memrerank.runtime.backends import Backend, resolve_providers
from memrerank.runtime.encoding import SplitPairs, make_encoder
from memrerank.runtime.hub import resolve_artifact
from memrerank.runtime.options import LoadOptions
from memrerank.runtime.scorer import Placed, Scorer

__all__ = ["Reranker", "RankHit"]


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


def _scorer_hook(name: str, doc: str) -> property:
    """A Reranker attribute that reads and sets its scorer's (one place holds the value and its checks)."""
    return property(lambda self: getattr(self.scorer, name), lambda self, value: setattr(self.scorer, name, value),
                    doc=doc)


class Reranker:
    """Scores (query, document) pairs with an exported artifact; imports no torch or transformers.

    Thread safety: one instance may be shared by threads; onnxruntime sessions are thread-safe for ``run`` and
    the instance keeps no per-call state apart from a bounded instruction-id cache.

    What scores: ``scorer`` (:class:`~memrerank.runtime.scorer.Scorer`: packer, batch budget, prefix path, one
    backend). Its public hooks (``batch_size``, ``max_batch_tokens``, ``prefix_reuse``, ``padding_side``,
    ``call_overhead``, ``packer``) can be read and set here too. To tokenize once and score later (after looking
    at the token ids): ``encoder.split(query, documents)`` then :meth:`score_split`. Another graph of the same
    artifact (a candidate being judged): :meth:`with_graph`.
    """

    def __init__(self, root: Path, manifest: Manifest, precision: str, scorer: Scorer, tokenizer: Tokenizer) -> None:
        if not isinstance(scorer, Scorer):
            raise TypeError(f"scorer must be a memrerank.runtime.scorer.Scorer, got {type(scorer).__name__}")
        self.root = root
        self.manifest = manifest
        self.precision = precision
        self.scorer = scorer
        self.tokenizer = tokenizer
        self.family: str = manifest.family
        self.pad_id: int = manifest.tokens.pad_id
        self.encoder = make_encoder(manifest, tokenizer)
        calibration = manifest.calibration.get(precision)
        self.calibrator = Calibrator.from_params(calibration.method, calibration.params) if calibration \
            else Calibrator()

    @classmethod
    def load(cls, path: str | Path, options: LoadOptions | str | None = None, *, precision: str | None = None,
             providers: Sequence[str] | str | None = None, threads: int | None = None,
             batch_size: int | None = None, max_batch_tokens: int | None = None, prefix_reuse: bool | None = None,
             allow_tf32: bool | None = None, io_binding: bool | None = None) -> Reranker:
        """Open an artifact directory written by ``memrerank export``.

        Args:
            path: the artifact directory — or a hub id (``"Qwen/Qwen3-Reranker-0.6B"``) or a Hugging Face checkpoint
                directory, exported on first use into the cache (``$MEMRERANK_CACHE``, default
                ``~/.cache/memrerank``; needs the export extra and, for a hub id, the network) and loaded from
                there afterwards (:mod:`memrerank.runtime.hub`).
            options: how to load and run it (:class:`~memrerank.runtime.options.LoadOptions`; default: fp32 on the
                CPU); a string is a precision (``Reranker.load(path, "int8")``). With ``precision="auto"``: the
                fastest exported precision for the first provider that met its fidelity budget at export. With
                ``providers=["tensorrt"]`` a TensorRT engine precision (``build-engine``) loads on its own.
            precision, providers, threads, batch_size, max_batch_tokens, prefix_reuse, allow_tf32, io_binding:
                the :class:`LoadOptions` fields, as keywords; one that is not ``None`` overrides ``options``.

        Raises:
            ArtifactError: missing/corrupted files or an unknown schema, with what to do.
            ProviderError: an unavailable provider was asked for, or one onnxruntime could not start.
            ValueError: an option out of range, naming it.
        """
        if isinstance(options, str):
            options = LoadOptions(precision=options)
        options = LoadOptions.merge(options, precision=precision, providers=providers, threads=threads,
                                    batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                                    prefix_reuse=prefix_reuse, allow_tf32=allow_tf32, io_binding=io_binding)
        # the provider only picks what a hub id exports; availability is checked where the backend opens
        root = resolve_artifact(path, options.precision, options.first_provider)
        manifest = read_manifest(root)
        engine = options.precision in manifest.engines and options.wants_tensorrt
        if options.precision == "auto":
            options = options.replace(precision=manifest.pick_auto(resolve_providers(options.providers)[0]))
        elif not engine:
            manifest.precision(options.precision)  # raises naming the exported precisions
        tokenizer = _load_tokenizer(root, manifest)
        scorer = Scorer.open(root, manifest, options)
        entry = manifest.precisions.get(options.precision)
        meant_for = entry.providers if entry is not None and not engine else ()
        runs_on = scorer.backend.providers[0]
        if meant_for and runs_on not in meant_for:
            warnings.warn(
                f"precision {options.precision!r} is meant for {', '.join(meant_for)}; on {runs_on} it runs "
                "correctly but is not expected to be faster than fp32", stacklevel=2)
        return cls(root, manifest, options.precision, scorer, tokenizer)

    def with_scorer(self, scorer: Scorer) -> Reranker:
        """This reranker (artifact, tokenizer, template, calibration) scoring through ``scorer`` instead."""
        return type(self)(self.root, self.manifest, self.precision, scorer, self.tokenizer)

    def with_graph(self, graph: str | Path, options: LoadOptions | None = None) -> Reranker:
        """This reranker over another ONNX graph of the same artifact: a candidate precision being judged by
        export's fidelity search or a benchmark (:meth:`Scorer.open` with ``graph=``; not hash-checked)."""
        options = LoadOptions.merge(options, precision=self.precision)
        return self.with_scorer(Scorer.open(self.root, self.manifest, options, graph=graph))

    # ------------------------------------------------------------------ the scorer's hooks
    @property
    def backend(self) -> Backend:
        """What runs the graph (the scorer's backend)."""
        return self.scorer.backend

    batch_size = _scorer_hook("batch_size", "Most rows per model call.")
    max_batch_tokens = _scorer_hook("max_batch_tokens", "Most padded tokens (rows × width) per model call.")
    prefix_reuse = _scorer_hook("prefix_reuse", "Whether each query's shared prefix runs once and its documents "
                                "on top of its cache (True needs a graph that takes a shared past).")
    padding_side = _scorer_hook("padding_side", "Where padding goes (the artifact's side).")
    call_overhead = _scorer_hook("call_overhead", "The packer's per-call cost, in padded-token equivalents, "
                                 "weighed against padding.")
    packer = _scorer_hook("packer", "Cuts pairs into padded batches (native kernel when built, else numpy).")

    # ------------------------------------------------------------------ scoring
    def _score_groups(self, groups: Iterable[tuple[str, list[int], list[str]]], n: int, instruction: str | None,
                      context: Sequence[str] = (), stats: dict[str, float] | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
        """Tokenize every group's pairs and score them; returns logits and truncation flags in the caller's order.

        ``stats`` (if given) accumulates seconds spent tokenizing, packing and in the model, and token/pad counts.
        """
        t0 = time.perf_counter()
        splits: list[Placed] = [
            (np.asarray(idx, dtype=np.int64), self.encoder.split(q, docs, instruction, context))
            for q, idx, docs in groups]
        if stats is not None:
            stats["tokenize_s"] = stats.get("tokenize_s", 0) + time.perf_counter() - t0
        return self.scorer.score(splits, n, stats)

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
        logits, truncated = self.scorer.score([w for w in where if len(w[0])], start, stats)
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


def _load_tokenizer(root: Path, manifest: Manifest) -> Tokenizer:
    """The artifact's tokenizer, built from the very bytes that were hash-checked (read once: nothing opens
    ``tokenizer.json`` again after the check), then checked against the manifest's ids; no truncation or padding
    (the packer does both)."""
    if TOKENIZER_NAME not in manifest.tokenizer_files:  # read_manifest refuses this; a hand-built Manifest may not
        raise ArtifactError(f"{root}: the manifest does not list {TOKENIZER_NAME}, so it cannot be verified; "
                            f"re-export with `memrerank export MODEL -o {root} --force`")

    def parse(contents: Mapping[str, bytes]) -> Tokenizer:
        try:
            return Tokenizer.from_str(contents[TOKENIZER_NAME].decode("utf-8"))
        except Exception as exc:  # not UTF-8, or tokenizers' own exception type
            raise ArtifactError(f"{root / TOKENIZER_NAME} could not be parsed ({exc}); re-export with "
                                f"`memrerank export MODEL -o {root} --force`") from exc

    tokenizer = load_verified(root, manifest.tokenizer_files, parse)
    tokenizer.no_truncation()
    tokenizer.no_padding()
    _check_tokenizer(tokenizer, manifest)
    return tokenizer


def _check_tokenizer(tokenizer: Tokenizer, manifest: Manifest) -> None:
    """Refuse a tokenizer whose ids disagree with the manifest (a swapped or edited tokenizer.json)."""
    for text, ids in manifest.template.id_checks.items():
        got = tokenizer.encode(text, add_special_tokens=False).ids
        if tuple(got) != ids:
            raise ArtifactError(
                f"tokenizer.json tokenizes {text!r} as {got}, the manifest records {list(ids)}: the tokenizer does not "
                "belong to this artifact; re-export with `memrerank export MODEL -o OUT --force`"
            )
