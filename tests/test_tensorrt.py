"""TensorRT path: what runs without TensorRT/GPU (profiles, manifest checks, calibrator feeding, fail-fast
errors) and, marked `tensorrt`/`gpu`, the real engine build + parity (skipped here: no GPU on CI)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from memrerank import Reranker
from memrerank.errors import ArtifactError, ProviderError
from memrerank.export.tensorrt import (
    INSTALL_HINT,
    CalibrationFeeder,
    Profile,
    calibration_batches,
    check_engine_compat,
    default_profile,
    parse_profile,
    profile_shapes,
)
from memrerank.manifest import read_manifest, sha256_file


def test_parse_profile():
    assert parse_profile("1x16,8x128,32x512", 512) == Profile((1, 16), (8, 128), (32, 512))
    for bad, word in [("1x16,8x128", "min,opt,max"), ("1x16,8xabc,32x512", "BATCHxSEQ"),
                      ("8x16,1x128,32x512", "min ≤ opt ≤ max"), ("1x16,8x128,32x9999", "max_length"),
                      ("0x16,8x128,32x512", "positive")]:
        with pytest.raises(ValueError, match=word):
            parse_profile(bad, 512)


def test_profile_shapes_follow_the_manifest(qwen_artifact, bert_artifact):
    q = read_manifest(qwen_artifact)
    prof = default_profile(q)
    names = q["precisions"]["fp32"]["inputs"]
    shapes = profile_shapes(q, names, prof)
    assert shapes["input_ids"] == ((1, 1), (32, 128), (64, min(1024, q["tokens"]["max_length"])))
    kv, hd = q["prefix_reuse"]["kv_heads"], q["prefix_reuse"]["head_dim"]
    assert shapes["past_key.0"] == ((1, kv, 0, hd), (1, kv, 64, hd), (1, kv, 256, hd))
    b = read_manifest(bert_artifact)
    bshapes = profile_shapes(b, b["precisions"]["fp32"]["inputs"], default_profile(b))
    assert set(bshapes) == set(b["precisions"]["fp32"]["inputs"]) and bshapes["input_ids"][2] == (64, 64)
    with pytest.raises(ValueError, match="no profile rule"):
        profile_shapes(b, ["pixel_values"], default_profile(b))


class FakeDevice:
    """Stands in for cudaMalloc+cudaMemcpy: remembers what was copied, returns fake addresses."""

    def __init__(self):
        self.copies = []

    def __call__(self, array):
        self.copies.append(array.copy())
        return 0x1000 * len(self.copies)


@pytest.mark.parametrize("fixture", ["qwen_artifact", "bert_artifact"])
def test_calibrator_feeds_every_packed_batch_in_engine_input_order(request, fixture):
    art = request.getfixturevalue(fixture)
    batches = calibration_batches(art, max_rows=16)
    names = read_manifest(art)["precisions"]["fp32"]["inputs"]
    assert all(set(b) == set(names) for b in batches)
    device = FakeDevice()
    feeder = CalibrationFeeder(batches, device)
    engine_names = list(reversed(names))  # an engine may list inputs in any order
    fed = []
    while (ptrs := feeder.get_batch(engine_names)) is not None:  # the calibrator loop TensorRT runs
        assert len(ptrs) == len(engine_names) and len(set(ptrs)) == len(ptrs)
        fed.append(dict(zip(engine_names, device.copies[-len(engine_names):])))
    assert feeder.fed == len(batches) == len(fed) and feeder.batch_size == 16
    for want, got in zip(batches, fed):
        for name in names:
            np.testing.assert_array_equal(got[name], want[name])
    # 320 built-in calibration pairs, every one fed exactly once
    assert sum(b["input_ids"].shape[0] for b in fed) == 320
    with pytest.raises(ValueError, match="lacks engine inputs"):
        CalibrationFeeder(batches, device).get_batch(["input_ids", "pixel_values"])
    with pytest.raises(ValueError, match="at least one batch"):
        CalibrationFeeder([], device)


def test_engine_compat_refuses_another_gpu_or_version(tmp_path):
    entry = {"tensorrt": "10.3.0", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "90"}
    check_engine_compat(entry, trt_version="10.3.0", gpu="NVIDIA H100 80GB HBM3", capability="90", root=tmp_path,
                        precision="fp16")
    with pytest.raises(ArtifactError, match=r"TensorRT 10.3.0 .*10.5.0.*memrerank build-engine .* --precision fp16"):
        check_engine_compat(entry, trt_version="10.5.0", gpu="NVIDIA H100 80GB HBM3", capability="90",
                            root=tmp_path, precision="fp16")
    with pytest.raises(ArtifactError, match="sm_90 .*Orin.*sm_87"):
        check_engine_compat(entry, trt_version="10.3.0", gpu="Orin", capability="87", root=tmp_path,
                            precision="int8")


@pytest.mark.skipif(__import__("importlib").util.find_spec("tensorrt") is not None, reason="TensorRT is installed")
def test_without_tensorrt_commands_fail_fast_with_the_install_hint(qwen_artifact, qwen_ckpt, tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "memrerank.cli", *a], capture_output=True, text=True)  # noqa: E731
    out = run("build-engine", str(qwen_artifact), "--precision", "fp16")
    assert out.returncode == 2 and "pypi.nvidia.com" in out.stderr
    out = run("export", str(qwen_ckpt), "-o", str(tmp_path / "x"), "--target", "tensorrt", "--precision", "fp32,int8")
    assert out.returncode == 2 and "pypi.nvidia.com" in out.stderr and not (tmp_path / "x").exists()
    out = run("export", str(qwen_ckpt), "-o", str(tmp_path / "x"), "--target", "tensorrt", "--precision", "fp32")
    assert out.returncode == 2 and "fp16 and/or int8" in out.stderr
    out = run("build-engine", str(qwen_artifact), "--precision", "fp32")
    assert out.returncode == 2 and "fp16, int8" in out.stderr


@pytest.mark.skipif(__import__("importlib").util.find_spec("tensorrt") is not None, reason="TensorRT is installed")
def test_loading_an_engine_without_tensorrt_is_a_provider_error(bert_artifact, tmp_path):
    art = tmp_path / "a"
    shutil.copytree(bert_artifact, art)
    engine = art / "tensorrt-fp16" / "model.engine"
    engine.parent.mkdir()
    engine.write_bytes(b"not a real engine")
    m = read_manifest(art)
    m["engines"] = {"fp16": {"engine": "tensorrt-fp16/model.engine", "tensorrt": "10.3.0", "gpu": "x",
                             "compute_capability": "90",
                             "files": {"tensorrt-fp16/model.engine": {"sha256": sha256_file(engine), "bytes": 17}}}}
    m["precisions"]["fp16"] = dict(m["precisions"]["fp32"])
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ProviderError, match="pypi.nvidia.com"):
        Reranker.load(art, precision="fp16", providers=["tensorrt"])
    # no engine for int8 and no TensorRT provider in onnxruntime: listed, never a silent CPU fallback
    with pytest.raises(ProviderError, match="available: .*CPUExecutionProvider"):
        Reranker.load(art, precision="fp32", providers=["tensorrt"])
    assert INSTALL_HINT.startswith("TensorRT is not available")


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_engine_build_and_parity_on_gpu(tmp_path, qwen_ckpt, precision):
    from memrerank.export import export_model
    from memrerank.export.tensorrt import build_engine

    art = export_model(str(qwen_ckpt), tmp_path / "a", precisions=["fp32", "int8-static"], log=lambda m: None)
    build_engine(art, precision)
    entry = read_manifest(art)["engines"][precision]
    assert entry["parity"]["spearman_mean"] > 0.95
    r = Reranker.load(art, precision=precision, providers=["tensorrt"], prefix_reuse=False)
    assert np.isfinite(r.predict([("q", "d")], raw=True)).all()
