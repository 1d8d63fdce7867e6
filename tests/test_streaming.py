"""The streaming export's pieces: safetensors read one tensor at a time without torch, the fused graph written
from the files (the same graph as from the PyTorch module), and int4 written while the graph is written (the same
graph as the int4 pass over an fp32 graph)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from memrerank.export.checkpoint import Checkpoint
from memrerank.export.fused import CheckpointSource, Rotation, write_fused_graph
from memrerank.export.int4 import Int4Coder, quantize_int4
from memrerank.export.quantize import graph_info, quantize_embeddings
from models import make_qwen2, make_qwen3

torch = pytest.importorskip("torch")


def test_checkpoint_reads_each_dtype_as_safetensors_does(tmp_path):
    from safetensors.torch import load_file, save_file

    rng = np.random.default_rng(0)
    tensors = {"a": torch.tensor(rng.normal(size=(5, 7)), dtype=torch.bfloat16),
               "b": torch.tensor(rng.normal(size=(3,)), dtype=torch.float16),
               "c": torch.tensor(rng.normal(size=(2, 3, 4)), dtype=torch.float32),
               "d": torch.tensor(rng.normal(size=(6, 4)) * 1e30, dtype=torch.bfloat16)}  # bf16's wide range
    save_file(tensors, tmp_path / "model.safetensors")
    ckpt = Checkpoint(tmp_path)
    ref = load_file(tmp_path / "model.safetensors")
    assert sorted(ckpt.names()) == sorted(ref)
    for name, t in ref.items():
        got = ckpt.tensor(name)
        assert got.dtype == np.float32 and got.shape == tuple(t.shape)
        np.testing.assert_array_equal(got, t.float().numpy())  # exact: each widening is exact
    np.testing.assert_array_equal(ckpt.rows("d", [4, 1]), ref["d"].float().numpy()[[4, 1]])
    assert ckpt.dtypes() == {"BF16": 2, "F16": 1, "F32": 1}
    with pytest.raises(KeyError, match="no tensor 'e'"):
        ckpt.tensor("e")
    with pytest.raises(IndexError, match="row 6 outside"):
        ckpt.rows("d", [6])


def test_checkpoint_refuses_truncated_files_and_pickles(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.ones(64, 64)}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(ValueError, match="outside the file"):
        Checkpoint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(ValueError, match="not a safetensors file"):
        Checkpoint(tmp_path)
    empty = tmp_path / "pickled"
    empty.mkdir()
    (empty / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="safetensors weights only"):
        Checkpoint(empty)


def test_checkpoint_reads_sharded_checkpoints(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.arange(6.0).reshape(2, 3)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"y": torch.ones(4, dtype=torch.bfloat16)}, tmp_path / "model-00002-of-00002.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"}}))
    ckpt = Checkpoint(tmp_path)
    np.testing.assert_array_equal(ckpt.tensor("x"), np.arange(6.0, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(ckpt.tensor("y"), np.ones(4, np.float32))


def _family(path):
    from transformers import AutoConfig

    from memrerank.export.families import family_for

    config = AutoConfig.from_pretrained(path)
    family = family_for(config)(str(path), config, revision=None, trust_remote_code=False, instruction=None,
                                max_length=None)
    family.load()
    return family, config


def _source(family, config, path):
    head = None if family.is_seq_cls else family._yes_no_ids()
    return CheckpointSource(Checkpoint(path), config, head)


def _initializers(path):
    model = onnx.load(str(path))
    return [n.op_type for n in model.graph.node], {
        i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


@pytest.fixture(scope="module", params=["qwen3", "qwen3-bf16", "qwen2-untied", "qwen3-seq-cls"])
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    if request.param.startswith("qwen2"):
        make_qwen2(path, tied=False)
    else:
        make_qwen3(path, seq_cls=request.param.endswith("seq-cls"))
    if request.param.endswith("bf16"):  # the hub's usual dtype: re-saved in bf16
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).save_pretrained(path)
    return path


@pytest.mark.parametrize("rotate", [False, True])
def test_the_graph_written_from_the_files_is_the_graph_written_from_the_module(tiny, tmp_path, rotate):
    family, config = _family(tiny)
    if "bf16" in tiny.name:
        assert Checkpoint(tiny).dtypes() == {"BF16": len(Checkpoint(tiny).names())}
    rotation = Rotation() if rotate else None
    write_fused_graph(family.graph_module(), tmp_path / "module" / "model.onnx", rotation=rotation)
    write_fused_graph(_source(family, config, tiny), tmp_path / "files" / "model.onnx", rotation=rotation)
    ops_m, inits_m = _initializers(tmp_path / "module" / "model.onnx")
    ops_f, inits_f = _initializers(tmp_path / "files" / "model.onnx")
    assert ops_m == ops_f and sorted(inits_m) == sorted(inits_f)
    for name, value in inits_m.items():  # the same float32 numbers: both read the same stored values
        np.testing.assert_array_equal(inits_f[name], value, err_msg=name)


def _run(path, ids, mask=None):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids) if mask is None else mask}
    for i in sess.get_inputs():
        if i.name.startswith("past_"):
            feed[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
    return sess.run(["logits"], feed)[0]


def test_int4_written_while_streaming_is_the_int4_pass_over_the_fp32_graph(tmp_path):
    path = make_qwen3(tmp_path / "ckpt", hidden=128)
    family, config = _family(path)
    fp32 = tmp_path / "fp32" / "model.onnx"
    write_fused_graph(family.graph_module(), fp32, rotation=Rotation())
    info = graph_info(fp32)
    two_pass = tmp_path / "two-pass" / "model.onnx"
    assert quantize_int4(fp32, two_pass, info.weight_nodes, False) == len(info.weight_nodes) == 8
    assert quantize_embeddings(two_pass, list(info.embedding_nodes), False) == 1
    coder = Int4Coder()
    streamed = tmp_path / "streamed" / "model.onnx"
    write_fused_graph(_source(family, config, path), streamed, rotation=Rotation(), coder=coder)
    assert (coder.products, coder.tables) == (8, 1)
    assert coder.build().extra["int4_products"] == 8
    ops = [n.op_type for n in onnx.load(str(streamed), load_external_data=False).graph.node]
    assert ops.count("MatMulNBits") == 8 and ops.count("MatMul") == 1  # the folded head stays fp32
    ids = np.random.default_rng(0).integers(0, 151_000, (3, 17)).astype(np.int64)
    want = _run(two_pass, ids)
    np.testing.assert_array_equal(_run(streamed, ids), want)
    assert np.abs(want - _run(fp32, ids)).max() > 1e-4  # it is 4-bit: a graph that did not code would differ


@pytest.fixture(scope="module")
def streamed(tmp_path_factory):
    """A tiny Qwen3 saved in bf16 and exported as int4 alone (streamed; the budget relaxed: random weights)."""
    from transformers import AutoModelForCausalLM

    from memrerank.export import export_model

    ckpt = make_qwen3(tmp_path_factory.mktemp("ckpt"), hidden=128)
    AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).save_pretrained(ckpt)
    out = tmp_path_factory.mktemp("art") / "int4"
    export_model(str(ckpt), out, precisions=["int4"], fidelity="top10=0.5,spearman=0.5")
    return ckpt, out


def test_int4_alone_streams_without_an_fp32_graph_and_is_judged_against_pytorch(streamed):
    from memrerank import Reranker
    from memrerank.manifest import read_manifest
    from test_parity import official_qwen3_logits
    from texts import DOCS, QUERIES

    ckpt, out = streamed
    manifest = read_manifest(out)
    assert list(manifest.precisions) == ["int4"] and not (out / "fp32").exists()
    entry = manifest.precision("int4")
    assert entry.build.extra["streamed"] and entry.build.extra["int4_products"] == 8
    assert entry.parity.reference == "pytorch (transformers, bfloat16)"
    assert entry.fidelity.extra["reference"] == entry.parity.reference and entry.fidelity.meets_budget
    # PyTorch scores a bounded set: 4 of the 8 built-in queries x 24 of their 40 documents
    assert (manifest.calibration_data.pairs, manifest.calibration_data.queries) == (96, 4)
    assert entry.fidelity.metrics["pairs"] == 96
    assert manifest.export.extra["streamed"]["checkpoint"]["dtypes"] == {"BF16": len(Checkpoint(ckpt).names())}
    ops = [n.op_type for n in onnx.load(str(out / entry.graph), load_external_data=False).graph.node]
    assert ops.count("MatMulNBits") == 8
    # the artifact ranks like the official recipe (PyTorch, fp32 here) within what 4 bits cost
    r = Reranker.load(out, "int4")
    got = r.predict([(QUERIES[0], d) for d in DOCS], raw=True)
    want = official_qwen3_logits(ckpt, [(QUERIES[0], d) for d in DOCS])
    assert np.corrcoef(got, want)[0, 1] > 0.9
    assert 1e-4 < np.abs(got - want).max() < 0.5 * np.abs(want).max()


def test_streamed_int4_missing_its_budget_fails_with_what_to_do(streamed, tmp_path):
    from memrerank.errors import ParityError
    from memrerank.export import export_model

    ckpt, _ = streamed
    with pytest.raises(ParityError, match=r"--precision fp32,int4"):
        export_model(str(ckpt), tmp_path / "out", precisions=["int4"], fidelity="top10=1.0,spearman=1.0")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("precisions, kw, match", [
    (["fp16"], {}, "fp32 is the reference"), (["int4"], {"graph": "traced"}, "streams the fused graph"),
    (["int4", "int8"], {}, "one at a time"), (["int8"], {"rotate": False}, "rotated recipe"),
    (["int4"], {"int4_block": 24}, "power of two from 16 to 256"), (["fp32", "int8"], {"int4_block": 64}, "add int4")])
def test_what_cannot_stream_is_refused_before_loading(tmp_path, precisions, kw, match):
    from memrerank.export import export_model

    with pytest.raises(ValueError, match=match):
        export_model(str(tmp_path / "nothing"), tmp_path / "out", precisions=precisions, **kw)


def test_int8_written_while_streaming_is_build_int8_of_the_rotated_fp32_graph(tmp_path):
    """The streamed int8 is the int8 precision's own plan for a rotated decoder (block Hadamard before the down
    projection, last tokens two-pass, last-layer products two-pass whole), without the search: the same scores,
    bit for bit, with padded rows (the last-token indices) in the batch."""
    from memrerank.export import export_model
    from memrerank.export.fidelity import CalibSet
    from memrerank.export.pairs import builtin_calibration_groups
    from memrerank.export.quantize import Int8Coder, build_int8

    path = make_qwen3(tmp_path / "ckpt", hidden=128)
    art = export_model(str(path), tmp_path / "art", precisions=["fp32"])
    fp32 = art / "fp32" / "model.onnx"
    built = tmp_path / "built" / "model.onnx"
    plan = build_int8(fp32, built, graph_info(fp32), CalibSet(art, builtin_calibration_groups()[:2]))
    family, config = _family(path)
    coder = Int8Coder()
    streamed = tmp_path / "streamed" / "model.onnx"
    write_fused_graph(_source(family, config, path), streamed, rotation=Rotation(), coder=coder)
    record = coder.build().extra
    assert (record["int8_products"], record["two_pass_last_token_products"]) == (8, 3)
    assert record["online_hadamard"]["activations"] == plan.extra["online_hadamard"]["activations"] == 2
    ids = np.random.default_rng(0).integers(0, 151_000, (3, 19)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 12:], mask[2, 4:] = 0, 0
    want = _run(built, ids, mask)
    np.testing.assert_array_equal(_run(streamed, ids, mask), want)
    assert np.abs(want - _run(fp32, ids, mask)).max() > 1e-4


def test_int8_alone_streams(tmp_path):
    from memrerank import Reranker
    from memrerank.export import export_model
    from memrerank.manifest import read_manifest

    path = make_qwen3(tmp_path / "ckpt", hidden=128)
    out = export_model(str(path), tmp_path / "art", precisions=["int8"])  # the default budget holds at int8
    manifest = read_manifest(out)
    assert list(manifest.precisions) == ["int8"] and not (out / "fp32").exists()
    entry = manifest.precision("int8")
    assert entry.build.extra["streamed"] and entry.fidelity.meets_budget
    assert entry.parity.reference == "pytorch (transformers, float32)" and entry.parity.max_abs_logit_diff < 0.2
    assert Reranker.load(out, "auto").precision == "int8"


def test_calibrating_a_streamed_artifact_needs_labels(streamed, tmp_path):
    import shutil

    from memrerank.calibrate import calibrate_artifact
    from memrerank.manifest import read_manifest
    from texts import DOCS, QUERIES

    from memrerank import Reranker

    art = shutil.copytree(streamed[1], tmp_path / "art")
    pairs = [(q, d) for q in QUERIES for d in DOCS]
    # labels the scores predict: calibrate refuses labels a model's scores carry no information about
    logits = Reranker.load(art, "int4").predict(pairs, raw=True)
    rows = [{"query": q, "document": d, "label": int(z > np.median(logits))} for (q, d), z in zip(pairs, logits)]
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text("\n".join(json.dumps(r) for r in rows))
    unlabelled = tmp_path / "unlabelled.jsonl"
    unlabelled.write_text("\n".join(json.dumps({k: r[k] for k in ("query", "document")}) for r in rows))
    with pytest.raises(ValueError, match="no teacher for unlabelled pairs"):
        calibrate_artifact(art, unlabelled)
    report = calibrate_artifact(art, labelled)
    assert list(report["precisions"]) == ["int4"] and "agreement_vs_fp32" not in report["precisions"]["int4"]
    assert read_manifest(art).calibration["int4"].method == report["precisions"]["int4"]["method"]
