"""int4: MatMulNBits' 4-bit layout checked by hand, and the product it runs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from memrerank.export.int4 import CLIP_RATIOS, int4_blocks, quantize_int4

K, N = 80, 24  # K not a multiple of the block: the last block is padded


def _unpack(packed, scales, k, block):
    """W as the 4-bit codes stand for it, decoded independently of onnxruntime: two codes per byte, the lower
    channel in the low nibble, value (code - 8) · the block's scale."""
    n, blocks, _ = packed.shape
    codes = np.empty((n, blocks, block), np.int64)
    codes[:, :, 0::2] = packed & 0x0F
    codes[:, :, 1::2] = packed >> 4
    w = (codes - 8) * scales.reshape(n, blocks)[:, :, None]
    return w.reshape(n, blocks * block)[:, :k].T, codes


@pytest.mark.parametrize("block", [16, 32])
def test_the_4bit_codes_round_each_block_to_its_own_grid(block):
    w = np.random.default_rng(0).normal(0, 0.05, (K, N)).astype(np.float32)
    w[5, 3] = 1.5  # an outlier widens its own block only
    packed, scales = int4_blocks(w, block)
    blocks = -(-K // block)
    assert packed.shape == (N, blocks, block // 2) and scales.shape == (N * blocks,)
    w_hat, codes = _unpack(packed, scales, K, block)
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
    packed, scales = int4_blocks(w, 16)
    want = x.astype(np.float64) @ _unpack(packed, scales, K, 16)[0]
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
