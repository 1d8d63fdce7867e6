"""The console script's subcommands and the options they share."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil

import pytest

import memrerank
import memrerank.cli as cli
from memrerank import LoadOptions
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
    assert main(["export", str(bert_ckpt), "-o", str(out), "--max-length", "64", "--json", "-q"]) == 0
    captured = capsys.readouterr()
    stdout = captured.out
    assert captured.err == ""  # -q: no progress messages
    assert "encoder-cross" in stdout
    manifest = Manifest.from_dict(json.loads(stdout))  # stdout is the artifact's manifest, nothing else
    assert manifest.family == "encoder-cross" and manifest.tokens.max_length == 64
    assert main(["export", str(bert_ckpt), "-o", str(out)]) == 2
    assert "--force" in capsys.readouterr().err


def test_calibrate_takes_precision_json_and_output(minilm_artifact, tmp_path, capsys):
    art = tmp_path / "art"
    shutil.copytree(minilm_artifact, art)
    data = tmp_path / "pairs.jsonl"
    words = ["cat", "tea", "Lisbon", "climbing", "passport", "piano", "river", "Marco", "birthday", "cabin"]
    pairs = [(f"what about {w}?", d) for w in words for d in (w, "sun", "dog", "map")]
    # labels the scores predict: calibrate refuses labels a model's scores carry no information about
    logits = memrerank.Reranker.load(art).predict(pairs, raw=True)
    data.write_text("\n".join(json.dumps({"query": q, "document": d, "label": int(z > 0)})
                              for (q, d), z in zip(pairs, logits)))
    report_file = tmp_path / "calibration.json"
    assert main(["calibrate", str(art), "--data", str(data), "--method", "temperature", "--precision", "fp32",
                 "--json", "-o", str(report_file)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads(report_file.read_text())
    assert report["mode"] == "labels" and list(report["precisions"]) == ["fp32"]
    assert report["precisions"]["fp32"]["method"] == "temperature"
    assert main(["calibrate", str(art), "--data", str(data), "--precision", "int8"]) == 2
    assert "int8" in capsys.readouterr().err


def test_serve_builds_one_config(bert_artifact, monkeypatch, capsys):
    """serve and serve --ray hand the same ServeConfig on; the load options travel in it as one LoadOptions."""
    import memrerank.scale
    import memrerank.serve

    calls = []
    monkeypatch.setattr(memrerank.serve, "serve", lambda config, *a: calls.append(("uvicorn", config, a)))
    monkeypatch.setattr(memrerank.scale, "serve_on_ray", lambda config, **kw: calls.append(("ray", config, kw)))
    common = [str(bert_artifact), "--precision", "fp32", "--providers", "cpu", "--max-batch-tokens", "512",
              "--no-prefix-reuse", "--threads", "1", "--batch-size", "8", "--max-documents", "20"]
    assert main(["serve", *common, "--workers", "2", "--port", "9000"]) == 0
    assert main(["serve", *common, "--ray", "--replicas", "2", "--port", "9001"]) == 0
    (_, local, args), (_, ray, kw) = calls
    assert local == ray and args == ("127.0.0.1", 9000, 2)
    assert kw == {"host": "127.0.0.1", "port": 9001, "replicas": 2, "address": None}
    assert local.artifact == str(bert_artifact) and local.limits.max_documents == 20
    assert local.options == LoadOptions(precision="fp32", providers=("cpu",), threads=1, batch_size=8,
                                        max_batch_tokens=512, prefix_reuse=False)
    captured = capsys.readouterr()
    assert captured.out == "" and "http://127.0.0.1:9000" in captured.err  # the startup line, text mode
    assert main(["serve", *common, "--ray", "--workers", "2"]) == 2


def test_serve_json_prints_the_resolved_config_and_quiet_silences_the_startup_line(bert_artifact, monkeypatch,
                                                                                    capsys):
    import memrerank.serve

    monkeypatch.setattr(memrerank.serve, "serve", lambda config, *a: None)
    assert main(["serve", str(bert_artifact), "--port", "9002", "--json", "-q"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    startup = json.loads(captured.out)  # one JSON line, before the server blocks
    assert len(captured.out.strip().splitlines()) == 1
    assert startup["url"] == "http://127.0.0.1:9002" and startup["artifact"] == str(bert_artifact)
    assert startup["options"]["precision"] == "auto" and startup["precision"] in Manifest.from_dict(
        json.loads((bert_artifact / "manifest.json").read_text())).precisions  # auto, resolved
    assert startup["limits"]["max_documents"] == 1000 and startup["workers"] == 1
    assert main(["serve", str(bert_artifact), "-q"]) == 0
    assert capsys.readouterr() == ("", "")


@pytest.fixture()
def rescore_jobs(tmp_path, monkeypatch):
    """The RescoreJobs ``memrerank rescore`` builds (rescore itself stubbed: no Ray)."""
    import memrerank.scale

    jobs = []

    class Report:
        def as_dict(self):
            return {"rows": 3, "output": str(tmp_path / "out")}

    monkeypatch.setattr(memrerank.scale, "rescore", lambda job: jobs.append(job) or Report())
    return jobs


def test_rescore_builds_one_job(bert_artifact, tmp_path, rescore_jobs, capsys):
    import memrerank.scale

    argv = ["rescore", str(bert_artifact), "a.jsonl", "b.jsonl", "-o", str(tmp_path / "out"), "--providers",
            "cuda,cpu", "--max-batch-tokens", "256", "--no-prefix-reuse", "--actors", "2", "--instruction", "find"]
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 3
    assert main(argv) == 0
    assert capsys.readouterr().out.split()[:2] == ["rows", "3"]
    job = rescore_jobs[0]
    assert isinstance(job, memrerank.scale.RescoreJob) and job == rescore_jobs[1]
    assert (job.input, job.output, job.actors, job.instruction, job.force) == (
        ("a.jsonl", "b.jsonl"), str(tmp_path / "out"), 2, "find", False)
    assert (job.options.precision, job.options.providers, job.options.max_batch_tokens,
            job.options.prefix_reuse) == ("auto", ("cuda", "cpu"), 256, False)


def test_rescore_speaks_the_shared_vocabulary(bert_artifact, tmp_path, rescore_jobs, capsys):
    """--force (not --overwrite), --threads (not --threads-per-actor), --block-rows for the actor's rows and
    --batch-size for the model's, as in every other command."""
    argv = ["rescore", str(bert_artifact), "a.jsonl", "-o", str(tmp_path / "out")]
    assert main([*argv, "--force", "--threads", "2", "--block-rows", "64", "--batch-size", "8", "-q"]) == 0
    (job,) = rescore_jobs
    assert job.force and job.block_rows == 64 and job.verbose is False
    assert (job.resume, job.allow_duplicate_ids) == (False, False)
    assert main([*argv, "--resume", "-q"]) == 0 and rescore_jobs[-1].resume
    assert main([*argv, "--allow-duplicate-ids", "-q"]) == 0 and rescore_jobs[-1].allow_duplicate_ids
    assert main([*argv, "--resume", "--allow-duplicate-ids"]) == 2
    assert "needs unique ids" in capsys.readouterr().err
    assert (job.options.threads, job.options.batch_size) == (2, 8)
    for gone in (["--overwrite"], ["--threads-per-actor", "2"]):
        with pytest.raises(SystemExit) as exit_:
            main([*argv, *gone])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert f"unrecognized arguments: {' '.join(gone)}" in err and len(err.strip().splitlines()) == 1


#: The least each command needs to parse (tests below add flags to these).
MINIMAL = {
    "export": ["ckpt", "-o", "out"], "rank": ["art", "--query", "q", "--docs", "d.txt"], "serve": ["art"],
    "rescore": ["art", "in.jsonl", "-o", "out"], "build-engine": ["art"], "info": ["art"], "bench": ["art"],
    "eval": ["art", "--data", "d.json"], "calibrate": ["art", "--data", "d.jsonl"], "demo": [],
}
#: Commands that load a reranker: each takes every LoadOptions field as a flag.
LOADING = ("rank", "serve", "rescore", "bench", "eval", "calibrate", "demo")


def test_minimal_covers_every_command():
    assert set(MINIMAL) == set(COMMANDS) and set(LOADING) <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_takes_quiet_and_json(command):
    args = build_parser().parse_args([command, *MINIMAL[command], "-q", "--json"])
    assert args.quiet is True and args.json is True
    args = build_parser().parse_args([command, *MINIMAL[command], "--quiet"])
    assert args.quiet is True and args.json is False


@pytest.mark.parametrize("command", LOADING)
def test_every_load_option_has_one_flag_wherever_a_reranker_loads(command):
    argv = [command, *MINIMAL[command], "--providers", "cuda,cpu", "--threads", "3", "--batch-size", "7",
            "--max-batch-tokens", "900", "--no-prefix-reuse", "--allow-tf32", "--no-io-binding"]
    options = cli.load_options(build_parser().parse_args(argv))
    assert options.replace(precision="fp32") == LoadOptions(
        providers=("cuda", "cpu"), threads=3, batch_size=7, max_batch_tokens=900, prefix_reuse=False,
        allow_tf32=True, io_binding=False)
    defaults = cli.load_options(build_parser().parse_args([command, *MINIMAL[command]]))
    assert defaults.replace(precision="fp32") == LoadOptions()
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    flags = {o for a in sub._actions for o in a.option_strings}
    wanted = {f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(LoadOptions)}
    if command == "demo":  # the demo picks its precisions itself: auto, then each one it exported
        wanted.discard("--precision")
    assert wanted <= flags


@pytest.mark.parametrize("value", ["-1", "0", "2.5", "two"])
@pytest.mark.parametrize("flag", ["--threads", "--batch-size", "--max-batch-tokens"])
def test_a_bad_count_is_one_line_and_exit_2(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["rank", "art", "--query", "q", "--docs", "d.txt", flag, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"memrerank rank: error: argument {flag}: expected a positive integer")
    assert len(err.strip().splitlines()) == 1


def test_rank_and_info_quiet_json(bert_artifact, docs_file, capsys):
    argv = ["rank", str(bert_artifact), "--query", "Who is Marco?", "--docs", str(docs_file), "-q", "--json"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert len(json.loads(captured.out)) == 4 and captured.err == ""
    assert main(["info", str(bert_artifact), "-q", "--json"]) == 0
    assert Manifest.from_dict(json.loads(capsys.readouterr().out)).family == "encoder-cross"


def test_build_engine_json_prints_the_engines_entries(bert_artifact, tmp_path, monkeypatch, capsys):
    """build-engine --json: the manifest entries of the engines it built; -q: no build log (TensorRT faked)."""
    from memrerank.export import tensorrt as export_trt
    from memrerank.manifest import read_manifest, write_manifest

    art = tmp_path / "a"
    shutil.copytree(bert_artifact, art)

    tf32 = []

    def fake_build(root, precision, profile, workspace_gb, log, allow_tf32=False):
        tf32.append(allow_tf32)
        log(f"building {precision}")
        engine = root / f"tensorrt-{precision}" / "model.engine"
        engine.parent.mkdir(exist_ok=True)
        engine.write_bytes(b"engine")
        manifest = read_manifest(root)
        entry = export_trt.engine_entry(precision, engine, root, trt_version="10.0-fake", gpu="Fake GPU",
                                        capability="90", profile=export_trt.default_profile(manifest),
                                        source_graph="fp32", method="fake", parity=None)
        write_manifest(root, manifest.with_engine(precision, entry))
        return engine

    monkeypatch.setattr(export_trt, "require_tensorrt", lambda: None)
    monkeypatch.setattr(export_trt, "build_engine", fake_build)
    assert main(["build-engine", str(art), "--precision", "fp16", "--json", "-q"]) == 0
    captured = capsys.readouterr()
    engines = json.loads(captured.out)
    assert list(engines) == ["fp16"] and engines["fp16"]["engine"] == "tensorrt-fp16/model.engine"
    assert engines["fp16"]["gpu"] == "Fake GPU" and captured.err == ""
    assert main(["build-engine", str(art), "--precision", "int8"]) == 0  # text: the build log, then the summary
    captured = capsys.readouterr()
    assert "building int8" in captured.err and "engine      int8" in captured.out
    assert main(["build-engine", str(art), "--precision", "fp16", "--allow-tf32", "-q"]) == 0
    assert tf32 == [False, False, True]  # TF32 stays cleared unless asked for


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


# ------------------------------------------------------------------------ errors of the system, bad paths
def _never(*args, **kwargs):
    raise AssertionError("work started before the output was checked")


@pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="needs Linux's /sys (not writable, even by root)")
def test_unwritable_outputs_are_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    """`export -o /sys/x` and `bench -o /sys/r.json` ended in a traceback, bench's only after the whole run. Each
    output is now checked before anything loads, starts or runs, and refused in one line."""
    for target in ("memrerank.export.export_model", "memrerank.export.require_export_extra",
                   "memrerank.benchmark.run_bench", "memrerank.scale.rescore"):
        monkeypatch.setattr(target, _never)
    cases = {
        "cannot write in /sys": [["export", "some/model", "-o", "/sys/x"], ["bench", "art", "-o", "/sys/r.json"],
                                 ["rescore", "art", "in.jsonl", "-o", "/sys/scores"],
                                 ["calibrate", "art", "--data", "d.jsonl", "--plot", "/sys/p.png"]],
        "no such directory": [["bench", "art", "-o", str(tmp_path / "missing" / "r.json")]],
        "is a directory": [["eval", "art", "--data", "d.json", "-o", str(tmp_path)]],
    }
    for words, argvs in cases.items():
        for argv in argvs:
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert err.startswith(f"memrerank {argv[0]}: error: ") and words in err, err
            assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    # a directory output's missing parents are created by the command: fine when the nearest one is writable
    cli._check_writable(tmp_path / "a" / "b" / "out", "-o", directory=True)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_disk_full_and_permission_denied_are_one_line(bert_artifact, tmp_path, monkeypatch, capsys):
    """ENOSPC (a write to /dev/full) and EACCES raised inside a command: one line naming the error and the
    file, exit 2, no traceback."""
    import memrerank.benchmark

    monkeypatch.setattr(memrerank.benchmark, "run_bench",
                        lambda *a, **k: {"precisions": {}, "providers": ["CPUExecutionProvider"]})
    assert main(["bench", str(bert_artifact), "-o", "/dev/full", "--json", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("memrerank bench: error: ") and "[ENOSPC]: /dev/full" in err and "\n" not in err

    def denied(args):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "x"))

    monkeypatch.setitem(cli._COMMANDS, "info", denied)
    assert main(["info", "--system"]) == 2
    assert capsys.readouterr().err.strip() == f"memrerank info: error: Permission denied [EACCES]: {tmp_path / 'x'}"
    # a report that cannot be replaced leaves the previous one whole
    report = tmp_path / "r.json"
    report.write_text("previous")
    from memrerank import atomic

    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space")))
    with pytest.raises(OSError, match="No space"):
        cli._write_json(report, {"new": 1})
    assert report.read_text() == "previous" and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_a_missing_local_path_is_never_a_hub_download(tmp_path, monkeypatch, capsys):
    """`memrerank info arts/qwen3-rr` (a typo of a local path) was taken for a hub id: a download and an export.
    A path that does not exist is now "no such artifact directory" when it looks like a path (the rule in the
    cli module docstring); only the remaining org/name form reaches the hub."""
    from memrerank.errors import ArtifactError

    monkeypatch.setattr("memrerank.runtime.hub.resolve_artifact", _never)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "arts").mkdir()
    for arg in ("arts/qwen3-rr", "./org/name", "~/no-such-memrerank-artifact", "a/b/c", "qwen3-rr",
                str(tmp_path / "gone"), "arts\\x"):
        assert main(["info", arg]) == 2, arg
        err = capsys.readouterr().err
        assert err.startswith(f"memrerank info: error: no such artifact directory: {arg} (make one with "), err
        assert len(err.strip().splitlines()) == 1
    assert main(["rank", "arts/qwen3-rr", "--query", "q", "--docs", "d.txt"]) == 2
    assert "no such artifact directory: arts/qwen3-rr" in capsys.readouterr().err
    assert main(["export", "arts/ckpt", "-o", str(tmp_path / "out")]) == 2
    assert "no such checkpoint directory: arts/ckpt" in capsys.readouterr().err
    asked = []

    def hub_id(reference, *args, **kwargs):
        asked.append(str(reference))
        raise ArtifactError(f"{reference}: offline (test)")

    monkeypatch.setattr("memrerank.runtime.hub.resolve_artifact", hub_id)
    assert main(["info", "Org/Model"]) == 2 and asked == ["Org/Model"]  # org/name with no ./Org: a hub id
