"""Fidelity of a lower precision vs fp32 on calibration pairs, and the sensitivity search that meets a budget."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memrerank.export.metrics import spearman, topk_overlap

__all__ = ["FidelityBudget", "CalibSet", "load_calib_jsonl", "search_exclusions", "TOPK_FIDELITY",
           "REFINE_MAX_NODES"]

TOPK_FIDELITY = 10
#: After whole groups are kept in fp32, each of their nodes is tried back in low precision one at a time when
#: they are at most this many (one quantize + one scoring pass per node).
REFINE_MAX_NODES = 64


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


def encode_groups(reranker: Any, groups: Sequence[tuple[str, list[str]]], batch_size: int
                  ) -> tuple[list[Any], np.ndarray]:
    """Whole pairs of ``(query, documents)`` groups, tokenized by the artifact's encoder and cut into padded
    batches (export-time feeds: calibration, fidelity, TensorRT calibration); also each pair's group index."""
    from memrerank.runtime.batching import iter_batches

    ids, types, group_of = [], [], []
    for g, (q, docs) in enumerate(groups):
        enc = reranker.encoder.encode(q, docs)
        ids.extend(enc.ids)
        if enc.type_ids is not None:
            types.extend(enc.type_ids)
        group_of.extend([g] * len(docs))
    batches = list(iter_batches(ids, types or None, pad_id=reranker.pad_id, padding_side=reranker.padding_side,
                                batch_size=batch_size))
    return batches, np.asarray(group_of)


class CalibSet:
    """Calibration pairs tokenized once with the artifact's encoder; scores any graph of the artifact."""

    def __init__(self, root: Path, groups: Sequence[tuple[str, list[str]]], batch_size: int = 16) -> None:
        from memrerank.runtime import Reranker

        self.groups = list(groups)
        self.reranker = Reranker.load(root, "fp32")
        self.batches, self.group_of = encode_groups(self.reranker, self.groups, batch_size)
        self.n_pairs = len(self.group_of)
        self.reference = self.score(root / "fp32" / "model.onnx")

    def feeds(self, graph: Path) -> list[dict[str, np.ndarray]]:
        import onnx

        from memrerank.runtime.backends import empty_past as make_empty_past

        inputs = onnx.load(str(graph), load_external_data=False).graph.input
        names = {i.name for i in inputs}
        past_names = [n for n in names if n.startswith(("past_key.", "past_value."))]
        # decoder graphs: full pairs with an empty shared past (batch 1, length 0)
        empty_past = make_empty_past(self.reranker.manifest.prefix_reuse, past_names) if past_names else {}
        out = []
        for b in self.batches:
            feed = {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "token_type_ids": b.token_type_ids}
            out.append({**{k: v for k, v in feed.items() if k in names and v is not None}, **empty_past})
        return out

    def score(self, graph: Path) -> np.ndarray:
        from memrerank.runtime.backends.onnxruntime import OrtBackend

        backend = OrtBackend(graph, layout=self.reranker.manifest.prefix_reuse)
        logits = np.empty(self.n_pairs, dtype=np.float64)
        for b in self.batches:
            logits[b.rows] = backend.score(b.input_ids, b.attention_mask, b.token_type_ids)
        return logits

    def timed_score(self, graph: Path) -> tuple[np.ndarray, float]:
        self.score(graph)  # warm-up
        t0 = time.perf_counter()
        logits = self.score(graph)
        return logits, time.perf_counter() - t0

    def fidelity(self, logits: np.ndarray) -> dict[str, float]:
        """max |Δlogit|, mean per-query Spearman and top-10 overlap vs fp32."""
        spear, top = [], []
        for g in range(len(self.groups)):
            sel = self.group_of == g
            spear.append(spearman(logits[sel], self.reference[sel]))
            top.append(topk_overlap(logits[sel], self.reference[sel], TOPK_FIDELITY))
        return {
            "max_abs_logit_diff": float(np.max(np.abs(logits - self.reference))),
            "spearman_mean": float(np.mean(spear)),
            "top10_overlap": float(np.mean(top)),
            "pairs": int(self.n_pairs),
            "queries": len(self.groups),
        }


def search_exclusions(build: Callable[[list[str]], None], graph: Path, calib: CalibSet,
                      groups: dict[str, list[str]], budget: FidelityBudget,
                      log: Callable[[str], None]) -> dict[str, Any]:
    """Build the plain precision; when it misses the budget, keep the most damaging node groups in fp32.

    Sensitivity: each group is quantized alone (everything else fp32) and its damage measured as the drop in
    mean Spearman vs fp32; groups are then kept in fp32, most damaging first, until the budget holds. Then each
    node of the kept groups is tried back in low precision, least damaging group first, and stays there when the
    budget still holds (layers are coarse: usually one or two products of a layer carry the damage).
    """
    build([])
    plain_logits, plain_time = calib.timed_score(graph)
    plain = calib.fidelity(plain_logits)
    plain_size = _size(graph)
    report: dict[str, Any] = {"budget": asdict(budget), "plain": plain, "kept_fp32": [], "meets_budget": True}
    if budget.met(plain):
        report["fidelity"] = plain
        return report
    log(f"  plain quantization misses the budget ({plain}); running the sensitivity search over {len(groups)} groups")
    every = [n for nodes in groups.values() for n in nodes]
    damage: dict[str, float] = {}
    for name, nodes in groups.items():
        only = set(nodes)
        build([n for n in every if n not in only])
        damage[name] = 1.0 - calib.fidelity(calib.score(graph))["spearman_mean"]
    kept: list[str] = []
    metrics = plain
    for name in sorted(damage, key=damage.get, reverse=True):
        kept.append(name)
        build([n for g in kept for n in groups[g]])
        metrics = calib.fidelity(calib.score(graph))
        if budget.met(metrics):
            break
    excluded = [n for g in kept for n in groups[g]]
    refined = budget.met(metrics) and len(excluded) <= REFINE_MAX_NODES
    if refined:
        current_built = True
        for node in reversed(list(excluded)):
            trial = [x for x in excluded if x != node]
            build(trial)
            m = calib.fidelity(calib.score(graph))
            current_built = budget.met(m)
            if current_built:
                excluded, metrics = trial, m
        if not current_built:
            build(excluded)
    _, final_time = calib.timed_score(graph)
    kept = [g for g in kept if set(groups[g]) & set(excluded)]
    report.update({
        "sensitivity": {k: round(v, 6) for k, v in sorted(damage.items(), key=lambda kv: -kv[1])},
        "kept_fp32": kept,
        "kept_fp32_nodes": excluded,
        "refined_per_node": refined,
        "fidelity": metrics,
        "meets_budget": budget.met(metrics),
        "size_bytes": {"plain": plain_size, "final": _size(graph)},
        "speed_cost": round(final_time / plain_time, 3) if plain_time > 0 else None,
    })
    return report


def _size(graph: Path) -> int:
    return sum(p.stat().st_size for p in graph.parent.iterdir() if p.is_file())
