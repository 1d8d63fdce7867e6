"""What a backend is: the one seam between :class:`~memrerank.runtime.Reranker` and whatever runs the graph.

A backend turns packed batches into one logit per row and, where its graph takes a shared past, runs a query's
shared prefix once (:meth:`Backend.prefix`) and scores every batch of that query against the cache it returned.
The cache is opaque to the caller: host arrays for ONNX Runtime on the CPU, device buffers for a GPU backend.
``Reranker`` depends on this protocol only; implementations live one per module (``onnxruntime``, ``tensorrt``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from memrerank.kernels import DEFAULT_CALL_OVERHEAD
from memrerank.manifest import CacheLayout

__all__ = ["Backend", "PrefixCache", "empty_past", "BatchBudget", "CPU_BUDGET", "GPU_BUDGET", "DEFAULT_BATCH_SIZE",
           "DEFAULT_MAX_BATCH_TOKENS"]

#: Most rows per model call on the CPU.
DEFAULT_BATCH_SIZE = 32
#: Most padded tokens per model call (rows × width) on the CPU. Bounds activation memory: with the int8
#: 0.6B-shaped decoder, 1,000 candidates × 512 tokens stay under 1.5 GB peak RSS (bench/memory.py).
DEFAULT_MAX_BATCH_TOKENS = 2048


@dataclass(frozen=True)
class BatchBudget:
    """How the packer cuts pairs into model calls on one kind of device.

    Attributes:
        batch_size: most rows per call.
        max_batch_tokens: most padded tokens (rows × width) per call.
        call_overhead: what one more call costs, in padded-token equivalents, weighed against padding.
    """

    batch_size: int
    max_batch_tokens: int
    call_overhead: int


#: The CPU's budget bounds activation memory.
CPU_BUDGET = BatchBudget(DEFAULT_BATCH_SIZE, DEFAULT_MAX_BATCH_TOKENS, DEFAULT_CALL_OVERHEAD)
#: On a GPU a call costs kernel launches and a host sync, so a typical request (up to 64 candidates of up to 512
#: tokens) is one call.
GPU_BUDGET = BatchBudget(64, 64 * 512, 4096)

#: What :meth:`Backend.prefix` returns and :meth:`Backend.score` takes back; only its backend reads it.
PrefixCache = Any


@runtime_checkable
class Backend(Protocol):
    """Runs one artifact graph (or engine).

    Attributes:
        providers: what the backend really runs on, best first (checked after the session was created, not
            what was asked for).
        has_past: whether :meth:`prefix` works (the graph takes a shared past and returns its presents).
        budget: how many rows and padded tokens one call should take on what the backend runs on (the
            :class:`~memrerank.runtime.LoadOptions` ``batch_size`` / ``max_batch_tokens`` override it).
    """

    providers: list[str]
    budget: BatchBudget

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
