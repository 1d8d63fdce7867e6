"""A hub id or a checkpoint directory where an artifact is expected: exported into the cache once, then loaded."""

from __future__ import annotations

import json

import numpy as np
import pytest

from memrerank import Reranker
from memrerank.cli import main
from memrerank.errors import ArtifactError
from memrerank.runtime import hub

PAIRS = [("Who is Marco?", "Marco is my climbing partner."), ("Who is Marco?", "I like green tea.")]


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMRERANK_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_what_counts_as_a_model_reference(bert_artifact, bert_ckpt, tmp_path):
    assert not hub.is_model_reference(bert_artifact)  # an artifact: loaded as it is
    assert hub.is_model_reference(bert_ckpt)  # a checkpoint directory
    assert hub.is_model_reference("Qwen/Qwen3-Reranker-0.6B")  # a hub id that is no path here
    assert not hub.is_model_reference(tmp_path / "missing")  # a missing directory stays an artifact error
    with pytest.raises(ArtifactError, match="memrerank export"):
        Reranker.load(tmp_path / "missing")


def test_a_typo_for_a_local_path_is_never_a_hub_id(tmp_path, monkeypatch, cache):
    """``arts/qwen3-rr`` has a hub id's form, but with ``./arts`` present it is a local path that does not exist:
    the Python API says so instead of downloading and exporting (as the CLI does)."""
    monkeypatch.chdir(tmp_path)
    assert hub.is_model_reference("arts/qwen3-rr")  # no ./arts: a hub id
    (tmp_path / "arts").mkdir()
    for missing in ("arts/qwen3-rr", "./org/name", "~/org/name", "a/b/c"):
        assert not hub.is_model_reference(missing), missing
    monkeypatch.setattr(hub, "resolve_artifact", lambda *a, **k: pytest.fail("a hub download was attempted"))
    with pytest.raises(ArtifactError, match="memrerank export"):
        Reranker.load("arts/qwen3-rr")


@pytest.mark.slow
def test_checkpoint_is_exported_once_into_the_cache(bert_ckpt, bert_artifact, cache):
    r = Reranker.load(bert_ckpt, precision="fp32")
    where = hub.artifact_cache_path(bert_ckpt)
    assert r.root == where and where.parent.parent == cache
    np.testing.assert_allclose(r.predict(PAIRS, raw=True), Reranker.load(bert_artifact).predict(PAIRS, raw=True),
                               atol=1e-4)  # same checkpoint, same scores (max_length differs only for long docs)
    first = (where / "manifest.json").read_bytes()
    Reranker.load(bert_ckpt, precision="fp32")  # second use: loaded, not exported again
    assert (where / "manifest.json").read_bytes() == first
    # a precision the cache lacks is added (the cached ones kept)
    assert Reranker.load(bert_ckpt, precision="int8").precision == "int8"
    assert set(json.loads((where / "manifest.json").read_text())["precisions"]) == {"fp32", "int8"}


@pytest.mark.slow
def test_cli_takes_a_checkpoint_as_artifact(bert_ckpt, cache, tmp_path, capsys):
    docs = tmp_path / "docs.txt"
    docs.write_text("Marco is my climbing partner.\nI like green tea.\n")
    assert main(["rank", str(bert_ckpt), "--query", "Who is Marco?", "--docs", str(docs), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2
    assert (hub.artifact_cache_path(bert_ckpt) / "manifest.json").is_file()


def test_offline_hub_id_is_one_line_naming_memrerank_export(cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ArtifactError, match=r"memrerank-test/no-such-model.*memrerank export") as info:
        Reranker.load("memrerank-test/no-such-model", precision="fp32")
    assert "\n" not in str(info.value)
    assert not (hub.artifact_cache_path("memrerank-test/no-such-model") / "manifest.json").exists()


def test_without_the_export_extra_the_error_says_how(cache, monkeypatch):
    real = hub.importlib.util.find_spec
    monkeypatch.setattr(hub.importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    with pytest.raises(ArtifactError, match=r'pip install "memrerank\[export\]".*memrerank export'):
        hub.resolve_artifact("Qwen/Qwen3-Reranker-0.6B", "int8")


def test_cache_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("MEMRERANK_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.cache_dir() == tmp_path / "xdg" / "memrerank"
    assert hub.artifact_cache_path("Qwen/Qwen3-Reranker-0.6B", "main").name == "Qwen--Qwen3-Reranker-0.6B@main"
    monkeypatch.setenv("MEMRERANK_CACHE", str(tmp_path / "mine"))
    assert hub.cache_dir() == tmp_path / "mine"
