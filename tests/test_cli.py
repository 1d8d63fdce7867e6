"""The console script's subcommands and the options they share."""

from __future__ import annotations

import json
import shutil

import pytest

import memrerank
import memrerank.cli as cli
from memrerank.cli import COMMANDS, build_parser, main
from memrerank.manifest import Manifest


@pytest.fixture()
def docs_file(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps(d) for d in ["Marco is my climbing partner.", {"text": "tea"}, "x",
                                                       "Marco Polo travelled to China."]))
    return docs


def test_rank_and_info(qwen_artifact, docs_file, capsys):
    assert main(["rank", str(qwen_artifact), "--query", "Who is Marco?", "--docs", str(docs_file), "--json",
                 "--top-k", "2"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 2 and {"index", "score", "logit", "text", "truncated"} <= set(hits[0])
    assert main(["rank", str(qwen_artifact), "--query", "Who is Marco?", "--docs", str(docs_file)]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["rank", "score", "logit", "idx", "text"] and "Marco" in table
    assert main(["info", str(qwen_artifact)]) == 0
    out = capsys.readouterr().out
    assert "decoder-yes-no" in out and "max|Δlogit|" in out and "sigmoid(logit)" in out
    assert main(["info", str(qwen_artifact), "--json"]) == 0
    assert Manifest.from_dict(json.loads(capsys.readouterr().out)).family == "decoder-yes-no"


def test_rank_load_options_keep_the_scores(qwen_artifact, docs_file, capsys):
    """--providers cpu, a small token budget and no prefix reuse change how pairs are run, not their scores."""
    base = ["rank", str(qwen_artifact), "--query", "Who is Marco?", "--docs", str(docs_file), "--json"]
    assert main(base) == 0
    default = json.loads(capsys.readouterr().out)
    assert main([*base, "--providers", "cpu", "--max-batch-tokens", "64", "--no-prefix-reuse",
                 "--threads", "1"]) == 0
    tuned = json.loads(capsys.readouterr().out)
    assert [h["index"] for h in tuned] == [h["index"] for h in default]
    assert [h["logit"] for h in tuned] == pytest.approx([h["logit"] for h in default], abs=1e-4)


def test_unavailable_provider_exits_2_naming_the_available_ones(qwen_artifact, bert_artifact, docs_file,
                                                                 capsys):
    argv = ["rank", str(qwen_artifact), "--query", "q", "--docs", str(docs_file), "--providers", "cuda"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("memrerank rank: error:") and "'cuda'" in err and "available: " in err
    assert "CPUExecutionProvider" in err and len(err.strip().splitlines()) == 1
    # bench checks before it starts a worker per precision
    assert main(["bench", str(bert_artifact), "--providers", "cuda", "--repeats", "1"]) == 2
    assert "available: " in capsys.readouterr().err


def test_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "memrerank export" in capsys.readouterr().err
    docs = tmp_path / "d.txt"
    docs.write_text("a\nb\n")
    assert main(["rank", str(tmp_path / "missing"), "--query", "q", "--docs", str(docs)]) == 2


def test_a_type_error_is_a_bug_not_a_user_error(monkeypatch):
    """main() turns memrerank's own errors into exit 2; a TypeError keeps its traceback."""
    def broken(args):
        raise TypeError("a bug")

    monkeypatch.setitem(cli._COMMANDS, "info", broken)
    with pytest.raises(TypeError, match="a bug"):
        main(["info", "--system"])


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"memrerank {memrerank.__version__}\n"


def test_help_lists_every_command_without_markup(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert list(COMMANDS) == ["export", "rank", "serve", "rescore", "build-engine", "info", "bench", "eval",
                              "calibrate", "demo"]
    lines = text.splitlines()
    for name, line in COMMANDS.items():  # one line each: the name and its help on the same line
        assert sum(1 for row in lines if row.split()[:1] == [name] and line in row) == 1, name
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == set(COMMANDS)
    for name in COMMANDS:
        with pytest.raises(SystemExit):
            main([name, "--help"])
        text += capsys.readouterr().out
    assert "`" not in text


def test_export_command(bert_ckpt, tmp_path, capsys):
    out = tmp_path / "cli-art"
    assert main(["export", str(bert_ckpt), "-o", str(out), "--max-length", "64", "--json"]) == 0
    stdout = capsys.readouterr().out
    assert "encoder-cross" in stdout
    manifest = Manifest.from_dict(json.loads(stdout))  # stdout is the artifact's manifest, nothing else
    assert manifest.family == "encoder-cross" and manifest.tokens.max_length == 64
    assert main(["export", str(bert_ckpt), "-o", str(out)]) == 2
    assert "--force" in capsys.readouterr().err


def test_calibrate_takes_precision_json_and_output(bert_artifact, tmp_path, capsys):
    art = tmp_path / "art"
    shutil.copytree(bert_artifact, art)
    data = tmp_path / "pairs.jsonl"
    words = ["cat", "tea", "Lisbon", "climbing", "passport", "piano", "river", "Marco", "birthday", "cabin"]
    data.write_text("\n".join(json.dumps({"query": f"what about {w}?", "document": d, "label": int(d == w)})
                              for w in words for d in (w, "sun", "dog", "map")))
    report_file = tmp_path / "calibration.json"
    assert main(["calibrate", str(art), "--data", str(data), "--method", "temperature", "--precision", "fp32",
                 "--json", "-o", str(report_file)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads(report_file.read_text())
    assert report["mode"] == "labels" and list(report["precisions"]) == ["fp32"]
    assert report["precisions"]["fp32"]["method"] == "temperature"
    assert main(["calibrate", str(art), "--data", str(data), "--precision", "int8"]) == 2
    assert "int8" in capsys.readouterr().err


def test_serve_builds_one_config(bert_artifact, monkeypatch):
    """serve and serve --ray hand the same ServeConfig on; the load options travel in it."""
    import memrerank.scale
    import memrerank.serve

    calls = []
    monkeypatch.setattr(memrerank.serve, "serve", lambda config, *a: calls.append(("uvicorn", config, a)))
    monkeypatch.setattr(memrerank.scale, "serve_on_ray", lambda config, **kw: calls.append(("ray", config, kw)))
    common = [str(bert_artifact), "--precision", "fp32", "--providers", "cpu", "--max-batch-tokens", "512",
              "--no-prefix-reuse", "--threads", "1", "--max-documents", "20"]
    assert main(["serve", *common, "--workers", "2", "--port", "9000"]) == 0
    assert main(["serve", *common, "--ray", "--replicas", "2", "--port", "9001"]) == 0
    (_, local, args), (_, ray, kw) = calls
    assert local == ray and args == ("127.0.0.1", 9000, 2)
    assert kw == {"host": "127.0.0.1", "port": 9001, "replicas": 2, "address": None}
    assert (local.artifact, local.precision, local.providers, local.threads, local.max_batch_tokens,
            local.prefix_reuse, local.limits.max_documents) == (str(bert_artifact), "fp32", ("cpu",), 1, 512,
                                                                False, 20)
    assert main(["serve", *common, "--ray", "--workers", "2"]) == 2


def test_rescore_builds_one_job(bert_artifact, tmp_path, monkeypatch, capsys):
    import memrerank.scale

    jobs = []

    class Report:
        def as_dict(self):
            return {"rows": 3, "output": str(tmp_path / "out")}

    monkeypatch.setattr(memrerank.scale, "rescore", lambda job: jobs.append(job) or Report())
    argv = ["rescore", str(bert_artifact), "a.jsonl", "b.jsonl", "-o", str(tmp_path / "out"), "--providers",
            "cuda,cpu", "--max-batch-tokens", "256", "--no-prefix-reuse", "--actors", "2", "--instruction", "find"]
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 3
    assert main(argv) == 0
    assert capsys.readouterr().out.split()[:2] == ["rows", "3"]
    job = jobs[0]
    assert isinstance(job, memrerank.scale.RescoreJob) and job == jobs[1]
    assert (job.input, job.output, job.providers, job.max_batch_tokens, job.prefix_reuse, job.actors,
            job.instruction) == (("a.jsonl", "b.jsonl"), str(tmp_path / "out"), ("cuda", "cpu"), 256, False, 2,
                                 "find")


def test_demo_offline_uses_the_embedded_default(tmp_path, monkeypatch, capsys):
    """README command 1: offline, the demo exports the packaged MiniLM body with its trained head, ranks each
    question's answer first and prints the figures and the next commands (tests/test_demo.py checks the
    rankings on the artifact at both precisions)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["demo", "-o", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "embedded default" in out and "all-MiniLM-L6-v2" in out and "held-out top-1" in out
    assert "NOT meaningful" not in out and "untrained" not in out
    from memrerank.demo import DEMO_QUESTIONS

    assert out.count("the memory that answers it ranks first") == len(DEMO_QUESTIONS)
    assert "precision 'auto' -> int8" in out and "latency fp32" in out and "latency int8" in out
    assert "budget met" in out and "MiB" in out  # fidelity and size per precision
    art = tmp_path / "demo" / "artifact"
    assert (art / "int8" / "model.onnx").is_file()
    assert f"memrerank rank {art}" in out and f"memrerank serve {art}" in out and f"memrerank bench {art}" in out
