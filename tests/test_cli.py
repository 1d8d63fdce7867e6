"""The console script's subcommands."""

from __future__ import annotations

import json

from memrerank.cli import main


def test_rank_and_info(qwen_artifact, tmp_path, capsys):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps(d) for d in ["Marco is my climbing partner.", {"text": "tea"}, "x"]))
    assert main(["rank", str(qwen_artifact), "--query", "Who is Marco?", "--docs", str(docs), "--json",
                 "--top-k", "2"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 2 and {"index", "score", "logit", "text", "truncated"} <= set(hits[0])
    assert main(["info", str(qwen_artifact)]) == 0
    out = capsys.readouterr().out
    assert "decoder-yes-no" in out and "max|Δlogit|" in out and "sigmoid(logit)" in out


def test_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "memrerank export" in capsys.readouterr().err
    docs = tmp_path / "d.txt"
    docs.write_text("a\nb\n")
    assert main(["rank", str(tmp_path / "missing"), "--query", "q", "--docs", str(docs)]) == 2


def test_export_command(bert_ckpt, tmp_path, capsys):
    out = tmp_path / "cli-art"
    assert main(["export", str(bert_ckpt), "-o", str(out), "--max-length", "64"]) == 0
    assert "encoder-cross" in capsys.readouterr().out
    assert main(["export", str(bert_ckpt), "-o", str(out)]) == 2
    assert "--force" in capsys.readouterr().err


def test_demo_offline_uses_the_embedded_default(tmp_path, monkeypatch, capsys):
    """README command 1: offline, the demo exports the packaged MiniLM body and says its head is untrained."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["demo", "-o", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "embedded all-MiniLM-L6-v2" in out and "NOT meaningful" in out
    assert "precision 'auto' -> int8" in out and "latency fp32" in out and "latency int8" in out
    assert (tmp_path / "demo" / "artifact" / "int8" / "model.onnx").is_file()
