"""The int8 preparation of ``memrerank.export.optimize``: first-token last layer, products on one row kept fp32,
smoothing and GELU offset codes — parity against transformers and the unchanged graph, hand-computed maths,
graph structure, and batch independence of the int8 graph they build."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from texts import DOCS, QUERIES

import models
from memrerank import LoadOptions, Reranker
from memrerank.export import export_model
from memrerank.export import optimize
from memrerank.export.fidelity import CalibSet
from memrerank.export.pairs import builtin_calibration_groups
from memrerank.export.quantize import graph_info, quantize_per_row

#: Max |Δlogit| of the first-token graph vs transformers (fp32 both), the artifact's fp32 tolerance.
FP32_ATOL = 1e-4
#: A document's score alone vs among 200 others (as tests/test_batch_independence.py).
ALONE_TOLERANCE = 1e-6


def _pairs() -> list[tuple[str, str]]:
    return [(q, d) for q in QUERIES[:3] for d in DOCS]


def _transformers_logits(ckpt, pairs, max_length=64) -> np.ndarray:
    """sentence-transformers CrossEncoder's computation: tokenizer(queries, docs) → logits[:, 0]."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForSequenceClassification.from_pretrained(ckpt).eval()
    enc = tok([q for q, _ in pairs], [d for _, d in pairs], padding=True, truncation="only_second",
              max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits[:, 0].double().numpy()


def _first_token_graph(artifact, tmp_path):
    model = onnx.load(str(artifact / "fp32" / "model.onnx"))
    changed = optimize.first_token_last_layer(model)
    assert isinstance(changed, list), changed
    path = tmp_path / "first-token.onnx"
    onnx.save(model, str(path))
    return path, changed


def _score(artifact, graph, pairs, batch_size):
    options = LoadOptions("fp32", threads=1, batch_size=batch_size)
    r = Reranker.load(artifact, options)
    if graph is not None:
        r = r.with_graph(graph, options)
    return r.predict(pairs, raw=True).astype(np.float64)


@pytest.fixture(scope="module")
def xlmr_artifact(tmp_path_factory):
    ckpt = models.make_xlm_roberta(tmp_path_factory.mktemp("ckpt") / "xlmr-tiny")
    return ckpt, export_model(str(ckpt), tmp_path_factory.mktemp("art") / "xlmr", max_length=64, log=lambda m: None)


@pytest.fixture(scope="module")
def bert_int8(tmp_path_factory, bert_ckpt):
    """Every weight product int8 that the builder quantizes (open budget: the search keeps nothing)."""
    return export_model(str(bert_ckpt), tmp_path_factory.mktemp("opt") / "bert-int8", precisions=["fp32", "int8"],
                        max_length=64, fidelity="top10=0,spearman=0", log=lambda m: None)


@pytest.mark.parametrize("batch_size", [1, 8])
def test_first_token_graph_matches_transformers(bert_ckpt, bert_artifact, tmp_path, batch_size):
    """Only the last layer's query/output/FFN products and the pooler move to one row per pair, and the logits
    stay those of transformers and of the unchanged graph."""
    graph, changed = _first_token_graph(bert_artifact, tmp_path)
    assert changed == ["/bert/encoder/layer.1/attention/self/query/MatMul",
                       "/bert/encoder/layer.1/attention/output/dense/MatMul",
                       "/bert/encoder/layer.1/intermediate/dense/MatMul", "/bert/encoder/layer.1/output/dense/MatMul",
                       "/bert/pooler/dense/Gemm", "/classifier/Gemm"]
    pairs = _pairs()
    got = _score(bert_artifact, graph, pairs, batch_size)
    np.testing.assert_allclose(got, _transformers_logits(bert_ckpt, pairs), atol=FP32_ATOL, rtol=0)
    np.testing.assert_allclose(got, _score(bert_artifact, None, pairs, batch_size), atol=1e-5, rtol=0)


def test_first_token_graph_on_a_roberta_style_model(xlmr_artifact, tmp_path):
    """XLM-R: no pooler (the head reads token 0 itself), no token types, a RoBERTa pair template."""
    ckpt, artifact = xlmr_artifact
    graph, changed = _first_token_graph(artifact, tmp_path)
    assert len([n for n in changed if "/layer.1/" in n]) == 4
    pairs = _pairs()
    np.testing.assert_allclose(_score(artifact, graph, pairs, 8), _transformers_logits(ckpt, pairs), atol=FP32_ATOL,
                               rtol=0)


def test_first_token_leaves_a_decoder_alone(qwen_artifact):
    """A decoder's head reads the last real token, not the first: the graph is left as it is, with the reason."""
    model = onnx.load(str(qwen_artifact / "fp32" / "model.onnx"))
    before = model.SerializeToString()
    why = optimize.first_token_last_layer(model)
    assert isinstance(why, str) and "first token" in why
    assert model.SerializeToString() == before


def _all_external(artifact, tmp_path, name):
    """The artifact's fp32 graph saved as torch's exporter writes one above 2 GiB: every tensor in external data."""
    path = tmp_path / name / "model.onnx"
    path.parent.mkdir()
    onnx.save(onnx.load(str(artifact / "fp32" / "model.onnx")), str(path), save_as_external_data=True,
              all_tensors_to_one_file=True, location="model.onnx_data", size_threshold=0)
    skeleton = onnx.load(str(path), load_external_data=False)
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in skeleton.graph.initializer)
    return path


def _constants_to_external(path):
    """Constant nodes' tensors into the external data too (torch's exporter does that above 2 GiB)."""
    model = onnx.load(str(path))
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx_data", size_threshold=0, convert_attribute=True)
    skeleton = onnx.load(str(path), load_external_data=False)
    assert any(a.t.data_location == onnx.TensorProto.EXTERNAL for n in skeleton.graph.node for a in n.attribute
               if a.type == onnx.AttributeProto.TENSOR)
    return path


def test_plan_reads_a_graph_whose_every_tensor_is_external(bert_artifact, qwen_artifact, tmp_path):
    """A real-size export keeps even index constants and norm vectors in external data: the plan's skeleton reads
    those (so an encoder still gets its first-token layer) and a decoder is left alone with its reason, where
    reading them from a graph loaded without its data crashed the 0.6B export."""
    enc = optimize._skeleton(_constants_to_external(_all_external(bert_artifact, tmp_path, "bert")))
    assert optimize.first_token_last_layer(enc)[-1] == "/classifier/Gemm"
    dec = optimize._skeleton(_constants_to_external(_all_external(qwen_artifact, tmp_path, "qwen")))
    assert not any(t.raw_data for t in dec.graph.initializer if len(t.dims) > 1), "weights stay on disk"
    why = optimize.first_token_last_layer(dec)
    assert isinstance(why, str) and "first token" in why


def test_int8_build_record_and_graph(bert_int8):
    """The manifest says what the builder did; the graph shows it: the first-token Slice, the one-row products as
    float products, every other weight product a MatMulIntegerToFloat, one smoothing Mul per LayerNorm output
    that feeds int8 products, and GELU outputs coded with the fixed zero point."""
    entry = json.loads((bert_int8 / "manifest.json").read_text())["precisions"]["int8"]
    build, kept = entry["build"], entry["fidelity"].get("kept_fp32_nodes", [])
    assert build["batch_independent"] is True
    first = build["first_token_last_layer"]
    assert first["applied"] is True and first["max_abs_logit_diff"] <= optimize.FIRST_TOKEN_TOLERANCE
    assert build["fp32_nodes"] == [n for n in first["products_on_first_token"] if n != "/classifier/Gemm"]
    model = onnx.load(str(bert_int8 / "int8" / "model.onnx"))
    nodes = {n.name: n for n in model.graph.node}
    ops = [n.op_type for n in model.graph.node]
    info = graph_info(bert_int8 / "fp32" / "model.onnx")
    assert ops.count("MatMulIntegerToFloat") == len(info.weight_nodes) - len(build["fp32_nodes"]) - len(kept) == 8
    for name in build["fp32_nodes"]:
        assert nodes[name].op_type in ("MatMul", "Gemm")  # kept as the float product it was
    assert "_first_token/Slice" in nodes and "_first_token/mask_Slice" in nodes
    # LayerNorm outputs read by int8 products: embeddings LN (layer 0 QKV), layer 0's two, layer 1's attention
    # LN is read by the first-token FFN only, the layer-0 output LN by layer 1's keys/values
    smooth = [n for n in model.graph.node if n.name.endswith("_smooth")]
    assert len(smooth) == build["smoothing"]["activations"] == 3
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    zps = [inits[n.input[4]] for n in model.graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert sum(int(z) == optimize.GELU_ZERO_POINT for z in zps) == build["gelu_codes"]["activations"] == 1
    assert sum(int(z) == 128 for z in zps) == 7


def test_int8_scores_alone_equal_scores_among_200(bert_int8):
    from test_batch_independence import _alone_vs_crowd

    r = Reranker.load(bert_int8, "int8", threads=1)
    assert _alone_vs_crowd(r, raw=True) <= ALONE_TOLERANCE
    assert _alone_vs_crowd(r, raw=False) <= ALONE_TOLERANCE


def test_real_minilm_int8_meets_the_budget_with_nothing_kept(minilm_ckpt, tmp_path):
    """On the real all-MiniLM-L6-v2 weights, the int8 build meets the export's default budget on the built-in
    calibration pairs as built: the sensitivity search keeps no product in fp32 (before these changes it kept
    5, bench/results/int8_flavours_minilm.json), and unseen pairs agree with fp32 as closely."""
    from memrerank.export.fidelity import FidelityBudget
    from memrerank.export.metrics import spearman

    out = export_model(str(minilm_ckpt), tmp_path / "minilm", precisions=["fp32", "int8"], max_length=128,
                       log=lambda m: None)
    entry = json.loads((out / "manifest.json").read_text())["precisions"]["int8"]
    assert entry["build"]["first_token_last_layer"]["applied"] is True
    assert entry["fidelity"]["kept_fp32"] == [] and entry["fidelity"]["meets_budget"]
    fp32, int8 = Reranker.load(out, "fp32"), Reranker.load(out, "int8")
    budget = FidelityBudget()
    for q in QUERIES:
        docs = [d for d in DOCS if d.strip()]
        a, b = int8.predict([(q, d) for d in docs], raw=True), fp32.predict([(q, d) for d in docs], raw=True)
        assert spearman(a, b) >= budget.spearman - 0.02, q


def _two_product_graph(tmp_path, k=16, n=8, rows=6):
    """x → LayerNorm → MatMul(W1) → Gelu(exact, exported form) → MatMul(W2)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    gamma = rng.uniform(0.5, 2.0, k).astype(np.float32)
    gamma[3] = 25.0  # an outlier channel, as BERT's LayerNorm outputs have
    w1 = rng.standard_normal((k, n)).astype(np.float32)
    w2 = rng.standard_normal((n, n)).astype(np.float32)
    inits = [numpy_helper.from_array(a, name) for a, name in ((gamma, "gamma"), (np.zeros(k, np.float32), "beta"),
                                                              (w1, "w1"), (w2, "w2"))]
    inits += [numpy_helper.from_array(np.array(v, np.float32), name) for v, name in
              ((np.sqrt(2.0), "sqrt2"), (1.0, "one"), (0.5, "half"))]
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], axis=-1, name="ln"),
             helper.make_node("MatMul", ["ln", "w1"], ["h"], name="mm1"),
             helper.make_node("Div", ["h", "sqrt2"], ["hd"], name="gelu_div"),
             helper.make_node("Erf", ["hd"], ["he"], name="gelu_erf"),
             helper.make_node("Add", ["he", "one"], ["ha"], name="gelu_add"),
             helper.make_node("Mul", ["h", "ha"], ["hm"], name="gelu_mul"),
             helper.make_node("Mul", ["hm", "half"], ["g"], name="gelu_mul_1"),
             helper.make_node("MatMul", ["g", "w2"], ["y"], name="mm2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", k])],
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["rows", n])
                               for name in ("h", "y")], inits)
    path = tmp_path / "fp32.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    x = (rng.standard_normal((rows, k)) * rng.uniform(0.1, 10, size=(rows, 1))).astype(np.float32)
    return path, x, gamma, w1, w2


def test_smoothed_and_offset_codes_match_the_hand_computed_maths(tmp_path):
    """mm1 reads a smoothed LayerNorm output, mm2 a GELU output with offset codes: onnxruntime equals numpy's
    per-row quantization of ``x / s`` by ``diag(s) W`` and of the GELU output on 0..255 with zero point 16,
    each row alone equals the row in the batch, and the detectors find exactly these two inputs."""
    import onnxruntime as ort
    from scipy.special import erf

    path, x, gamma, w1, w2 = _two_product_graph(tmp_path)
    model = onnx.load(str(path))
    assert optimize.layernorm_inputs(model, ["mm1", "mm2"]) == ["ln"]
    assert optimize.gelu_inputs(model, ["mm1", "mm2"]) == ["g"]
    s = np.exp(np.linspace(-1, 1, len(gamma))).astype(np.float32)
    out = tmp_path / "int8.onnx"
    assert quantize_per_row(path, out, ["mm1", "mm2"], external=False, smooth={"ln": s},
                            lower_bounds={"g": optimize.GELU_MIN}) == 2

    def weights(w):
        scale = np.abs(w).max(axis=0) / np.float32(127)
        return np.clip(np.rint(w / scale), -127, 127).astype(np.int64), scale.astype(np.float64)

    mu, var = x.mean(1, keepdims=True), x.var(1, keepdims=True)
    ln = ((x - mu) / np.sqrt(var + 1e-5) * gamma).astype(np.float32)
    xs = (ln * (np.float32(1) / s)).astype(np.float32)
    a_scale = np.maximum(np.abs(xs).max(1, keepdims=True) / np.float32(127), np.float32(1e-30))
    wq, ws = weights(w1 * s[:, None])
    h = (np.clip(np.rint(xs / a_scale), -128, 127).astype(np.int64) @ wq) * ws * a_scale
    zp = optimize.GELU_ZERO_POINT
    g = (h * 0.5 * (1 + erf(h / np.sqrt(2)))).astype(np.float32)
    g_scale = np.maximum(g.max(1, keepdims=True) / np.float32(255 - zp), np.float32(-optimize.GELU_MIN / zp))
    codes = np.rint(g / g_scale) + zp
    assert codes.min() >= 0 and codes.max() <= 255  # the bound keeps every code in range: nothing clipped
    wq2, ws2 = weights(w2)
    y = ((codes.astype(np.int64) - zp) @ wq2) * ws2 * g_scale

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got_h, got_y = session.run(None, {"x": x})
    np.testing.assert_allclose(got_h, h, rtol=0, atol=2e-4 * np.abs(h).max())
    np.testing.assert_allclose(got_y, y, rtol=0, atol=5e-3 * np.abs(y).max())  # an ulp in h can move a code
    for i in range(len(x)):
        alone = session.run(None, {"x": x[i:i + 1]})
        np.testing.assert_array_equal(alone[0][0], got_h[i])
        np.testing.assert_array_equal(alone[1][0], got_y[i])


def test_smoothing_factors_formula():
    """s_j = a_j^α / w_j^(1-α), geometric mean 1; α=0 follows the weights only, α=1 the activations only."""
    a = {"x": np.array([1.0, 4.0, 16.0])}
    w = {"x": np.array([1.0, 1.0, 4.0])}
    s = optimize.smoothing_factors(a, w, 0.5)["x"]
    raw = np.array([1.0, 2.0, 2.0])  # sqrt(a) / sqrt(w)
    np.testing.assert_allclose(s, raw / np.exp(np.mean(np.log(raw))), rtol=1e-6)
    np.testing.assert_allclose(optimize.smoothing_factors(a, w, 1.0)["x"], np.array([1, 4, 16]) / 4.0, rtol=1e-6)
    np.testing.assert_allclose(optimize.smoothing_factors(a, w, 0.0)["x"], 1 / (np.array([1, 1, 4]) / 4 ** (1 / 3)),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="alpha"):
        optimize.smoothing_factors(a, w, 1.5)


def test_plan_without_calibration_changes_nothing(bert_artifact):
    """No pairs to check the first-token graph on: the fp32 graph as it is; only the pooler (one row per pair
    already) stays fp32; nothing smoothed or offset."""
    fp32 = bert_artifact / "fp32" / "model.onnx"
    plan = optimize.plan_int8(fp32, graph_info(fp32), None)
    assert plan.record["first_token_last_layer"]["applied"] is False
    assert plan.one_row == ["/bert/pooler/dense/Gemm"]
    assert not plan.smooth and not plan.lower_bounds
    assert plan.model is None  # quantized from the file as it is


def test_first_token_kept_out_when_the_check_fails(bert_artifact, monkeypatch):
    """The export's check against the unchanged graph decides: a tolerance nothing can meet keeps the graph."""
    monkeypatch.setattr(optimize, "FIRST_TOKEN_TOLERANCE", -1.0)
    fp32 = bert_artifact / "fp32" / "model.onnx"
    calib = CalibSet(bert_artifact, builtin_calibration_groups()[:2])
    plan = optimize.plan_int8(fp32, graph_info(fp32), calib)
    record = plan.record["first_token_last_layer"]
    assert record["applied"] is False and "max |Δlogit|" in record["why"]
    assert plan.one_row == ["/bert/pooler/dense/Gemm"]
    assert plan.smooth and plan.lower_bounds  # measured on the calibration pairs all the same
