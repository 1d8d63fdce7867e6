"""bench/report.py: every README benchmark block is what the committed bench/results render."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def report(monkeypatch, tmp_path):
    """bench/report.py as a module, reading a copy of bench/results (so a test may edit it)."""
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_report", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    results = tmp_path / "results"
    shutil.copytree(ROOT / "bench" / "results", results)
    monkeypatch.setattr(module, "RESULTS", results)
    return module


def test_the_readme_matches_the_committed_results(report):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert report.check(readme) == []
    assert report.main(["--check"]) == 0
    assert set(report.readme_blocks(readme)) | set(report.pending(readme)) == set(report.SECTIONS)
    assert len(report.readme_blocks(readme)) >= 2


def test_a_hand_edited_figure_fails_the_check(report, tmp_path):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    name, body = next(iter(report.readme_blocks(readme).items()))
    edited = tmp_path / "README.md"
    edited.write_text(readme.replace(body, body.replace("|", "| 9", 1)), encoding="utf-8")
    problems = report.check(edited.read_text(encoding="utf-8"))
    assert len(problems) == 1 and problems[0].startswith(f"{name}: the README differs")
    assert report.main(["--check", "--readme", str(edited)]) == 1
    assert report.main(["--write", "--readme", str(edited)]) == 0  # --write puts the rendered figures back
    assert report.check(edited.read_text(encoding="utf-8")) == []


def test_a_changed_result_fails_the_check_and_a_missing_one_names_the_bench(report):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    sec = next(iter(report.SECTIONS.values()))
    path = report.RESULTS / sec.files[0]
    data = json.loads(path.read_text())
    first = next(iter(data["results"].values()))
    first["pairs_per_s"] *= 2
    path.write_text(json.dumps(data))
    assert any(p.startswith(f"{sec.name}: the README differs") for p in report.check(readme))
    path.unlink()
    (missing,) = [p for p in report.check(readme) if p.startswith(sec.name)]
    assert "is missing" in missing and sec.command in missing


def test_a_block_without_a_renderer_and_a_section_without_a_block_are_reported(report):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    extra = readme + "\n<!-- bench:nobody -->\nx\n<!-- /bench:nobody -->\n"
    assert any("'nobody' has no renderer" in p for p in report.check(extra))
    name = next(iter(report.SECTIONS))
    stripped = report.BLOCK.sub(lambda m: "" if m.group("name") == name else m.group(0), readme)
    assert any(f"no <!-- bench:{name} --> block" in p for p in report.check(stripped))
