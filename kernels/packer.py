"""The fused pair packer: pieces of many pairs → length-sorted, token-budgeted, padded batches in one pass.

Inputs are what the pair encoder produces without re-tokenizing anything: the shared head ids of each query
(template lead + instruction + context + query), the ragged document ids from one ``encode_batch`` call and the
template tail. The packer applies the document-only truncation rule (``doc[:budget]``), sorts rows longest first
(stable, so ties keep the caller's order), cuts the sorted rows into batches, and writes every batch's
``input_ids``, ``attention_mask`` (and segment ids) into one flat buffer each.

Batches (length bucketing): each batch is a run of the sorted rows with ``rows ≤ max_rows`` and
``rows × width ≤ max_tokens`` (a single row longer than that still gets a batch of its own). Among all such cuts
the packer picks, by dynamic programming, the one minimising ``Σ (rows × width + call_overhead)``: padded tokens
plus a per-call cost in token equivalents, so short rows are not padded to a long one's width just to share a
call, and tiny batches are merged when a call costs more than the padding. Ties go to the shorter first batch.

:func:`pack_numpy` is the reference; the native kernel (``memrerank.kernels._kernels.pack``) must return
bit-for-bit the same arrays (``tests/test_kernels.py``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Packed", "PackedBatch", "pack_numpy", "plan_batches", "DEFAULT_CALL_OVERHEAD"]

#: Cost of one model call in padded-token equivalents: onnxruntime's fixed per-call work is worth a few tokens of
#: a 0.6B decoder and ~10 tokens of MiniLM-L6 on CPU, so short rows are rarely padded to share a call.
DEFAULT_CALL_OVERHEAD = 16


def plan_batches(sorted_lengths: np.ndarray, max_rows: int, max_tokens: int, call_overhead: int) -> list[int]:
    """Batch boundaries over rows sorted longest first (see the module docstring); returns ``[0, ..., n]``."""
    lengths = [int(x) for x in sorted_lengths]
    n = len(lengths)
    best = [0] * (n + 1)
    nxt = [n] * (n + 1)
    for i in range(n - 1, -1, -1):
        width = lengths[i]
        best_cost, best_j = -1, i + 1
        for j in range(i + 1, min(n, i + max_rows) + 1):
            rows = j - i
            if rows > 1 and rows * width > max_tokens:
                break
            cost = rows * width + call_overhead + best[j]
            if best_cost < 0 or cost < best_cost:
                best_cost, best_j = cost, j
        best[i], nxt[i] = best_cost, best_j
    bounds = [0]
    while bounds[-1] < n:
        bounds.append(nxt[bounds[-1]])
    return bounds


@dataclass
class PackedBatch:
    """One padded batch (views into the :class:`Packed` buffers).

    Attributes:
        rows: the caller's positions of this batch's rows.
        input_ids / attention_mask / token_type_ids: int64, shape (rows, width).
        last: column of each row's last real token.
    """

    rows: np.ndarray
    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray | None
    last: np.ndarray


@dataclass
class Packed:
    """All batches of one packing call.

    Attributes:
        order: caller positions in packed order (longest first).
        bounds: batch ``b`` holds packed rows ``bounds[b]:bounds[b+1]``.
        widths: padded width of each batch.
        offsets: batch ``b``'s elements are ``flat[offsets[b]:offsets[b+1]]``.
        input_ids / attention_mask / token_type_ids: the flat buffers.
        last: per packed row, column of its last real token.
        lengths: per caller row, its token count after truncation.
        truncated: per caller row, whether its document was cut.
    """

    order: np.ndarray
    bounds: np.ndarray
    widths: np.ndarray
    offsets: np.ndarray
    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray | None
    last: np.ndarray
    lengths: np.ndarray
    truncated: np.ndarray

    def __len__(self) -> int:
        return len(self.widths)

    def batch(self, b: int) -> PackedBatch:
        lo, hi = int(self.bounds[b]), int(self.bounds[b + 1])
        shape = (hi - lo, int(self.widths[b]))
        sl = slice(int(self.offsets[b]), int(self.offsets[b + 1]))
        types = self.token_type_ids[sl].reshape(shape) if self.token_type_ids is not None else None
        return PackedBatch(rows=self.order[lo:hi], input_ids=self.input_ids[sl].reshape(shape),
                           attention_mask=self.attention_mask[sl].reshape(shape), token_type_ids=types,
                           last=self.last[lo:hi])

    def __iter__(self) -> Iterator[PackedBatch]:
        return (self.batch(b) for b in range(len(self)))

    @property
    def padding_waste(self) -> float:
        """Share of the packed tokens that are padding."""
        total = int(self.offsets[-1])
        return 1.0 - float(self.lengths.sum()) / total if total else 0.0


def _as_i64(a: Sequence[int] | np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, dtype=np.int64).reshape(-1))


def check_args(heads: Sequence[np.ndarray], row_head: np.ndarray, docs: Sequence[Sequence[int]],
               budgets: np.ndarray, max_rows: int, max_tokens: int, head_types: Sequence[np.ndarray] | None
               ) -> None:
    """The argument checks both implementations share (the native kernel re-checks sizes)."""
    if len(row_head) != len(docs):
        raise ValueError(f"row_head has {len(row_head)} entries for {len(docs)} documents")
    if len(budgets) != len(heads):
        raise ValueError(f"budgets has {len(budgets)} entries for {len(heads)} heads")
    if len(row_head) and (row_head.min() < 0 or row_head.max() >= len(heads)):
        raise ValueError("row_head refers to a head that does not exist")
    if max_rows < 1 or max_tokens < 1:
        raise ValueError(f"max_rows and max_tokens must be positive, got {max_rows}, {max_tokens}")
    if head_types is not None and len(head_types) != len(heads):
        raise ValueError("head_types needs one array per head")


def pack_numpy(heads: Sequence[np.ndarray], row_head: np.ndarray, docs: Sequence[Sequence[int]],
               tail: np.ndarray, budgets: np.ndarray, *, pad_id: int, left: bool, max_rows: int, max_tokens: int,
               head_types: Sequence[np.ndarray] | None = None, doc_type: int = 0,
               tail_types: np.ndarray | None = None, call_overhead: int = DEFAULT_CALL_OVERHEAD) -> Packed:
    """Reference packer (see the module docstring for the contract)."""
    heads = [_as_i64(h) for h in heads]
    row_head, budgets, tail = _as_i64(row_head), _as_i64(budgets), _as_i64(tail)
    check_args(heads, row_head, docs, budgets, max_rows, max_tokens, head_types)
    n = len(docs)
    doc_len = np.fromiter((len(d) for d in docs), dtype=np.int64, count=n)
    head_len = np.fromiter((len(h) for h in heads), dtype=np.int64, count=len(heads))
    kept = np.minimum(doc_len, budgets[row_head]) if n else doc_len
    truncated = doc_len > kept
    lengths = (head_len[row_head] + kept + len(tail)) if n else doc_len
    order = np.argsort(-lengths, kind="stable").astype(np.int64)
    if call_overhead < 0:
        raise ValueError(f"call_overhead must be >= 0, got {call_overhead}")
    bounds_a = np.asarray(plan_batches(lengths[order], max_rows, max_tokens, call_overhead), dtype=np.int64)
    widths_a = lengths[order[bounds_a[:-1]]].astype(np.int64)
    widths = widths_a.tolist()
    offsets = np.zeros(len(widths) + 1, dtype=np.int64)
    np.cumsum(np.diff(bounds_a) * widths_a, out=offsets[1:])
    total = int(offsets[-1])
    input_ids = np.full(total, pad_id, dtype=np.int64)
    mask = np.zeros(total, dtype=np.int64)
    types = np.zeros(total, dtype=np.int64) if head_types is not None else None
    htypes = [_as_i64(t) for t in head_types] if head_types is not None else None
    ttypes = _as_i64(tail_types) if tail_types is not None else np.zeros(len(tail), dtype=np.int64)
    last = np.zeros(n, dtype=np.int64)
    for b in range(len(widths)):
        width = int(widths_a[b])
        for p in range(int(bounds_a[b]), int(bounds_a[b + 1])):
            r = int(order[p])
            length = int(lengths[r])
            start = int(offsets[b]) + (p - int(bounds_a[b])) * width + (width - length if left else 0)
            h = heads[row_head[r]]
            k = int(kept[r])
            row = np.concatenate([h, np.asarray(docs[r][:k], dtype=np.int64), tail])
            input_ids[start:start + length] = row
            mask[start:start + length] = 1
            if types is not None:
                types[start:start + length] = np.concatenate(
                    [htypes[row_head[r]], np.full(k, doc_type, np.int64), ttypes])
            last[p] = width - 1 if left else length - 1
    return Packed(order=order, bounds=bounds_a, widths=widths_a, offsets=offsets, input_ids=input_ids,
                  attention_mask=mask, token_type_ids=types, last=last, lengths=lengths, truncated=truncated)
