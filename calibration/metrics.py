"""Calibration metrics: ECE, Brier score, log-loss, reliability bins, decision agreement."""

from __future__ import annotations

import numpy as np

from memrerank.calibration.fit import log_loss

__all__ = ["ece", "brier", "log_loss", "reliability_bins", "decision_agreement", "ECE_BINS", "THRESHOLDS"]

ECE_BINS = 15
THRESHOLDS = (0.3, 0.5, 0.7)


def _bin_index(p: np.ndarray, bins: int) -> np.ndarray:
    # Equal-width bins on [0, 1]; p == 1.0 falls in the last bin.
    return np.minimum((p * bins).astype(np.int64), bins - 1)


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: Σ_bins (n_b / n) · |mean(label) − mean(prob)| over equal-width bins."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    idx = _bin_index(p, bins)
    total = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            total += sel.sum() / len(p) * abs(y[sel].mean() - p[sel].mean())
    return float(total)


def brier(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean squared error between probability and label."""
    return float(np.mean((np.asarray(probs, dtype=np.float64) - np.asarray(labels, dtype=np.float64)) ** 2))


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> list[tuple[float, float, int]]:
    """(mean probability, observed frequency, count) for each non-empty bin."""
    p, y = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    idx = _bin_index(p, bins)
    return [(float(p[idx == b].mean()), float(y[idx == b].mean()), int((idx == b).sum()))
            for b in range(bins) if (idx == b).any()]


def decision_agreement(p: np.ndarray, q: np.ndarray, thresholds=THRESHOLDS) -> dict[str, float]:
    """Share of pairs on which ``p >= t`` and ``q >= t`` decide alike, per threshold."""
    p, q = np.asarray(p), np.asarray(q)
    return {f"{t:g}": float(np.mean((p >= t) == (q >= t))) for t in thresholds}
