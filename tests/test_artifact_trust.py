"""Artifact trust (issue 27): every path a manifest names stays inside the artifact directory; tokenizer.json is
listed and hashed; what is hashed is what is loaded, even while a concurrent ``export --force`` swaps files; a
calibration that is not finite or in range is refused at load."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from memrerank import Reranker
from memrerank.calibration import Calibrator
from memrerank.errors import ArtifactError
from memrerank.manifest import file_entries, load_verified, read_manifest, sha256_file
from memrerank.runtime import backends
from memrerank.runtime import reranker as reranker_module

PAIRS = [("who is my climbing partner?", "Marco is my climbing partner."), ("tea or coffee?", "I like tea."),
         ("who is my climbing partner?", "the cat sleeps")]


def _copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / "art"))


def _edit(art: Path, edit) -> None:
    m = json.loads((art / "manifest.json").read_text())
    edit(m)
    (art / "manifest.json").write_text(json.dumps(m))


def _entry(path: Path) -> dict:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def _name_graph(art: Path, rel: str, target: Path) -> None:
    """Point the fp32 precision at ``rel``, listed with ``target``'s true hash and size (so only the path is
    wrong)."""
    def edit(m):
        m["precisions"]["fp32"]["graph"] = rel
        m["precisions"]["fp32"]["files"] = {rel: _entry(target)}
    _edit(art, edit)


def _swapped_vocab(art: Path) -> str:
    """tokenizer.json with the ids of 'cat' and 'tea' swapped (the template's id checks cannot see it)."""
    spec = json.loads((art / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["cat"], vocab["tea"] = vocab["tea"], vocab["cat"]
    return json.dumps(spec)


# ---------------------------------------------------------------------------------------- paths stay inside
@pytest.mark.parametrize("how", ["absolute", "dotdot", "nested-dotdot"])
def test_a_graph_path_outside_the_artifact_is_refused(bert_artifact, tmp_path, how):
    art = _copy(bert_artifact, tmp_path)
    outside = tmp_path / "outside.onnx"
    shutil.copy(art / "fp32" / "model.onnx", outside)  # a valid graph, with the hash the manifest records
    rel = {"absolute": str(outside), "dotdot": "../outside.onnx", "nested-dotdot": "fp32/../../outside.onnx"}[how]
    _name_graph(art, rel, outside)
    problem = "is an absolute path" if how == "absolute" else "climbs out of the artifact directory with '..'"
    for load in (read_manifest, Reranker.load):
        with pytest.raises(ArtifactError) as info:
            load(art)
        message = str(info.value)
        assert f"precisions.fp32.files: {rel!r} {problem}" in message
        assert "only name files inside its artifact directory" in message and "re-export" in message


def test_a_system_file_named_among_the_tokenizer_files_is_never_read(bert_artifact, tmp_path, monkeypatch):
    art = _copy(bert_artifact, tmp_path)
    target = Path("/etc/hostname")
    if not target.is_file():
        target = tmp_path / "hostname"
        target.write_text("somehost\n")
    _edit(art, lambda m: m["tokenizer"]["files"].update({str(target): _entry(target)}))
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, *a, **k: (opened.append(str(path)), real_open(path, *a, **k))[1])
    with pytest.raises(ArtifactError, match=rf"tokenizer\.files: '{target}' is an absolute path.*inside"):
        Reranker.load(art)
    assert str(target) not in opened


def test_a_symlink_leading_out_is_refused_and_one_inside_is_followed(bert_artifact, tmp_path):
    art = _copy(bert_artifact, tmp_path)
    want = Reranker.load(art).predict(PAIRS, raw=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    graph = art / "fp32" / "model.onnx"
    shutil.move(graph, elsewhere / "model.onnx")
    graph.symlink_to(elsewhere / "model.onnx")  # same bytes, same hash: only the place is wrong
    with pytest.raises(ArtifactError, match=r"fp32/model\.onnx leads out of the artifact directory .*copy the file "
                                            r"in instead of linking it"):
        Reranker.load(art)
    graph.unlink()
    shutil.move(art / "fp32", elsewhere / "fp32")
    shutil.move(elsewhere / "model.onnx", elsewhere / "fp32" / "model.onnx")
    (art / "fp32").symlink_to(elsewhere / "fp32", target_is_directory=True)  # a linked folder, the same
    with pytest.raises(ArtifactError, match="leads out of the artifact directory"):
        Reranker.load(art)
    (art / "fp32").unlink()
    shutil.move(elsewhere / "fp32", art / "store")
    (art / "fp32").mkdir()
    (art / "fp32" / "model.onnx").symlink_to(Path("..") / "store" / "model.onnx")  # inside: followed
    np.testing.assert_array_equal(Reranker.load(art).predict(PAIRS, raw=True), want)


# ------------------------------------------------------------------------------ the tokenizer is verified
def test_an_unlisted_tokenizer_is_refused(bert_artifact, tmp_path):
    """Unlisted, tokenizer.json could not be verified: an edited one (ids swapped) used to load and score
    differently."""
    art = _copy(bert_artifact, tmp_path)
    (art / "tokenizer.json").write_text(_swapped_vocab(art))
    _edit(art, lambda m: m["tokenizer"]["files"].pop("tokenizer.json"))
    for load in (read_manifest, Reranker.load):
        with pytest.raises(ArtifactError, match=r"tokenizer\.files: tokenizer\.json is not listed \(with its sha256 "
                                                r"and size\), so it cannot be verified.*re-export"):
            load(art)
    _edit(art, lambda m: m["tokenizer"]["files"].update({"tokenizer.json": _entry(bert_artifact / "tokenizer.json")}))
    with pytest.raises(ArtifactError, match=r"tokenizer\.json (does not match its sha256|has \d+ bytes, the manifest "
                                            r"records)"):  # listed, the edit shows
        Reranker.load(art)


# -------------------------------------------------------------------------- what is hashed is what is loaded
def _other_graph(art: Path, tmp_path: Path) -> Path:
    """The fp32 graph with its logit doubled: a valid graph that scores differently."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(art / "fp32" / "model.onnx"))
    out = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = [o if o != out else "raw_logits" for o in node.output]
    model.graph.initializer.append(numpy_helper.from_array(np.array(2.0, np.float32), "two"))
    model.graph.node.append(helper.make_node("Mul", ["raw_logits", "two"], [out]))
    path = tmp_path / "other.onnx"
    onnx.save(model, str(path))
    return path


def test_files_swapped_after_the_check_do_not_reach_the_parsers(bert_artifact, tmp_path, monkeypatch):
    """A concurrent `export --force` replaces the graph and tokenizer.json between the hash check and the parse:
    the parsers get the bytes that were checked, not the new files."""
    art = _copy(bert_artifact, tmp_path)
    want = Reranker.load(art).predict(PAIRS, raw=True)
    cat = Reranker.load(art).tokenizer.token_to_id("cat")
    other, swapped = _other_graph(art, tmp_path), tmp_path / "tokenizer.json"
    swapped.write_text(_swapped_vocab(art))
    real_session, real_tokenizer = ort.InferenceSession, reranker_module.Tokenizer

    def session(*args, **kwargs):
        os.replace(other, art / "fp32" / "model.onnx")
        return real_session(*args, **kwargs)

    class Tokenizer:  # what the loader sees as tokenizers.Tokenizer
        @staticmethod
        def from_str(text):
            os.replace(swapped, art / "tokenizer.json")
            return real_tokenizer.from_str(text)

        @staticmethod
        def from_file(path):
            os.replace(swapped, art / "tokenizer.json")
            return real_tokenizer.from_file(path)

    monkeypatch.setattr(ort, "InferenceSession", session)
    monkeypatch.setattr(reranker_module, "Tokenizer", Tokenizer)
    r = Reranker.load(art)
    assert not other.exists() and not swapped.exists(), "both files were swapped during the load"
    assert r.tokenizer.token_to_id("cat") == cat
    np.testing.assert_array_equal(r.predict(PAIRS, raw=True), want)
    with pytest.raises(ArtifactError, match=r"does not match its sha256|bytes, the manifest records"):
        Reranker.load(art)  # the next load sees the new files, and refuses them


def _externalize(art: Path) -> None:
    """Re-save the fp32 graph with every weight in ``model.onnx_data`` (as graphs above 1 GiB are)."""
    import onnx

    graph = art / "fp32" / "model.onnx"
    onnx.save(onnx.load(str(graph)), str(graph), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx_data", size_threshold=0)
    files = file_entries(art, [graph, art / "fp32" / "model.onnx_data"])
    _edit(art, lambda m: m["precisions"]["fp32"].update(files={k: v.to_dict() for k, v in files.items()}))


@pytest.fixture
def external_artifact(bert_artifact, tmp_path):
    art = _copy(bert_artifact, tmp_path)
    _externalize(art)
    return art


@pytest.mark.parametrize("from_bytes", [True, False], ids=["graph-as-bytes", "graph-by-path"])
def test_external_weight_data_loads_and_is_hash_checked(external_artifact, bert_artifact, monkeypatch, from_bytes):
    """The graph comes as the bytes that were checked, its data from beside it (an onnxruntime before 1.21 opens
    the graph by path, under the same same-file check); scores equal the inline graph's; altered data fails."""
    monkeypatch.setattr(backends, "LOADS_EXTERNAL_DATA_FROM_BYTES", from_bytes)
    want = Reranker.load(bert_artifact).predict(PAIRS, raw=True)
    np.testing.assert_allclose(Reranker.load(external_artifact).predict(PAIRS, raw=True), want, atol=1e-6)
    data = external_artifact / "fp32" / "model.onnx_data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match=r"model\.onnx_data does not match its sha256"):
        Reranker.load(external_artifact)


@pytest.mark.parametrize("change", ["replaced", "rewritten-in-place", "graph-replaced"])
def test_a_file_changed_while_onnxruntime_builds_its_session_fails_the_load(external_artifact, monkeypatch, change):
    """The weight data is hashed through the descriptor opened before the session, while onnxruntime reads it by
    path: a file replaced (as `export --force` does) or rewritten meanwhile fails the load, even with the same
    bytes, since what onnxruntime read may not be what was hashed. A graph read by path (onnxruntime < 1.21)
    is held to the same check."""
    monkeypatch.setattr(backends, "LOADS_EXTERNAL_DATA_FROM_BYTES", change != "graph-replaced")
    target = external_artifact / "fp32" / ("model.onnx" if change == "graph-replaced" else "model.onnx_data")
    real_session = ort.InferenceSession

    def session(*args, **kwargs):
        if change == "rewritten-in-place":
            with open(target, "r+b") as fh:  # the same bytes, written again
                head = fh.read(16)
                fh.seek(0)
                fh.write(head)
        else:
            copy = target.with_name("copy")
            shutil.copy(target, copy)
            os.replace(copy, target)
        return real_session(*args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", session)
    with pytest.raises(ArtifactError, match=r"changed while the artifact was loading .*concurrent `memrerank "
                                            r"export --force`.*load again"):
        Reranker.load(external_artifact)


def test_load_verified_hands_over_the_bytes_it_hashed(tmp_path):
    graph, data, config = tmp_path / "m.onnx", tmp_path / "m.onnx_data", tmp_path / "config.json"
    graph.write_bytes(os.urandom(300))
    data.write_bytes(os.urandom(1 << 20))
    config.write_bytes(b"{}")
    entries = file_entries(tmp_path, [graph, data, config])
    seen = load_verified(tmp_path, entries, dict, by_path=["config.json"])
    assert seen == {"m.onnx": graph.read_bytes()}, "read files as bytes; weight data and by-path files are not read"
    with pytest.raises(ArtifactError, match="could not"):
        load_verified(tmp_path, entries, lambda contents: (_ for _ in ()).throw(ArtifactError("could not")))


# ----------------------------------------------------------------------------- calibration in the manifest
@pytest.mark.parametrize("method,params,problem", [
    ("platt", {"a": 1.0, "b": float("nan")}, "b = nan is not a finite number"),
    ("temperature", {"temperature": float("inf")}, "temperature = inf is not a finite number"),
    ("temperature", {"temperature": 0.0}, r"temperature = 0 is outside \[0.01, 100\]"),
    ("temperature", {"temperature": -2.0}, r"temperature = -2 is outside"),
    ("temperature", {"temperature": 1.7e10}, r"temperature = 1.7e\+10 is outside .*every score is 0.5"),
    ("platt", {"a": 0.0, "b": 0.0}, r"a = 0 is outside \[0.01, 100\] \(a slope at or below 0"),
    ("platt", {"a": 3908.0, "b": 0.0}, r"a = 3908 is outside .*every score is 0 or 1"),
    ("platt", {"a": 1.0, "b": -1e3}, r"b = -1000 is outside \[-50, 50\]"),
    ("platt", {"a": 1.0}, "platt takes the parameters a, b, got a"),
    ("isotonic", {"a": 1.0}, "unknown method 'isotonic'; known: temperature, platt"),
])
def test_a_calibration_that_is_not_finite_or_in_range_is_refused_at_load(bert_artifact, tmp_path, method, params,
                                                                         problem):
    """b = NaN used to give NaN scores, temperature = inf every score 0.5."""
    art = _copy(bert_artifact, tmp_path)
    _edit(art, lambda m: m.update(calibration={"fp32": {"method": method, "params": params}}))
    where = r"calibration\.fp32\.method" if method == "isotonic" else r"calibration\.fp32\.params"
    for load in (read_manifest, Reranker.load):
        with pytest.raises(ArtifactError, match=rf"{where}: {problem}.*fit it again with `memrerank calibrate` or "
                                                r"remove the block"):
            load(art)
    with pytest.raises(ValueError, match=problem):
        Calibrator.from_params(method, params)


def test_a_calibration_in_range_loads_and_applies(bert_artifact, tmp_path):
    art = _copy(bert_artifact, tmp_path)
    _edit(art, lambda m: m.update(calibration={"fp32": {"method": "platt", "params": {"a": 100.0, "b": -50.0}}}))
    r = Reranker.load(art)
    z = r.predict(PAIRS, raw=True)
    np.testing.assert_allclose(r.predict(PAIRS), 1 / (1 + np.exp(-(100.0 * z - 50.0))), rtol=1e-5)
