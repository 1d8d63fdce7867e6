"""Fidelity of a lower precision vs fp32 on calibration pairs, and the sensitivity search that meets a budget.

The search is bounded (:class:`SearchLimits`) so an export takes minutes whatever the calibration set: the fp32
logits are computed once (:class:`CalibSet`); the plain quantization is scored on every pair; block sensitivity
is measured on a few probe pairs; candidates are judged on a stratified sample of the query groups, hardest group
first, and abandoned as soon as they can no longer meet the budget; the result is confirmed on the groups the
sample left out. Every candidate's logits are kept, so no pair is scored twice on the same graph.
"""

from __future__ import annotations

import contextlib
import math
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memrerank.export.metrics import spearman, topk_overlap

__all__ = ["FidelityBudget", "CalibSet", "SearchLimits", "load_calib_jsonl", "search_exclusions",
           "TOPK_FIDELITY"]

TOPK_FIDELITY = 10
_LAYER_GROUP = re.compile(r"layer \d+")  # the group names GraphInfo gives transformer layers
#: The layer index inside a node name: ``layers.3`` / ``layer.3``, or the exporter's ``_3`` suffix on a module
#: name repeated once per layer (``/q_proj_3/MatMul``; the first layer's has none).
_LAYER_INDEX = re.compile(r"(layers?\.)\d+|_\d+(?=/)")
_AGREEMENT = ("spearman_mean", "top10_overlap")  # the budgeted metrics, both "1 = same as fp32"
#: The most a sample's damage is scaled up to predict every pair's (see :func:`search_exclusions`).
SAMPLE_CORRECTION_MAX = 4.0
#: A candidate judged on a sample passes when its predicted figures, less this many standard errors of the
#: sample's mean (over the groups it leaves out), meet the budget: a pass the other pairs would overturn costs a
#: confirmation and a rebuild.
SAMPLE_MARGIN_SE = 1.0
#: Query groups scored between two early-stop checks: the pairs of whole groups, at least this many batches.
_CHUNK_BATCHES = 4


@dataclass(frozen=True)
class FidelityBudget:
    """Minimum agreement with fp32 a quantized precision must keep on the calibration pairs."""

    top10: float = 0.95
    spearman: float = 0.99

    @classmethod
    def parse(cls, text: str | None) -> FidelityBudget:
        """Parse ``"top10=0.95,spearman=0.99"`` (either key may be omitted)."""
        if not text:
            return cls()
        values: dict[str, float] = {}
        for item in text.split(","):
            key, _, val = item.partition("=")
            key = key.strip()
            if key not in ("top10", "spearman") or not val:
                raise ValueError(f"--fidelity: expected top10=X,spearman=Y, got {text!r}")
            v = float(val)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"--fidelity: {key} must be in [0, 1], got {v}")
            values[key] = v
        return cls(**values)

    def met(self, metrics: dict[str, float]) -> bool:
        return metrics["top10_overlap"] >= self.top10 and metrics["spearman_mean"] >= self.spearman

    @classmethod
    def default(cls, precision: str) -> FidelityBudget:
        """The budget ``precision`` is held to when ``--fidelity`` is not given (:data:`DEFAULT_BUDGETS`)."""
        return DEFAULT_BUDGETS.get(precision, cls())


#: Budgets other than :class:`FidelityBudget`'s default, by precision: ``int4`` is the size tier (a 4B model in
#: ~2.7 GB), held to Spearman 0.98 / top-10 0.90 so that the sensitivity search keeps few products on 8 bits;
#: ``--fidelity`` sets one budget for every precision.
DEFAULT_BUDGETS: dict[str, FidelityBudget] = {"int4": FidelityBudget(top10=0.90, spearman=0.98)}


def load_calib_jsonl(path: str | Path) -> list[tuple[str, list[str]]]:
    """Read ``{"query", "document"}`` lines (extra keys ignored) and group documents by query."""
    from memrerank.jsonl import iter_jsonl

    groups: dict[str, list[str]] = {}
    for where, row in iter_jsonl(path, "--calib-data"):
        if not isinstance(row, dict) or not isinstance(row.get("query"), str) or not isinstance(
                row.get("document"), str):
            raise ValueError(f"--calib-data: {where} needs string fields 'query' and 'document'")
        groups.setdefault(row["query"], []).append(row["document"])
    if not groups:
        raise ValueError(f"--calib-data: {path} has no pairs")
    return list(groups.items())


def _encode(reranker: Any, groups: Sequence[tuple[str, list[str]]]
            ) -> tuple[list[np.ndarray], list[np.ndarray] | None, np.ndarray]:
    """Each pair's token ids (and segment ids, when the encoder makes them) and its group index."""
    ids, types, group_of = [], [], []
    for g, (q, docs) in enumerate(groups):
        enc = reranker.encoder.encode(q, docs)
        ids.extend(enc.ids)
        if enc.type_ids is not None:
            types.extend(enc.type_ids)
        group_of.extend([g] * len(docs))
    return ids, types or None, np.asarray(group_of, dtype=np.int64)


def encode_groups(reranker: Any, groups: Sequence[tuple[str, list[str]]], batch_size: int
                  ) -> tuple[list[Any], np.ndarray]:
    """Whole pairs of ``(query, documents)`` groups, tokenized by the artifact's encoder and cut into padded
    batches (export-time feeds: calibration, fidelity, TensorRT calibration); also each pair's group index."""
    from memrerank.runtime.batching import iter_batches

    ids, types, group_of = _encode(reranker, groups)
    batches = list(iter_batches(ids, types, pad_id=reranker.pad_id, padding_side=reranker.padding_side,
                                batch_size=batch_size))
    return batches, group_of


def stratified_groups(damage: Sequence[float], sizes: Sequence[int], max_pairs: int) -> list[int]:
    """Indices of groups whose sizes sum to at most ``max_pairs``: as many as fit evenly spaced along ``damage``
    (ties by index), then the room left filled from both ends of the damage range; at least the median group.
    Sorted."""
    n = len(damage)
    order = sorted(range(n), key=lambda g: (damage[g], g))
    chosen = [order[n // 2]]
    for m in range(2, n + 1):
        pick = sorted({order[int(round(i))] for i in np.linspace(0, n - 1, m)})
        if sum(sizes[g] for g in pick) > max_pairs:
            break
        chosen = pick
    room = max_pairs - sum(sizes[g] for g in chosen)
    ends = [order[i] for pair in zip(range(n), range(n - 1, -1, -1)) for i in pair][:n]  # low, high, low…
    for g in ends:  # fill what is left, from both ends of the damage range alternately
        if g not in chosen and sizes[g] <= room:
            chosen.append(g)
            room -= sizes[g]
    return sorted(chosen)


class CalibSet:
    """Calibration pairs tokenized once with the artifact's encoder; scores any graph of the artifact.

    ``reference`` holds the fp32 graph's logits, computed once when the set is made; every fidelity figure
    compares against it. ``seconds`` records what making the set took (``setup``: loading and tokenizing,
    ``fp32_reference``: scoring the fp32 graph).

    A decoder artifact with prefix reuse is scored the way the runtime scores it by default: each query's shared
    prefix (template, instruction, query) runs once and its documents on top of it (:attr:`prefix_reuse`), which
    also halves the work of every fidelity evaluation on a typical calibration set. :meth:`feeds` (activation
    statistics, static-int8 calibration) stays whole pairs.
    """

    def __init__(self, root: Path, groups: Sequence[tuple[str, list[str]]], batch_size: int = 16, *,
                 reference: bool = True) -> None:
        from memrerank.runtime import Reranker

        t0 = time.perf_counter()
        self.root = root
        # The fp32 reranker tokenizes and says how the artifact pads; its session is not kept (at 1.5B it would
        # hold 6 GB for the whole search while every candidate opens its own).
        reranker = Reranker.load(root, "fp32")
        #: The artifact's manifest.
        self.manifest = reranker.manifest
        ids, types, group_of = _encode(reranker, groups)
        self._setup(groups, ids, types, group_of, batch_size, reranker.pad_id, reranker.padding_side)
        #: Per query group, its pairs as prefix + documents + suffix (decoders with prefix reuse), else ``None``.
        self.prefix_reuse = bool(reranker.prefix_reuse)
        self._splits = ([reranker.encoder.split(q, docs) for q, docs in self.groups] if self.prefix_reuse
                        else None)
        del reranker
        t1 = time.perf_counter()
        # reference=False: a set for building only (activation statistics), no fidelity figures
        self.reference = self.score(root / "fp32" / "model.onnx") if reference else None
        self.seconds = {"setup": t1 - t0, "fp32_reference": time.perf_counter() - t1}

    def _setup(self, groups: Sequence[tuple[str, list[str]]], ids: list[np.ndarray], types: list[np.ndarray] | None,
               group_of: np.ndarray, batch_size: int, pad_id: int, padding_side: str) -> None:
        self.groups = list(groups)
        self.batch_size = batch_size
        self._ids, self._types, self._pad = ids, types, (pad_id, padding_side)
        self.group_of = np.asarray(group_of, dtype=np.int64)
        self.n_pairs = len(self.group_of)
        self.group_rows = [np.flatnonzero(self.group_of == g) for g in range(len(self.groups))]
        self.batches = list(self._batches(np.arange(self.n_pairs)))
        self.last_timing = (0.0, 0)  # seconds in the graph and padded tokens of the last :meth:`score`
        self.prefix_reuse, self._splits = False, None  # whole pairs unless __init__ finds a prefix-reuse decoder

    def _batches(self, rows: np.ndarray) -> Iterator[Any]:
        """Length-sorted padded batches over ``rows``; each batch's ``rows`` are positions in the whole set."""
        from memrerank.runtime.batching import iter_batches

        pad_id, side = self._pad
        types = [self._types[i] for i in rows] if self._types is not None else None
        for b in iter_batches([self._ids[i] for i in rows], types, pad_id=pad_id, padding_side=side,
                              batch_size=self.batch_size):
            b.rows = rows[b.rows]
            yield b

    def _backend(self, graph: Path) -> Any:
        from memrerank.runtime.backends.onnxruntime import OrtBackend

        return OrtBackend(graph, layout=self.manifest.prefix_reuse)

    def feeds(self, graph: Path, rows: np.ndarray | None = None) -> list[dict[str, np.ndarray]]:
        """Whole pairs as ``graph``'s inputs, in length-sorted batches: every pair, or the positions ``rows``."""
        import onnx

        from memrerank.runtime.backends import empty_past as make_empty_past

        inputs = onnx.load(str(graph), load_external_data=False).graph.input
        names = {i.name for i in inputs}
        past_names = [n for n in names if n.startswith(("past_key.", "past_value."))]
        # decoder graphs: full pairs with an empty shared past (batch 1, length 0)
        empty_past = make_empty_past(self.manifest.prefix_reuse, past_names) if past_names else {}
        out = []
        for b in self.batches if rows is None else self._batches(np.asarray(rows, np.int64)):
            feed = {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "token_type_ids": b.token_type_ids}
            out.append({**{k: v for k, v in feed.items() if k in names and v is not None}, **empty_past})
        return out

    def score(self, graph: Path, units: Sequence[np.ndarray] | None = None, *,
              stop: Callable[[int], bool] | None = None, out: np.ndarray | None = None) -> np.ndarray | None:
        """The graph's logits on every pair, or on the pairs of ``units`` (arrays of row positions, e.g. query
        groups), scored in order a few units at a time.

        Args:
            graph: an ONNX graph of this artifact.
            units: what to score; default every pair, in one length-sorted pass.
            stop: called after each chunk of units with how many units are scored; ``True`` abandons the graph.
            out: where to write the logits (default: a new array of NaN).

        Returns:
            Logits for every pair of the set (NaN where not scored), or ``None`` when ``stop`` abandoned it.
            ``last_timing`` then holds the seconds spent in the graph and the padded tokens it ran.
        """
        logits = np.full(self.n_pairs, np.nan) if out is None else out
        if self._splits is not None:
            return self._score_reuse(graph, self.group_rows if units is None else units, stop, logits)
        backend = self._backend(graph)
        if units is None:
            chunks: list[tuple[int, Iterable[Any]]] = [(0, self.batches)]
        else:
            chunks, rows, min_rows = [], [], _CHUNK_BATCHES * self.batch_size
            for i, unit in enumerate(units):
                rows.append(np.asarray(unit))
                if sum(len(r) for r in rows) >= min_rows or i == len(units) - 1:
                    chunks.append((i + 1, self._batches(np.concatenate(rows))))
                    rows = []
        seconds, tokens = 0.0, 0
        try:
            for done, batches in chunks:
                for b in batches:
                    t0 = time.perf_counter()
                    logits[b.rows] = backend.score(b.input_ids, b.attention_mask, b.token_type_ids)
                    seconds += time.perf_counter() - t0
                    tokens += int(b.input_ids.size)
                if stop is not None and stop(done):
                    return None
            return logits
        finally:
            self.last_timing = (seconds, tokens)

    def _score_reuse(self, graph: Path, units: Sequence[np.ndarray], stop: Callable[[int], bool] | None,
                     logits: np.ndarray) -> np.ndarray | None:
        """:meth:`score` through the runtime's prefix path (a :class:`~memrerank.runtime.Scorer` over ``graph``
        with the loaded fp32 reranker's budget): each unit's rows, split by query group, run as the group's
        prefix once plus those documents, a few units per chunk (``stop`` is asked after each)."""
        import dataclasses

        from memrerank.runtime import LoadOptions, Scorer

        scorer = Scorer.open(self.root, self.manifest,
                             LoadOptions(prefix_reuse=True, batch_size=self.batch_size), graph=graph)
        assert self._splits is not None
        stats: dict[str, float] = {}
        chunk: list[tuple[np.ndarray, Any]] = []
        size = 0
        try:
            for i, unit in enumerate(units):
                rows = np.asarray(unit, dtype=np.int64)
                for g in np.unique(self.group_of[rows]):
                    where = rows[self.group_of[rows] == g]
                    split = self._splits[g]
                    local = where - self.group_rows[g][0]  # a group's rows are contiguous, in document order
                    chunk.append((where, dataclasses.replace(split, docs=[split.docs[j] for j in local])))
                    size += len(where)
                if size >= _CHUNK_BATCHES * self.batch_size or i == len(units) - 1:
                    got, _ = scorer.score(chunk, self.n_pairs, stats)
                    for where, _split in chunk:
                        logits[where] = got[where]
                    chunk, size = [], 0
                    if stop is not None and stop(i + 1):
                        return None
            return logits
        finally:
            self.last_timing = (stats.get("model_s", 0.0), int(stats.get("padded_tokens", 0)))

    def group_fidelity(self, logits: np.ndarray, g: int) -> tuple[float, float]:
        """Spearman and top-10 overlap of one query group vs fp32."""
        rows = self.group_rows[g]
        return (spearman(logits[rows], self.reference[rows]),
                topk_overlap(logits[rows], self.reference[rows], TOPK_FIDELITY))

    def fidelity(self, logits: np.ndarray, groups: Sequence[int] | None = None) -> dict[str, float]:
        """max |Δlogit|, mean per-query Spearman and top-10 overlap vs fp32, on every group or on ``groups``."""
        ids = list(range(len(self.groups))) if groups is None else list(groups)
        per = np.array([self.group_fidelity(logits, g) for g in ids])
        rows = np.concatenate([self.group_rows[g] for g in ids])
        return {
            "max_abs_logit_diff": float(np.max(np.abs(logits[rows] - self.reference[rows]))),
            "spearman_mean": float(np.mean(per[:, 0])),
            "top10_overlap": float(np.mean(per[:, 1])),
            "pairs": int(len(rows)),
            "queries": len(ids),
        }


@dataclass(frozen=True)
class SearchLimits:
    """Bounds on the sensitivity search, so an export takes minutes whatever the calibration set or model size.

    Attributes:
        max_pairs: calibration pairs a candidate graph is judged on. Above it, whole query groups are drawn
            evenly across the plain quantization's per-group damage (a stratified sample: the easy and the hard
            queries both represented); the chosen exclusions are then confirmed on the other groups.
        probe_pairs: pairs the sensitivity of each block is measured on (mean squared logit change vs fp32),
            spread over the sample's groups.
        max_blocks: the sensitivity of at most this many blocks is measured (one build each); with more groups
            (a 28-layer decoder) adjacent layers are merged into blocks and the refinement splits the kept ones.
        max_refine: at most this many extra builds try kept products back in low precision (whole layers of a
            kept block, then product kinds across the kept layers, then single products, largest first).
        max_cost: the refinement stops once the search has cost this many times the plain step (one build and
            one pass over every pair, in CPU seconds of this process), so a model whose candidates are slow to
            build and score (a 0.6B decoder) is refined less.
    """

    max_pairs: int = 320
    probe_pairs: int = 64
    max_blocks: int = 8
    max_refine: int = 6
    max_cost: float = 5.0

    def __post_init__(self) -> None:
        if (self.max_pairs < 1 or self.probe_pairs < 1 or self.max_blocks < 1 or self.max_refine < 0
                or not self.max_cost > 0):
            raise ValueError("SearchLimits needs max_pairs >= 1, probe_pairs >= 1, max_blocks >= 1, "
                             f"max_refine >= 0 and max_cost > 0; got {self}")


class _Search:
    """One sensitivity search: builds candidate graphs, scores them (each candidate's logits kept), keeps the
    clock and the progress bar."""

    def __init__(self, build: Callable[[list[str]], None], graph: Path, calib: CalibSet, budget: FidelityBudget,
                 bar: Any) -> None:
        self._build, self.graph, self.calib, self.budget, self._bar = build, graph, calib, budget, bar
        self.built: frozenset[str] | None = None  # what the graph on disk was built with
        self.logits: dict[frozenset[str], np.ndarray] = {}
        self.speed: dict[frozenset[str], list[float]] = {}  # seconds in the graph, padded tokens
        self.builds = 0
        self.scored_pairs = 0
        self.evaluations = 0
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}
        self.correction: dict[str, float] = {}
        self.sampled_share = 1.0  # the sample's share of every group (1: the sample is every pair)

    @contextlib.contextmanager
    def clock(self, step: str) -> Iterator[None]:
        """Add the wall and CPU (all threads) seconds of the block to ``step``."""
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.seconds[step] = self.seconds.get(step, 0.0) + time.perf_counter() - t0
            self.cpu_seconds[step] = self.cpu_seconds.get(step, 0.0) + time.process_time() - c0

    def ensure_built(self, exclude: Sequence[str], step: str) -> None:
        """Build with ``exclude`` kept in fp32 unless the graph on disk already is that one."""
        if self.built != frozenset(exclude):
            with self.clock(step):
                self._build(list(exclude))
            self.built = frozenset(exclude)
            self.builds += 1

    def cached(self, exclude: Sequence[str]) -> np.ndarray:
        return self.logits.setdefault(frozenset(exclude), np.full(self.calib.n_pairs, np.nan))

    def score(self, exclude: Sequence[str], units: Sequence[np.ndarray], step: str,
              stop: Callable[[int], bool] | None = None) -> bool:
        """Score ``units`` on the graph built with ``exclude`` into its cached logits; False when ``stop`` cut it."""
        self.ensure_built(exclude, step)
        logits = self.cached(exclude)
        with self.clock(step):
            before = int(np.isnan(logits).sum())
            complete = self.calib.score(self.graph, units, stop=stop, out=logits) is not None
            self.scored_pairs += before - int(np.isnan(logits).sum())
        speed = self.speed.setdefault(frozenset(exclude), [0.0, 0.0])
        speed[0] += self.calib.last_timing[0]
        speed[1] += self.calib.last_timing[1]
        return complete

    def predict(self, metrics: dict[str, float]) -> dict[str, float]:
        """Metrics measured on the sample, with their damage scaled to what every pair would show."""
        return {**metrics, **{k: 1.0 - (1.0 - metrics[k]) * r for k, r in self.correction.items()}}

    def passes(self, metrics: dict[str, float] | None) -> bool:
        """Whether a candidate meets the budget: on the sample, with :data:`SAMPLE_MARGIN_SE` standard errors
        to spare."""
        if metrics is None:
            return False
        se = metrics.get("standard_error", {})
        return self.budget.met({k: metrics[k] - SAMPLE_MARGIN_SE * se.get(k, 0.0) for k in _AGREEMENT})

    def evaluate(self, exclude: Sequence[str], groups: Sequence[int], step: str, *, sample: bool,
                 early: bool = True) -> dict[str, float] | None:
        """Fidelity of the graph built with ``exclude`` on ``groups`` (scored in the given order, groups already
        scored for this graph reused); predicted for every pair when ``sample``. ``None`` when ``early`` and the
        graph was abandoned because the groups still to score could no longer bring it to the budget."""
        calib, logits = self.calib, self.cached(exclude)
        done = [g for g in groups if not np.isnan(logits[calib.group_rows[g]]).any()]
        todo = [g for g in groups if g not in set(done)]
        n = len(groups)
        total = np.sum([calib.group_fidelity(logits, g) for g in done], axis=0) if done else np.zeros(2)
        counted = 0

        def hopeless(k: int) -> bool:  # k more groups scored: could a perfect rest still meet the budget?
            nonlocal total, counted
            for g in todo[counted:k]:
                total = total + np.asarray(calib.group_fidelity(logits, g))
            counted = k
            rest = n - len(done) - k
            best = {"spearman_mean": (total[0] + rest) / n, "top10_overlap": (total[1] + rest) / n}
            return not self.budget.met(self.predict(best) if sample else best)

        complete = True
        if todo:
            complete = self.score(exclude, [calib.group_rows[g] for g in todo], step, hopeless if early else None)
        self.evaluations += 1
        if not complete:
            self.tick(f"{step}: abandoned early")
            return None
        metrics = calib.fidelity(logits, groups)
        if sample:
            metrics = self.predict(metrics)
            per_group = np.array([calib.group_fidelity(logits, g) for g in groups])
            spread = per_group.std(axis=0, ddof=1) if n > 1 else np.zeros(2)
            # the standard error of the mean over the groups the sample leaves out (finite population)
            se = spread / math.sqrt(n) * math.sqrt(max(0.0, 1.0 - self.sampled_share))
            metrics["standard_error"] = {k: float(v) * self.correction.get(k, 1.0) for k, v in zip(_AGREEMENT, se)}
        self.tick(f"{step}: spearman {metrics['spearman_mean']:.4f} top10 {metrics['top10_overlap']:.3f}")
        return metrics

    def tick(self, text: str) -> None:
        """Advance the bar by one candidate graph."""
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)
            self._bar.update(1)

    def seconds_per_token(self, exclude: Sequence[str]) -> float | None:
        seconds, tokens = self.speed.get(frozenset(exclude), (0.0, 0.0))
        return seconds / tokens if tokens else None


def _progress(total: int, label: str, enabled: bool | None) -> Any:
    """A tqdm bar over the candidates on stderr when ``enabled`` (``None``: when stderr is a terminal)."""
    from memrerank.progress import on_terminal

    if not (on_terminal() if enabled is None else enabled):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=label, unit="graph", leave=False, dynamic_ncols=True, file=sys.stderr)


def search_exclusions(build: Callable[[list[str]], None], graph: Path, calib: CalibSet,
                      groups: dict[str, list[str]], budget: FidelityBudget,
                      log: Callable[[str], None], *, limits: SearchLimits | None = None,
                      label: str = "sensitivity search", progress: bool | None = False) -> dict[str, Any]:
    """Build the plain precision; when it misses the budget, keep the most damaging products in fp32.

    Bounded steps (:class:`SearchLimits`); the fp32 logits come from ``calib`` (computed once):

    1. plain: everything quantized, scored on every pair; when it meets the budget the search stops there.
    2. sensitivity: each block (a layer group, or adjacent layers merged when there are more than
       ``max_blocks``) is quantized alone, everything else fp32; its damage is the mean squared logit change
       on ``probe_pairs`` pairs.
    3. keep: the fewest most-damaging blocks kept in fp32 that meet the budget (1, 2, 4… then bisection).
    4. refine: kept products are tried back in low precision, at most ``max_refine`` builds and while the search
       has cost less than ``max_cost`` plain steps.
    5. confirm: the result is scored on the groups the sample left out; when the sample was optimistic,
       products given back are restored, then further blocks kept, until the budget holds on every pair.

    Steps 3–5 judge a candidate on a stratified sample of at most ``max_pairs`` pairs, scoring its hardest
    groups first and abandoning it as soon as a perfect score on the groups left could not meet the budget.
    The sample's damage is scaled by what the plain graph showed (damage on every pair / damage on the sample,
    between 1 and :data:`SAMPLE_CORRECTION_MAX`), so a sample that happens to be easy does not pass candidates
    that every pair would fail, and a candidate passes with :data:`SAMPLE_MARGIN_SE` standard errors to spare.

    Args:
        build: writes ``graph`` with the given weight products kept in fp32.
        graph: where ``build`` writes the candidate graph.
        calib: the calibration pairs and their fp32 logits.
        groups: the weight products by group (:attr:`memrerank.export.quantize.GraphInfo.groups`).
        budget: the fidelity to meet.
        log: progress messages.
        limits: the search's bounds (default :class:`SearchLimits`).
        label: the progress bar's and the summary's name.
        progress: a tqdm bar over the candidate graphs on stderr (``None``: when stderr is a terminal).

    Returns:
        The fidelity record written to the manifest: the metrics on every pair (``fidelity``), the plain
        quantization's, the products kept in fp32, the sensitivity of each block and the seconds of each step
        (``timing``). The graph on disk is the one the record describes.
    """
    limits = limits or SearchLimits()
    t_start, c_start = time.perf_counter(), time.process_time()
    groups = _split_groups(groups, limits.max_blocks)
    blocks = _blocks(groups, limits.max_blocks)
    total = 1 + len(blocks) + 2 * max(1, len(blocks)).bit_length() + limits.max_refine + 1
    bar = _progress(total, label, progress)
    search = _Search(build, graph, calib, budget, bar)
    try:
        report = _run_search(search, groups, blocks, limits, log)
    finally:
        if bar is not None:
            bar.total = bar.n
            bar.refresh()
            bar.close()
    timing: dict[str, Any] = {k: round(v, 2) for k, v in search.seconds.items()}
    timing.update(total=round(time.perf_counter() - t_start, 2), cpu_seconds={
                      **{k: round(v, 2) for k, v in search.cpu_seconds.items()},
                      "total": round(time.process_time() - c_start, 2)}, builds=search.builds,
                  evaluations=search.evaluations, scored_pairs=search.scored_pairs)
    reference = getattr(calib, "seconds", {}).get("fp32_reference")
    if reference is not None:
        timing["fp32_reference_once"] = round(reference, 2)
    report["timing"] = timing
    steps = ", ".join(f"{k} {v:.1f} s" for k, v in search.seconds.items())
    log(f"  {label}: {search.builds} builds, {search.scored_pairs} pairs scored in {timing['total']:.1f} s, "
        f"{timing['cpu_seconds']['total']:.0f} s CPU ({steps})"
        + (f"; fp32 logits computed once before: {reference:.1f} s" if reference is not None else ""))
    return report


@dataclass
class _Sample:
    """The query groups candidates are judged on (hardest first), the groups left for the confirmation, and the
    probe pairs the sensitivity of each block is measured on."""

    sample: list[int]
    rest: list[int]
    probe: np.ndarray
    pairs: int


def _run_search(search: _Search, groups: dict[str, list[str]], blocks: dict[str, list[str]],
                limits: SearchLimits, log: Callable[[str], None]) -> dict[str, Any]:
    calib, budget, graph = search.calib, search.budget, search.graph
    everything = list(range(len(calib.groups)))
    c_plain = time.process_time()  # CPU seconds: the cost bound should not move with the machine's load
    plain = search.evaluate([], everything, "plain", sample=False, early=False)
    plain_cost = time.process_time() - c_plain
    plain_size = _size(graph)
    report: dict[str, Any] = {"budget": asdict(budget), "plain": plain, "kept_fp32": [], "meets_budget": True}
    if budget.met(plain):
        report["fidelity"] = plain
        return report
    sample = _draw_sample(search, plain, limits)
    where = ("every pair" if not sample.rest else f"{sample.pairs} of {calib.n_pairs} pairs ({len(sample.sample)} "
             f"of {len(everything)} queries)")
    log(f"  plain quantization misses the budget (spearman {plain['spearman_mean']:.4f}, top10 "
        f"{plain['top10_overlap']:.3f}); sensitivity of {len(blocks)} blocks on {len(sample.probe)} probe pairs, "
        f"candidates judged on {where}")
    damage = _sensitivity(search, groups, blocks, sample.probe)
    order = list(blocks)
    ranked = sorted(damage, key=lambda b: (-damage[b], order.index(b)))

    def judge(exclude: list[str], step: str) -> dict[str, float] | None:
        return search.evaluate(exclude, sample.sample, step, sample=bool(sample.rest))

    kept_blocks = ranked[:_fewest_kept(search, judge, ranked, [damage[b] for b in ranked], plain, blocks, groups)]
    excluded = _nodes(kept_blocks, blocks, groups)
    # refine: give kept products back while the budget holds on the sample and the search is within its cost
    deadline = c_plain + limits.max_cost * plain_cost
    chain, trials = _refine(lambda trial: search.passes(judge(trial, "refine")), excluded, kept_blocks, blocks,
                            groups, limits.max_refine, deadline)
    excluded, final = _confirm(search, sample, chain, ranked, kept_blocks, blocks, groups, log)
    search.ensure_built(excluded, "rebuild")
    plain_speed, final_speed = search.seconds_per_token([]), search.seconds_per_token(excluded)
    report.update({
        "sensitivity": {k: round(v, 8) for k, v in sorted(damage.items(), key=lambda kv: -kv[1])},
        "sensitivity_metric": f"mean squared logit change vs fp32 on {len(sample.probe)} pairs, the block alone "
                              "quantized",
        "kept_fp32": [g for g, nodes in groups.items() if set(nodes) & set(excluded)],
        "kept_fp32_nodes": excluded,
        "refined_per_node": trials > 0,
        "refine_trials": trials,
        "search_sample": {"pairs": sample.pairs, "queries": len(sample.sample), "probe_pairs": len(sample.probe),
                          "damage_scale": {k: round(v, 3) for k, v in search.correction.items()}},
        "fidelity": final,
        "meets_budget": budget.met(final),
        "size_bytes": {"plain": plain_size, "final": _size(graph)},
        "speed_cost": round(final_speed / plain_speed, 3) if plain_speed and final_speed else None,
    })
    return report


def _draw_sample(search: _Search, plain: dict[str, float], limits: SearchLimits) -> _Sample:
    """Whole groups spread over the plain graph's per-group damage, judged hardest first; sets the search's
    damage correction (the sample's damage scaled to what every pair showed for the plain graph, never down)."""
    calib = search.calib
    everything = list(range(len(calib.groups)))
    plain_logits = search.cached([])
    hardness = [2.0 - sum(calib.group_fidelity(plain_logits, g)) for g in everything]
    sizes = [len(r) for r in calib.group_rows]
    sample = everything if calib.n_pairs <= limits.max_pairs else stratified_groups(hardness, sizes,
                                                                                   limits.max_pairs)
    sample = sorted(sample, key=lambda g: (-hardness[g], g))
    rest = sorted((g for g in everything if g not in set(sample)), key=lambda g: (-hardness[g], g))
    if rest:
        search.sampled_share = len(sample) / len(everything)
        on_sample = calib.fidelity(plain_logits, sample)
        search.correction = {k: min(SAMPLE_CORRECTION_MAX, max(1.0, (1.0 - plain[k]) / max(1.0 - on_sample[k], 1e-9)))
                             for k in _AGREEMENT}
    return _Sample(sample, rest, _probe_rows(calib, sample, limits.probe_pairs), sum(sizes[g] for g in sample))


def _sensitivity(search: _Search, groups: dict[str, list[str]], blocks: dict[str, list[str]],
                 probe: np.ndarray) -> dict[str, float]:
    """Each block quantized alone (everything else fp32): its mean squared logit change on the probe pairs."""
    every = [n for nodes in groups.values() for n in nodes]
    damage: dict[str, float] = {}
    for name in blocks:
        only = set(_nodes([name], blocks, groups))
        exclude = [n for n in every if n not in only]
        search.score(exclude, [probe], "sensitivity")
        diff = search.cached(exclude)[probe] - search.calib.reference[probe]
        damage[name] = float(np.mean(diff * diff))
        search.evaluations += 1
        search.tick(f"sensitivity: {name} {damage[name]:.2e}")
    return damage


def _fewest_kept(search: _Search, judge: Callable[[list[str], str], dict[str, float] | None], ranked: list[str],
                 damage: list[float], plain: dict[str, float], blocks: dict[str, list[str]],
                 groups: dict[str, list[str]]) -> int:
    """The smallest k such that keeping the k most damaging blocks in fp32 meets the budget on the sample:
    galloping from the k the probe predicts, then bisection."""
    tried: dict[int, dict[str, float] | None] = {}

    def keeps(k: int) -> bool:
        if k not in tried:
            tried[k] = judge(_nodes(ranked[:k], blocks, groups), "keep")
        return search.passes(tried[k])

    lo, hi = 0, len(ranked)  # lo misses (k=0 is plain), hi meets (all fp32 is the reference itself)
    k = min(_predicted_keep(damage, plain, search.budget), hi - 1)
    if k >= 1 and keeps(k):  # gallop down
        hi, step = k, 1
        while hi - step > lo:
            if not keeps(hi - step):
                lo = hi - step
                break
            hi, step = hi - step, 2 * step
    else:  # gallop up (k failed, or there is a single block)
        lo, step = max(k, 0), 1
        while lo + step < hi:
            if keeps(lo + step):
                hi = lo + step
                break
            lo, step = lo + step, 2 * step
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if keeps(mid):
            hi = mid
        else:
            lo = mid
    return hi


def _confirm(search: _Search, sample: _Sample, chain: list[list[str]], ranked: list[str], kept_blocks: list[str],
             blocks: dict[str, list[str]], groups: dict[str, list[str]], log: Callable[[str], None]
             ) -> tuple[list[str], dict[str, float]]:
    """Score the most refined candidate on every pair (the sample's groups reused); when the sample was
    optimistic, restore products given back (by bisection over the refinement's nested steps), then keep more
    blocks, until the budget holds. Returns the products kept in fp32 and their fidelity on every pair;
    ``kept_blocks`` grows in place."""
    def confirm(exclude: list[str], early: bool = True) -> dict[str, float] | None:
        return search.evaluate(exclude, sample.sample + sample.rest, "confirm", sample=False, early=early)

    excluded = chain[-1]
    final = confirm(excluded)
    if final is None and len(chain) > 1:
        log("  the sample was optimistic: taking back products given back until every pair meets the budget")
        excluded, final = chain[0], confirm(chain[0])
        if final is not None:
            good, bad = 0, len(chain) - 1
            while bad - good > 1:
                mid = (good + bad) // 2
                m = confirm(chain[mid])
                good, bad = (mid, bad) if m is not None else (good, mid)
                if m is not None:
                    final = m
            excluded = chain[good]
    extra = [b for b in ranked if b not in kept_blocks]
    while (final is None or not search.budget.met(final)) and extra:
        kept_blocks.append(extra.pop(0))
        log(f"  still below the budget on every pair: keeping {kept_blocks[-1]} too")
        excluded = excluded + [n for n in _nodes(kept_blocks[-1:], blocks, groups) if n not in excluded]
        final = confirm(excluded)
    if final is None:  # nothing left to keep: record the full figures of the last candidate
        final = confirm(excluded, early=False)
    return excluded, final


def _predicted_keep(damage: Sequence[float], plain: dict[str, float], budget: FidelityBudget) -> int:
    """How many of the blocks (``damage``: mean squared logit change of each alone, largest first) to keep so
    the budget holds, if each metric's shortfall vs fp32 scaled with the summed squared change of the blocks
    left quantized. Ranking damage saturates, so this underestimates; the search gallops up from it."""
    total = float(sum(damage))
    if total <= 0:
        return 1
    room = {"spearman_mean": 1.0 - budget.spearman, "top10_overlap": 1.0 - budget.top10}
    left = total
    for k, d in enumerate(damage):
        if all((1.0 - plain[m]) * left / total <= room[m] for m in room):
            return max(1, k)
        left -= d
    return len(damage)


def _probe_rows(calib: CalibSet, groups: Sequence[int], n: int) -> np.ndarray:
    """At most ``n`` pairs spread over ``groups``: the same share of each, evenly spaced inside it."""
    share = max(1, n // max(1, len(groups)))
    rows = []
    for g in groups:
        r = calib.group_rows[g]
        rows.append(r[np.unique(np.linspace(0, len(r) - 1, min(share, len(r))).round().astype(int))])
    return np.sort(np.concatenate(rows)[:n])


def _split_groups(groups: dict[str, list[str]], max_blocks: int) -> dict[str, list[str]]:
    """``groups``, with a group that holds most of the products (a graph whose node names carry no layer index
    puts every product in ``other``) cut into runs of products in graph order, so the search still has
    ``max_blocks`` blocks to tell apart: ``other [0-27]``, ``other [28-55]``…"""
    total = sum(len(nodes) for nodes in groups.values())
    big = max(groups, key=lambda g: len(groups[g]), default=None)
    room = max_blocks - len(groups) + 1
    if big is None or room < 2 or len(groups[big]) * 2 <= total or len(groups[big]) <= max_blocks:
        return groups
    out: dict[str, list[str]] = {}
    for g, nodes in groups.items():
        if g != big:
            out[g] = nodes
            continue
        for run in np.array_split(np.arange(len(nodes)), room):
            out[f"{g} [{run[0]}-{run[-1]}]"] = [nodes[i] for i in run]
    return out


def _blocks(groups: dict[str, list[str]], max_blocks: int) -> dict[str, list[str]]:
    """Block name -> its group names: the groups themselves, or runs of adjacent layers when there are too many."""
    if len(groups) <= max_blocks:
        return {g: [g] for g in groups}
    layers = sorted((g for g in groups if _LAYER_GROUP.fullmatch(g)), key=lambda g: int(g.split()[1]))
    rest = [g for g in groups if g not in layers]
    n = max(1, max_blocks - len(rest))
    out: dict[str, list[str]] = {}
    for chunk in np.array_split(np.arange(len(layers)), min(n, len(layers))):
        members = [layers[i] for i in chunk]
        first, last = members[0].split()[1], members[-1].split()[1]
        out[members[0] if len(members) == 1 else f"layers {first}-{last}"] = members
    out.update({g: [g] for g in rest})
    return out


def _nodes(block_names: Sequence[str], blocks: dict[str, list[str]], groups: dict[str, list[str]]) -> list[str]:
    return [n for b in block_names for g in blocks[b] for n in groups[g]]


def _refine(passes: Callable[[list[str]], bool], excluded: list[str], kept_blocks: list[str],
            blocks: dict[str, list[str]], groups: dict[str, list[str]], max_trials: int,
            deadline: float = math.inf) -> tuple[list[list[str]], int]:
    """Give kept products back to low precision while ``passes`` (the budget on the sample), in at most ``max_trials``
    builds and until ``deadline`` (``time.process_time``): whole layers of merged blocks, then one product kind
    across every kept layer (all the FFN output projections…), then single products; least damaging block
    first, and within a layer its last products (the FFN's, the largest) first.

    Returns:
        The products kept in fp32 after each accepted step, from ``excluded`` to the most refined, and the number
        of builds tried.
    """
    chain = [list(excluded)]
    trials = 0
    seen: set[frozenset[str]] = set()

    def attempt(give_back: list[str]) -> None:
        nonlocal excluded, trials
        give = frozenset(n for n in give_back if n in excluded)
        if (not give or give == frozenset(excluded) or give in seen or trials >= max_trials
                or time.process_time() >= deadline):
            return
        seen.add(give)
        trial = [n for n in excluded if n not in give]
        trials += 1
        if passes(trial):
            excluded = trial
            chain.append(trial)

    least_first = list(reversed(kept_blocks))
    for b in least_first:  # merged blocks: layer by layer
        if len(blocks[b]) > 1:
            for g in reversed(blocks[b]):
                attempt(groups[g])
    kinds: dict[str, list[str]] = {}
    for n in reversed(excluded):
        kinds.setdefault(_LAYER_INDEX.sub(lambda m: f"{m.group(1)}*" if m.group(1) else "", n), []).append(n)
    for nodes in kinds.values():
        if len(nodes) > 1:
            attempt(nodes)
    for b in least_first:
        for n in reversed(_nodes([b], blocks, groups)):
            attempt([n])
    return chain, trials


def _size(graph: Path) -> int:
    return sum(p.stat().st_size for p in graph.parent.iterdir() if p.is_file())
