"""The embedded default behind ``memrerank demo``: its generated data, its shipped head, and that it ranks.

The end-to-end test runs the offline demo once (the packaged all-MiniLM-L6-v2 body with the trained head,
exported to fp32 and int8 on the built-in pairs) and checks every demo question's answer ranks first at both
precisions, on the artifact the demo wrote.
"""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest

from memrerank import Reranker, demo, demo_data
from memrerank.cli import main

# The classifier is 385 floats (1.5 KB); the shipped head adds a rank-8 update of the pooler (2 x 384 x 8 floats) and
# its bias, about 27 KB, for about 5 points of held-out top-1 (bench/train_demo_head.py records both heads).
HEAD_MAX_BYTES = 48 * 1024
#: One in eight candidates is the answer: a head that ranks at random gets 12.5 % top-1 and 50 % pairwise.
HELDOUT_FLOOR = {"top1": 0.35, "pairwise": 0.75}


def test_heldout_file_is_what_the_generator_writes():
    bundled = demo_data.load_heldout()
    assert bundled == demo_data.generate("heldout", demo_data.HELDOUT_QUERIES, demo_data.HELDOUT_SEED)
    assert len(bundled) == demo_data.HELDOUT_QUERIES
    for ex in bundled:
        assert len(ex.documents) == demo_data.CANDIDATES and len(set(ex.documents)) == len(ex.documents)
        assert 0 <= ex.answer < len(ex.documents)


def test_generation_is_deterministic_and_splits_share_nothing():
    assert demo_data.generate("train", 50, 3) == demo_data.generate("train", 50, 3)
    assert demo_data.generate("train", 50, 3) != demo_data.generate("train", 50, 4)
    for pool in (demo_data.NAMES, demo_data.RELATIONS, demo_data.CITIES, demo_data.MONTHS, demo_data.WEEKDAYS):
        assert not set(pool["train"]) & set(pool["heldout"])
    for topic in demo_data.TOPICS:
        assert not set(topic.memories["train"]) & set(topic.memories["heldout"]), topic.name
        assert not set(topic.questions["train"]) & set(topic.questions["heldout"]), topic.name
        if topic.qualifiers:
            assert not set(topic.qualifiers["train"]) & set(topic.qualifiers["heldout"]), topic.name
    train_names = set(demo_data.NAMES["train"])
    for ex in demo_data.load_heldout():
        words = set(re.findall(r"[A-Z][a-z]+", " ".join((ex.query,) + ex.documents)))
        assert not words & train_names, (ex.query, words & train_names)
    with pytest.raises(ValueError, match="split"):
        demo_data.generate("test", 1, 0)


def test_the_shipped_head_is_small_and_safe_to_load():
    assert demo.HEAD_FILE.stat().st_size < HEAD_MAX_BYTES
    arrays, meta = demo.load_head()  # np.load(..., allow_pickle=False): plain arrays only
    assert arrays["classifier.weight"].shape == (1, 384) and arrays["classifier.bias"].shape == (1,)
    assert set(arrays) == set(meta["arrays"])
    assert all(a.dtype == np.float32 for a in arrays.values())
    held = meta["accuracy"][meta["head"]]["heldout"]
    assert held["queries"] == demo_data.HELDOUT_QUERIES
    assert held["top1"] >= HELDOUT_FLOOR["top1"] and held["pairwise"] >= HELDOUT_FLOOR["pairwise"]


def test_the_head_loader_refuses_pickled_arrays(tmp_path):
    """An object array in a head file would need unpickling: load_head refuses it instead of running it."""
    bad = tmp_path / "head.npz"
    np.savez(bad, meta=np.array(json.dumps({"head": "x"})), **{"classifier.bias": np.array([object()], dtype=object)})
    with pytest.raises(ValueError, match="allow_pickle"):
        demo.load_head(bad)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path_factory.mktemp("demo")
    import contextlib
    import io

    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            assert demo.run_demo(None, out) == 0
    finally:
        mp.undo()
    return out, buf.getvalue()


def test_demo_prints_each_answer_first_and_the_next_commands(demo_run):
    out, text = demo_run
    assert "NOT meaningful" not in text and "untrained" not in text
    assert "held-out top-1" in text
    assert text.count("the memory that answers it ranks first") == len(demo.DEMO_QUESTIONS)
    for q, a in zip(demo.DEMO_QUESTIONS, demo.DEMO_ANSWERS, strict=True):
        block = text.split(f"Q: {q}")[1]
        first = block.strip().splitlines()[1]
        assert demo.DEMO_MEMORIES[a] in first, (q, first)
    art = out / "artifact"
    for command in (f"memrerank rank {art} --query", f"memrerank serve {art}", f"memrerank bench {art}"):
        assert command in text
    assert (out / "memories.txt").read_text().splitlines() == demo.DEMO_MEMORIES
    assert "latency fp32" in text and "latency int8" in text and "precision 'auto' -> int8" in text


@pytest.mark.parametrize("precision", demo.DEMO_PRECISIONS)
def test_every_demo_answer_ranks_first(demo_run, precision):
    out, _ = demo_run
    reranker = Reranker.load(out / "artifact", precision=precision)
    for q, a in zip(demo.DEMO_QUESTIONS, demo.DEMO_ANSWERS, strict=True):
        hits = reranker.rank(q, demo.DEMO_MEMORIES)
        assert hits[0].index == a, (precision, q, [(h.index, round(h.score, 3)) for h in hits[:3]])


def test_the_embedded_artifact_meets_the_fidelity_budget_and_records_timing(demo_run):
    out, _ = demo_run
    manifest = json.loads((out / "artifact" / "manifest.json").read_text())
    assert manifest["tokens"]["max_length"] == demo.EMBEDDED_MAX_LENGTH
    fid = manifest["precisions"]["int8"]["fidelity"]
    assert fid["meets_budget"] and fid["timing"]["total"] > 0 and fid["timing"]["builds"] >= 1


@pytest.mark.parametrize("precision", demo.DEMO_PRECISIONS)
def test_heldout_accuracy_of_the_exported_artifact(demo_run, precision):
    """The README's held-out figures, re-measured on the exported graphs (a third of the set, for time): well
    above chance at both precisions, and at fp32 close to what training recorded for the head on PyTorch."""
    out, _ = demo_run
    reranker = Reranker.load(out / "artifact", precision=precision)
    examples = demo_data.load_heldout()[::3]
    top1 = sum(reranker.rank(e.query, list(e.documents))[0].index == e.answer for e in examples) / len(examples)
    assert top1 >= HELDOUT_FLOOR["top1"]
    if precision == "fp32":
        _, meta = demo.load_head()
        assert top1 == pytest.approx(meta["accuracy"][meta["head"]]["heldout"]["top1"], abs=0.06)


def test_a_second_run_reuses_the_artifact_while_its_stamp_matches(demo_run, monkeypatch, capsys):
    out, _ = demo_run
    manifest = (out / "artifact" / "manifest.json").read_text()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert demo.run_demo(None, out) == 0
    text = capsys.readouterr().out
    assert "reusing the demo artifact" in text and "exported" not in text
    assert text.count("the memory that answers it ranks first") == len(demo.DEMO_QUESTIONS)
    assert (out / "artifact" / "manifest.json").read_text() == manifest  # not rebuilt
    stamp = json.loads((out / "demo.json").read_text())
    assert stamp == demo._stamp(None)
    # another memrerank version or another head: the cached artifact is not this version's
    for changed in ({**stamp, "memrerank": "0.0.0"}, {**stamp, "head_sha256": "0" * 64}):
        assert not demo._cached(out / "demo.json", out / "artifact", changed)
    assert demo._cached(out / "demo.json", out / "artifact", stamp)


def test_demo_json_prints_its_results_and_quiet_silences_progress(demo_run, monkeypatch, capsys):
    """demo --json: one JSON object with what the text shows (the cached artifact reused); -q: no messages."""
    out, _ = demo_run
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["demo", "-o", str(out), "--json", "-q", "--threads", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    results = json.loads(captured.out)
    assert results["artifact"] == str(out / "artifact") and results["reused"] and results["model"] == "embedded"
    assert results["precision"] == "int8" and set(results["latency"]) == set(demo.DEMO_PRECISIONS)
    assert [q["query"] for q in results["questions"]] == demo.DEMO_QUESTIONS
    assert all(q["answer_first"] and q["hits"][0]["index"] == q["answer"] for q in results["questions"])
    assert results["next"][1] == f"memrerank serve {out / 'artifact'}"
    assert demo.demo_text(results).count("the memory that answers it ranks first") == len(demo.DEMO_QUESTIONS)
    assert main(["demo", "-o", str(out), "-q"]) == 0  # text without the progress messages
    text = capsys.readouterr().out
    assert "reusing the demo artifact" not in text and "precision 'auto' -> int8" in text


def test_examples_are_frozen_dataclasses():
    ex = demo_data.load_heldout()[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        ex.answer = 0  # type: ignore[misc]
