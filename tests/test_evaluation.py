"""Eval metrics against hand-computed values; the LoCoMo loader's repairs; bench and eval commands."""

from __future__ import annotations

import json

import numpy as np
import pytest

from memrerank import LoadOptions
from memrerank.benchmark import load_bench_data, markdown_table, run_bench
from memrerank.cli import main
from memrerank.evaluation import (
    average_precision,
    evaluate_artifact,
    evaluate_scores,
    load_jsonl_queries,
    load_locomo,
    ndcg_at_k,
    Query,
    recall_at_k,
    reciprocal_rank,
)

SCORES = np.array([0.9, 0.8, 0.7, 0.6, 0.5])  # ranking = 0, 1, 2, 3, 4


def test_metrics_hand_computed():
    rel = {1, 3}
    # relevant at ranks 2 and 4: AP = (1/2 + 2/4) / 2 = 0.5
    assert average_precision(SCORES, rel) == pytest.approx(0.5)
    assert reciprocal_rank(SCORES, rel) == pytest.approx(0.5)
    # DCG = 1/log2(3) + 1/log2(5); IDCG = 1/log2(2) + 1/log2(3)
    dcg = 1 / np.log2(3) + 1 / np.log2(5)
    assert ndcg_at_k(SCORES, rel, 10) == pytest.approx(dcg / (1 + 1 / np.log2(3)))
    assert recall_at_k(SCORES, rel, 1) == 0.0 and recall_at_k(SCORES, rel, 2) == 0.5 and recall_at_k(SCORES, rel, 5) == 1
    assert average_precision(SCORES, set()) == 0.0 and reciprocal_rank(SCORES, {9}) == 0.0


def test_evaluate_scores_per_category():
    qs = [Query("a", ["x"] * 5, {0}, "temporal"), Query("b", ["x"] * 5, {4}, "single-hop")]
    out = evaluate_scores(qs, [SCORES, SCORES])
    assert out["temporal"]["MRR"] == 1.0 and out["single-hop"]["MRR"] == pytest.approx(0.2)
    assert out["overall"]["MRR"] == pytest.approx(0.6) and out["overall"]["queries"] == 2


@pytest.fixture()
def locomo_file(tmp_path):
    conv = {"speaker_a": "Ann", "speaker_b": "Bo",
            "session_1_date_time": "1 May 2023", "session_1": [
                {"speaker": "Ann", "dia_id": "D1:1", "text": "I adopted a cat."},
                {"speaker": "Bo", "dia_id": "D1:2", "text": "Nice!"}],
            "session_2_date_time": "2 May 2023", "session_2": [
                {"speaker": "Ann", "dia_id": "D2:1", "text": "The cat is called Miso.", "blip_caption": "a cat"}],
            "session_3_date_time": "3 May 2023", "session_3": [
                {"speaker": "Bo", "dia_id": "D3:1", "text": "I ran a marathon."}]}
    qa = [
        {"question": "What pet?", "evidence": ["D1:1"], "category": 4},
        {"question": "Cat name?", "evidence": ["D1:1; D2:1"], "category": 1},  # two ids in one string
        {"question": "Run?", "evidence": ["D:3:1"], "category": 2},              # stray colon
        {"question": "Zero-padded?", "evidence": ["D2:01"], "category": 3},
        {"question": "Nothing", "evidence": [], "category": 5},                  # dropped
        {"question": "Unknown id", "evidence": ["D9:9"], "category": 5},         # dropped id -> dropped query
    ]
    path = tmp_path / "locomo10.json"
    path.write_text(json.dumps([{"sample_id": "s1", "conversation": conv, "qa": qa}]))
    return path


def test_locomo_loader_repairs_and_counts(locomo_file):
    r = load_locomo(locomo_file)
    assert [q.query for q in r.queries] == ["What pet?", "Cat name?", "Run?", "Zero-padded?"]
    assert r.dropped_queries == 2 and r.dropped_ids == 1 and r.repaired_ids == 3
    cat_name = r.queries[1]
    assert len(cat_name.documents) == 3 and cat_name.relevant == {0, 2} and cat_name.category == "multi-hop"
    assert cat_name.documents[2] == "[2 May 2023] Ann: The cat is called Miso. [shares a photo of a cat]"
    assert r.queries[0].documents == ["[1 May 2023] Ann: I adopted a cat.", "[1 May 2023] Bo: Nice!"]
    wide = load_locomo(locomo_file, window=1)
    assert len(wide.queries[0].documents) == 3  # sessions 1 and 2
    assert len(load_locomo(locomo_file, candidates="turns").queries[0].documents) == 4
    with pytest.raises(ValueError, match="LoCoMo"):
        bad = locomo_file.parent / "bad.json"
        bad.write_text("{}")
        load_locomo(bad)
    sample = json.loads(locomo_file.read_text())[0]
    sample["qa"][0]["evidence"] = [7]  # not a string: a format error, not a crash
    bad.write_text(json.dumps([sample]))
    with pytest.raises(ValueError, match=r"sample 0 does not follow LoCoMo's locomo10.json format \(TypeError"):
        load_locomo(bad)


def test_jsonl_queries_validation(tmp_path):
    p = tmp_path / "q.jsonl"
    p.write_text(json.dumps({"query": "q", "documents": ["a", "b"], "relevant": [1]}) + "\n")
    assert load_jsonl_queries(p).queries[0].relevant == {1}
    p.write_text(json.dumps({"query": "q", "documents": ["a"], "relevant": [3]}) + "\n")
    with pytest.raises(ValueError, match="outside"):
        load_jsonl_queries(p)


def test_eval_command(bert_artifact, locomo_file, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(["eval", str(bert_artifact), "--data", str(locomo_file), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "dropped 1 ids naming no turn and 2 queries without evidence" in text and "| overall | 4 |" in text
    metrics = json.loads(out.read_text())["fp32"]
    assert metrics["overall"]["queries"] == 4 and 0 <= metrics["overall"]["MAP"] <= 1
    # --json: the metrics on stdout, the loader's counts on stderr; the load options change nothing
    assert main(["eval", str(bert_artifact), "--data", str(locomo_file), "--precision", "fp32", "--json",
                 "--providers", "cpu", "--max-batch-tokens", "64", "--no-prefix-reuse", "--batch-size", "2"]) == 0
    captured = capsys.readouterr()
    assert "dropped 1 ids" in captured.err
    again = json.loads(captured.out)["fp32"]
    assert set(again) == set(metrics) and all(again[c] == pytest.approx(metrics[c]) for c in metrics)
    assert main(["eval", str(bert_artifact), "--data", str(locomo_file), "--json", "-q"]) == 0
    captured = capsys.readouterr()  # -q: not even the loader's counts
    assert captured.err == "" and json.loads(captured.out)["fp32"]["overall"] == pytest.approx(metrics["overall"])
    assert main(["eval", str(bert_artifact), "--data", str(locomo_file), "--precision", "int8"]) == 2
    assert "no 'int8' precision" in capsys.readouterr().err


def test_eval_rejects_documents_that_are_not_strings(bert_artifact, tmp_path, capsys):
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"query": "q", "documents": ["a", 3], "relevant": [0]}) + "\n")
    assert main(["eval", str(bert_artifact), "--data", str(data)]) == 2
    assert "list of strings" in capsys.readouterr().err


def test_bench_command(bert_artifact, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"query": "q", "document": d, "label": int(i == 0)})
                              for i, d in enumerate(["cat", "dog", "tea", "sun"])))
    js = tmp_path / "b.json"
    assert main(["bench", str(bert_artifact), "--data", str(data), "--repeats", "1", "--precision", "fp32",
                 "--providers", "cpu", "--max-batch-tokens", "256", "--no-prefix-reuse", "--batch-size", "4",
                 "--threads", "1", "--json", "-q", "-o", str(js)]) == 0
    report = json.loads(capsys.readouterr().out)  # --json: stdout is the report, nothing else
    assert report == json.loads(js.read_text()) and report["providers"] == ["CPUExecutionProvider"]
    # --batch-size is the model's rows per call, as everywhere; the workers got the options themselves
    assert report["batch_size"] == 4 and report["precisions"]["fp32"]["batch_size"] == 4
    assert report["options"] == LoadOptions(providers=("CPUExecutionProvider",), threads=1, batch_size=4,
                                            max_batch_tokens=256, prefix_reuse=False).as_dict()
    table = markdown_table(report)  # what `memrerank bench` prints without --json
    assert "| fp32 |" in table and "ΔMAP" in table
    rep = report["precisions"]["fp32"]
    assert rep["fidelity"] == pytest.approx({"spearman_mean": 1.0, "top10_overlap": 1.0, "delta_MAP": 0.0})
    assert set(rep["latency_ms"]) == {"8", "32", "128"} and rep["peak_rss_mb"] > 0 and rep["cold_start_s"] > 0
    assert main(["bench", str(bert_artifact), "--precision", "int8", "--repeats", "1"]) == 2
    assert "--precision" in capsys.readouterr().err


def test_bench_eval_take_one_load_options(bert_artifact, locomo_file):
    """run_bench and evaluate_artifact take a LoadOptions, not option keywords or a dict; a bad field cannot
    even be built, and the error names it."""
    with pytest.raises(ValueError, match="LoadOptions.threads"):
        run_bench(bert_artifact, ["fp32"], options=LoadOptions(threads="2"))
    with pytest.raises(TypeError, match="LoadOptions"):
        run_bench(bert_artifact, ["fp32"], options={"threads": 2})
    with pytest.raises(TypeError, match="threads"):
        run_bench(bert_artifact, ["fp32"], threads=2)  # the old keyword is gone
    with pytest.raises(ValueError, match="repeats"):
        run_bench(bert_artifact, ["fp32"], repeats=0)
    queries = load_locomo(locomo_file).queries
    with pytest.raises(TypeError, match="providers"):
        evaluate_artifact(bert_artifact, queries, ["fp32"], providers=["cpu"])
    base = evaluate_artifact(bert_artifact, queries, ["fp32"])
    tuned = evaluate_artifact(bert_artifact, queries, ["fp32"], LoadOptions(batch_size=1, max_batch_tokens=64))
    assert tuned["fp32"]["overall"] == pytest.approx(base["fp32"]["overall"])


def test_bench_data_is_checked_before_any_worker(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"query": "q", "documents": ["a", None]}) + "\n")
    with pytest.raises(ValueError, match="list of strings"):
        load_bench_data(data)
    data.write_text(json.dumps({"query": "q", "documents": ["a"], "relevant": [2]}) + "\n")
    with pytest.raises(ValueError, match="indices"):
        load_bench_data(data)
