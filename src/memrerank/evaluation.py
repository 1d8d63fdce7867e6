"""Retrieval metrics and memory-benchmark loaders for ``memrerank eval`` (numpy only).

LoCoMo (``locomo10.json``): each question is a query, its candidates are the dialogue turns of the sessions
holding its evidence (± ``window`` neighbouring sessions) or of the whole conversation, and the relevant turns are
its evidence ``dia_id``s. Malformed evidence ids are repaired (``"D8:6; D9:17"`` → two ids, ``"D:11:26"`` →
``D11:26``, ``"D30:05"`` → ``D30:5``); ids that name no turn and questions left with no evidence are dropped and
counted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from memrerank.runtime.options import LoadOptions

__all__ = [
    "Query", "LOCOMO_CATEGORIES", "load_locomo", "load_jsonl_queries", "average_precision", "reciprocal_rank",
    "ndcg_at_k", "recall_at_k", "evaluate_scores", "evaluate_artifact", "RECALL_KS",
]

LOCOMO_CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop", 5: "adversarial"}
RECALL_KS = (1, 5, 10)
_EVIDENCE = re.compile(r"D:?(\d+):(\d+)")


@dataclass
class Query:
    """One evaluation query with its candidates and the indices of the relevant ones."""

    query: str
    documents: list[str]
    relevant: set[int]
    category: str = "all"
    group: str = ""


@dataclass
class LoadReport:
    """Loaded queries, and what the loader repaired or dropped on the way."""

    queries: list[Query] = field(default_factory=list)
    repaired_ids: int = 0
    dropped_ids: int = 0
    dropped_queries: int = 0


def _turn_text(turn: dict[str, Any], date: str) -> str:
    text = f"[{date}] {turn.get('speaker', '?')}: {turn.get('text', '')}"
    if turn.get("blip_caption"):
        text += f" [shares a photo of {turn['blip_caption']}]"
    return text


def load_locomo(path: str | Path, candidates: str = "sessions", window: int = 0,
                limit: int | None = None) -> LoadReport:
    """Load LoCoMo questions as ranking queries.

    Args:
        path: ``locomo10.json``.
        candidates: ``"sessions"`` (turns of the evidence sessions ± window) or ``"turns"`` (whole conversation).
        window: neighbouring sessions added on each side in ``"sessions"`` mode.
        limit: keep at most this many queries (in file order).
    """
    if candidates not in ("sessions", "turns"):
        raise ValueError(f"candidates must be 'sessions' or 'turns', got {candidates!r}")
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, list) or not data or "conversation" not in data[0]:
        raise ValueError(f"{path} does not look like LoCoMo's locomo10.json (a list of samples with 'conversation')")
    report = LoadReport()
    for n, sample in enumerate(data):
        try:
            for query in _sample_queries(sample, candidates, window, report):
                report.queries.append(query)
                if limit is not None and len(report.queries) >= limit:
                    return report
        except (KeyError, TypeError, AttributeError) as exc:  # a field missing or of the wrong kind
            raise ValueError(f"{path}: sample {n} does not follow LoCoMo's locomo10.json format "
                             f"({type(exc).__name__}: {exc})") from exc
    return report


def _sample_queries(sample: dict[str, Any], candidates: str, window: int, report: LoadReport) -> Iterator[Query]:
    """One LoCoMo sample's questions with evidence as queries; counts repairs and drops in ``report``."""
    conv = sample["conversation"]
    sessions: dict[int, list[tuple[str, str]]] = {}
    for key, turns in conv.items():
        m = re.fullmatch(r"session_(\d+)", key)
        if m and isinstance(turns, list):
            date = conv.get(f"{key}_date_time", "")
            sessions[int(m.group(1))] = [(t["dia_id"], _turn_text(t, date)) for t in turns]
    known = {did for turns in sessions.values() for did, _ in turns}
    for qa in sample["qa"]:
        ids: list[str] = []
        for raw in qa.get("evidence") or []:
            found = [f"D{int(a)}:{int(b)}" for a, b in _EVIDENCE.findall(raw)]
            if len(found) != 1 or found[0] != raw:
                report.repaired_ids += 1
            for did in found:
                if did in known:
                    ids.append(did)
                else:
                    report.dropped_ids += 1
        if not ids:
            report.dropped_queries += 1
            continue
        if not isinstance(qa.get("question"), str):
            raise TypeError(f"a question with evidence {ids[:3]} has no 'question' string")
        ev_sessions = sorted({int(d[1:].split(":")[0]) for d in ids})
        if candidates == "turns":
            chosen = sorted(sessions)
        else:
            chosen = sorted({s + o for s in ev_sessions for o in range(-window, window + 1)} & set(sessions))
        turns = [t for s in chosen for t in sessions[s]]
        relevant = {i for i, (did, _) in enumerate(turns) if did in set(ids)}
        cat = LOCOMO_CATEGORIES.get(int(qa.get("category", 0)), str(qa.get("category")))
        yield Query(qa["question"], [t for _, t in turns], relevant, cat, sample.get("sample_id", ""))


def load_jsonl_queries(path: str | Path) -> LoadReport:
    """Generic JSONL: one ``{"query", "documents": [...], "relevant": [indices]}`` object per line
    (optional ``"category"``)."""
    from memrerank.jsonl import iter_jsonl

    report = LoadReport()
    for where, row in iter_jsonl(path, "--data"):
        if not isinstance(row, dict):
            raise ValueError(f"--data: {where} must be an object")
        docs, rel = row.get("documents"), row.get("relevant")
        if not isinstance(row.get("query"), str) or not isinstance(docs, list) or not isinstance(rel, list):
            raise ValueError(f"--data: {where} needs 'query' (str), 'documents' (list) and 'relevant' (list of indices)")
        if not all(isinstance(d, str) for d in docs):
            raise ValueError(f"--data: {where} 'documents' must be a list of strings")
        bad = [r for r in rel if not isinstance(r, int) or not 0 <= r < len(docs)]
        if bad:
            raise ValueError(f"--data: {where} relevant indices {bad} are outside 0..{len(docs) - 1}")
        report.queries.append(Query(row["query"], docs, set(rel), str(row.get("category", "all"))))
    return report


def _order(scores: np.ndarray) -> np.ndarray:
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")


def average_precision(scores: np.ndarray, relevant: set[int]) -> float:
    """Mean of precision@rank over the ranks of the relevant documents (0 if none is relevant)."""
    if not relevant:
        return 0.0
    hits, total = 0, 0.0
    for rank, idx in enumerate(_order(scores), 1):
        if int(idx) in relevant:
            hits += 1
            total += hits / rank
    return total / len(relevant)


def reciprocal_rank(scores: np.ndarray, relevant: set[int]) -> float:
    for rank, idx in enumerate(_order(scores), 1):
        if int(idx) in relevant:
            return 1.0 / rank
    return 0.0


def ndcg_at_k(scores: np.ndarray, relevant: set[int], k: int = 10) -> float:
    """Binary-gain NDCG@k with log2(rank + 1) discounts."""
    gains = [1.0 if int(i) in relevant else 0.0 for i in _order(scores)[:k]]
    dcg = sum(g / np.log2(r + 2) for r, g in enumerate(gains))
    ideal = sum(1.0 / np.log2(r + 2) for r in range(min(k, len(relevant))))
    return float(dcg / ideal) if ideal > 0 else 0.0


def recall_at_k(scores: np.ndarray, relevant: set[int], k: int) -> float:
    if not relevant:
        return 0.0
    top = {int(i) for i in _order(scores)[:k]}
    return len(top & relevant) / len(relevant)


def evaluate_scores(queries: Sequence[Query], scores: Sequence[np.ndarray]) -> dict[str, dict[str, float]]:
    """MAP, MRR, NDCG@10 and Recall@k per category and overall."""
    rows: dict[str, list[dict[str, float]]] = {}
    for q, s in zip(queries, scores):
        m = {"MAP": average_precision(s, q.relevant), "MRR": reciprocal_rank(s, q.relevant),
             "NDCG@10": ndcg_at_k(s, q.relevant, 10)}
        m.update({f"Recall@{k}": recall_at_k(s, q.relevant, k) for k in RECALL_KS})
        rows.setdefault(q.category, []).append(m)
        rows.setdefault("overall", []).append(m)
    return {cat: {**{k: float(np.mean([r[k] for r in rs])) for k in rs[0]}, "queries": len(rs)}
            for cat, rs in rows.items()}


def evaluate_artifact(artifact: str | Path, queries: Sequence[Query], precisions: Sequence[str] | None = None,
                      options: LoadOptions | None = None, *,
                      progress: bool | None = False) -> dict[str, dict[str, dict[str, float]]]:
    """Score every query's candidates with each precision of an artifact and compute :func:`evaluate_scores`.

    Args:
        artifact: the artifact directory.
        queries: the evaluation queries (:func:`load_locomo`, :func:`load_jsonl_queries`).
        precisions: precisions to evaluate (``None`` = every exported one).
        options: how the artifact is loaded (:class:`~memrerank.runtime.options.LoadOptions`; default: all
            defaults); its ``precision`` is replaced by each precision evaluated.
        progress: a progress bar over the queries on stderr (``None``: when stderr is a terminal).

    Returns:
        ``{precision: {category: {metric: value, "queries": n}}}``, ranked by the raw logits.

    Raises:
        TypeError: ``options`` is not a :class:`LoadOptions`.
    """
    from memrerank import Reranker
    from memrerank.manifest import read_manifest
    from memrerank.progress import bar
    from memrerank.runtime.options import LoadOptions

    options = LoadOptions.merge(options)
    names = list(precisions or read_manifest(artifact).precisions)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for p in names:
        r = Reranker.load(artifact, options.replace(precision=p))
        scores = [r.predict([(q.query, d) for d in q.documents], raw=True)
                  for q in bar(queries, desc=f"eval {p}", enabled=progress, unit="query")]
        results[p] = evaluate_scores(queries, scores)
    return results
