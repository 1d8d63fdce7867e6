"""Runtime behaviour: rank/threshold/top_k, input checks, artifact integrity, providers, no torch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from memrerank import RankHit, Reranker
from memrerank.calibration import Calibrator, sigmoid
from memrerank.errors import ArtifactError, ProviderError

DOCS = ["Marco is my climbing partner.", "I like tea.", "Marco Polo travelled to China.", ""]


def test_rank_sorts_and_keeps_indices(qwen_artifact):
    r = Reranker.load(qwen_artifact)
    docs = list(DOCS)
    hits = r.rank("Who is Marco?", docs)
    assert docs == DOCS, "input must not be mutated"
    assert sorted(h.index for h in hits) == list(range(len(DOCS)))
    assert all(isinstance(h, RankHit) for h in hits)
    assert [h.logit for h in hits] == sorted((h.logit for h in hits), reverse=True)
    logits = r.predict([("Who is Marco?", d) for d in DOCS], raw=True)
    for h in hits:
        assert h.text == DOCS[h.index]
        assert h.logit == pytest.approx(float(logits[h.index]), abs=1e-5)
        assert h.score == pytest.approx(float(sigmoid(logits[h.index])), abs=1e-6)


def test_top_k_and_threshold(qwen_artifact):
    r = Reranker.load(qwen_artifact)
    hits = r.rank("Who is Marco?", DOCS)
    assert [h.index for h in r.rank("Who is Marco?", DOCS, top_k=2)] == [h.index for h in hits[:2]]
    t = (hits[1].score + hits[2].score) / 2
    assert [h.index for h in r.rank("Who is Marco?", DOCS, threshold=t)] == [h.index for h in hits[:2]]
    assert r.rank("Who is Marco?", DOCS, threshold=1.0) == [h for h in hits if h.score >= 1.0]


@pytest.mark.parametrize("kwargs,exc,word", [
    ({"top_k": 0}, ValueError, "top_k"),
    ({"top_k": -1}, ValueError, "top_k"),
    ({"threshold": 1.5}, ValueError, "threshold"),
    ({"threshold": float("nan")}, ValueError, "threshold"),
    ({"instruction": 3}, TypeError, "instruction"),
])
def test_rank_argument_errors(qwen_artifact, kwargs, exc, word):
    with pytest.raises(exc, match=word):
        Reranker.load(qwen_artifact).rank("q", DOCS, **kwargs)


def test_rank_of_no_documents_is_empty(qwen_artifact):
    """As predict([]) returns an empty array; argument checks still run first."""
    r = Reranker.load(qwen_artifact)
    assert r.rank("q", []) == [] and r.rank("q", (), top_k=3, threshold=0.5) == []
    with pytest.raises(ValueError, match="top_k"):
        r.rank("q", [], top_k=0)
    with pytest.raises(TypeError, match="query"):
        r.rank(None, [])


@pytest.mark.parametrize("docs,exc,word", [
    (["ok", None], TypeError, r"documents\[1\]"),
    (["ok", b"bytes"], TypeError, r"documents\[1\]"),
    ("a string", TypeError, "documents"),
])
def test_rank_document_errors(qwen_artifact, docs, exc, word):
    with pytest.raises(exc, match=word):
        Reranker.load(qwen_artifact).rank("q", docs)


def test_predict_groups_by_query_and_keeps_order(qwen_artifact):
    r = Reranker.load(qwen_artifact, batch_size=3)
    pairs = [("q1", "a"), ("q2", "b"), ("q1", "c"), ("q2", "a")]
    got = r.predict(pairs, raw=True)
    single = np.array([r.predict([p], raw=True)[0] for p in pairs])
    np.testing.assert_allclose(got, single, atol=1e-5)
    assert r.predict([], raw=True).shape == (0,)
    with pytest.raises(TypeError, match=r"pairs\[0\]"):
        r.predict([("only-one",)])


def test_long_query_is_a_value_error(qwen_short_artifact):
    with pytest.raises(ValueError, match="query"):
        Reranker.load(qwen_short_artifact).rank("why " * 300, ["doc"])


def test_unknown_precision_and_provider(qwen_artifact):
    with pytest.raises(ValueError, match="precision"):
        Reranker.load(qwen_artifact, precision="fp8")
    with pytest.raises(ProviderError, match="available: .*CPUExecutionProvider"):
        Reranker.load(qwen_artifact, providers=["tensorrt"])


def _copy(src, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def test_bit_flip_is_detected_before_onnxruntime(bert_artifact, tmp_path):
    art = _copy(bert_artifact, tmp_path)
    path = art / "fp32" / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256.*--force"):
        Reranker.load(art)


def test_truncated_file_and_missing_file_are_detected(bert_artifact, tmp_path):
    art = _copy(bert_artifact, tmp_path)
    path = art / "fp32" / "model.onnx"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match="bytes"):
        Reranker.load(art)
    path.unlink()
    with pytest.raises(ArtifactError, match="missing"):
        Reranker.load(art)


def test_schema_version_and_tokenizer_swap_are_refused(bert_artifact, qwen_artifact, tmp_path):
    art = _copy(bert_artifact, tmp_path)
    m = json.loads((art / "manifest.json").read_text())
    m["schema_version"] = 99
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="schema_version 99"):
        Reranker.load(art)
    m["schema_version"] = 1
    # a different tokenizer with matching hashes in the manifest must still be refused by the id checks
    shutil.copy(qwen_artifact / "tokenizer.json", art / "tokenizer.json")
    from memrerank.manifest import sha256_file

    m["tokenizer"]["files"]["tokenizer.json"] = {"sha256": sha256_file(art / "tokenizer.json"),
                                                 "bytes": (art / "tokenizer.json").stat().st_size}
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="does not belong to this artifact"):
        Reranker.load(art)
    with pytest.raises(ArtifactError, match="memrerank export"):
        Reranker.load(tmp_path / "nothing-here")


def test_calibration_block_is_applied(bert_artifact, tmp_path):
    art = _copy(bert_artifact, tmp_path)
    m = json.loads((art / "manifest.json").read_text())
    m["calibration"] = {"fp32": {"method": "temperature", "params": {"temperature": 2.0}}}
    (art / "manifest.json").write_text(json.dumps(m))
    base, calibrated = Reranker.load(bert_artifact), Reranker.load(art)
    pairs = [("q", d) for d in DOCS]
    logits = base.predict(pairs, raw=True)
    np.testing.assert_allclose(calibrated.predict(pairs, raw=True), logits, atol=1e-6)
    np.testing.assert_allclose(calibrated.predict(pairs), 1 / (1 + np.exp(-logits / 2.0)), atol=1e-6)


def test_calibrator_math():
    assert Calibrator()(np.array([0.0]))[0] == pytest.approx(0.5)
    assert Calibrator.from_block({"method": "platt", "params": {"a": 2.0, "b": -1.0}})(np.array([1.0]))[0] == \
        pytest.approx(1 / (1 + np.exp(-1.0)))
    assert np.isfinite(sigmoid(np.array([-1e4, 1e4]))).all()
    with pytest.raises(ValueError, match="slope"):
        Calibrator.from_block({"method": "platt", "params": {"a": -1.0, "b": 0.0}})


def test_runtime_imports_without_torch(qwen_artifact):
    code = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in ('torch', 'transformers', 'optimum'):
                    raise ImportError('blocked: ' + name)
        sys.meta_path.insert(0, Block())
        import memrerank
        from memrerank import Reranker
        r = Reranker.load({str(qwen_artifact)!r})
        hits = r.rank('Who is Marco?', ['Marco is my climbing partner.', 'tea'])
        assert len(hits) == 2
        assert not any(m.split('.')[0] in ('torch', 'transformers', 'optimum') for m in sys.modules)
        print('ok')
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_predict_has_one_return_type_and_truncation_has_its_own_method(qwen_short_artifact):
    r = Reranker.load(qwen_short_artifact)
    pairs = [("q", "short"), ("q", "long " * 400)]
    scores = r.predict(pairs)
    assert isinstance(scores, np.ndarray) and scores.shape == (2,)
    again, truncated = r.predict_with_truncation(pairs)
    np.testing.assert_array_equal(again, scores)
    assert truncated.tolist() == [False, True]
    empty, flags = r.predict_with_truncation([])
    assert empty.shape == flags.shape == (0,)
    with pytest.raises(TypeError):
        r.predict(pairs, return_truncated=True)


def test_context_is_keyword_only(qwen_artifact):
    r = Reranker.load(qwen_artifact)
    with pytest.raises(TypeError):
        r.rank("q", ["d"], None, None, None, ["earlier turn"])
    with pytest.raises(TypeError):
        r.predict([("q", "d")], False, None, ["earlier turn"])
    assert len(r.rank("q", ["d"], context=["earlier turn"])) == 1


def test_batch_budget_follows_the_provider(qwen_artifact):
    """CPU keeps its memory-bounding budget; a GPU budget makes a typical request (64 candidates) one call."""
    from memrerank.kernels import pack_pairs
    from memrerank.runtime.backends.base import CPU_BUDGET, GPU_BUDGET

    r = Reranker.load(qwen_artifact)
    assert r.backend.budget == CPU_BUDGET
    cpu = CPU_BUDGET
    assert (r.batch_size, r.max_batch_tokens, r.call_overhead) == (cpu.batch_size, cpu.max_batch_tokens,
                                                                  cpu.call_overhead)
    assert Reranker.load(qwen_artifact, batch_size=3, max_batch_tokens=99).max_batch_tokens == 99
    gpu = GPU_BUDGET
    head, docs, tail = np.arange(60), [list(range(5, 5 + 40 + i % 30)) for i in range(64)], np.arange(12)
    packed = pack_pairs([head], np.zeros(64, np.int64), docs, tail, [400], pad_id=0, left=True,
                        max_rows=gpu.batch_size, max_tokens=gpu.max_batch_tokens, call_overhead=gpu.call_overhead)
    assert len(list(packed)) == 1
    cpu_calls = pack_pairs([head], np.zeros(64, np.int64), docs, tail, [400], pad_id=0, left=True,
                           max_rows=cpu.batch_size, max_tokens=cpu.max_batch_tokens, call_overhead=cpu.call_overhead)
    assert len(list(cpu_calls)) > 1


def test_a_provider_onnxruntime_dropped_is_an_error_not_a_cpu_run(qwen_artifact, monkeypatch):
    """onnxruntime keeps going on CPU when CUDA's libraries fail to load; the backend checks the session itself."""
    import onnxruntime as ort

    from memrerank.errors import ProviderError

    real = ort.InferenceSession
    seen = {}

    def session(path, sess_options=None, providers=None, provider_options=None):
        seen["options"] = dict(zip(providers, provider_options))
        return real(path, sess_options=sess_options, providers=["CPUExecutionProvider"])  # CUDA dropped

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", session)
    with pytest.raises(ProviderError, match="could not start CUDAExecutionProvider .*runs on CPUExecutionProvider"):
        Reranker.load(qwen_artifact, providers=["cuda", "cpu"])
    # fp32 parity on a GPU: TF32 is off unless asked for
    assert seen["options"]["CUDAExecutionProvider"] == {"use_tf32": "0"}
    with pytest.raises(ProviderError):
        Reranker.load(qwen_artifact, providers="cuda", allow_tf32=True)
    assert seen["options"]["CUDAExecutionProvider"] == {"use_tf32": "1"}


@pytest.mark.parametrize("field, value", [("threads", -1), ("threads", "2"), ("threads", 2.7), ("threads", True),
                                          ("batch_size", 0), ("max_batch_tokens", "512"),
                                          ("allow_tf32", "false"), ("prefix_reuse", "no"), ("io_binding", 1),
                                          ("precision", "int3"), ("providers", [])])
def test_load_options_are_checked_once_naming_the_field(qwen_artifact, field, value):
    """What was accepted before (threads=-1, "2", 2.7; allow_tf32="false", a truthy string) is refused, by
    LoadOptions and by Reranker.load's keywords alike, before any file is opened."""
    from memrerank import LoadOptions

    with pytest.raises(ValueError, match=f"LoadOptions.{field}"):
        LoadOptions(**{field: value})
    with pytest.raises(ValueError, match=f"LoadOptions.{field}"):
        Reranker.load(qwen_artifact, **{field: value})


def test_load_options_and_keywords_are_one_channel(qwen_artifact):
    """``Reranker.load(path, options, **fields)``: a keyword that is not None overrides the options; a string is
    a precision; anything else is a TypeError naming LoadOptions."""
    from memrerank import LoadOptions

    options = LoadOptions("fp32", threads=1, batch_size=3, prefix_reuse=False)
    r = Reranker.load(qwen_artifact, options, max_batch_tokens=99)
    assert (r.batch_size, r.max_batch_tokens, r.prefix_reuse) == (3, 99, False)
    assert Reranker.load(qwen_artifact, options, prefix_reuse=True).prefix_reuse is True
    assert Reranker.load(qwen_artifact, "fp32").precision == "fp32"
    assert options.replace(threads=2).threads == 2 and options.threads == 1
    with pytest.raises(TypeError, match="LoadOptions"):
        Reranker.load(qwen_artifact, {"threads": 1})
    with pytest.raises(TypeError, match="unknown load option"):
        LoadOptions.merge(options, thread=1)


def test_the_scorer_seam_scores_any_graph_of_the_artifact(qwen_artifact, bert_artifact):
    """Scorer.open over a graph named by path gives Reranker.predict's logits (same packer, budget and prefix
    path); with_graph keeps the tokenizer and template; a graph without a past cannot take prefix_reuse."""
    from memrerank import LoadOptions
    from memrerank.runtime import Scorer

    pairs = [("Who is Marco?", d) for d in DOCS]
    for art in (qwen_artifact, bert_artifact):
        r = Reranker.load(art, "fp32", prefix_reuse=False)
        want = r.predict(pairs, raw=True)
        other = Reranker.load(art, "fp32").with_graph(art / "fp32" / "model.onnx", LoadOptions(prefix_reuse=False))
        np.testing.assert_array_equal(other.predict(pairs, raw=True), want)
        scorer = Scorer.open(art, r.manifest, LoadOptions("fp32", batch_size=2))
        assert scorer.prefix_reuse == (art == qwen_artifact) and scorer.batch_size == 2
        splits = [(np.arange(len(DOCS)), r.encoder.split("Who is Marco?", DOCS))]
        logits, truncated = scorer.score(splits, len(DOCS))
        np.testing.assert_allclose(logits, want, atol=1e-5, rtol=0)
        assert truncated.dtype == bool and truncated.shape == (len(DOCS),)
    with pytest.raises(ArtifactError, match="prefix_reuse"):
        Scorer.open(bert_artifact, Reranker.load(bert_artifact).manifest, LoadOptions(prefix_reuse=True))
