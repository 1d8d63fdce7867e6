"""The fused decoder graph (memrerank.export.fused): same scores as transformers' official recipe, prefix reuse
included, built from fused operators only, and its CUDA form (checked by its structure and by running it on the
CPU, where onnxruntime implements the same operators)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnxruntime as ort
import pytest
from packaging.version import Version

from conftest import PARITY_ATOL
from memrerank import Reranker
from test_parity import official_qwen3_logits
from texts import DOCS, QUERIES

pytestmark = pytest.mark.skipif(
    Version(ort.__version__).release < (1, 23),
    reason=f"the fused graph uses ONNX Attention (opset 23), which onnxruntime {ort.__version__} does not run (1.23+)")

LAYERS = 2  # tests/models.py make_qwen3


def _export(src, out, graph="fused", **kw):
    from memrerank.export import export_model

    return export_model(str(src), out, log=lambda m: None, graph=graph, **kw)


@pytest.fixture(scope="module")
def fused_artifact(tmp_path_factory, qwen_ckpt):
    """max_length 128: the long document is truncated, so truncation runs through both scoring paths."""
    return _export(qwen_ckpt, tmp_path_factory.mktemp("fused") / "qwen3", max_length=128)


def _op_counts(path):
    from memrerank.export.fused import fused_op_counts

    return fused_op_counts(path)


@pytest.mark.parametrize("prefix_reuse", [True, False])
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("batch_size", [1, 8])
def test_fused_matches_official_recipe(qwen_ckpt, fused_artifact, padding_side, batch_size, prefix_reuse):
    pairs = [(q, d) for q in QUERIES for d in DOCS]
    ref = official_qwen3_logits(qwen_ckpt, pairs, max_length=128)
    reranker = Reranker.load(fused_artifact, batch_size=batch_size, prefix_reuse=prefix_reuse)
    reranker.padding_side = padding_side
    got, truncated = reranker.predict_with_truncation(pairs, raw=True)
    assert truncated.any() and np.ptp(ref) > 1.0
    np.testing.assert_allclose(got, ref, atol=PARITY_ATOL["fp32"], rtol=0)


def test_fused_export_records_graph_and_parity(fused_artifact):
    from memrerank.manifest import read_manifest

    manifest = read_manifest(fused_artifact)
    parity = manifest.precision("fp32").parity
    assert manifest.to_dict()["export"]["graph"] == "fused"
    assert set(parity.extra["max_abs_logit_diff_by_run"]) == {
        f"{path}/{run}" for path in ("reuse", "whole") for run in ("left/batch8", "right/batch8", "right/batch1")}
    assert parity.max_abs_logit_diff <= PARITY_ATOL["fp32"]


def test_fused_products_are_grouped_by_layer(fused_artifact):
    """The fused graph names each weight product after its weight (``/model/layers.N.down_proj/MatMul``), so the
    int8 sensitivity search judges layers and product kinds, not runs of anonymous ``MatMul_17`` nodes."""
    from memrerank.export.quantize import graph_info

    info = graph_info(fused_artifact / "fp32" / "model.onnx")
    layers = {g: v for g, v in info.groups.items() if g.startswith("layer ")}
    assert sorted(layers) == ["layer 0", "layer 1"]
    assert all(sorted(n.split("/")[2].split(".")[-1] for n in v) == ["down_proj", "gate_up_proj", "o_proj",
                                                                     "qkv_proj"] for v in layers.values())


def test_fused_prefix_cache_is_batch_one_and_shared(fused_artifact):
    """The prefix pass returns row 0's keys/values (1, kv, P, d); one such cache scores many rows, each as its whole
    pair would score, whatever the batch around it."""
    r = Reranker.load(fused_artifact, batch_size=16)
    head = r.encoder.head_ids(QUERIES[0])
    past = r.backend.prefix(np.asarray(head))
    assert sorted(past) == sorted(f"past_{k}.{i}" for i in range(LAYERS) for k in ("key", "value"))
    assert all(v.shape == (1, 2, len(head), 16) for v in past.values())
    docs = [d for d in DOCS for _ in range(3)]
    with_reuse = r.predict([(QUERIES[0], d) for d in docs], raw=True)
    alone = np.array([r.predict([(QUERIES[0], d)], raw=True)[0] for d in DOCS])
    r.prefix_reuse = False
    whole = r.predict([(QUERIES[0], d) for d in docs], raw=True)
    np.testing.assert_allclose(with_reuse, whole, atol=PARITY_ATOL["fp32"], rtol=0)
    np.testing.assert_allclose(with_reuse, np.repeat(alone, 3), atol=PARITY_ATOL["fp32"], rtol=0)


def test_fused_graph_is_made_of_fused_ops(fused_artifact):
    """Per layer: one Attention, two RotaryEmbedding (q, k), two skip-RMSNorms, three products (packed QKV, output,
    packed gate/up) + the down product; no unfused softmax or RMSNorm arithmetic anywhere."""
    import onnx

    counts = _op_counts(fused_artifact / "fp32" / "model.onnx")
    assert counts["Attention"] == LAYERS
    assert counts["com.microsoft:RotaryEmbedding"] == 2 * LAYERS
    assert counts["com.microsoft:SkipSimplifiedLayerNormalization"] == 2 * LAYERS  # + the final one, less layer 0's
    assert counts["SimplifiedLayerNormalization"] == 1 + 2 * LAYERS  # layer 0's input norm + q/k norms
    assert counts["MatMul"] == 4 * LAYERS + 1  # + the folded head
    assert not {"Softmax", "Pow", "ReduceMean", "Sqrt", "Div", "Neg"} & set(counts)
    graph = onnx.load(str(fused_artifact / "fp32" / "model.onnx")).graph
    attention = [n for n in graph.node if n.op_type == "Attention"][0]
    attrs = {a.name: a.i for a in attention.attribute}
    assert (attrs["q_num_heads"], attrs["kv_num_heads"]) == (4, 2)  # grouped heads stay grouped on the CPU
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"] + [
        f"past_{k}.{i}" for i in range(LAYERS) for k in ("key", "value")]


@pytest.mark.parametrize("prefix_reuse", [True, False])
def test_cuda_form_repeats_heads_and_matches_official_recipe(qwen_ckpt, tmp_path, prefix_reuse):
    """The CUDA graph (no GPU here): its Attention nodes see as many key/value heads as query heads (onnxruntime's
    CUDA Attention takes grouped heads only in flash / memory-efficient kernels, which refuse fp32 and a float mask
    with a past). onnxruntime runs the same operators on the CPU, so its scores are checked here."""
    import onnx

    out = _export(qwen_ckpt, tmp_path / "cuda", max_length=128, graph="fused-cuda")
    graph = onnx.load(str(out / "fp32" / "model.onnx")).graph
    attention = [n for n in graph.node if n.op_type == "Attention"]
    assert len(attention) == LAYERS
    for node in attention:
        attrs = {a.name: a.i for a in node.attribute}
        assert attrs["q_num_heads"] == attrs["kv_num_heads"] == 4
    counts = _op_counts(out / "fp32" / "model.onnx")
    assert counts["com.microsoft:RotaryEmbedding"] == 2 * LAYERS and "Softmax" not in counts
    pairs = [(q, d) for q in QUERIES[:2] for d in DOCS]
    reranker = Reranker.load(out, batch_size=8, prefix_reuse=prefix_reuse)
    np.testing.assert_allclose(reranker.predict(pairs, raw=True), official_qwen3_logits(qwen_ckpt, pairs, 128),
                               atol=PARITY_ATOL["fp32"], rtol=0)


def test_fused_refused_for_encoders(bert_ckpt, tmp_path):
    with pytest.raises(ValueError, match="--graph fused is for decoder rerankers"):
        _export(bert_ckpt, tmp_path / "bert", max_length=64)
    assert not (tmp_path / "bert").exists()


def test_unknown_graph_refused_before_loading(tmp_path):
    from memrerank.export import export_model

    with pytest.raises(ValueError, match="graph: unknown 'flash'; choose from traced, fused, fused-cuda"):
        export_model("/nonexistent", tmp_path / "x", graph="flash")


@pytest.mark.slow
def test_fused_lower_precisions_build(qwen_ckpt, tmp_path):
    """fp16 (the GPU precision: head and final norm kept fp32) and int8 build from the fused graph and stay close to
    its fp32 scores."""
    from memrerank.manifest import PARITY_TOLERANCE, read_manifest

    out = _export(qwen_ckpt, tmp_path / "lower", precisions=["fp32", "fp16", "int8"],
                  fidelity="top10=0.8,spearman=0.95")
    manifest = read_manifest(out)
    assert manifest.precision("fp16").parity.max_abs_logit_diff <= PARITY_TOLERANCE["fp16"]
    fp16_ops = _op_counts(out / "fp16" / "model.onnx")
    assert fp16_ops["Attention"] == LAYERS and "Softmax" not in fp16_ops
    assert _op_counts(out / "int8" / "model.onnx").get("MatMul", 0) < _op_counts(out / "fp32" / "model.onnx")["MatMul"]
    pairs = [(QUERIES[0], d) for d in DOCS]
    fp32 = Reranker.load(out).predict(pairs, raw=True)
    for precision in ("fp16", "int8"):
        with warnings.catch_warnings():  # "fp16 is meant for GPU providers": expected on the CPU
            warnings.simplefilter("ignore")
            got = Reranker.load(out, precision).predict(pairs, raw=True)
        assert np.corrcoef(got, fp32)[0, 1] > 0.95


def test_cli_export_graph_choices_are_the_exporters(tmp_path, qwen_ckpt):
    """``memrerank export --graph fused`` reaches the exporter: the manifest records the fused graph."""
    from memrerank.cli import EXPORT_GRAPHS, main
    from memrerank.export.fused import GRAPH_KINDS

    assert EXPORT_GRAPHS == GRAPH_KINDS
    out = tmp_path / "fused-cli"
    assert main(["export", str(qwen_ckpt), "-o", str(out), "--precision", "fp32", "--graph", "fused", "-q"]) == 0
    assert json.loads((out / "manifest.json").read_text())["export"]["graph"] == "fused"


def test_a_decoder_exports_the_rotated_fused_graph_by_default_and_falls_back_to_traced(tmp_path, qwen_ckpt,
                                                                                        monkeypatch):
    """No --graph: a decoder gets the fused graph, rotated; where the fused writer cannot cover the model, the
    traced graph, with the reason in the log and in the manifest's export block. Asking for fused explicitly
    keeps the error."""
    from memrerank.export import export_model, pipeline
    from memrerank.manifest import read_manifest

    art = export_model(str(qwen_ckpt), tmp_path / "default", max_length=128, log=lambda m: None)
    export = read_manifest(art).to_dict()["export"]
    assert export["graph"] == "fused" and export["rotation"]["seed"] == 0 and "graph_fallback" not in export

    def cannot(*a, **kw):
        raise ValueError("the fused graph does not support sliding-window layers")

    monkeypatch.setattr(pipeline, "write_fused_graph", cannot)
    said = []
    art = export_model(str(qwen_ckpt), tmp_path / "fallback", max_length=128, log=said.append)
    export = read_manifest(art).to_dict()["export"]
    assert export["graph"] == "traced" and "rotation" not in export
    assert "sliding-window" in export["graph_fallback"] and any("exporting the traced graph" in m for m in said)
    assert read_manifest(art).precision("fp32").parity.within_tolerance
    with pytest.raises(ValueError, match="sliding-window"):
        export_model(str(qwen_ckpt), tmp_path / "asked", graph="fused", max_length=128, log=lambda m: None)
