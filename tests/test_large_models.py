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
