"""GPTQ 4-bit coding: the codes against a plain float64 transcription of the paper's algorithm, the product error
it exists to lower, ``H`` against activations computed by hand, and the int4 precision built with it."""

from __future__ import annotations

import gc
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from memrerank.export.gptq import gptq_blocks, input_hessians
from memrerank.export.int4 import CLIP_RATIOS, int4_blocks, pack_blocks


def _unpack(packed, scales, zeros, k, block):
    """MatMulNBits' 4-bit layout back to ``W`` (K × N) and the codes (N × K)."""
    n, blocks, _ = packed.shape
    q = np.empty((n, blocks, block), np.int64)
    q[..., 0::2], q[..., 1::2] = packed & 15, packed >> 4
    z = np.stack([zeros & 15, zeros >> 4], -1).reshape(n, -1)[:, :blocks]
    w = (q - z[..., None]) * scales.reshape(n, blocks)[..., None].astype(np.float64)
    return w.reshape(n, -1)[:, :k].T, q.reshape(n, -1)[:, :k]


def _reference_gptq(w, h, block, damp=0.01):
    """Algorithm 1 of the GPTQ paper, one input channel at a time in float64 with the explicit inverse, and the
    block range chosen as int4_blocks chooses it (least squared error over CLIP_RATIOS) when a block starts."""
    wt = w.T.astype(np.float64).copy()
    n, k = wt.shape
    h = h.astype(np.float64) + damp * np.mean(np.diag(h)) * np.eye(k)
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: H^-1 = U^T U
    codes = np.zeros((n, k), np.int64)
    for i in range(k):
        if i % block == 0:
            cols = wt[:, i:i + block]
            lo, hi = np.minimum(cols.min(1), 0), np.maximum(cols.max(1), 0)
            best = np.full(n, np.inf)
            s, z = np.zeros(n), np.zeros(n)
            for c in CLIP_RATIOS:
                sc = (hi - lo) * c / 15
                zc = np.clip(np.rint(-lo * c / sc), 0, 15)
                err = np.square((np.clip(np.rint(cols / sc[:, None]) + zc[:, None], 0, 15) - zc[:, None])
                                * sc[:, None] - cols).sum(1)
                s, z, best = np.where(err < best, sc, s), np.where(err < best, zc, z), np.minimum(err, best)
        q = np.clip(np.rint(wt[:, i] / s) + z, 0, 15)
        codes[:, i] = q
        e = (wt[:, i] - (q - z) * s) / u[i, i]
        wt[:, i:] -= np.outer(e, u[i, i:])
    return codes


def _correlated(rng, tokens, k, rank=12, mix=None):
    """Activations with strongly correlated channels (as a transformer's are: ``rank`` directions mixed by
    ``mix``), plus a little noise."""
    mix = rng.standard_normal((rank, k)) if mix is None else mix
    return (rng.standard_normal((tokens, rank)) @ mix + 0.05 * rng.standard_normal((tokens, k))).astype(np.float32)


def test_codes_match_the_papers_algorithm():
    rng = np.random.default_rng(0)
    k, n, block = 96, 40, 32
    x = _correlated(rng, 600, k)
    w = rng.standard_normal((k, n)).astype(np.float32)
    h = x.T @ x
    _, got = _unpack(*pack_blocks(*gptq_blocks(w, h, block, CLIP_RATIOS)), k, block)
    want = _reference_gptq(w, h, block)
    # float32 and lazy batches vs float64 one channel at a time: a rounding tie may go the other way
    assert np.mean(got == want) > 0.995


def test_gptq_lowers_the_product_error_on_the_calibration_activations():
    rng = np.random.default_rng(1)
    k, n = 128, 64
    mix = rng.standard_normal((12, k))
    x = _correlated(rng, 2000, k, mix=mix)
    w = (0.05 * rng.standard_normal((k, n))).astype(np.float32)
    gptq, _ = _unpack(*pack_blocks(*gptq_blocks(w, x.T @ x, 32, CLIP_RATIOS)), k, 32)
    rtn, _ = _unpack(*int4_blocks(w, 32), k, 32)
    held_out = _correlated(rng, 500, k, mix=mix)  # the same channel mixing, other tokens
    err = {name: np.square(held_out @ w - held_out @ q).mean() for name, q in (("gptq", gptq), ("rtn", rtn))}
    assert err["gptq"] < 0.5 * err["rtn"], err
    # the weights themselves move further from W: the error was moved where the activations do not look
    assert np.square(gptq - w).mean() > np.square(rtn - w).mean()


@pytest.mark.parametrize("act_order", [False, True])
def test_uncorrelated_channels_leave_nothing_to_compensate(act_order):
    """With a diagonal H no channel's error can be moved onto another: the codes are round to nearest's exactly,
    in the channels' own order whatever order they were coded in."""
    rng = np.random.default_rng(4)
    k, n = 64, 24
    w = rng.standard_normal((k, n)).astype(np.float32)
    h = np.diag(rng.uniform(0.5, 50.0, k)).astype(np.float32)
    got = pack_blocks(*gptq_blocks(w, h, 32, CLIP_RATIOS, act_order=act_order))
    for a, b in zip(got, int4_blocks(w, 32)):
        np.testing.assert_array_equal(a, b)


def test_act_order_codes_the_heavy_channels_first():
    """Activations with outlier channels (as a decoder's down projection reads): coding the channels the
    activations weigh most first leaves less product error than the channels' own order."""
    rng = np.random.default_rng(1)
    k, n = 256, 64
    mix, size = rng.standard_normal((12, k)), np.exp(1.5 * rng.standard_normal(k))
    x = _correlated(rng, 3000, k, mix=mix) * size
    held_out = _correlated(rng, 800, k, mix=mix) * size
    w = (0.05 * rng.standard_normal((k, n))).astype(np.float32)
    err = {}
    for act_order in (False, True):
        q, _ = _unpack(*pack_blocks(*gptq_blocks(w, x.T @ x, 32, CLIP_RATIOS, act_order=act_order)), k, 32)
        err[act_order] = np.square(held_out @ w - held_out @ q).mean()
    assert err[True] < 0.5 * err[False], err


def test_unseen_channels_and_a_ragged_last_block():
    rng = np.random.default_rng(2)
    k, n, block = 40, 8, 16  # 40 channels: the last block of 16 holds 8
    x = _correlated(rng, 300, k)
    x[:, 5] = 0.0  # a channel no token reaches: H[5, 5] = 0
    w = rng.standard_normal((k, n)).astype(np.float32)
    got, codes = _unpack(*pack_blocks(*gptq_blocks(w, x.T @ x, block, CLIP_RATIOS)), k, block)
    assert got.shape == (k, n) and np.isfinite(got).all()
    assert np.allclose(x @ got, x @ w, atol=0.6 * np.abs(x @ w).max())
    with pytest.raises(ValueError, match="H must be 40 x 40"):
        gptq_blocks(w, np.eye(39, dtype=np.float32), block, CLIP_RATIOS)
    with pytest.raises(ValueError, match="non-finite"):
        gptq_blocks(w, np.full((k, k), np.inf, np.float32), block, CLIP_RATIOS)


def _two_products(path, k, mid, n, rng):
    """``y = relu(x·W1)·W2`` with an ``attention_mask`` input the graph ignores (as the decoder's feeds carry)."""
    w1 = rng.standard_normal((k, mid)).astype(np.float32)
    w2 = rng.standard_normal((mid, n)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"], name="p1"), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="p2"),
             helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
             helper.make_node("ReduceSum", ["m"], ["ms"], keepdims=0)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", k]),
                                       helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "t"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "t", n]),
                           helper.make_tensor_value_info("ms", TensorProto.FLOAT, [])],
                          [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return w1


@pytest.mark.parametrize("budget", [None, 4 * 10 * 10])  # one pass / a pass per activation
def test_hessians_are_x_transpose_x_over_the_real_tokens(tmp_path, budget):
    rng = np.random.default_rng(3)
    k, mid = 10, 10
    w1 = _two_products(tmp_path / "g.onnx", k, mid, 4, rng)
    feeds = []
    for b, t in ((3, 5), (6, 2)):
        mask = (rng.random((b, t)) > 0.3).astype(np.int64)
        feeds.append({"x": rng.standard_normal((b, t, k)).astype(np.float32), "attention_mask": mask})
    runs = list(input_hessians(tmp_path / "g.onnx", {"x": k, "r": mid}, feeds, budget=budget, rows=2))
    assert len(runs) == (1 if budget is None else 2)
    got = {name: v for run in runs for name, v in run.items()}
    xs = np.concatenate([f["x"][f["attention_mask"].astype(bool)] for f in feeds]).astype(np.float64)
    rs = np.maximum(xs @ w1, 0)
    assert got["x"][1] == got["r"][1] == len(xs)  # padded tokens not counted
    np.testing.assert_allclose(got["x"][0], xs.T @ xs, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got["r"][0], rs.T @ rs, rtol=1e-4, atol=1e-3)
    assert not list(tmp_path.glob(".probe-*"))  # the probe graphs are removed
    with pytest.raises(ValueError, match="not activations"):
        next(input_hessians(tmp_path / "g.onnx", {"nope": 3}, feeds))


def test_int4_precision_is_gptq_coded_and_closer_to_fp32(tmp_path, qwen_ckpt):
    """``--int4-coding gptq``: the export's int4 (fp32 graph + calibration pairs) codes with GPTQ and says so;
    on the same pairs it is closer to fp32 than round to nearest (the default)."""
    from memrerank import Reranker
    from memrerank.export import export_model
    from memrerank.export.fidelity import CalibSet
    from memrerank.export import int4
    from memrerank.export.int4 import build_int4
    from memrerank.export.pairs import builtin_calibration_groups
    from memrerank.export.quantize import graph_info

    root = export_model(str(qwen_ckpt), tmp_path / "a", precisions=["fp32", "int4"], int4_block=16,
                        int4_coding="gptq", fidelity="top10=0.1,spearman=0.1", log=lambda m: None)
    build = json.loads((root / "manifest.json").read_text())["precisions"]["int4"]["build"]
    assert build["coding"] == "gptq" and "GPTQ" in build["method"]
    fp32 = root / "fp32" / "model.onnx"
    info = graph_info(fp32)
    groups = builtin_calibration_groups()
    calib = CalibSet(root, groups)
    errors = {}
    for coding in ("gptq", "rtn"):
        out = tmp_path / coding / "model.onnx"
        assert build_int4(fp32, out, info, calib, block=16, coding=coding).extra["coding"] == coding
        errors[coding] = float(np.sqrt(np.mean(np.square(calib.score(out) - calib.reference))))
    assert errors["gptq"] < errors["rtn"], errors
    assert build_int4(fp32, tmp_path / "rtn" / "model.onnx", info, calib, block=16).extra["coding"] == "rtn"
    with pytest.raises(ValueError, match="needs the calibration set"):
        build_int4(fp32, tmp_path / "x.onnx", info, None, coding="gptq")
    for bad, why in (({"precisions": ["int4"], "int4_coding": "gptq"}, "streamed int4 rounds to nearest"),
                     ({"precisions": ["fp32", "int8"], "int4_coding": "gptq"}, "add int4"),
                     ({"precisions": ["fp32", "int4"], "int4_coding": "awq"}, "unknown 'awq'")):
        with pytest.raises(ValueError, match=why):
            export_model(str(qwen_ckpt), tmp_path / "bad", log=lambda m: None, **bad)
    # and the artifact's graph is the GPTQ one: it scores as the rebuilt one does
    r = Reranker.load(root, precision="int4")
    q, docs = groups[0]
    np.testing.assert_allclose(r.predict([(q, d) for d in docs], raw=True),
                               calib.score(tmp_path / "gptq" / "model.onnx")[calib.group_rows[0]], atol=1e-4)
    # the codes the search reuses are remembered while their calibration set lives, not after
    assert int4._gptq_last
    del calib
    gc.collect()
    assert not int4._gptq_last
