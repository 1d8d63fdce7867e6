"""Length-sorted batching: pairs of similar length share a batch, so little compute goes to padding."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

__all__ = ["Batch", "iter_batches"]


@dataclass
class Batch:
    """One padded batch.

    Attributes:
        rows: positions, in the caller's list, of this batch's rows.
        input_ids / attention_mask / token_type_ids: int64 arrays of shape (rows, longest row).
    """

    rows: np.ndarray
    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray | None


def iter_batches(
    ids: list[np.ndarray],
    type_ids: list[np.ndarray] | None,
    *,
    pad_id: int,
    padding_side: str,
    batch_size: int,
) -> Iterator[Batch]:
    """Yield padded batches over ``ids`` sorted longest first; ``Batch.rows`` restores the caller's order."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    order = np.argsort(-lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = int(lengths[rows[0]])
        input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        types = np.zeros((len(rows), width), dtype=np.int64) if type_ids is not None else None
        for r, i in enumerate(rows):
            n = int(lengths[i])
            cols = slice(width - n, width) if padding_side == "left" else slice(0, n)
            input_ids[r, cols] = ids[i]
            mask[r, cols] = 1
            if types is not None:
                types[r, cols] = type_ids[i]
        yield Batch(rows=rows, input_ids=input_ids, attention_mask=mask, token_type_ids=types)
