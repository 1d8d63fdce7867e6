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


@pytest.mark.parametrize("docs,exc,word", [
    ([], ValueError, "documents"),
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
