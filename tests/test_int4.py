"""int4: MatMulNBits' 4-bit layout checked by hand, and the product it runs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from memrerank.export.fidelity import FidelityBudget
from memrerank.export.int4 import CLIP_RATIOS, int4_blocks, quantize_int4

K, N = 80, 24  # K not a multiple of the block: the last block is padded


def _unpack(packed, scales, zeros, k, block):
    """W as the 4-bit codes stand for it, decoded independently of onnxruntime: two codes per byte, the lower
    channel in the low nibble, value (code - z) · the block's scale, z the block's zero point (two per byte, the
    lower block in the low nibble) or 8 without zero points."""
    n, blocks, _ = packed.shape
    codes = np.empty((n, blocks, block), np.int64)
    codes[:, :, 0::2] = packed & 0x0F
    codes[:, :, 1::2] = packed >> 4
    if zeros is None:
        z = np.full((n, blocks), 8)
    else:
        zz = zeros.reshape(n, -1)
        z = np.stack([zz & 0x0F, zz >> 4], axis=-1).reshape(n, -1)[:, :blocks].astype(np.int64)
    w = (codes - z[:, :, None]) * scales.reshape(n, blocks)[:, :, None]
    return w.reshape(n, blocks * block)[:, :k].T, codes, z


@pytest.mark.parametrize("block", [16, 32])
def test_symmetric_codes_round_each_block_to_its_own_grid(block):
    w = np.random.default_rng(0).normal(0, 0.05, (K, N)).astype(np.float32)
    w[5, 3] = 1.5  # an outlier widens its own block only
    packed, scales, zeros = int4_blocks(w, block, symmetric=True)
    blocks = -(-K // block)
    assert packed.shape == (N, blocks, block // 2) and scales.shape == (N * blocks,) and zeros is None
    w_hat, codes, _ = _unpack(packed, scales, zeros, K, block)
    assert codes.min() >= 0 and codes.max() <= 15
    # per block: the scale is c·v/-8 (v the value of largest magnitude, c a clipping ratio), the codes the
    # values rounded to the nearest step and clamped to -8..7, and no ratio tried leaves a smaller squared error
    padded = np.pad(w, ((0, blocks * block - K), (0, 0))).T.reshape(N, blocks, block)
    v = np.take_along_axis(padded, np.abs(padded).argmax(axis=-1)[..., None], axis=-1)
    got = scales.reshape(N, blocks, 1)
    ratio = got / (v / -8.0)
    assert np.all(np.abs(ratio - np.asarray(CLIP_RATIOS)).min(axis=-1) < 1e-5)
    want = np.clip(np.rint(padded / got), -8, 7) + 8
    assert (codes == want).mean() > 0.999  # a value within float error of a half step may round either way
    err = np.square((codes - 8) * got - padded).sum(axis=-1)
    for c in CLIP_RATIOS:
        s = v * c / -8.0
        assert np.all(err <= np.square(np.clip(np.rint(padded / s), -8, 7) * s - padded).sum(axis=-1) + 1e-9)
    assert (ratio < 1).any() and (ratio == 1).any()  # both happen on normal weights
    # the outlier widens its own block only
    assert abs(scales.reshape(N, blocks)[3, 0]) > 5 * abs(scales.reshape(N, blocks)[3, 1])
    with pytest.raises(ValueError, match="power of two"):
        int4_blocks(w, 24)


@pytest.mark.parametrize("block", [16, 32])
def test_asymmetric_codes_span_each_blocks_own_range(block):
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.05, (K, N)).astype(np.float32)
    w[:, 7] = np.abs(w[:, 7]) + 0.3  # a column of positive values only: zero point 0, the grid spent above zero
    w[:, 9] = 0.0  # an all-zero column: every value exact
    packed, scales, zeros = int4_blocks(w, block)
    blocks = -(-K // block)
    assert zeros.shape == (N * -(-blocks // 2),) and zeros.dtype == np.uint8
    w_hat, codes, z = _unpack(packed, scales, zeros, K, block)
    padded = np.pad(w, ((0, blocks * block - K), (0, 0))).T.reshape(N, blocks, block)
    lo, hi = np.minimum(padded.min(-1), 0), np.maximum(padded.max(-1), 0)
    s = scales.reshape(N, blocks)
    live = hi > lo
    # the scale is c·(hi - lo)/15 for a ratio c tried, the zero point -lo/s rounded, the codes round to nearest
    ratio = s[live] * 15 / (hi - lo)[live]
    assert np.all(np.abs(ratio[:, None] - np.asarray(CLIP_RATIOS)).min(axis=-1) < 1e-5)
    np.testing.assert_array_equal(z[live], np.clip(np.rint(-lo[live] * ratio / s[live]), 0, 15))
    want = np.clip(np.rint(padded / s[..., None]) + z[..., None], 0, 15)
    assert (codes == want).mean() > 0.999
    assert (z[7] == 0).all() and np.all(w_hat[:, 9] == 0)
    err = np.square(w_hat - w).sum()
    sym = _unpack(*int4_blocks(w, block, symmetric=True), K, block)[0]
    assert err < 0.8 * np.square(sym - w).sum()  # the block's own range: a finer grid than ±max on most blocks


def _product_graph(path, w, bias=None):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", K])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", N])
    inits = [numpy_helper.from_array(w, "W")]
    if bias is None:
        nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="/layers.0/mlp/down_proj/MatMul")]
    else:  # a Gemm with a bias, on rows
        inits.append(numpy_helper.from_array(bias, "B"))
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["r", K])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["r", N])
        nodes = [helper.make_node("Gemm", ["x", "W", "B"], ["y"], name="/layers.0/mlp/down_proj/MatMul")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def _run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_matmulnbits_computes_the_decoded_weights_product_row_by_row(tmp_path):
    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.05, (K, N)).astype(np.float32)
    x = rng.normal(0, 1, (3, 5, K)).astype(np.float32)
    x[1, 2] *= 40  # a loud row does not move the others
    fp32 = _product_graph(tmp_path / "fp32.onnx", w)
    name = "/layers.0/mlp/down_proj/MatMul"
    assert quantize_int4(fp32, tmp_path / "exact.onnx", [name], False, block=16, accuracy_level=0) == 1
    quantize_int4(fp32, tmp_path / "int8.onnx", [name], False, block=16, accuracy_level=4)
    want = x.astype(np.float64) @ _unpack(*int4_blocks(w, 16), K, 16)[0]
    ops = [n.op_type for n in onnx.load(str(tmp_path / "exact.onnx")).graph.node]
    assert ops == ["MatMulNBits"]
    np.testing.assert_allclose(_run(tmp_path / "exact.onnx", x), want, rtol=1e-4, atol=1e-4)
    got = _run(tmp_path / "int8.onnx", x)  # activations coded int8 per block of each row
    rel = np.abs(got - want).max(axis=-1) / np.abs(want).max(axis=-1)
    assert rel.max() < 0.03
    for b in range(3):  # a row's result is its own: alone equals among the others, bit for bit
        for t in range(5):
            np.testing.assert_array_equal(_run(tmp_path / "int8.onnx", x[b:b + 1, t:t + 1])[0, 0], got[b, t])
    # a Gemm's bias is added after the 4-bit product
    bias = rng.normal(0, 1, N).astype(np.float32)
    gemm = _product_graph(tmp_path / "gemm.onnx", w, bias)
    quantize_int4(gemm, tmp_path / "gemm4.onnx", [name], False, block=16, accuracy_level=0)
    rows = x.reshape(-1, K)
    np.testing.assert_allclose(_run(tmp_path / "gemm4.onnx", rows), want.reshape(-1, N) + bias, rtol=1e-4,
                               atol=1e-4)


def test_codes_are_remembered_by_the_weights_bytes_across_builds(tmp_path, monkeypatch):
    """The search rebuilds the graph many times: a weight seen before is not coded again, an edited one is, and
    the remembered codes are what a fresh coding writes."""
    from memrerank.export import int4

    monkeypatch.setattr(int4, "_codes", type(int4._codes)())
    calls = []
    real = int4.weight_blocks
    monkeypatch.setattr(int4, "weight_blocks", lambda w, *a, **k: calls.append(1) or real(w, *a, **k))
    rng = np.random.default_rng(2)
    w = rng.normal(0, 0.05, (K, N)).astype(np.float32)
    name = "/layers.0/mlp/down_proj/MatMul"
    fp32 = _product_graph(tmp_path / "a.onnx", w)
    quantize_int4(fp32, tmp_path / "a4.onnx", [name], False, block=16)
    quantize_int4(_product_graph(tmp_path / "b.onnx", w.copy()), tmp_path / "b4.onnx", [name], False, block=16)
    assert len(calls) == 1  # the same bytes in another file: coded once
    for got in ("a4.onnx", "b4.onnx"):
        inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / got)).graph.initializer}
        for a, b in zip(real(w, 16), (inits[name + "_w_int4"], inits[name + "_w_int4_scale"],
                                      inits[name + "_w_int4_zero"])):
            np.testing.assert_array_equal(a, b)
    w2 = w.copy()
    w2[0, 0] += 0.01
    quantize_int4(_product_graph(tmp_path / "c.onnx", w2), tmp_path / "c4.onnx", [name], False, block=16)
    quantize_int4(fp32, tmp_path / "d4.onnx", [name], False, block=32)
    assert len(calls) == 3  # an edited weight, another block size: coded afresh
    monkeypatch.setattr(int4, "CODES_CACHE_BYTES", sum(a.nbytes for a in real(w, 16)))
    quantize_int4(_product_graph(tmp_path / "e.onnx", w * 2), tmp_path / "e4.onnx", [name], False, block=16)
    assert len(int4._codes) <= 1  # bounded: the oldest dropped


def _unpack8(packed, scales, zeros, k, block):
    """8-bit blocks decoded by hand: one code per byte, one zero point per block (128 without zero points)."""
    n, blocks, _ = packed.shape
    z = np.full((n, blocks), 128) if zeros is None else zeros.reshape(n, blocks).astype(np.int64)
    w = (packed.astype(np.int64) - z[:, :, None]) * scales.reshape(n, blocks)[:, :, None]
    return w.reshape(n, blocks * block)[:, :k].T


def test_eight_bit_blocks_and_the_products_kept_on_them(tmp_path):
    """The products the search keeps run on 8-bit blocks in the same kernel: codes on 0..255 within half a step
    of the weight, MatMulNBits(bits=8) computes the decoded weights' product, a row alone as among others."""
    from memrerank.export.int4 import weight_blocks

    rng = np.random.default_rng(3)
    w = rng.normal(0, 0.05, (K, N)).astype(np.float32)
    packed, scales, zeros = weight_blocks(w, 16, bits=8)
    assert packed.shape == (N, K // 16, 16) and zeros.shape == (N * (K // 16),)
    w8 = _unpack8(packed, scales, zeros, K, 16)
    step = np.repeat(scales.reshape(N, -1), 16, axis=1)[:, :K].T
    assert np.all(np.abs(w8 - w) <= step / 2 + 1e-7)
    w4 = _unpack(*int4_blocks(w, 16), K, 16)[0]
    assert np.square(w8 - w).sum() < np.square(w4 - w).sum() / 100  # 16x finer grid
    sym = _unpack8(*weight_blocks(w, 16, bits=8, symmetric=True), K, 16)
    assert np.abs(sym - w).max() < np.abs(w).max() / 100
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        weight_blocks(w, 16, bits=3)

    x = rng.normal(0, 1, (3, 5, K)).astype(np.float32)
    x[0, 1, 3] = 600.0  # an outlier channel: its block's activation codes only
    name = "/layers.0/mlp/down_proj/MatMul"
    fp32 = _product_graph(tmp_path / "fp32.onnx", w)
    quantize_int4(fp32, tmp_path / "exact.onnx", [name], False, block=16, accuracy_level=0, eight_bit=[name])
    node = onnx.load(str(tmp_path / "exact.onnx")).graph.node[0]
    assert node.op_type == "MatMulNBits" and {a.name: a.i for a in node.attribute}["bits"] == 8
    np.testing.assert_allclose(_run(tmp_path / "exact.onnx", x), x.astype(np.float64) @ w8, rtol=1e-4, atol=1e-3)
    quantize_int4(fp32, tmp_path / "level4.onnx", [name], False, block=16, eight_bit=[name])
    got = _run(tmp_path / "level4.onnx", x)
    want = x.astype(np.float64) @ w8
    assert np.abs(got - want).max() / np.abs(want).max() < 0.02
    for b in range(3):
        for t in range(5):
            np.testing.assert_array_equal(_run(tmp_path / "level4.onnx", x[b:b + 1, t:t + 1])[0, 0], got[b, t])


def test_the_search_keeps_int4_products_on_8_bits(tmp_path, qwen_ckpt):
    """Held to a budget plain int4 misses, the export's search keeps products on 8-bit blocks (the first way it
    tries) and records them; the graph on disk is what the record says."""
    import json

    from memrerank.export import export_model

    root = export_model(str(qwen_ckpt), tmp_path / "a", precisions=["fp32", "int4"],
                        fidelity="top10=0.95,spearman=0.995", log=lambda m: None)
    entry = json.loads((root / "manifest.json").read_text())["precisions"]["int4"]
    fid, build = entry["fidelity"], entry["build"]
    assert not FidelityBudget(top10=0.95, spearman=0.995).met(fid["plain"])  # plain int4 missed
    assert fid["meets_budget"] and fid["kept_as"] == "8-bit" and fid["kept_fp32_nodes"]
    nodes = onnx.load(str(root / "int4" / "model.onnx"), load_external_data=False).graph.node
    eight = {n.name.removesuffix("_int4") for n in nodes if n.op_type == "MatMulNBits"
             and {a.name: a.i for a in n.attribute}["bits"] == 8}
    assert eight == set(fid["kept_fp32_nodes"]) and build["eight_bit_products"] == len(eight)


def test_embeddings_kept_on_8_bits_stay_int8_rows(tmp_path, qwen_artifact):
    """Kept "8-bit", the embeddings stay the int8 rows they already are (never a 4x larger fp32 table); kept
    "fp32" they are fp32."""
    from memrerank.export.int4 import build_int4
    from memrerank.export.quantize import graph_info

    fp32 = qwen_artifact / "fp32" / "model.onnx"
    info = graph_info(fp32)
    assert info.embedding_nodes
    tables = {}
    for way in ("8-bit", "fp32"):
        out = tmp_path / way / "model.onnx"
        build_int4(fp32, out, info, exclude=list(info.embedding_nodes), kept_as=way)
        g = onnx.load(str(out)).graph
        tables[way] = max((i for i in g.initializer if len(i.dims) == 2), key=lambda i: i.dims[0] * i.dims[1])
    assert tables["8-bit"].data_type == onnx.TensorProto.INT8
    assert tables["fp32"].data_type == onnx.TensorProto.FLOAT


def test_the_block_size_asked_for_is_the_block_size_written(tmp_path, qwen_ckpt):
    """``--int4-block``: every 4-bit product of the graph, from the fp32 graph or streamed, has the blocks asked
    for, and the manifest says so; the same command line parses it."""
    import json

    from memrerank.cli import build_parser
    from memrerank.export import export_model

    args = build_parser().parse_args(["export", "m", "-o", "x", "--precision", "int4", "--int4-block", "64"])
    assert args.int4_block == 64
    for precisions in (["fp32", "int4"], ["int4"]):
        root = export_model(str(qwen_ckpt), tmp_path / "-".join(precisions), precisions=precisions, int4_block=64,
                            fidelity="top10=0,spearman=0", log=lambda m: None)
        entry = json.loads((root / "manifest.json").read_text())["precisions"]["int4"]
        assert entry["build"]["block_size"] == 64 and "blocks of 64" in entry["build"]["method"]
        nodes = [n for n in onnx.load(str(root / "int4" / "model.onnx"), load_external_data=False).graph.node
                 if n.op_type == "MatMulNBits"]
        assert nodes and all({a.name: a.i for a in n.attribute}["block_size"] == 64 for n in nodes)
