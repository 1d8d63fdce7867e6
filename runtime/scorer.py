"""The public scoring seam: tokenized splits → packer → one :class:`~memrerank.runtime.backends.Backend` → logits.

:class:`Scorer` is what :class:`~memrerank.runtime.Reranker` scores with, and what export's fidelity search and
the benchmarks use to score a candidate graph of an artifact (:meth:`Scorer.open` with ``graph=``): the same
packer, batch budget and prefix path as the runtime, on whatever graph is being judged. ``Reranker`` adds the
argument checks, tokenization, calibration and hits on top.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from memrerank.errors import ArtifactError
from memrerank.kernels import pack_pairs
from memrerank.manifest import Manifest
from memrerank.runtime.backends import Backend, open_backend
from memrerank.runtime.encoding import SplitPairs
from memrerank.runtime.options import LoadOptions, check_optional_bool, check_positive_int

__all__ = ["Scorer", "Placed"]

#: One query group to score: where its rows go in the result, and its tokenized pairs.
Placed = tuple[np.ndarray, SplitPairs]
_NO_HEAD = np.zeros(0, dtype=np.int64)


class Scorer:
    """Scores tokenized pairs with one backend.

    Attributes (public hooks a benchmark may set): ``batch_size`` and ``max_batch_tokens`` (the packer's budget
    per call), ``call_overhead`` (what one more call costs, in padded-token equivalents), ``prefix_reuse``,
    ``padding_side`` and ``packer`` (the function that cuts pairs into batches, with
    :func:`memrerank.kernels.pack_pairs`'s signature; e.g. ``memrerank.kernels.pack_numpy``).

    Args:
        backend: what runs the graph; its ``budget`` gives the defaults of ``batch_size``, ``max_batch_tokens``
            and ``call_overhead``.
        pad_id: the artifact's padding token.
        padding_side: ``"left"`` or ``"right"`` (the artifact's).
        prefix_reuse: score each query's documents against its shared prefix, run once (needs ``backend.has_past``).
        batch_size: most rows per call (``None``: the backend's budget).
        max_batch_tokens: most padded tokens per call (``None``: the backend's budget).

    Raises:
        ValueError: ``prefix_reuse`` asked of a backend without a past, or a budget that is not a positive int.
    """

    def __init__(self, backend: Backend, *, pad_id: int, padding_side: str, prefix_reuse: bool = False,
                 batch_size: int | None = None, max_batch_tokens: int | None = None) -> None:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        budget = backend.budget
        self.backend = backend
        self.pad_id = pad_id
        self.padding_side = padding_side
        self.prefix_reuse = prefix_reuse
        self.batch_size = check_positive_int(batch_size, "batch_size", optional=True) or budget.batch_size
        self.max_batch_tokens = (check_positive_int(max_batch_tokens, "max_batch_tokens", optional=True)
                                 or budget.max_batch_tokens)
        self.call_overhead = budget.call_overhead
        self.packer: Callable[..., Any] = pack_pairs

    @property
    def prefix_reuse(self) -> bool:
        """Whether each query's shared prefix runs once and its documents on top of its cache."""
        return self._prefix_reuse

    @prefix_reuse.setter
    def prefix_reuse(self, value: bool) -> None:
        if check_optional_bool(value, "prefix_reuse", optional=False) and not self.backend.has_past:
            raise ValueError("prefix_reuse=True needs a graph that takes a shared past")
        self._prefix_reuse = value

    @classmethod
    def open(cls, root: Path, manifest: Manifest, options: LoadOptions | None = None, *,
             graph: str | Path | None = None) -> Scorer:
        """A scorer over one graph of the artifact at ``root``.

        Args:
            root: the artifact directory.
            manifest: its manifest (:func:`memrerank.manifest.read_manifest`).
            options: providers, threads, batch budget and prefix reuse (``prefix_reuse=None``: on where the graph
                supports it). ``precision`` picks the graph unless ``graph`` is given; ``"auto"`` is resolved by
                :meth:`Reranker.load`, not here.
            graph: an ONNX graph of this artifact that the manifest does not list (a candidate being judged by
                export's fidelity search or a benchmark), run on onnxruntime with the options' providers and
                threads. Its files are not hash-checked: use it for graphs this process wrote.

        Raises:
            ArtifactError / ProviderError: as :func:`memrerank.runtime.backends.open_backend`.
            ArtifactError: also ``prefix_reuse=True`` on a graph without a shared past.
        """
        options = LoadOptions.merge(options)
        if graph is None:
            backend = open_backend(root, manifest, options)
        else:
            from memrerank.runtime.backends.onnxruntime import OrtBackend

            backend = OrtBackend(graph, providers=options.providers, threads=options.threads,
                                 layout=manifest.prefix_reuse, allow_tf32=options.allow_tf32)
        supported = manifest.prefix_reuse is not None and backend.has_past
        reuse = supported if options.prefix_reuse is None else options.prefix_reuse
        if reuse and not supported:
            what = f"the graph {graph}" if graph is not None else f"{manifest.family}, {type(backend).__name__}"
            raise ArtifactError(
                f"{root}: prefix_reuse=True needs a decoder artifact whose graph takes a shared past; this one "
                f"({what}) has none. Re-export it with this memrerank version "
                "(`memrerank export MODEL -o OUT --force`) or pass prefix_reuse=False")
        return cls(backend, pad_id=manifest.tokens.pad_id, padding_side=manifest.tokens.padding_side,
                   prefix_reuse=reuse, batch_size=options.batch_size, max_batch_tokens=options.max_batch_tokens)

    def score(self, splits: Sequence[Placed], n: int, stats: dict[str, float] | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
        """Score tokenized query groups; each pairs its :class:`SplitPairs` with where its rows go in the ``n``
        results (rows not named stay NaN).

        With ``prefix_reuse`` on, every query group (one document included) runs its shared prefix once and its
        documents on top of it, so a document takes the same path, and gets the same score, whatever else shares
        the call; with it off, all pairs are packed together as whole pairs.

        Args:
            splits: ``(positions, split)`` per query group.
            n: the length of the result.
            stats: a dict that accumulates seconds packing (``pack_s``) and in the model (``model_s``), and the
                ``tokens`` / ``padded_tokens`` run.

        Returns:
            ``(logits, truncated)``: float32 logits and a bool array (which documents were cut to fit), length
            ``n``.
        """
        logits = np.full(n, np.nan, dtype=np.float32)
        truncated = np.zeros(n, dtype=bool)
        tally = {"pack_s": 0.0, "model_s": 0.0, "tokens": 0, "padded_tokens": 0}
        if self.prefix_reuse:
            for where, sp in splits:
                self._score_on_prefix(where, sp, logits, truncated, tally)
        elif splits:
            self._score_whole(splits, logits, truncated, tally)
        if stats is not None:
            for key, value in tally.items():
                stats[key] = stats.get(key, 0) + value
        return logits, truncated

    def _run(self, packed: Any, where: np.ndarray, logits: np.ndarray, past: Any = None) -> float:
        t = time.perf_counter()
        for b in packed:
            logits[where[b.rows]] = self.backend.score(b.input_ids, b.attention_mask, b.token_type_ids, past)
        return time.perf_counter() - t

    def _score_on_prefix(self, where: np.ndarray, sp: SplitPairs, logits: np.ndarray, truncated: np.ndarray,
                         tally: dict[str, float]) -> None:
        t = time.perf_counter()
        past = self.backend.prefix(sp.head)
        tally["model_s"] += time.perf_counter() - t
        t = time.perf_counter()
        packed = self.packer([_NO_HEAD], np.zeros(len(sp.docs), np.int64), sp.docs, sp.tail, [sp.budget],
                             pad_id=self.pad_id, left=self.padding_side == "left", max_rows=self.batch_size,
                             max_tokens=self.max_batch_tokens, call_overhead=self.call_overhead)
        tally["pack_s"] += time.perf_counter() - t
        truncated[where] = packed.truncated
        tally["tokens"] += int(packed.lengths.sum()) + len(sp.head)
        tally["padded_tokens"] += int(packed.offsets[-1]) + len(sp.head)
        tally["model_s"] += self._run(packed, where, logits, past)

    def _score_whole(self, splits: Sequence[Placed], logits: np.ndarray, truncated: np.ndarray,
                     tally: dict[str, float]) -> None:
        t = time.perf_counter()
        where = np.concatenate([w for w, _ in splits])
        row_head = np.concatenate([np.full(len(sp.docs), g, np.int64) for g, (_, sp) in enumerate(splits)])
        docs = [d for _, sp in splits for d in sp.docs]
        first = splits[0][1]
        packed = self.packer([sp.head for _, sp in splits], row_head, docs, first.tail,
                             [sp.budget for _, sp in splits], pad_id=self.pad_id, left=self.padding_side == "left",
                             max_rows=self.batch_size, max_tokens=self.max_batch_tokens,
                             head_types=[sp.head_types for _, sp in splits] if first.head_types is not None else None,
                             doc_type=first.doc_type, tail_types=first.tail_types, call_overhead=self.call_overhead)
        tally["pack_s"] += time.perf_counter() - t
        truncated[where] = packed.truncated
        tally["tokens"] += int(packed.lengths.sum())
        tally["padded_tokens"] += int(packed.offsets[-1])
        tally["model_s"] += self._run(packed, where, logits)

    def __repr__(self) -> str:
        return (f"Scorer(providers={self.backend.providers}, prefix_reuse={self.prefix_reuse}, "
                f"batch_size={self.batch_size}, max_batch_tokens={self.max_batch_tokens})")
