"""Native hot paths with numpy fallbacks.

Kernels (C++ via nanobind, built by CMakeLists.txt when a compiler is present):

* ``pack`` — the fused pair packer (:mod:`memrerank.kernels.packer` holds the contract and the numpy reference).

:data:`NATIVE` tells whether the compiled extension is in use; ``MEMRERANK_NO_KERNELS=1`` (at build or run time)
forces the numpy path. Both paths return bit-for-bit the same arrays.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from memrerank.kernels.packer import DEFAULT_CALL_OVERHEAD, Packed, PackedBatch, check_args, pack_numpy

__all__ = ["NATIVE", "backend_name", "pack_pairs", "Packed", "PackedBatch", "pack_numpy", "pack_native"]

try:  # pragma: no cover - depends on the build
    if os.environ.get("MEMRERANK_NO_KERNELS", "0") not in ("", "0"):
        raise ImportError("disabled by MEMRERANK_NO_KERNELS")
    from memrerank.kernels import _kernels  # type: ignore[attr-defined]

    NATIVE = True
except ImportError:
    _kernels = None
    NATIVE = False


def backend_name() -> str:
    """``"native"`` when the compiled kernels are in use, else ``"numpy"``."""
    return "native" if NATIVE else "numpy"


def _i64(a: Sequence[int] | np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, dtype=np.int64).reshape(-1))


def pack_native(heads: Sequence[np.ndarray], row_head: np.ndarray, docs: Sequence[Sequence[int]],
                tail: np.ndarray, budgets: np.ndarray, *, pad_id: int, left: bool, max_rows: int, max_tokens: int,
                head_types: Sequence[np.ndarray] | None = None, doc_type: int = 0,
                tail_types: np.ndarray | None = None, call_overhead: int = DEFAULT_CALL_OVERHEAD) -> Packed:
    """The compiled packer (raises RuntimeError when it is not built)."""
    if _kernels is None:
        raise RuntimeError("the native kernels are not built (or MEMRERANK_NO_KERNELS is set)")
    heads = [_i64(h) for h in heads]
    row_head, budgets = _i64(row_head), _i64(budgets)
    check_args(heads, row_head, docs, budgets, max_rows, max_tokens, head_types)
    docs = docs if isinstance(docs, list) else list(docs)
    docs = [d if isinstance(d, (list, tuple)) else list(d) for d in docs]
    out = _kernels.pack(heads, row_head, docs, _i64(tail), budgets, int(pad_id), bool(left), int(max_rows),
                        int(max_tokens), [_i64(t) for t in head_types] if head_types is not None else None,
                        int(doc_type), _i64(tail_types) if tail_types is not None else None, int(call_overhead))
    order, bounds, widths, offsets, ids, mask, types, last, lengths, truncated = out
    return Packed(order=order, bounds=bounds, widths=widths, offsets=offsets, input_ids=ids, attention_mask=mask,
                  token_type_ids=types, last=last, lengths=lengths, truncated=truncated.view(bool))


def pack_pairs(*args, **kwargs) -> Packed:
    """Pack pair pieces into batches with the native kernel when built, else numpy (same output)."""
    return (pack_native if NATIVE else pack_numpy)(*args, **kwargs)
