"""Score calibration: turns a raw logit into a probability whose thresholds mean the same at every precision.

The runtime applies what the manifest's ``calibration`` block records for the loaded precision; an artifact
without one gives ``sigmoid(logit)`` (for the decoder family that is exactly the official
``softmax([no, yes])[yes]`` score).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from memrerank.manifest import calibration_problem

__all__ = ["sigmoid", "Calibrator", "METHODS"]

METHODS = ("none", "temperature", "platt")


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function (no overflow for large |x|)."""
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    ex = np.exp(x[~pos])
    out[~pos] = ex / (1.0 + ex)
    return out


@dataclass(frozen=True)
class Calibrator:
    """``p = sigmoid(a * logit + b)``; temperature scaling is ``a = 1/T, b = 0``; ``none`` is ``a = 1, b = 0``."""

    method: str = "none"
    a: float = 1.0
    b: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_block(cls, block: dict[str, Any] | None) -> Calibrator:
        """Build from a fit's ``{"method", "params", ...}`` dict (``None`` or empty → uncalibrated)."""
        if not block:
            return cls()
        return cls.from_params(block.get("method"), block.get("params", {}), dict(block))

    @classmethod
    def from_params(cls, method: Any, params: dict[str, Any], info: dict[str, Any] | None = None) -> Calibrator:
        """Build from a method name and its parameters (as a manifest's calibration entry holds them).

        Raises:
            ValueError: an unknown method, or parameters that are not finite or out of the bounds
                :func:`memrerank.manifest.calibration_problem` sets (a slope at or below 0 would change the
                ranking; NaN, infinite or extreme parameters would make every score NaN, 0.5, 0 or 1).
        """
        problem = calibration_problem(method, params)
        if problem:
            raise ValueError(f"calibration: {problem}")
        block = info or {"method": method, "params": dict(params)}
        if method == "temperature":
            return cls("temperature", 1.0 / float(params["temperature"]), 0.0, block)
        return cls("platt", float(params["a"]), float(params["b"]), block)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        return sigmoid(self.a * np.asarray(logits, dtype=np.float64) + self.b).astype(np.float32)
