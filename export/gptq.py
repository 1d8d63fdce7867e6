"""4-bit coding with error compensation (GPTQ, Frantar et al. 2022): the ``int4`` precision's default coding where
calibration pairs exist.

Round to nearest codes each weight alone. GPTQ codes a product ``x·W`` (``W``: K × N) one input channel at a time
and spreads each channel's rounding error over the channels not coded yet, in proportion to how the calibration
activations correlate them (``H = Xᵀ·X`` over the real tokens of the calibration pairs, :func:`input_hessians`):
the error the *product* makes on those activations shrinks, not the error of each weight. The blocks, scales and
zero points are :func:`memrerank.export.int4.weight_blocks`' (asymmetric blocks of input channels, the range of
least squared error, chosen when a block's first channel is reached, from the weights as compensated so far), so
the graph and kernel are the same ``MatMulNBits``; only which code each weight gets differs.

``H`` comes from the fp32 graph (every layer's inputs as fp32 computes them, not as the already-coded layers
before it would: the one-pass variant), gathered in as few passes as :data:`HESSIAN_BYTES` allows (a pass asks
the graph for the inputs of a run of layers only, so onnxruntime computes those layers and no further).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DAMP", "HESSIAN_BYTES", "gptq_blocks", "input_hessians", "product_inputs"]

#: Added to ``H``'s diagonal, as a share of its mean (GPTQ's ``percdamp``): keeps the inverse finite where the
#: calibration activations leave directions unseen.
DAMP = 0.01
#: At most this many bytes of ``H`` (float32 K × K per product input) held at once; more inputs take more passes.
HESSIAN_BYTES = 6 << 30
#: Input channels updated together before the rest of ``W`` is (GPTQ's lazy batch; a multiple of every block).
LAZY = 128


def product_inputs(graph: Path, nodes: Iterable[str]) -> dict[str, tuple[str, int]]:
    """Product node → (the activation it multiplies, K), for the plain weight products ``nodes`` of ``graph``
    (read without its weights)."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    wanted, out = set(nodes), {}
    for n in model.graph.node:
        if n.name not in wanted or n.input[1] not in inits:
            continue
        dims = list(inits[n.input[1]].dims)
        transposed = n.op_type == "Gemm" and any(a.name == "transB" and a.i for a in n.attribute)
        out[n.name] = (n.input[0], int(dims[1] if transposed else dims[0]))
    return out


def _passes(sizes: dict[str, int], order: Sequence[str], budget: int) -> list[list[str]]:
    """``order``'s activations cut into consecutive runs whose float32 ``H`` fit ``budget`` bytes (one each at
    least)."""
    runs: list[list[str]] = [[]]
    held = 0
    for x in order:
        need = 4 * sizes[x] ** 2
        if runs[-1] and held + need > budget:
            runs.append([])
            held = 0
        runs[-1].append(x)
        held += need
    return [r for r in runs if r]


def input_hessians(graph: Path, sizes: dict[str, int], feeds: Sequence[dict[str, np.ndarray]], *,
                   budget: int | None = None, rows: int = 4) -> Iterator[dict[str, tuple[np.ndarray, int]]]:
    """``Xᵀ·X`` (float32 K × K) and the token count of each activation in ``sizes`` (name → K), over the real
    tokens (``attention_mask``) of ``feeds``, yielded a run of activations at a time (graph order, at most
    ``budget`` bytes of ``H`` per run: :data:`HESSIAN_BYTES`), so the caller codes a run's products and frees its
    ``H`` before the next is gathered.

    Each run is a copy of the graph's structure beside it (sharing its external data) whose only outputs are that
    run's activations: onnxruntime prunes the layers after them. ``rows``: pairs per run call (each call holds every
    requested activation of its rows).
    """
    import onnx

    from memrerank.export.optimize import probe_session

    model = onnx.load(str(graph), load_external_data=False)
    order = [x for n in model.graph.node for x in n.input if x in sizes]
    order = list(dict.fromkeys(order))  # graph order, each once
    if set(order) != set(sizes):
        raise ValueError(f"not activations of {graph}: {sorted(set(sizes) - set(order))[:3]}")
    for run in _passes(sizes, order, HESSIAN_BYTES if budget is None else budget):
        session = probe_session(graph, run, only=True)
        wanted = {i.name for i in session.get_inputs()}
        hs = {x: np.zeros((sizes[x], sizes[x]), np.float32) for x in run}
        tokens = 0
        for feed in feeds:
            batch = feed["attention_mask"].shape[0]
            for r0 in range(0, batch, rows):
                part = {k: (v[r0:r0 + rows] if v.ndim and v.shape[0] == batch and not k.startswith("past_") else v)
                        for k, v in feed.items() if k in wanted}
                mask = feed["attention_mask"][r0:r0 + rows].astype(bool)
                tokens += int(mask.sum())
                for x, value in zip(run, session.run(run, part)):
                    xs = value[mask] if value.ndim == 3 and value.shape[:2] == mask.shape else value.reshape(
                        -1, value.shape[-1])
                    hs[x] += xs.T @ xs
        del session
        yield {x: (h, tokens) for x, h in hs.items()}


def _block_range(rows: Any, top: float, clip_ratios: Sequence[float]) -> tuple[Any, Any]:
    """Scale and zero point (N each) of one asymmetric block ``rows`` (block × N: its input channels of every
    column) on the grid 0..``top``: the clip ratio of least squared error, as
    :func:`memrerank.export.int4.weight_blocks` chooses it."""
    import torch

    lo = torch.clamp(rows.min(dim=0).values, max=0.0)
    hi = torch.clamp(rows.max(dim=0).values, min=0.0)
    hi = torch.where(hi == lo, torch.full_like(hi, top), hi)  # an all-zero block: scale 1, zero point 0
    best = (torch.full_like(lo, float("inf")), torch.empty_like(lo), torch.empty_like(lo))
    for c in clip_ratios:
        scale = (hi - lo) * (c / top)
        zero = torch.clamp(torch.round(-lo * c / scale), 0, top)
        q = torch.clamp(torch.round(rows / scale) + zero, 0, top)
        err = ((q - zero) * scale - rows).square().sum(dim=0)
        better = err < best[0]
        best = (torch.where(better, err, best[0]), torch.where(better, scale, best[1]),
                torch.where(better, zero, best[2]))
    return best[1], best[2]


def _upper_inverse_factor(h: Any) -> Any:
    """``U``, upper triangular with ``H⁻¹ = Uᵀ·U`` (GPTQ's Cholesky factor of the inverse): with ``P`` the
    reversal, ``P·H·P = L·Lᵀ`` gives ``U = P·L⁻¹·P`` (one factorisation and one triangular inverse; no ``H⁻¹``)."""
    import torch

    rev = torch.flip(h, (0, 1))
    low = torch.linalg.cholesky(rev)
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    return torch.flip(torch.linalg.solve_triangular(low, eye, upper=False), (0, 1))


def gptq_blocks(w: Any, h: Any, block: int, clip_ratios: Sequence[float], *, bits: int = 4,
                damp: float = DAMP, act_order: bool = False) -> tuple[Any, Any, Any]:
    """``W`` (K × N) coded by GPTQ against ``H`` (K × K, ``Xᵀ·X`` of its input) in asymmetric blocks of ``block``
    input channels on the grid 0..2^bits - 1, each block's range the ``clip_ratios`` one of least squared error.

    Input channels are coded in order; a block's scale and zero point are chosen when its first channel is reached,
    from the weights as compensated so far. Channels no calibration token reached (``H[k, k] = 0``) are coded from
    zero weights (they multiply nothing the calibration saw). ``damp``: :data:`DAMP`.

    ``act_order``: code the channels in order of falling ``H[k, k]`` (the ones the activations weigh most first,
    while the most channels remain to take their error), every block's range chosen first from the weights as
    given ("static groups": the blocks stay blocks of consecutive channels, so ``MatMulNBits`` needs no index).

    Returns:
        ``(codes, scales, zero_points)``: uint8 ``(N, ceil(K / block), block)`` (the last block padded), float32
        and uint8 ``(N, ceil(K / block))``; :func:`memrerank.export.int4.pack_blocks` lays them out for
        ``MatMulNBits``.

    Raises:
        ValueError: shapes that do not match, or ``H`` not finite.
    """
    import torch

    w = np.asarray(w, np.float32)
    k, n = w.shape
    if np.shape(h) != (k, k):
        raise ValueError(f"H must be {k} x {k} for a weight of {k} input channels, got {np.shape(h)}")
    if not np.isfinite(h).all():
        raise ValueError("H has non-finite entries: the calibration activations overflowed float32")
    top = float((1 << bits) - 1)
    ratios = tuple(clip_ratios)
    blocks = -(-k // block)
    kp = blocks * block
    with torch.no_grad():
        wk = torch.zeros((kp, n), dtype=torch.float32)  # input channels as rows: each step reads one row
        wk[:k] = torch.from_numpy(w)
        hh = torch.eye(kp, dtype=torch.float32)  # padded channels: unit curvature, zero weight
        hh[:k, :k] = torch.from_numpy(np.asarray(h, np.float32))
        dead = torch.diagonal(hh) == 0
        hh[dead, dead] = 1.0
        wk[dead] = 0.0
        diag = torch.diagonal(hh)
        diag += damp * float(diag[:k].mean())
        codes = torch.empty((kp, n), dtype=torch.uint8)
        scales = torch.empty((blocks, n), dtype=torch.float32)
        zeros = torch.empty((blocks, n), dtype=torch.float32)
        order = None
        if act_order:
            for b in range(blocks):
                scales[b], zeros[b] = _block_range(wk[b * block:(b + 1) * block], top, ratios)
            order = torch.argsort(torch.diagonal(hh), descending=True, stable=True)
            wk, hh = wk[order], hh[order][:, order]
            row_scale, row_zero = scales[order // block], zeros[order // block]  # each channel's block's
        u = _upper_inverse_factor(hh)  # float32: ~3e-5 of H⁻¹ off float64 at K = 8960, damped
        del hh
        lazy = max(LAZY // block, 1) * block
        for i1 in range(0, kp, lazy):
            i2 = min(i1 + lazy, kp)
            w1 = wk[i1:i2].clone()
            err1 = torch.empty_like(w1)
            u1 = u[i1:i2, i1:i2]
            for i in range(i2 - i1):
                col = i1 + i
                if order is not None:
                    s, z = row_scale[col], row_zero[col]
                elif col % block == 0:
                    s, z = _block_range(w1[i:i + block], top, ratios)
                    scales[col // block], zeros[col // block] = s, z
                row = w1[i]
                q = torch.clamp(torch.round(row / s) + z, 0, top)
                codes[col] = q.to(torch.uint8)
                err1[i] = (row - (q - z) * s) / u1[i, i]
                if i + 1 < i2 - i1:  # the error spread over this lazy batch's channels after it
                    w1[i + 1:].addr_(u1[i, i + 1:], err1[i], alpha=-1.0)
            if i2 < kp:  # and over every channel after the batch, in one product
                wk[i2:].addmm_(u[i1:i2, i2:].T, err1, alpha=-1.0)
        if order is not None:
            codes[order] = codes.clone()  # back to the channels' own order
        codes, scales, zeros = codes.T.contiguous(), scales.T.contiguous(), zeros.T.contiguous()
    return codes.numpy().reshape(n, blocks, block), scales.numpy(), zeros.numpy().astype(np.uint8)
