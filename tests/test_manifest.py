"""The artifact contract as types: parse once, name what is wrong, write atomically."""

from __future__ import annotations

import copy
import dataclasses
import json
import os

import pytest

from memrerank.errors import ArtifactError
from memrerank.manifest import (
    FAMILIES,
    FAMILY_TEMPLATES,
    Build,
    CacheLayout,
    CalibrationData,
    CalibrationEntry,
    DecoderTemplate,
    EncoderTemplate,
    EngineEntry,
    EngineParity,
    ExportInfo,
    FileEntry,
    Manifest,
    read_manifest,
    write_manifest,
)

#: A TensorRT engine entry as build-engine writes it (files are not checked by the manifest's parser).
ENGINE = {"engine": "tensorrt-fp16/model.engine", "files": {"tensorrt-fp16/model.engine": {"sha256": "0" * 64,
                                                                                          "bytes": 1}},
          "tensorrt": "10.3.0", "gpu": "NVIDIA H100", "compute_capability": "90", "source_graph": "fp32",
          "profile": {}, "method": "FP16 builder flag",
          "parity": {"reference": "fp32 onnx", "max_abs_logit_diff": 0.002, "spearman_mean": 0.99,
                     "top3_agreement": 1.0}}


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
    assert isinstance(m.export, ExportInfo) and m.export.graph == "traced" and m.export.allow_pickle is False
    assert m.export.step_seconds is not None and set(m.export.step_seconds) >= {"load", "fp32 graph"}
    assert fp32.build == Build() and m.calibration_data is None  # fp32 only: nothing built or calibrated
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
    (lambda d: d["export"].update(opset="17"), r"export\.opset: expected an integer"),
    (lambda d: d["export"]["versions"].update(torch=2), r"export\.versions\.torch: expected a string"),
    (lambda d: d["export"].update(step_seconds={"load": "fast"}),
     r"export\.step_seconds\.load: expected a number"),
    (lambda d: d["precisions"]["fp32"].update(build={"batch_independent": "yes"}),
     r"precisions\.fp32\.build\.batch_independent: expected a boolean"),
    (lambda d: d.update(calibration_data={"source": "built-in pairs", "pairs": "320", "queries": 8}),
     r"calibration_data\.pairs: expected an integer"),
    (lambda d: d.update(calibration_data={"source": "built-in pairs", "pairs": 320}),
     r"calibration_data\.queries: missing"),
    (lambda d: d.update(engines={"fp16": {**ENGINE, "parity": {**ENGINE["parity"],
                                                               "max_abs_logit_diff": "0"}}}),
     r"engines\.fp16\.parity\.max_abs_logit_diff: expected a number"),
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
    # the JSON is parsed back before the write: a block built wrong never reaches the disk
    monkeypatch.undo()
    bad = dataclasses.replace(m, tokens=dataclasses.replace(m.tokens, padding_side="middle"))
    with pytest.raises(ArtifactError, match=r"tokens\.padding_side: expected 'left' or 'right'"):
        write_manifest(tmp_path, bad)
    pairs: object = 320.5
    bad = dataclasses.replace(m, calibration_data=CalibrationData("built-in pairs", pairs, 8))  # type: ignore
    with pytest.raises(ArtifactError, match=r"calibration_data\.pairs: expected an integer"):
        write_manifest(tmp_path, bad)
    with pytest.raises(TypeError, match="takes a Manifest"):
        write_manifest(tmp_path, m.to_dict())  # type: ignore[arg-type]
    assert read_manifest(tmp_path) == updated


def test_written_blocks_round_trip_in_the_shape_export_writes(qwen_artifact, tmp_path):
    """Build records, engine parity, calibration data and export info are types, written in the JSON shape
    they had as dicts."""
    m = read_manifest(qwen_artifact)
    build = Build(method="per-row", batch_independent=True, extra={"fp32_nodes": ["/head/MatMul"]})
    engine = EngineEntry.from_dict(ENGINE, "engines.fp16")
    assert engine.parity == EngineParity("fp32 onnx", 0.002, 0.99, 1.0)
    int8 = dataclasses.replace(m.precisions["fp32"], build=build)
    typed = dataclasses.replace(m.with_precision("int8", int8).with_engine("fp16", engine),
                                calibration_data=CalibrationData("built-in pairs", 320, 8),
                                export=dataclasses.replace(m.export, step_seconds={"load": 1.5}))
    raw = typed.to_dict()
    assert raw["calibration_data"] == {"source": "built-in pairs", "pairs": 320, "queries": 8}
    assert raw["engines"]["fp16"] == ENGINE
    assert raw["precisions"]["int8"]["build"] == {"method": "per-row", "batch_independent": True,
                                                  "fp32_nodes": ["/head/MatMul"]}
    assert raw["precisions"]["fp32"]["build"] == {}  # fp32 records no build, as before
    assert set(raw["export"]) == {"date", "versions", "opset", "graph", "command", "allow_pickle",
                                  "step_seconds"}
    assert raw["export"]["step_seconds"] == {"load": 1.5}
    assert Manifest.from_dict(raw) == typed
    assert write_manifest(tmp_path, typed) == typed and read_manifest(tmp_path) == typed
    # each block alone: from_dict(to_dict()) is the identity, the JSON path names where a field is wrong
    for block, where in ((build, "precisions.int8.build"), (engine.parity, "engines.fp16.parity"),
                         (typed.calibration_data, "calibration_data"), (typed.export, "export"),
                         (FileEntry("ab" * 32, 3), "tokenizer.files.tokenizer.json")):
        assert type(block).from_dict(block.to_dict(), where) == block
    with pytest.raises(ArtifactError, match=r"export\.allow_pickle: expected a boolean"):
        ExportInfo.from_dict({**typed.export.to_dict(), "allow_pickle": "no"}, "export")
    # an export without a command line records that it has none; a manifest without an export block reads
    assert ExportInfo().to_dict() == {"command": None}
    bare = m.to_dict()
    del bare["export"]
    assert Manifest.from_dict(bare).export == ExportInfo()


def test_a_family_is_named_once():
    """The family names live in the manifest module; export's families and the runtime's pair encoders
    register against exactly those, and a family class with another name is refused."""
    from memrerank.export.families import FAMILY_REGISTRY, register_family
    from memrerank.runtime.encoding import ENCODERS

    assert FAMILIES == tuple(FAMILY_TEMPLATES) == ("decoder-yes-no", "encoder-cross")
    assert {cls.name for cls in FAMILY_REGISTRY.values()} == set(FAMILIES) == set(ENCODERS)
    with pytest.raises(ValueError, match=r"unknown family 'decoder'.*known: decoder-yes-no, encoder-cross"):
        register_family("SomeForCausalLM")(type("Other", (), {"name": "decoder"}))
    assert "SomeForCausalLM" not in FAMILY_REGISTRY


def _flip_byte(path, at=10):
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_weights_are_hashed_while_loading_and_an_altered_file_fails_the_load(tmp_path):
    """verify_files_while: what a parser reads (the graph) is hash-checked before ``load`` runs; the external
    weight data while it runs, and the load fails, its result dropped, when they differ from the manifest."""
    from memrerank.manifest import file_entries, is_weight_data, verify_files_while

    graph, data = tmp_path / "m.onnx", tmp_path / "m.onnx_data"
    graph.write_bytes(os.urandom(256))
    data.write_bytes(os.urandom(3 << 20))
    entries = file_entries(tmp_path, [graph, data])
    assert is_weight_data("int8/model.onnx_data") and not is_weight_data("int8/model.onnx")
    calls = []

    def load():
        calls.append(1)
        return "session"

    assert verify_files_while(tmp_path, entries, load) == "session" and calls == [1]
    _flip_byte(data)
    with pytest.raises(ArtifactError, match=r"m\.onnx_data does not match its sha256.*--force"):
        verify_files_while(tmp_path, entries, load)
    assert calls == [1, 1]  # built while the hash ran, then refused

    def broken():
        raise RuntimeError("onnxruntime: bad external data")

    with pytest.raises(ArtifactError, match="sha256"):  # the altered file is named, not the error it caused
        verify_files_while(tmp_path, entries, broken)
    _flip_byte(data)  # restored
    with pytest.raises(RuntimeError, match="bad external data"):
        verify_files_while(tmp_path, entries, broken)
    _flip_byte(graph)
    with pytest.raises(ArtifactError, match=r"m\.onnx does not match its sha256"):
        verify_files_while(tmp_path, entries, load)
    assert calls == [1, 1]  # an altered graph never reaches the loader
    data.write_bytes(data.read_bytes()[:-1])
    with pytest.raises(ArtifactError, match="bytes, the manifest records"):
        verify_files_while(tmp_path, entries, load)
