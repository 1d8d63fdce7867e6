"""Every precision at any size: weights in external data, and no step that serializes the whole model in memory.

Protobuf cannot serialize a message above 2 GiB (the real Qwen3-Reranker-0.6B is 2.3 GB in fp32), so any step
that shape-infers or serializes an in-memory ModelProto fails at real decoder size. The test lowers the
external-data threshold so a tiny model takes the large-model path, and makes in-memory shape inference fail as it
would above 2 GiB.
"""

from __future__ import annotations

import numpy as np
import onnx.shape_inference
import pytest

from memrerank import Reranker
from memrerank.errors import ArtifactError
from memrerank.manifest import PARITY_TOLERANCE, read_manifest


def _refuse_in_memory(model, *args, **kwargs):
    raise AssertionError("in-memory shape inference: protobuf fails on this above 2 GiB; use a file path")


@pytest.mark.slow
def test_export_every_precision_through_external_data(qwen_ckpt, tmp_path, monkeypatch):
    import onnxruntime.transformers.float16 as float16

    from memrerank.export import export_model, graph

    monkeypatch.setattr(graph, "EXTERNAL_DATA_BYTES", 0)
    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", _refuse_in_memory)
    monkeypatch.setattr(float16, "infer_shapes", _refuse_in_memory)
    art = export_model(str(qwen_ckpt), tmp_path / "big", precisions=["fp32", "fp16", "int8"], log=lambda m: None)
    m = read_manifest(art)
    for name in ("fp32", "fp16", "int8"):
        entry = m.precisions[name]
        assert f"{name}/model.onnx_data" in entry.files, f"{name} keeps its weights inline: {sorted(entry.files)}"
    fp16 = m.precisions["fp16"]
    assert fp16.parity.max_abs_logit_diff <= PARITY_TOLERANCE["fp16"]
    pairs = [("Who is Marco?", "Marco is my climbing partner."), ("Who is Marco?", "I like tea.")]
    ref = Reranker.load(art, "fp32", prefix_reuse=False).predict(pairs, raw=True)
    for name in ("fp16", "int8"):
        got = Reranker.load(art, name).predict(pairs, raw=True)
        assert np.isfinite(got).all() and np.max(np.abs(got - ref)) < 0.5


def test_the_fused_graph_streams_its_weights_to_external_data(qwen_ckpt, tmp_path, monkeypatch):
    """Above the external-data limit the fused writer puts each weight straight into ``model.onnx_data`` as it
    writes the graph (4 KiB-aligned offsets), so the graph in memory never holds the weights: the .onnx file
    holds only small constants, and the artifact scores as the inline one does."""
    import onnx

    from memrerank.export import export_model, graph

    small = export_model(str(qwen_ckpt), tmp_path / "inline", graph="fused", log=lambda m: None)
    monkeypatch.setattr(graph, "EXTERNAL_DATA_BYTES", 0)
    big = export_model(str(qwen_ckpt), tmp_path / "streamed", graph="fused", precisions=["fp32", "int8"],
                       log=lambda m: None)
    model = onnx.load(str(big / "fp32" / "model.onnx"), load_external_data=False)
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    inline = [t for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    assert external and all(len(t.raw_data) <= 1024 for t in inline)
    offsets = [int(dict((e.key, e.value) for e in t.external_data)["offset"]) for t in external]
    assert all(o % 4096 == 0 for o in offsets) and len(set(offsets)) == len(offsets)
    assert (big / "fp32" / "model.onnx").stat().st_size < 200_000
    assert read_manifest(big).precision("fp32").parity.max_abs_logit_diff <= PARITY_TOLERANCE["fp32"]
    pairs = [("Who is Marco?", "Marco is my climbing partner."), ("Who is Marco?", "I like tea.")]
    np.testing.assert_allclose(Reranker.load(big).predict(pairs, raw=True),
                               Reranker.load(small).predict(pairs, raw=True), atol=1e-6, rtol=0)
    assert np.isfinite(Reranker.load(big, "int8").predict(pairs, raw=True)).all()
    # the int8 weights are hashed while onnxruntime builds the session: an altered byte still fails the load
    data = big / "int8" / "model.onnx_data"
    blob = bytearray(data.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    data.write_bytes(bytes(blob))
    with pytest.raises(ArtifactError, match="model.onnx_data does not match its sha256"):
        Reranker.load(big, "int8")
