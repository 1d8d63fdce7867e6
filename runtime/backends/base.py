"""What a backend is: the one seam between :class:`~memrerank.runtime.Reranker` and whatever runs the graph.

A backend turns packed batches into one logit per row and, where its graph takes a shared past, runs a query's
shared prefix once (:meth:`Backend.prefix`) and scores every batch of that query against the cache it returned.
The cache is opaque to the caller: host arrays for ONNX Runtime on the CPU, device buffers for a GPU backend.
``Reranker`` depends on this protocol only; implementations live one per module (``onnxruntime``, ``tensorrt``).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from memrerank.manifest import CacheLayout

__all__ = ["Backend", "PrefixCache", "empty_past"]

#: What :meth:`Backend.prefix` returns and :meth:`Backend.score` takes back; only its backend reads it.
PrefixCache = Any


@runtime_checkable
class Backend(Protocol):
    """Runs one artifact graph (or engine).

    Attributes:
        providers: what the backend really runs on, best first (checked after the session was created, not
            what was asked for).
        has_past: whether :meth:`prefix` works (the graph takes a shared past and returns its presents).
    """

    providers: list[str]

    @property
    def has_past(self) -> bool: ...

    def score(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray | None = None,
              past: PrefixCache | None = None) -> np.ndarray:
        """One float32 logit per row; ``past`` (from :meth:`prefix`) is shared by every row."""
        ...

    def prefix(self, ids: np.ndarray) -> PrefixCache:
        """Run the shared prefix ``ids`` (1-D) once and return its cache."""
        ...

    def empty_past(self) -> dict[str, np.ndarray]:
        """The zero-length past the graph takes when no prefix is reused (empty for graphs without a past)."""
        ...


def empty_past(layout: CacheLayout | None, names: list[str] | tuple[str, ...] | None = None
               ) -> dict[str, np.ndarray]:
    """Zero-length past arrays ``(1, kv_heads, 0, head_dim)`` for each past input of a decoder graph.

    Args:
        layout: the manifest's prefix-reuse layout (``None``: the graph has no past → ``{}``).
        names: the graph's past input names (default: every layer's ``past_key.i`` / ``past_value.i``).
    """
    if layout is None:
        return {}
    shape = (layout.past_batch, layout.kv_heads, 0, layout.head_dim)
    return {name: np.zeros(shape, dtype=np.float32) for name in (names or layout.past_names)}
