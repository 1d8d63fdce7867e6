"""Outlier channels kept out of the int8 codes (LLM.int8()'s decomposition with channels fixed at export), on a
hand-built product whose input has the real decoders' shape of trouble: one channel ~100x the others."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from memrerank.export.quantize import quantize_per_row

K, N = 64, 32


def _product(path, w):
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="/model/layers.0.down_proj/MatMul")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", N])], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_outlier_channels_run_in_fp32_beside_the_int8_product(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.05, (K, N)).astype(np.float32)
    x = rng.normal(0, 1, (3, 5, K)).astype(np.float32)
    x[..., 7] *= 120.0  # the outlier channel: it sets every row's scale and crushes the other 63 channels
    fp32 = _product(tmp_path / "fp32.onnx", w)
    want = x @ w
    plain, split = tmp_path / "plain.onnx", tmp_path / "split.onnx"
    quantize_per_row(fp32, plain, ["/model/layers.0.down_proj/MatMul"], False)
    quantize_per_row(fp32, split, ["/model/layers.0.down_proj/MatMul"], False, outliers={"x": np.array([7])})
    err_plain = np.abs(_run(plain, x) - want).max()
    err_split = np.abs(_run(split, x) - want).max()
    assert err_split < err_plain / 10, (err_plain, err_split)
    ops = [n.op_type for n in onnx.load(str(split)).graph.node]
    assert ops.count("MatMulIntegerToFloat") == 1 and ops.count("MatMul") == 1 and "Gather" in ops
    # every channel an outlier: the int8 part codes zeros, the fp32 part is the whole product
    every = tmp_path / "every.onnx"
    quantize_per_row(fp32, every, ["/model/layers.0.down_proj/MatMul"], False, outliers={"x": np.arange(K)})
    np.testing.assert_allclose(_run(every, x), want, atol=1e-4, rtol=1e-5)
    # the channel set is a constant: a row's result does not depend on its neighbours
    alone = _run(split, x[:1])
    np.testing.assert_array_equal(alone, _run(split, x)[:1])


def test_outlier_channels_are_those_far_above_the_median():
    from memrerank.export.optimize import OUTLIER_RATIO, outlier_channels

    ranges = np.full(100, 2.0)
    ranges[[3, 40]] = [2.0 * OUTLIER_RATIO * 1.01, 600.0]
    ranges[50] = 2.0 * OUTLIER_RATIO * 0.99
    assert outlier_channels(ranges).tolist() == [3, 40]
    assert outlier_channels(np.full(8, 3.0)).size == 0


def test_a_decoder_int8_build_records_its_smoothing_and_outliers(qwen_ckpt, tmp_path):
    """The decoder int8 plan smooths every quantized product's input and records the outlier channels it
    found; the graph carries one smoothing Mul per coded activation."""
    import json

    from memrerank.export import export_model

    art = export_model(str(qwen_ckpt), tmp_path / "q", precisions=["fp32", "int8"], fidelity="top10=0,spearman=0",
                       graph="traced", log=lambda m: None)
    build = json.loads((art / "manifest.json").read_text())["precisions"]["int8"]["build"]
    assert build["smoothing"]["method"] == "SmoothQuant scale migration on every product input"
    assert build["smoothing"]["activations"] > 0
    assert build["outlier_channels"]["ratio"] > 0 and "channels" in build["outlier_channels"]
    names = [n.name for n in onnx.load(str(art / "int8" / "model.onnx"), load_external_data=False).graph.node]
    assert sum(n.endswith("_smooth") for n in names) == build["smoothing"]["activations"]


def test_online_hadamard_spreads_an_outlier_channel_over_its_block(tmp_path):
    """The down projection's input rotated block by block before coding (and the weight rows by the transpose):
    the product is unchanged, an outlier channel's size is shared by its block, and rows stay independent."""
    from memrerank.export.graph import block_hadamard

    h = block_hadamard(16)
    np.testing.assert_allclose(h @ h.T, np.eye(16), atol=1e-12)  # orthogonal
    assert abs(h[0, 0]) == 0.25  # normalized: every entry is ±1/sqrt(16)
    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.05, (K, N)).astype(np.float32)
    x = rng.normal(0, 1, (3, 5, K)).astype(np.float32)
    x[..., 7] *= 120.0
    fp32 = _product(tmp_path / "fp32.onnx", w)
    want = x @ w
    name = "/model/layers.0.down_proj/MatMul"
    plain, rotated = tmp_path / "plain.onnx", tmp_path / "rot.onnx"
    quantize_per_row(fp32, plain, [name], False)
    quantize_per_row(fp32, rotated, [name], False, hadamard={"x": 32})
    err_plain = np.abs(_run(plain, x) - want).max()
    err_rot = np.abs(_run(rotated, x) - want).max()
    assert err_rot < err_plain / 3, (err_plain, err_rot)
    # the stored weight is Hᵀ·W block by block: fp32 activations through the graph's own H and the stored
    # weight give x·W up to the weight's int8 rounding (x·H·Hᵀ·W = x·W)
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(rotated)).graph.initializer}
    h_graph = next(v for k, v in inits.items() if k.endswith("_hadamard"))
    w_q = next(v for k, v in inits.items() if k.endswith("_w_int8"))
    w_s = next(v for k, v in inits.items() if k.endswith("_w_scale"))
    mixed = (x.reshape(-1, 32) @ h_graph).reshape(x.shape)
    np.testing.assert_allclose(mixed @ (w_q.astype(np.float32) * w_s), want, atol=0.02 * np.abs(want).max())
    np.testing.assert_array_equal(_run(rotated, x[:1]), _run(rotated, x)[:1])
    ops = [n.op_type for n in onnx.load(str(rotated)).graph.node]
    assert ops.count("MatMul") == 1 and ops.count("MatMulIntegerToFloat") == 1  # the rotation, the product
    with pytest.raises(ValueError, match="power of two"):
        quantize_per_row(fp32, tmp_path / "bad.onnx", [name], False, hadamard={"x": 24})


def test_a_rotated_decoder_int8_build_codes_inputs_as_they_are_and_rotates_the_down_projection(tmp_path):
    """On a rotated fused graph (export --rotate) the int8 plan measures nothing: no smoothing, no outlier
    channels (the rotation left none), and every layer's down-projection input gets the online Hadamard; the
    manifest says so and the graph has one Hadamard product per layer."""
    import json

    import models
    from memrerank import LoadOptions, Reranker
    from memrerank.export import export_model
    from texts import DOCS, QUERIES

    ckpt = models.make_qwen2(tmp_path / "q2", tied=False)
    art = export_model(str(ckpt), tmp_path / "art", precisions=["fp32", "int8"], graph="fused", rotate=True,
                       fidelity="top10=0,spearman=0", log=lambda m: None)
    build = json.loads((art / "manifest.json").read_text())["precisions"]["int8"]["build"]
    assert build["smoothing"]["activations"] == 0 and "rotated" in build["smoothing"]["why"]
    assert build["outlier_channels"]["activations"] == 0
    layers = json.loads((art / "manifest.json").read_text())["prefix_reuse"]["layers"]
    assert build["online_hadamard"]["activations"] == layers
    nodes = onnx.load(str(art / "int8" / "model.onnx"), load_external_data=False).graph.node
    assert sum(n.name.endswith("_hadamard") for n in nodes) == layers
    assert not any(n.name.endswith("_smooth") for n in nodes)
    pairs = [(q, d) for q in QUERIES[:2] for d in DOCS]
    fp32 = Reranker.load(art, LoadOptions("fp32")).predict(pairs, raw=True)
    int8 = Reranker.load(art, LoadOptions("int8")).predict(pairs, raw=True)
    assert np.abs(int8 - fp32).max() < 0.1 * (np.abs(fp32).max() + 1)


def test_two_pass_codes_leave_only_the_weight_rounding(tmp_path):
    """A two-pass product codes its activation, then the rounding error of those codes, and sums two integer
    products by the same int8 weight: against x·W_q (the weight's own int8 rounding, computed here by hand) the
    error falls ~100-fold from the one-pass product's; rows stay independent; offset codes are refused."""
    rng = np.random.default_rng(2)
    w = rng.normal(0, 0.05, (K, N)).astype(np.float32)
    x = rng.normal(0, 1, (3, 5, K)).astype(np.float32)
    x[..., 7] *= 20.0
    fp32 = _product(tmp_path / "fp32.onnx", w)
    scale = np.abs(w).max(axis=0) / 127.0
    w_q = np.clip(np.rint(w / scale), -127, 127) * scale  # what the int8 weight holds
    want = x.astype(np.float64) @ w_q
    name = "/model/layers.0.down_proj/MatMul"
    one, two = tmp_path / "one.onnx", tmp_path / "two.onnx"
    quantize_per_row(fp32, one, [name], False)
    quantize_per_row(fp32, two, [name], False, two_pass={name})
    err_one = np.abs(_run(one, x) - want).max()
    err_two = np.abs(_run(two, x) - want).max()
    assert err_two < err_one / 50, (err_one, err_two)
    nodes = onnx.load(str(two)).graph.node
    assert [n.op_type for n in nodes].count("MatMulIntegerToFloat") == 2
    assert sum(n.name.endswith("_quant_residual") for n in nodes) == 1
    np.testing.assert_array_equal(_run(two, x[:1]), _run(two, x)[:1])
    # with the Hadamard rotation before coding, the residual is taken of the rotated activation
    rot = tmp_path / "rot.onnx"
    quantize_per_row(fp32, rot, [name], False, two_pass={name}, hadamard={"x": 32})
    assert np.abs(_run(rot, x) - x @ w).max() < np.abs(_run(one, x) - x @ w).max()
    with pytest.raises(ValueError, match="two-pass codes need symmetric codes"):
        quantize_per_row(fp32, tmp_path / "bad.onnx", [name], False, two_pass={name}, lower_bounds={"x": -0.17})


def _masked_product(path, w):
    """The product graph with an ``attention_mask`` input (B, S), which only the rewrite reads."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="/model/layers.0.down_proj/MatMul")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", K]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", N])], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _run_masked(path, x, mask):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x, "attention_mask": mask})[0]


@pytest.mark.parametrize("side", ["right", "left"])
def test_the_last_tokens_rows_are_coded_twice_and_the_others_once(tmp_path, side):
    """``two_pass_last=n``: each sequence's last n real tokens (by attention_mask, either padding side, fewer when
    it has fewer) come out as the whole two-pass product gives them, every other row as the one-pass product;
    a sequence's rows do not move with what shares its batch."""
    rng = np.random.default_rng(3)
    w = rng.normal(0, 0.05, (K, N)).astype(np.float32)
    lengths = [7, 2, 0, 5]  # real tokens per row; 0: a padding-only row
    s, n = 7, 3
    x = rng.normal(0, 1, (len(lengths), s, K)).astype(np.float32)
    mask = np.zeros((len(lengths), s), np.int64)
    for b, length in enumerate(lengths):
        if side == "right":
            mask[b, :length] = 1
        else:
            mask[b, s - length:] = 1
    fp32 = _masked_product(tmp_path / "fp32.onnx", w)
    name = "/model/layers.0.down_proj/MatMul"
    one, two, last = tmp_path / "one.onnx", tmp_path / "two.onnx", tmp_path / "last.onnx"
    quantize_per_row(fp32, one, [name], False)
    quantize_per_row(fp32, two, [name], False, two_pass={name})
    quantize_per_row(fp32, last, [name], False, two_pass_last=n)
    y_one, y_two, y_last = (_run_masked(p, x, mask) for p in (one, two, last))
    scale = np.abs(w).max(axis=0) / 127.0
    w_q = np.clip(np.rint(w / scale), -127, 127) * scale  # what the int8 weight holds
    want_q = x.astype(np.float64) @ w_q  # the two-pass rows are ~50x closer to it: the two graphs differ
    assert np.abs(y_two - want_q).max() < np.abs(y_one - want_q).max() / 50
    for b, length in enumerate(lengths):
        real = np.flatnonzero(mask[b])
        twice = set(real[-n:].tolist()) if length else {0}  # a padding-only row: its first position (unread)
        for t in range(s):
            want = y_two if t in twice else y_one
            np.testing.assert_allclose(y_last[b, t], want[b, t], rtol=0, atol=1e-6, err_msg=f"row {b} token {t}")
    # alone, each sequence (trimmed to its own length on its padding side) gets the same rows
    for b, length in enumerate(lengths):
        if length == 0:
            continue
        keep = slice(0, length) if side == "right" else slice(s - length, s)
        alone = _run_masked(last, x[b:b + 1, keep], mask[b:b + 1, keep])
        np.testing.assert_array_equal(alone[0], y_last[b, keep])
    # a product named in two_pass_last_skip codes its last tokens once: the one-pass product, bit for bit
    skip = tmp_path / "skip.onnx"
    quantize_per_row(fp32, skip, [name], False, two_pass_last=n, two_pass_last_skip=[name])
    np.testing.assert_array_equal(_run_masked(skip, x, mask), y_one)
    with pytest.raises(ValueError, match="attention_mask"):
        quantize_per_row(_product(tmp_path / "nomask.onnx", w), tmp_path / "bad.onnx", [name], False,
                         two_pass_last=n)
