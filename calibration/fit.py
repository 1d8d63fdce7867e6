"""Fitting temperature and Platt scaling by minimising log-loss (Newton's method, numpy only).

Targets may be hard labels (0/1) or soft probabilities (teacher mode: another precision's calibrated scores).
Both objectives are convex; the Platt slope is constrained positive so calibration never changes the ranking.
On hard labels the log-loss minimum runs off to an infinite slope when the scores separate the labels; Platt's
(1999) targets (:func:`platt_targets`) keep it finite. :func:`informative_p_value` tests whether scores carry
any information about labels at all.
"""

from __future__ import annotations

import math

import numpy as np

from memrerank.calibration import sigmoid

__all__ = ["fit_temperature", "fit_platt", "log_loss", "platt_targets", "informative_p_value"]

_EPS = 1e-12
#: The least slope a Platt fit returns (it is kept positive so calibration never changes the ranking).
_SLOPE_FLOOR = 1e-12


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
    """Return (a > 0, b) minimising log-loss of ``sigmoid(a * logit + b)``.

    Newton's method on centred, scaled logits (slope and bias then barely interact, even when the logits hardly
    vary), with a backtracking line search; the slope is held at or above a tiny floor, and once it sits there
    with the loss still falling towards 0 only the bias moves (the constrained optimum of a convex problem).
    Scores that do not vary, or rank the targets backwards, end at that floor with the bias at the targets'
    mean log-odds, the best constant.
    """
    z, y = _check(logits, targets)
    centre, scale = float(z.mean()), float(z.std())
    if scale == 0.0:  # constant scores: only the bias can be fitted
        mean = float(np.clip(y.mean(), _EPS, 1 - _EPS))
        return _SLOPE_FLOOR, float(np.log(mean / (1 - mean)))
    x = np.stack([(z - centre) / scale, np.ones_like(z)], 1)
    w = np.array([scale, centre])  # a = 1, b = 0 in the logits' own units
    floor = _SLOPE_FLOOR * scale

    def loss(v: np.ndarray) -> float:
        q = x @ v  # log(1 + e^q) - y q, computed without overflow
        return float(np.mean(np.logaddexp(0.0, q) - y * q))

    current = loss(w)
    for _ in range(iters):
        p = sigmoid(x @ w)
        g = x.T @ (p - y) / len(z)
        hess = (x * (p * (1 - p))[:, None]).T @ x / len(z) + 1e-12 * np.eye(2)
        if w[0] <= floor and g[0] > 0:  # held at the floor: move the bias only
            step = np.array([0.0, g[1] / hess[1, 1]])
        else:
            step = np.linalg.solve(hess, g)
        t, new = 1.0, w
        while t > 1e-10:
            new = w - t * step
            new[0] = max(new[0], floor)
            value = loss(new)
            if value <= current:
                break
            t /= 2
        else:
            break
        done = np.max(np.abs(new - w)) < 1e-10 * max(1.0, float(np.max(np.abs(w))))
        w, current = new, value
        if done:
            break
    a = float(w[0] / scale)
    return a, float(w[1] - a * centre)


def platt_targets(labels: np.ndarray) -> np.ndarray:
    """Platt's (1999) targets for 0/1 labels: ``(N+ + 1) / (N+ + 2)`` for a positive, ``1 / (N- + 2)`` for a
    negative (what scikit-learn's ``CalibratedClassifierCV(method="sigmoid")`` fits to).

    A Bayesian prior, uniform on each class's probability: the fit is pulled from 0 and 1 by one pseudo-pair per
    label, which keeps its slope finite when the scores separate the labels (the plain log-loss minimum is then
    at an infinite slope: every score 0 or 1), and barely moves it on large data.

    Raises:
        ValueError: a label that is not 0 or 1.
    """
    y = np.asarray(labels, dtype=np.float64).ravel()
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("calibration: Platt's targets need 0/1 labels")
    positives, negatives = int(y.sum()), int(y.size - y.sum())
    return np.where(y == 1.0, (positives + 1) / (positives + 2), 1 / (negatives + 2))


def informative_p_value(logits: np.ndarray, labels: np.ndarray) -> float:
    """p-value of the hypothesis that the scores carry no information about the 0/1 labels.

    A likelihood-ratio test of Platt scaling (``sigmoid(a·logit + b)``, ``a >= 0``) against the constant base
    rate (``a = 0``): ``2·N·(log-loss of the base rate − log-loss of the fit)`` is, under that hypothesis, 0 or
    χ²₁ with even odds (the slope is held at or above 0), so ``p = P(χ²₁ ≥ stat) / 2``. Scores that rank the
    labels backwards count as no information: a calibration keeps the ranking.
    """
    z, y = _check(logits, labels)
    base = float(y.mean())
    if base in (0.0, 1.0) or np.ptp(z) == 0.0:
        return 1.0
    a, b = fit_platt(z, y)
    stat = 2 * z.size * (log_loss(np.full(z.size, base), y) - log_loss(sigmoid(a * z + b), y))
    if stat <= 0:
        return 1.0
    return 0.5 * math.erfc(math.sqrt(stat / 2))
