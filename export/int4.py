"""The ``int4`` precision: weight-only 4-bit products on onnxruntime's ``MatMulNBits``.

Each weight product ``x·W`` (``W``: K × N) becomes ``MatMulNBits(x, W_q, s, z)``: ``W`` is cut into blocks of
:data:`INT4_BLOCK` input channels per output column, each coded on the 4-bit grid 0..15 with its own scale and
zero point (asymmetric: the grid spans the block's own range, zero included; the range shrunk where that lowers
the block's squared error, :func:`int4_blocks`), so the weights take 4 bits + one fp32 scale and one 4-bit zero
point per block (0.64 bytes per value at blocks of 32). The activation stays fp32 in the graph; with
:data:`INT4_ACCURACY_LEVEL` 4 the CPU kernel codes each row's blocks to int8 on the fly and multiplies in int8
(per row, so a score still depends on its own row alone). The token embeddings are stored int8 (one scale per
row, as the ``int8`` precision does) and the folded head stays fp32.

Asymmetric blocks, measured on the real Qwen2.5-Coder-1.5B (12 held-out LoCoMo questions x 20 turns, every
product 4-bit, Spearman / top-10 vs fp32; ``bench/int4_recipes.py``): see that bench's results; symmetric
blocks (zero point fixed at 8, ``symmetric=True``) are kept for comparison.

Where the fidelity search keeps a product (``exclude``), it runs on 8 bits in the same blocks and kernel
(``kept_as="8-bit"``: ``MatMulNBits`` with ``bits=8``) or in fp32 (``kept_as="fp32"``). Each build codes the
weights from the fp32 graph in one pass (remembered across the search's builds, :data:`CODES_CACHE_BYTES`).
"""

from __future__ import annotations

import hashlib
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Collection, Mapping

from memrerank.export.quantize import (
    GraphInfo,
    _embeddings_record,
    quantize_embeddings,
    register_precision,
    rewrite_products,
    write_int8_lookup,
)
from memrerank.manifest import Build

__all__ = ["CLIP_RATIOS", "CODINGS", "INT4_ACCURACY_LEVEL", "INT4_BLOCK", "INT4_METHOD", "Int4Coder", "build_int4",
           "check_block", "gptq_codes", "gptq_codes_for", "int4_blocks", "pack_blocks", "quantize_int4", "weight_blocks"]

#: Input channels per 4-bit block (one scale each).
INT4_BLOCK = 32
#: ``MatMulNBits`` ``accuracy_level``: 4 = the activation coded int8 per block and int8 products (CPU).
INT4_ACCURACY_LEVEL = 4

#: How the 4-bit codes are chosen (:func:`build_int4`'s ``coding``).
CODINGS = {"rtn": "round to nearest",
           "gptq": "GPTQ: each input channel's rounding error compensated on the channels after it, weighted by "
                   "the calibration activations",
           "gptq-act": "GPTQ with the channels coded in order of falling activation weight (static blocks)"}


def int4_method(block: int = INT4_BLOCK, coding: str = "rtn") -> str:
    """The manifest's ``build.method`` of an int4 graph with blocks of ``block`` coded by ``coding``."""
    how = ("codes rounded to nearest" if coding == "rtn" else "the codes by GPTQ on the calibration pairs"
           + (" (channels in order of falling activation weight)" if coding == "gptq-act" else ""))
    return (f"weight-only 4-bit: asymmetric blocks of {block} input channels, one fp32 scale and one 4-bit zero "
            f"point each (the range of least squared error), {how}, MatMulNBits accuracy_level "
            f"{INT4_ACCURACY_LEVEL} (each row's activation blocks coded int8 on the fly); int8 embeddings; the "
            "folded head fp32")


INT4_METHOD = int4_method()


#: Range ratios tried per block: the block's range (symmetric: its largest magnitude; asymmetric: its min and max,
#: zero included) shrunk by ``c``, for the ``c`` giving the least squared error over the block (1.0 = plain round
#: to nearest over the full range).
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def check_block(block: int) -> None:
    """Refuse a block size ``MatMulNBits`` does not take (a power of two from 16 to 256)."""
    if isinstance(block, bool) or not isinstance(block, int) or block < 16 or block > 256 or block & (block - 1):
        raise ValueError(f"int4 block size must be a power of two from 16 to 256 (16, 32, 64, 128, 256), got "
                         f"{block!r}")


def int4_blocks(w: Any, block: int = INT4_BLOCK, clip_ratios: tuple[float, ...] = CLIP_RATIOS, *,
                symmetric: bool = False) -> tuple[Any, Any, Any]:
    """``W`` (K × N, float32) in ``MatMulNBits``' 4-bit layout (:func:`weight_blocks` with ``bits=4``)."""
    return weight_blocks(w, block, clip_ratios, bits=4, symmetric=symmetric)


def weight_blocks(w: Any, block: int = INT4_BLOCK, clip_ratios: tuple[float, ...] = CLIP_RATIOS, *,
                  bits: int = 4, symmetric: bool = False) -> tuple[Any, Any, Any]:
    """``W`` (K × N, float32) in ``MatMulNBits``' ``bits``-bit layout (4 or 8).

    With ``bits=4`` (the grid 0..15, zero point 8 when symmetric):

    Asymmetric (the default): each block of ``block`` input channels of one column spans ``[c·lo, c·hi]``
    (``lo = min(block, 0)``, ``hi = max(block, 0)``, ``c`` in ``clip_ratios``) with the scale
    ``s = c·(hi - lo) / 15`` and the zero point ``z = round(-c·lo / s)`` in 0..15; its codes are
    ``clamp(round(w / s) + z, 0, 15)`` and stand for ``(code - z)·s``. Symmetric: the scale ``c·v / -8`` (``v``:
    the value of largest magnitude), zero point 8, codes ``clamp(round(w / s), -8, 7) + 8``. Either way the ``c``
    leaving the least squared error is kept: the extremes may clip so the many small values get a finer grid.

    With ``bits=8`` the same on the grid 0..255 (zero point 128 when symmetric), one code and one zero point
    per byte.

    Returns:
        ``(packed, scales, zero_points)``: uint8 ``(N, ceil(K / block), block · bits / 8)``, 4-bit codes two per
        byte, the lower channel in the low nibble; float32 scales ``(N · ceil(K / block),)``, column-major by
        block; uint8 zero points, 4-bit ones ``(N · ceil(blocks / 2),)`` two per byte, the lower block in the low
        nibble, 8-bit ones ``(N · blocks,)`` (``None`` when symmetric: ``MatMulNBits`` then takes the grid's
        middle).
    """
    import numpy as np

    check_block(block)
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    top, mid = float((1 << bits) - 1), float(1 << (bits - 1))
    if not clip_ratios or not all(0.0 < c <= 1.0 for c in clip_ratios):
        raise ValueError(f"clip_ratios must be in (0, 1], got {clip_ratios}")
    w = np.asarray(w, dtype=np.float32)
    k, n = w.shape
    blocks = -(-k // block)
    packed = np.empty((n, blocks, block * bits // 8), np.uint8)
    scales = np.empty((n, blocks), np.float32)
    zeros = np.empty((n, blocks), np.uint8)
    step = max(1, (1 << 24) // (blocks * block))  # columns per chunk: ~16M values, bounded temporaries
    for c0 in range(0, n, step):
        cols = w[:, c0:c0 + step]
        if blocks * block != k:  # the last block padded with zeros (they multiply nothing)
            cols = np.pad(cols, ((0, blocks * block - k), (0, 0)))
        wb = np.ascontiguousarray(cols.T).reshape(-1, blocks, block)
        if symmetric:
            v = np.take_along_axis(wb, np.abs(wb).argmax(axis=-1)[..., None], axis=-1)
            v[v == 0] = -mid  # an all-zero block: scale 1, codes at the middle
        else:
            lo = np.minimum(wb.min(axis=-1, keepdims=True), 0.0)
            hi = np.maximum(wb.max(axis=-1, keepdims=True), 0.0)
            flat = hi == lo
            hi[flat] = top  # an all-zero block: scale 1, zero point 0
        best_err = np.full(wb.shape[:-1] + (1,), np.inf, np.float32)
        best_scale = np.empty_like(best_err)
        best_zero = np.empty_like(best_err)
        best_q = np.empty(wb.shape, np.uint8)
        for c in clip_ratios:
            if symmetric:
                scale = (v * np.float32(c / -mid)).astype(np.float32)
                zero = np.full_like(scale, mid)
                q = np.clip(np.rint(wb / scale), -mid, mid - 1) + mid
            else:
                scale = ((hi - lo) * np.float32(c / top)).astype(np.float32)
                zero = np.clip(np.rint(-lo * np.float32(c) / scale), 0, top)
                q = np.clip(np.rint(wb / scale) + zero, 0, top)
            err = np.square((q - zero) * scale - wb).sum(axis=-1, keepdims=True)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_scale = np.where(better, scale, best_scale)
            best_zero = np.where(better, zero, best_zero)
            best_q = np.where(better, q, best_q).astype(np.uint8)
        packed[c0:c0 + step] = best_q if bits == 8 else best_q[..., 0::2] | (best_q[..., 1::2] << 4)
        scales[c0:c0 + step] = best_scale[..., 0]
        zeros[c0:c0 + step] = best_zero[..., 0].astype(np.uint8)
    return _layout(packed, scales, None if symmetric else zeros, bits)


def pack_blocks(codes: Any, scales: Any, zeros: Any, bits: int = 4) -> tuple[Any, Any, Any]:
    """Codes (uint8 ``(N, blocks, block)``, one per weight), scales and zero points (``(N, blocks)``) in
    :func:`weight_blocks`' ``MatMulNBits`` layout (its return value)."""
    import numpy as np

    codes = np.asarray(codes, np.uint8)
    packed = codes if bits == 8 else codes[..., 0::2] | (codes[..., 1::2] << 4)
    return _layout(packed, np.asarray(scales, np.float32), np.asarray(zeros, np.uint8), bits)


def _layout(packed: Any, scales: Any, zeros: Any, bits: int) -> tuple[Any, Any, Any]:
    import numpy as np

    if zeros is None:
        return packed, scales.reshape(-1), None
    if bits == 8:
        return packed, scales.reshape(-1), zeros.reshape(-1)
    if zeros.shape[1] % 2:
        zeros = np.pad(zeros, ((0, 0), (0, 1)), constant_values=8)
    return packed, scales.reshape(-1), (zeros[:, 0::2] | (zeros[:, 1::2] << 4)).reshape(-1)


#: Bytes of 4-bit codes :func:`quantize_int4` keeps between calls (least recently used dropped first): the
#: sensitivity search rebuilds the graph many times with a different set of products kept, and coding every
#: weight again (the range search over :data:`CLIP_RATIOS`) was half of each build at 1.5B.
CODES_CACHE_BYTES = 2 << 30
_codes: OrderedDict[tuple[Any, ...], tuple[Any, Any, Any]] = OrderedDict()


def _cached_blocks(w: Any, block: int, symmetric: bool, bits: int = 4) -> tuple[Any, Any, Any]:
    """:func:`weight_blocks` of ``w``, remembered by a digest of its bytes (so a weight read again from another
    graph file is coded once; an edited weight is coded afresh)."""
    import numpy as np

    w = np.ascontiguousarray(w, dtype=np.float32)
    key = (hashlib.blake2b(w.data, digest_size=20).digest(), w.shape, block, bits, symmetric, CLIP_RATIOS)
    if key in _codes:
        _codes.move_to_end(key)
        return _codes[key]
    codes = weight_blocks(w, block, bits=bits, symmetric=symmetric)
    size = sum(a.nbytes for a in codes if a is not None)
    if size <= CODES_CACHE_BYTES:
        _codes[key] = codes
        while sum(a.nbytes for c in _codes.values() for a in c if a is not None) > CODES_CACHE_BYTES:
            _codes.popitem(last=False)
    return codes


def quantize_int4(src: Path, out: Path, nodes: list[str], external: bool, *, block: int = INT4_BLOCK,
                  accuracy_level: int = INT4_ACCURACY_LEVEL, symmetric: bool = False,
                  eight_bit: Collection[str] = (), codes: Mapping[str, tuple[Any, Any, Any]] | None = None) -> int:
    """Write ``src`` to ``out`` with the weight products ``nodes`` as 4-bit ``MatMulNBits``; returns how many.

    ``eight_bit``: products among ``nodes`` coded on 8 bits instead (the same blocks, kernel and activation codes:
    what the sensitivity search keeps).

    A weight read by several products is coded once (and remembered across calls, :data:`CODES_CACHE_BYTES`); a
    Gemm's bias becomes an ``Add`` after the product.
    ``symmetric``: blocks with the fixed zero point 8 (:func:`int4_blocks`; for measurement).
    ``codes``: product node → its 4-bit blocks already coded (:func:`memrerank.export.gptq.gptq_blocks`), used
    in place of round to nearest for the 4-bit products it names.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    coded: dict[tuple[str, bool, int], tuple[str, bool]] = {}  # (weight, transposed, bits) -> tag, zero points?
    eight = set(eight_bit)

    def replace(node: Any, w: Any, bias: str | None, transposed: bool) -> list[Any]:
        tag = node.name or node.output[0]
        bits = 8 if tag in eight else 4
        given = codes.get(tag) if codes is not None and bits == 4 else None
        key = (node.input[1], transposed, bits) if given is None else (tag, transposed, bits)
        if key not in coded:
            packed, scales, zeros = given if given is not None else _cached_blocks(w, block, symmetric, bits)
            model.graph.initializer.extend([numpy_helper.from_array(packed, tag + "_w_int4"),
                                            numpy_helper.from_array(scales, tag + "_w_int4_scale")])
            if zeros is not None:
                model.graph.initializer.append(numpy_helper.from_array(zeros, tag + "_w_int4_zero"))
            coded[key] = (tag, zeros is not None)
        w_tag, asymmetric = coded[key]
        product = node.output[0] if bias is None else node.output[0] + "_int4"
        new = [_product_node(node.input[0], w_tag, product, tag, w.shape, block, accuracy_level, asymmetric, bits)]
        if bias is not None:
            new.append(helper.make_node("Add", [product, bias], [node.output[0]], name=tag + "_bias"))
        return new

    return rewrite_products(model, nodes, replace, out, external)


def _product_node(x: str, w_tag: str, out: str, tag: str, shape: tuple[int, int], block: int,
                  accuracy_level: int, asymmetric: bool, bits: int = 4) -> Any:
    """``out = MatMulNBits(x, w_tag_w_int4, w_tag_w_int4_scale[, w_tag_w_int4_zero])`` for a K × N weight coded by
    :func:`weight_blocks` on ``bits`` bits."""
    from onnx import helper

    k, n = shape
    inputs = [x, w_tag + "_w_int4", w_tag + "_w_int4_scale"] + ([w_tag + "_w_int4_zero"] if asymmetric else [])
    return helper.make_node("MatMulNBits", inputs, [out], name=tag + "_int4",
                            domain="com.microsoft", K=k, N=n, bits=bits, block_size=block,
                            accuracy_level=accuracy_level)


class Int4Coder:
    """The ``int4`` precision written while the fused graph is written (the streaming export): each weight
    product as :func:`quantize_int4` writes it, the token embeddings as int8 rows, the folded head fp32 (the
    writer keeps it a plain ``MatMul``). No fp32 graph exists in between: each weight is coded as soon as it is
    read and only its codes reach the graph's external data.

    ``products`` and ``tables`` count what it wrote (the build record).
    """

    def __init__(self, block: int = INT4_BLOCK, accuracy_level: int = INT4_ACCURACY_LEVEL) -> None:
        check_block(block)  # before any weight is read
        self.block, self.accuracy_level = block, accuracy_level
        self.products = 0
        self.tables = 0

    def product(self, g: Any, x: str, weight_name: str, w: Any, name: str, one_row: bool = False) -> str:
        from onnx import TensorProto

        packed, scales, zeros = int4_blocks(w, self.block)
        g.const(name + "_w_int4", packed)
        g.const(name + "_w_int4_scale", scales)
        if zeros is not None:
            g.const(name + "_w_int4_zero", zeros)
        out = name + "_int4_out"
        g.nodes.append(_product_node(x, name, out, name, w.shape, self.block, self.accuracy_level,
                                     zeros is not None))
        g.types[out] = TensorProto.FLOAT
        self.products += 1
        return out

    def embedding(self, g: Any, table_name: str, table: Any, ids: str) -> str:
        self.tables += 1
        return write_int8_lookup(g, table_name, table, ids)

    def build(self) -> Build:
        """The manifest's ``build`` record of the graph written."""
        return Build(method=int4_method(self.block), batch_independent=True, extra={
            "block_size": self.block, "accuracy_level": self.accuracy_level, "coding": "rtn",
            "int4_products": self.products,
            "embeddings": _embeddings_record(self.tables),
            "streamed": True})


#: How the products the sensitivity search keeps may run, best first (:func:`build_int4`'s ``kept_as``).
KEPT_AS = {"8-bit": "8-bit weight blocks on the same MatMulNBits kernel (activations coded int8 per block)",
           "fp32": "fp32 weights and product"}


#: Calibration pairs GPTQ's ``H`` is gathered over (spread over the query groups): a fp32 pass over these.
GPTQ_PAIRS = 128
_gptq_last: dict[tuple[Any, ...], dict[str, tuple[Any, Any, Any]]] = {}


def gptq_codes(fp32: Path, nodes: Collection[str], calib: Any, block: int = INT4_BLOCK,
               pairs: int = GPTQ_PAIRS, log: Callable[[str], None] | None = None, act_order: bool = False
               ) -> dict[str, tuple[Any, Any, Any]]:
    """Product node → its 4-bit blocks coded by :func:`memrerank.export.gptq.gptq_blocks` (``act_order`` as
    there), for the products ``nodes`` of the fp32 graph, ``H`` from ``pairs`` of the calibration set ``calib``
    (:class:`memrerank.export.fidelity.CalibSet`). The last answer is remembered while ``calib`` lives (the
    sensitivity search builds the graph many times from the same codes)."""
    key = (str(fp32), fp32.stat().st_mtime_ns, block, act_order, id(calib), pairs, tuple(sorted(nodes)))
    if key not in _gptq_last:
        _gptq_last.clear()
        _gptq_last[key] = gptq_codes_for(fp32, nodes, calib, [(block, act_order)], pairs, log)[(block, act_order)]
        weakref.finalize(calib, _gptq_last.pop, key, None)  # dropped with the calibration set (the export's end)
    return _gptq_last[key]


def gptq_codes_for(fp32: Path, nodes: Collection[str], calib: Any, recipes: Collection[tuple[int, bool]],
                   pairs: int = GPTQ_PAIRS, log: Callable[[str], None] | None = None
                   ) -> dict[tuple[int, bool], dict[str, tuple[Any, Any, Any]]]:
    """:func:`gptq_codes` for several ``(block, act_order)`` recipes from one gathering of ``H`` (nothing
    remembered); ``log``: told after each pass of the fp32 graph and each run of products coded."""
    import time

    import numpy as np
    import onnx
    from onnx import numpy_helper

    from memrerank.export.gptq import gptq_blocks, input_hessians, product_inputs

    for block, _ in recipes:
        check_block(block)
    t0 = time.perf_counter()
    inputs = product_inputs(fp32, nodes)
    per_group = max(1, -(-pairs // max(len(calib.group_rows), 1)))
    rows = np.concatenate([r[:per_group] for r in calib.group_rows])[:pairs]
    feeds = calib.feeds(fp32, rows)
    graph = onnx.load(str(fp32), load_external_data=False).graph
    inits = {i.name: i for i in graph.initializer}
    node_of = {n.name: n for n in graph.node}
    codes: dict[tuple[int, bool], dict[str, tuple[Any, Any, Any]]] = {r: {} for r in recipes}
    for hs in input_hessians(fp32, {x: k for x, k in inputs.values()}, feeds):
        if log:
            log(f"GPTQ: H of {len(hs)} activations gathered ({time.perf_counter() - t0:.0f} s)")
        for name, (x, _) in inputs.items():
            if x not in hs:
                continue
            node = node_of[name]
            tensor = onnx.TensorProto()
            tensor.CopyFrom(inits[node.input[1]])  # its data read into the copy only
            w = numpy_helper.to_array(tensor, base_dir=str(fp32.parent)).astype(np.float32)
            if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
                w = w.T
            for block, act_order in recipes:
                codes[(block, act_order)][name] = pack_blocks(*gptq_blocks(w, hs[x][0], block, CLIP_RATIOS,
                                                                           act_order=act_order))
        if log:
            log(f"GPTQ: {len(codes[next(iter(codes))])} of {len(inputs)} products coded "
                f"({time.perf_counter() - t0:.0f} s)")
        del hs
    return codes


@register_precision("int4", kept_as=tuple(KEPT_AS))
def build_int4(fp32: Path, out: Path, info: GraphInfo, calib: Any = None, exclude: list[str] | None = None,
               kept_as: str = "8-bit", block: int = INT4_BLOCK, coding: str | None = None,
               log: Callable[[str], None] | None = None) -> Build:
    """Weight-only 4-bit products (:func:`quantize_int4`), int8 embeddings, the head fp32.

    ``exclude``: the products the sensitivity search keeps, run as ``kept_as`` says (:data:`KEPT_AS`): ``"8-bit"``
    (the same blocks and kernel, 8-bit codes: an int8 product whose activation is coded per block of the row, so
    an outlier channel costs its own block only; kept embeddings stay int8 rows) or ``"fp32"``. ``block``: input
    channels per block (:data:`INT4_BLOCK`). ``coding`` (:data:`CODINGS`): ``"rtn"`` (the default) or
    ``"gptq"`` / ``"gptq-act"`` (:func:`gptq_codes` on ``calib``, the calibration set, told to ``log``). GPTQ is
    not the default yet: on the real 1.5B it lifts held-out agreement (``bench/int4_recipes.py``), but on a small
    encoder with the 128 built-in pairs it fits them at the held-out pairs' expense.
    """
    check_block(block)
    if kept_as not in KEPT_AS:
        raise ValueError(f"kept_as: unknown {kept_as!r}; choose from {', '.join(KEPT_AS)}")
    coding = coding or "rtn"
    if coding not in CODINGS:
        raise ValueError(f"coding: unknown {coding!r}; choose from {', '.join(CODINGS)}")
    if coding != "rtn" and calib is None:
        raise ValueError(f"coding={coding!r} needs the calibration set (calib=) to measure the activations")
    exclude = set(exclude or [])
    eight = [n for n in info.weight_nodes if n in exclude] if kept_as == "8-bit" else []
    nodes = [n for n in info.weight_nodes if n not in exclude or n in set(eight)]
    out.parent.mkdir(parents=True, exist_ok=True)
    codes = (gptq_codes(fp32, info.weight_nodes, calib, block, log=log, act_order=coding == "gptq-act")
             if coding != "rtn" else None)
    done = quantize_int4(fp32, out, nodes, info.external_data, block=block, eight_bit=eight, codes=codes)
    # the embeddings are int8 rows already: kept "8-bit" they stay so (fp32 would quadruple the largest table of a
    # decoder, 0.93 GB of a 1.5B's, for a rounding that reaches the logit once, at the input)
    embeddings = [n for n in info.embedding_nodes if kept_as == "8-bit" or n not in exclude]
    tables = quantize_embeddings(out, embeddings, info.external_data)
    extra: dict[str, Any] = {"block_size": block, "accuracy_level": INT4_ACCURACY_LEVEL, "coding": coding,
                             **({"gptq_pairs": min(GPTQ_PAIRS, calib.n_pairs)} if coding != "rtn" else {}),
                             "int4_products": done - len(eight), "embeddings": _embeddings_record(tables)}
    kept = [n for n in info.weight_nodes if n in exclude]
    if kept:
        extra["kept_as"] = kept_as
        extra["eight_bit_products" if kept_as == "8-bit" else "fp32_products"] = len(kept)
    return Build(method=int4_method(block, coding), batch_independent=True, extra=extra)
