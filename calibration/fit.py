"""Fitting temperature and Platt scaling by minimising log-loss (Newton's method, numpy only).

Targets may be hard labels (0/1) or soft probabilities (teacher mode: another precision's calibrated scores).
Both objectives are convex; the Platt slope is constrained positive so calibration never changes the ranking.
"""

from __future__ import annotations

import numpy as np

from memrerank.calibration import sigmoid

__all__ = ["fit_temperature", "fit_platt", "log_loss"]

_EPS = 1e-12


def log_loss(probs: np.ndarray, targets: np.ndarray) -> float:
    """Mean binary cross-entropy (targets may be soft)."""
    p = np.clip(np.asarray(probs, dtype=np.float64), _EPS, 1 - _EPS)
    y = np.asarray(targets, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def _check(logits: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z = np.asarray(logits, dtype=np.float64).ravel()
    y = np.asarray(targets, dtype=np.float64).ravel()
    if z.shape != y.shape or z.size == 0:
        raise ValueError(f"calibration: need as many targets as logits (got {y.size} and {z.size}), and at least one")
    if not (np.isfinite(z).all() and np.isfinite(y).all()) or y.min() < 0 or y.max() > 1:
        raise ValueError("calibration: logits must be finite and targets in [0, 1]")
    return z, y


def fit_temperature(logits: np.ndarray, targets: np.ndarray, iters: int = 100) -> float:
    """Return T > 0 minimising log-loss of ``sigmoid(logit / T)``."""
    z, y = _check(logits, targets)
    a = 1.0  # a = 1/T; the loss is convex in a
    for _ in range(iters):
        p = sigmoid(a * z)
        g = np.mean((p - y) * z)
        h = np.mean(p * (1 - p) * z * z) + 1e-12
        step = g / h
        new = a - step
        if new <= 0:  # keep the slope positive: halve towards zero instead of crossing it
            new = a / 2
        if abs(new - a) < 1e-10 * max(1.0, abs(a)):
            a = new
            break
        a = new
    return float(1.0 / a)


def fit_platt(logits: np.ndarray, targets: np.ndarray, iters: int = 100) -> tuple[float, float]:
    """Return (a > 0, b) minimising log-loss of ``sigmoid(a * logit + b)``."""
    z, y = _check(logits, targets)
    x = np.stack([z, np.ones_like(z)], 1)
    w = np.array([1.0, 0.0])
    for _ in range(iters):
        p = sigmoid(x @ w)
        g = x.T @ (p - y) / len(z)
        hess = (x * (p * (1 - p))[:, None]).T @ x / len(z) + 1e-9 * np.eye(2)
        step = np.linalg.solve(hess, g)
        new = w - step
        t = 1.0
        while new[0] <= 0 and t > 1e-6:  # damp the step so the slope stays positive
            t /= 2
            new = w - t * step
        if new[0] <= 0:
            break
        done = np.max(np.abs(new - w)) < 1e-10
        w = new
        if done:
            break
    return float(w[0]), float(w[1])
