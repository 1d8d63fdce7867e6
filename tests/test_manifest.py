"""The artifact contract as types: parse once, name what is wrong, write atomically."""

from __future__ import annotations

import copy
import json
import os

import pytest

from memrerank.errors import ArtifactError
from memrerank.manifest import (
    CacheLayout,
    CalibrationEntry,
    DecoderTemplate,
    EncoderTemplate,
    Manifest,
    read_manifest,
    write_manifest,
)


def _raw(art):
    return json.loads((art / "manifest.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("fixture,template", [("qwen_artifact", DecoderTemplate), ("bert_artifact", EncoderTemplate)])
def test_read_gives_types_and_round_trips(request, fixture, template):
    art = request.getfixturevalue(fixture)
    raw = _raw(art)
    m = read_manifest(art)
    assert isinstance(m.template, template) and m.family == raw["family"]
    assert m.tokens.max_length == raw["tokens"]["max_length"] and m.tokens.pad_id == raw["tokens"]["pad_id"]
    fp32 = m.precisions["fp32"]
    assert fp32.graph == "fp32/model.onnx" and fp32.files[fp32.graph].bytes == (art / fp32.graph).stat().st_size
    assert fp32.parity is not None and fp32.parity.max_abs_logit_diff == raw["precisions"]["fp32"]["parity"][
        "max_abs_logit_diff"]
    assert (m.prefix_reuse is not None) == (fixture == "qwen_artifact")
    # the file export wrote is exactly what the types write back: nothing is lost or renamed
    assert m.to_dict() == raw
    assert Manifest.from_dict(m.to_dict()) == m
    with pytest.raises(Exception):
        m.family = "x"  # frozen


@pytest.mark.parametrize("edit,message", [
    (lambda d: d["precisions"]["fp32"].pop("files"), r"precisions\.fp32\.files: missing"),
    (lambda d: d["tokens"].update(max_length="512"), r"tokens\.max_length: expected an integer"),
    (lambda d: d["tokens"].update(padding_side="middle"), r"tokens\.padding_side: expected 'left' or 'right'"),
    (lambda d: d["template"].pop("suffix_ids"), r"template\.suffix_ids: missing"),
    (lambda d: d["template"].update(prefix_ids=[1, "2"]), r"template\.prefix_ids: expected a list of integers"),
    (lambda d: d["precisions"]["fp32"].update(graph="fp32/other.onnx"), r"precisions\.fp32\.graph: .* not among"),
    (lambda d: d["precisions"].update(bf16=d["precisions"]["fp32"]), r"precisions\.bf16: unknown precision"),
    (lambda d: d["prefix_reuse"].pop("kv_heads"), r"prefix_reuse\.kv_heads: missing"),
    (lambda d: d.update(calibration={"fp32": {"method": "platt", "params": {"a": "x"}}}),
     r"calibration\.fp32\.params\.a: expected a number"),
    (lambda d: d.update(family="decoder"), r"family: unknown family"),
    (lambda d: d.update(schema_version=99), r"schema_version 99"),
    (lambda d: d.pop("source"), r"source: missing"),
])
def test_a_bad_field_is_named_with_what_to_do(qwen_artifact, tmp_path, edit, message):
    raw = copy.deepcopy(_raw(qwen_artifact))
    edit(raw)
    with pytest.raises(ArtifactError, match=message) as info:
        Manifest.from_dict(raw)
    assert "re-export" in str(info.value)
    # through read_manifest the message also names the directory
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match=str(tmp_path)):
        read_manifest(tmp_path)


def test_precision_lookup_and_auto(qwen_artifact):
    m = read_manifest(qwen_artifact)
    assert m.precision("fp32") is m.precisions["fp32"]
    with pytest.raises(ArtifactError, match=r"no 'int8' precision \(it has: fp32\).*--precision int8"):
        m.precision("int8")
    assert m.pick_auto("CPUExecutionProvider") == "fp32"


def test_layout_names_every_past_input(qwen_artifact):
    m = read_manifest(qwen_artifact)
    layout = m.prefix_reuse
    assert isinstance(layout, CacheLayout)
    assert set(layout.past_names) == {n for n in m.precisions["fp32"].inputs if n.startswith("past_")}


def test_writer_is_atomic_and_checks_before_writing(qwen_artifact, tmp_path, monkeypatch):
    m = read_manifest(qwen_artifact)
    before = (qwen_artifact / "manifest.json").read_bytes()
    (tmp_path / "manifest.json").write_bytes(before)
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    updated = m.with_calibration({"fp32": CalibrationEntry("temperature", {"temperature": 2.0}, {"mode": "labels"})})
    written = write_manifest(tmp_path, updated)
    assert written == updated and read_manifest(tmp_path) == updated and synced  # file (and directory) synced
    assert _raw(tmp_path)["calibration"]["fp32"] == {"method": "temperature", "params": {"temperature": 2.0},
                                                     "mode": "labels"}
    # a failure at the rename leaves the old manifest whole and no temporary file behind
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        write_manifest(tmp_path, m)
    assert read_manifest(tmp_path) == updated
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]
    # a dict is parsed first: a malformed one never reaches the disk
    monkeypatch.undo()
    bad = m.to_dict()
    del bad["tokens"]
    with pytest.raises(ArtifactError, match="tokens: missing"):
        write_manifest(tmp_path, bad)
    assert read_manifest(tmp_path) == updated
