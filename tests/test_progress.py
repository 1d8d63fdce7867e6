"""Progress of the long jobs: a bar on a terminal, silence elsewhere and with --quiet, time per export step."""

from __future__ import annotations

import json

from memrerank.cli import main
from memrerank.progress import Steps, bar


def test_bar_only_when_enabled(capsys):
    assert list(bar(range(3), desc="work", enabled=False)) == [0, 1, 2]
    assert capsys.readouterr().err == ""
    assert list(bar(range(3), desc="work", enabled=True)) == [0, 1, 2]
    assert "work" in capsys.readouterr().err
    assert list(bar(range(2), desc="work")) == [0, 1]  # None: stderr is no terminal under pytest
    assert capsys.readouterr().err == ""


def test_steps_time_each_step_and_keep_log_lines(capsys):
    logged = []
    steps = Steps(2, desc="job", enabled=False, log=logged.append)
    steps.start("first")
    steps.log("message")
    steps.start("second")
    seconds = steps.finish()
    assert list(seconds) == ["first", "second"] and all(v >= 0 for v in seconds.values())
    assert logged == ["message"] and "first" in steps.summary()
    shown = Steps(1, desc="job", enabled=True)
    shown.start("only")
    shown.log("through the bar")
    shown.finish()
    err = capsys.readouterr().err
    assert "through the bar" in err and "job" in err


def test_export_records_time_per_step_and_quiet_is_silent(bert_ckpt, tmp_path, capsys):
    out = tmp_path / "art"
    assert main(["export", str(bert_ckpt), "-o", str(out), "--max-length", "64", "--quiet", "--json"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    steps = json.loads(captured.out)["export"]["step_seconds"]
    assert list(steps) == ["load", "fp32 graph", "validate fp32"] and all(v >= 0 for v in steps.values())
    assert main(["export", str(bert_ckpt), "-o", str(out), "--max-length", "64", "--force"]) == 0
    err = capsys.readouterr().err
    assert "loading" in err and "validate fp32" in err  # the log line at the end names each step's time
