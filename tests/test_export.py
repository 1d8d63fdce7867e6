"""Export: manifest contract, validation, refusal to overwrite, typed errors, atomicity, external data."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import onnx
import pytest

import models
from memrerank import Reranker
from memrerank.errors import ParityError, UnsafeCheckpointError, UnsupportedModelError
from memrerank.export import export_model
from memrerank.manifest import PARITY_TOLERANCE, SCHEMA_VERSION, sha256_file


def test_manifest_records_the_contract(qwen_artifact):
    m = json.loads((qwen_artifact / "manifest.json").read_text())
    assert m["schema_version"] == SCHEMA_VERSION
    assert m["family"] == "decoder-yes-no"
    assert m["source"]["architecture"] == "Qwen3ForCausalLM"
    assert m["tokens"]["yes_id"] == 9693 and m["tokens"]["no_id"] == 2152
    assert m["tokens"]["padding_side"] == "right"  # batch-independent scores (tests/test_batch_independence.py)
    assert m["template"]["default_instruction"].startswith("Given a web search query")
    assert m["calibration"] == {}
    fp32 = m["precisions"]["fp32"]
    for rel, meta in fp32["files"].items():
        assert sha256_file(qwen_artifact / rel) == meta["sha256"]
    assert set(m["tokenizer"]["files"]) >= {"tokenizer.json", "tokenizer_config.json"}
    parity = fp32["parity"]
    assert parity["max_abs_logit_diff"] <= PARITY_TOLERANCE["fp32"]
    # both decoder paths are checked against PyTorch: the shared prefix reused and whole pairs (empty past)
    # batch 8 on both padding sides; a batch of one has no padding and runs on the family's side only
    assert set(parity["max_abs_logit_diff_by_run"]) == {f"{path}/{side}" for path in ("reuse", "whole")
                                                        for side in ("left/batch8", "right/batch8", "right/batch1")}
    assert max(parity["max_abs_logit_diff_by_run"].values()) == parity["max_abs_logit_diff"]
    assert parity["spearman_mean"] > 0.999 and parity["top3_agreement"] == 1.0


def test_decoder_graph_has_one_folded_logit_and_no_vocab_projection(qwen_artifact):
    model = onnx.load(str(qwen_artifact / "fp32" / "model.onnx"), load_external_data=False)
    outputs = model.graph.output
    # one logit per row, plus the per-layer keys/values of row 0 that the prefix pass returns
    assert [o.name for o in outputs] == ["logits", "present_key.0", "present_key.1", "present_value.0",
                                         "present_value.1"]
    dims = outputs[0].type.tensor_type.shape.dim
    assert len(dims) == 2 and dims[1].dim_value == 1
    # The only tensor with a vocabulary-sized dimension is the embedding table (no lm_head MatMul).
    vocab_inits = [i for i in model.graph.initializer if 151669 in i.dims]
    assert len(vocab_inits) == 1
    vocab_matmuls = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and vocab_inits[0].name in n.input]
    assert vocab_matmuls == []


def test_existing_output_is_refused_without_force(qwen_ckpt, qwen_artifact):
    before = (qwen_artifact / "manifest.json").read_bytes()
    with pytest.raises(FileExistsError, match="--force"):
        export_model(str(qwen_ckpt), qwen_artifact, log=lambda m: None)
    assert (qwen_artifact / "manifest.json").read_bytes() == before


def test_unsupported_checkpoint_lists_supported(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=100)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UnsupportedModelError) as err:
        export_model(str(tmp_path / "gpt2"), tmp_path / "out", log=lambda m: None)
    msg = str(err.value)
    assert "GPT2LMHeadModel" in msg and "Qwen3ForCausalLM" in msg and "BertForSequenceClassification" in msg
    assert not (tmp_path / "out").exists()


def test_multi_label_classifier_is_refused(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, num_labels=3, architectures=["BertForSequenceClassification"])
    BertForSequenceClassification(cfg).save_pretrained(tmp_path / "bert3")
    with pytest.raises(ValueError, match="one output label"):
        export_model(str(tmp_path / "bert3"), tmp_path / "out", log=lambda m: None)


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        export_model(str(tmp_path / "nope"), tmp_path / "out", log=lambda m: None)


def test_parity_failure_is_typed_and_leaves_nothing(tmp_path, bert_ckpt, monkeypatch):
    from memrerank.export.families.encoder_cross import EncoderCrossFamily

    original = EncoderCrossFamily.reference
    monkeypatch.setattr(EncoderCrossFamily, "reference",
                        lambda self, q, d, i: original(self, q, d, i) + 1e-3)  # a reference the graph cannot match
    out = tmp_path / "out"
    with pytest.raises(ParityError, match=r"right/batch1: max \|Δlogit\| = 1\.0\d*e-03"):
        export_model(str(bert_ckpt), out, log=lambda m: None)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [], "the partial directory must be removed"


def test_broken_whole_pair_path_fails_the_export(tmp_path, qwen_ckpt, monkeypatch):
    """The whole-pair path (empty past: prefix_reuse=False, TensorRT, single documents) is checked on its own:
    a graph right with a reused prefix but wrong on whole pairs is refused, naming the runs that missed."""
    from memrerank.runtime.backends.onnxruntime import OrtBackend

    score = OrtBackend.score

    def whole_pairs_off_by_one(self, input_ids, attention_mask, token_type_ids=None, past=None):
        return score(self, input_ids, attention_mask, token_type_ids, past) + (1.0 if past is None else 0.0)

    monkeypatch.setattr(OrtBackend, "score", whole_pairs_off_by_one)
    out = tmp_path / "out"
    with pytest.raises(ParityError) as err:
        export_model(str(qwen_ckpt), out, max_length=128, log=lambda m: None)
    msg = str(err.value)
    for run in ("left/batch8", "right/batch8", "right/batch1"):  # a batch of one runs on the family's side
        assert re.search(rf"whole/{run}: max \|Δlogit\| = 1\.0\d*e\+00", msg), msg
        reuse = float(re.search(rf"reuse/{run}: max \|Δlogit\| = (\S+)", msg).group(1))
        assert reuse <= PARITY_TOLERANCE["fp32"]
    assert list(tmp_path.iterdir()) == [], "nothing written, no sibling left"


def _pickle_only_checkpoint(src, dst, cls_name):
    """``src`` re-saved with ``safe_serialization=False``: ``pytorch_model.bin`` and no safetensors."""
    import shutil

    import transformers

    model = getattr(transformers, cls_name).from_pretrained(src)
    model.save_pretrained(dst, safe_serialization=False)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(f, dst / f.name)
    assert (dst / "pytorch_model.bin").exists() and not list(dst.glob("*.safetensors"))
    return dst


@pytest.mark.parametrize("ckpt_fixture,cls_name", [("bert_ckpt", "BertForSequenceClassification"),
                                                   ("qwen_ckpt", "Qwen3ForCausalLM")])
def test_pickle_only_checkpoint_is_refused(request, tmp_path, ckpt_fixture, cls_name, monkeypatch):
    """A checkpoint whose weights are only pytorch_model.bin is refused before anything unpickles it; the error
    names the file and how to convert it."""
    import torch

    ckpt = _pickle_only_checkpoint(request.getfixturevalue(ckpt_fixture), tmp_path / "bin-only", cls_name)

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(UnsafeCheckpointError) as err:
        export_model(str(ckpt), tmp_path / "out", log=lambda m: None)
    msg = str(err.value)
    assert str(ckpt.resolve() / "pytorch_model.bin") in msg
    assert "safe_serialization=True" in msg and "--allow-pickle" in msg
    assert not (tmp_path / "out").exists()


def test_allow_pickle_and_the_printed_conversion_both_work(tmp_path, bert_ckpt, bert_artifact):
    """--allow-pickle loads the pickle (recorded in the manifest); the conversion the error prints gives a
    checkpoint that exports without it. Both score as the safetensors original."""
    ckpt = _pickle_only_checkpoint(bert_ckpt, tmp_path / "bin-only", "BertForSequenceClassification")
    pair = [("Who painted the lake?", "Ana painted the lake at dawn.")]
    want = Reranker.load(bert_artifact).predict(pair, raw=True)
    out = export_model(str(ckpt), tmp_path / "pickled", max_length=64, allow_pickle=True, log=lambda m: None)
    assert json.loads((out / "manifest.json").read_text())["export"]["allow_pickle"] is True
    np.testing.assert_allclose(Reranker.load(out).predict(pair, raw=True), want, atol=1e-6, rtol=0)

    with pytest.raises(UnsafeCheckpointError) as err:
        export_model(str(ckpt), tmp_path / "refused", log=lambda m: None)
    snippet = "\n".join(line.strip() for line in str(err.value).splitlines() if line.startswith("    "))
    exec(snippet, {})  # noqa: S102 - runs the conversion the message prints, on this test's own checkpoint
    assert (ckpt / "model.safetensors").exists()
    out = export_model(str(ckpt), tmp_path / "converted", max_length=64, log=lambda m: None)
    assert json.loads((out / "manifest.json").read_text())["export"]["allow_pickle"] is False
    np.testing.assert_allclose(Reranker.load(out).predict(pair, raw=True), want, atol=1e-6, rtol=0)


def test_force_replaces_atomically(tmp_path, bert_ckpt):
    out = tmp_path / "art"
    export_model(str(bert_ckpt), out, max_length=64, log=lambda m: None)
    first = json.loads((out / "manifest.json").read_text())["export"]["date"]
    export_model(str(bert_ckpt), out, max_length=48, force=True, log=lambda m: None)
    m = json.loads((out / "manifest.json").read_text())
    assert m["tokens"]["max_length"] == 48 and m["export"]["date"] >= first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_external_data_is_hashed_and_loads(tmp_path, bert_ckpt, monkeypatch):
    """Graphs over 2 GB store weights beside the graph; forced here on a tiny model to exercise the path."""
    monkeypatch.setenv("FORCE_ONNX_EXTERNAL_DATA", "1")
    out = export_model(str(bert_ckpt), tmp_path / "ext", max_length=64, log=lambda m: None)
    files = json.loads((out / "manifest.json").read_text())["precisions"]["fp32"]["files"]
    assert len(files) == 2 and any(f.endswith("_data") for f in files)
    mask = os.umask(0)
    os.umask(mask)
    for f in files:  # readable as a plain open() would create it: onnx writes external data 0600
        assert (out / f).stat().st_mode & 0o777 == 0o666 & ~mask, f
    r = Reranker.load(out)
    assert np.isfinite(r.predict([("q", "d")], raw=True)).all()


def test_instruction_is_refused_for_encoders(tmp_path, bert_ckpt):
    with pytest.raises(ValueError, match="decoder rerankers only"):
        export_model(str(bert_ckpt), tmp_path / "o", instruction="x", log=lambda m: None)


def test_custom_default_instruction_is_used(tmp_path, qwen_ckpt, qwen_artifact):
    out = export_model(str(qwen_ckpt), tmp_path / "instr", instruction="Find the memory that answers",
                       log=lambda m: None)
    custom = Reranker.load(out)
    base = Reranker.load(qwen_artifact)
    pair = [("Who is Marco?", "Marco is my climbing partner.")]
    np.testing.assert_allclose(custom.predict(pair, raw=True),
                               base.predict(pair, raw=True, instruction="Find the memory that answers"), atol=1e-5)
    assert abs(float(custom.predict(pair, raw=True)[0] - base.predict(pair, raw=True)[0])) > 1e-4


def test_models_module_uses_real_vocab():
    assert models.QWEN3_VOCAB == 151669
