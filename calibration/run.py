"""``memrerank calibrate``: fit per-precision calibration on pairs and write it into the manifest."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from memrerank.calibration import Calibrator, sigmoid
from memrerank.calibration.fit import fit_platt, fit_temperature, log_loss
from memrerank.calibration.metrics import brier, decision_agreement, ece, reliability_bins

__all__ = ["load_calibration_pairs", "calibrate_artifact", "CALIBRATION_METHODS"]

CALIBRATION_METHODS = ("auto", "temperature", "platt")


def load_calibration_pairs(path: str | Path, limit: int | None = None) -> tuple[list[str], list[str], np.ndarray | None]:
    """(queries, documents, labels or None) from a JSONL of {"query","document","label"?} or LoCoMo's json."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--data: {path} does not exist")
    if path.suffix == ".json":
        from memrerank.evaluation import load_locomo

        qs, ds, ys = [], [], []
        for q in load_locomo(path, candidates="sessions", window=0, limit=limit).queries:
            for i, d in enumerate(q.documents):
                qs.append(q.query)
                ds.append(d)
                ys.append(float(i in q.relevant))
        return qs, ds, np.asarray(ys)
    from memrerank.jsonl import iter_jsonl

    qs, ds, ys = [], [], []
    for where, row in iter_jsonl(path, "--data"):
        if not isinstance(row, dict) or not isinstance(row.get("query"), str) or not isinstance(
                row.get("document"), str):
            raise ValueError(f"--data: {where} needs string fields 'query' and 'document'")
        qs.append(row["query"])
        ds.append(row["document"])
        ys.append(row.get("label"))
    labelled = [y is not None for y in ys]
    if any(labelled) and not all(labelled):
        raise ValueError(f"--data {path}: either every line has a 'label' (labels mode) or none (teacher mode)")
    if all(labelled):
        y = np.asarray(ys, dtype=np.float64)
        if not np.isin(y, (0.0, 1.0)).all():
            raise ValueError(f"--data {path}: labels must be 0 or 1")
        return qs, ds, y
    return qs, ds, None


def _holdout_mask(queries: Sequence[str], fraction: float) -> np.ndarray:
    """Deterministic split by query (a query's pairs are all train or all held out)."""
    def bucket(q: str) -> float:
        return int(hashlib.sha256(q.encode("utf-8", "surrogatepass")).hexdigest()[:8], 16) / 0xFFFFFFFF

    return np.array([bucket(q) < fraction for q in queries])


def _fit(method: str, logits: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
    if method == "temperature":
        return {"method": "temperature", "params": {"temperature": fit_temperature(logits, targets)}}
    if method == "platt":
        a, b = fit_platt(logits, targets)
        return {"method": "platt", "params": {"a": a, "b": b}}
    t = _fit("temperature", logits, targets)
    p = _fit("platt", logits, targets)
    lt = log_loss(Calibrator.from_block(t)(logits), targets)
    lp = log_loss(Calibrator.from_block(p)(logits), targets)
    return p if lp < lt * 0.99 else t  # the bias only where it helps


def _metrics(probs: np.ndarray, targets: np.ndarray, labelled: bool) -> dict[str, float]:
    out = {"log_loss": log_loss(probs, targets), "brier": brier(probs, targets)}
    if labelled:
        out["ece"] = ece(probs, targets)
    else:
        out["mean_abs_diff_to_teacher"] = float(np.mean(np.abs(probs - targets)))
    return out


def calibrate_artifact(artifact: str | Path, data: str | Path, method: str = "auto",
                       precisions: Sequence[str] | None = None, holdout: float = 0.2, limit: int | None = None,
                       plot: str | Path | None = None, log=print) -> dict[str, Any]:
    """Fit, report and store calibration for each precision of ``artifact``."""
    from memrerank import Reranker
    from memrerank.manifest import MANIFEST_NAME, read_manifest

    if method not in CALIBRATION_METHODS:
        raise ValueError(f"--method: choose one of {', '.join(CALIBRATION_METHODS)}")
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"--holdout must be in (0, 1), got {holdout}")
    root = Path(artifact)
    manifest = read_manifest(root)
    names = list(precisions or manifest["precisions"])
    queries, docs, labels = load_calibration_pairs(data, limit)
    labelled = labels is not None
    held = _holdout_mask(queries, holdout)
    if held.all() or not held.any():
        raise ValueError("--holdout leaves an empty train or held-out part; give more queries")
    pairs = list(zip(queries, docs))
    log(f"{len(pairs)} pairs ({'labels' if labelled else 'teacher'} mode), {int(held.sum())} held out")
    logits = {p: Reranker.load(root, precision=p).predict(pairs, raw=True).astype(np.float64)
              for p in dict.fromkeys(["fp32", *names])}
    existing_fp32 = Calibrator.from_block(manifest.get("calibration", {}).get("fp32"))
    blocks: dict[str, dict[str, Any]] = {}
    report: dict[str, Any] = {"mode": "labels" if labelled else "teacher", "pairs": len(pairs),
                              "held_out": int(held.sum()), "precisions": {}}
    if labelled:
        base_rate = float(labels[~held].mean())
        report["base_rate"] = base_rate
        report["base_rate_log_loss"] = log_loss(np.full(int(held.sum()), base_rate), labels[held])
    # labels mode fits every precision to the labels; teacher mode fits to fp32's calibrated probabilities.
    teacher = labels if labelled else existing_fp32(logits["fp32"]).astype(np.float64)
    order = [p for p in names if p != "fp32"]
    if labelled and "fp32" in names:
        order = ["fp32", *order]
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    for p in order:
        z = logits[p]
        block = _fit(method, z[~held], teacher[~held])
        cal = Calibrator.from_block(block)
        before, after = sigmoid(z).astype(np.float64), cal(z).astype(np.float64)
        entry = {"before": _metrics(before[held], teacher[held], labelled),
                 "after": _metrics(after[held], teacher[held], labelled)}
        block.update({"mode": report["mode"], "data": str(data), "data_size": len(pairs),
                      "train_pairs": int((~held).sum()), "fit_date": now, "metrics": entry})
        blocks[p] = block
        report["precisions"][p] = {"method": block["method"], "params": block["params"], **entry}
    # decision agreement vs fp32 at the usual thresholds, before and after
    fp32_after = (Calibrator.from_block(blocks["fp32"]) if "fp32" in blocks else existing_fp32)(logits["fp32"])
    for p in order:
        if p == "fp32":
            continue
        cal = Calibrator.from_block(blocks[p])
        report["precisions"][p]["agreement_vs_fp32"] = {
            "before": decision_agreement(sigmoid(logits[p])[held], sigmoid(logits["fp32"])[held]),
            "after": decision_agreement(cal(logits[p])[held], fp32_after[held]),
        }
        blocks[p]["metrics"]["agreement_vs_fp32"] = report["precisions"][p]["agreement_vs_fp32"]
    if labelled:
        for p, r in report["precisions"].items():
            r["beats_uncalibrated"] = r["after"]["log_loss"] < r["before"]["log_loss"]
            r["beats_base_rate"] = r["after"]["log_loss"] < report["base_rate_log_loss"]
    manifest.setdefault("calibration", {}).update(blocks)
    tmp = root / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, root / MANIFEST_NAME)
    if plot:
        _plot(plot, {p: (sigmoid(logits[p])[held], Calibrator.from_block(blocks[p])(logits[p])[held]) for p in order},
              teacher[held], labelled)
    return report


def _plot(path: str | Path, curves: dict[str, tuple[np.ndarray, np.ndarray]], targets: np.ndarray,
          labelled: bool) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ValueError("--plot needs matplotlib: pip install 'memrerank[bench]'") from exc
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls=":", label="perfect")
    for name, (before, after) in curves.items():
        for probs, style, tag in ((before, "--", "before"), (after, "-", "after")):
            bins = reliability_bins(probs, targets)
            line, = ax.plot([b[0] for b in bins], [b[1] for b in bins], style, marker="o", ms=3,
                            label=f"{name} {tag}" + (f" (ECE {ece(probs, targets):.3f})" if labelled else ""))
    ax.set_xlabel("predicted probability")
    ax.set_ylabel("observed relevance rate" if labelled else "teacher (fp32) probability")
    ax.set_title("Reliability (held-out pairs, 15 bins)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
