"""TensorRT path: what runs without TensorRT/GPU (profiles, manifest checks, calibrator feeding, fail-fast
errors) and, marked `tensorrt`/`gpu`, the real engine build + parity (skipped here: no GPU on CI)."""

from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
import sys
import threading
import types
from concurrent.futures import ThreadPoolExecutor

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
from memrerank.manifest import EngineEntry, read_manifest, sha256_file, write_manifest


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
    names = q.precisions["fp32"].inputs
    shapes = profile_shapes(q, names, prof)
    assert shapes["input_ids"] == ((1, 1), (32, 128), (64, min(1024, q.tokens.max_length)))
    kv, hd = q.prefix_reuse.kv_heads, q.prefix_reuse.head_dim
    assert shapes["past_key.0"] == ((1, kv, 0, hd), (1, kv, 64, hd), (1, kv, 256, hd))
    b = read_manifest(bert_artifact)
    bshapes = profile_shapes(b, b.precisions["fp32"].inputs, default_profile(b))
    assert set(bshapes) == set(b.precisions["fp32"].inputs) and bshapes["input_ids"][2] == (64, 64)
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
    names = read_manifest(art).precisions["fp32"].inputs
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
    entry = EngineEntry(engine="tensorrt-fp16/model.engine", files={}, tensorrt="10.3.0", gpu="NVIDIA H100 80GB HBM3",
                        compute_capability="90", source_graph="fp32")
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
    m = json.loads((art / "manifest.json").read_text())
    m["engines"] = {"fp16": {"engine": "tensorrt-fp16/model.engine", "tensorrt": "10.3.0", "gpu": "x",
                             "compute_capability": "90", "source_graph": "fp32",
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
    entry = read_manifest(art).engines[precision]
    assert entry.parity is not None and entry.parity.spearman_mean > 0.95
    r = Reranker.load(art, precision=precision, providers=["tensorrt"], prefix_reuse=False)
    assert np.isfinite(r.predict([("q", "d")], raw=True)).all()


# ------------------------------------------------------------------ engine plumbing without TensorRT or a GPU
class HostCuda:
    """The CudaRuntime calls TensorRTBackend and build_engine make, on host memory (ctypes buffers)."""

    def __init__(self):
        self.live, self.lock = {}, threading.Lock()

    def malloc(self, nbytes):
        buf = ctypes.create_string_buffer(max(nbytes, 1))
        with self.lock:
            self.live[ctypes.addressof(buf)] = buf
        return ctypes.addressof(buf)

    def free(self, ptr):
        with self.lock:
            del self.live[ptr]  # a double free (or another thread's buffer) raises KeyError

    def to_device(self, array):
        ptr = self.malloc(array.nbytes)
        ctypes.memmove(ptr, np.ascontiguousarray(array).ctypes.data, array.nbytes)
        return ptr

    def to_host(self, ptr, out):
        ctypes.memmove(out.ctypes.data, ptr, out.nbytes)
        return out

    def synchronize(self):
        pass

    def device_name(self):
        return "Fake GPU"

    def capability(self):
        return "90"


def fake_tensorrt():
    """The TensorRT API build_engine and TensorRTBackend use; the 'engine' runs its source ONNX graph on CPU."""
    import onnxruntime as ort

    ns = types.SimpleNamespace
    trt = types.ModuleType("tensorrt")
    trt.__version__, trt.float32, trt.built = "10.0-fake", "float32", []
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    trt.MemoryPoolType, trt.TensorIOMode = ns(WORKSPACE=0), ns(INPUT="in", OUTPUT="out")
    trt.BuilderFlag = ns(FP16="FP16", INT8="INT8", OBEY_PRECISION_CONSTRAINTS="OBEY", TF32="TF32")

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.num_errors = network, 0

        def parse_from_file(self, path):
            self.network.path = path
            self.network.inputs = [i.name for i in ort.InferenceSession(path).get_inputs()]
            self.network.num_inputs, self.network.num_layers = len(self.network.inputs), 0
            self.network.get_input = lambda i: ns(name=self.network.inputs[i])
            return True

    class Config:
        def __init__(self):
            self.flags, self.profiles = {"TF32"}, []  # TensorRT's builder config starts with TF32 on
            cache = ns(serialize=lambda: b"timing")
            self.create_timing_cache, self.get_timing_cache = lambda data: cache, lambda: cache
            self.set_memory_pool_limit = self.set_timing_cache = lambda *a, **k: None
            self.set_flag, self.add_optimization_profile = self.flags.add, self.profiles.append
            self.clear_flag = self.flags.discard

    class Builder:
        def __init__(self, logger):
            self.create_network, self.create_builder_config = lambda flags: ns(), Config

        def create_optimization_profile(self):
            shapes = {}
            return ns(shapes=shapes, set_shape=lambda name, *mmm: shapes.__setitem__(name, mmm))

        def build_serialized_network(self, network, config):
            trt.built.append(config)
            return network.path.encode()

    class Context:
        def __init__(self, session):
            self.session, self.shapes, self.ptrs = session, {}, {}
            self.set_input_shape, self.set_tensor_address = self.shapes.__setitem__, self.ptrs.__setitem__

        def execute_async_v3(self, stream):
            feeds = {}
            for i in self.session.get_inputs():
                dtype = np.int64 if i.type == "tensor(int64)" else np.float32
                n = int(np.prod(self.shapes[i.name])) * np.dtype(dtype).itemsize
                raw = (ctypes.c_char * n).from_address(self.ptrs[i.name])
                feeds[i.name] = np.frombuffer(raw, dtype).reshape(self.shapes[i.name]).copy()
            out = np.ascontiguousarray(self.session.run(["logits"], feeds)[0], dtype=np.float32)
            ctypes.memmove(self.ptrs["logits"], out.ctypes.data, out.nbytes)
            return True

    def engine(blob):
        session = ort.InferenceSession(blob.decode(), providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()] + [o.name for o in session.get_outputs()]
        return ns(num_io_tensors=len(names), get_tensor_name=names.__getitem__,
                  get_tensor_mode=lambda n: "in" if n in names[:len(session.get_inputs())] else "out",
                  create_execution_context=lambda: Context(session))

    trt.OnnxParser, trt.Builder = OnnxParser, Builder
    trt.Runtime = lambda logger: ns(deserialize_cuda_engine=engine)
    return trt


def test_engine_build_manifest_load_and_parity_without_tensorrt(bert_artifact, tmp_path, monkeypatch):
    from memrerank.export import tensorrt as export_trt
    from memrerank.runtime.backends.cuda import CudaRuntime
    from memrerank.runtime.backends.tensorrt import TensorRTBackend

    art = tmp_path / "a"
    shutil.copytree(bert_artifact, art)
    trt, cuda, writes = fake_tensorrt(), HostCuda(), []
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(CudaRuntime, "load", classmethod(lambda cls: cuda))
    monkeypatch.setattr(export_trt, "write_manifest", lambda root, m: writes.append(m) or write_manifest(root, m))
    path = export_trt.build_engine(art, "fp16", log=lambda m: None)

    assert len(writes) == 1, "the manifest is written once, after the parity check"
    (config,) = trt.built
    assert {"FP16", "OBEY"} <= config.flags and config.profiles[0].shapes["input_ids"] == ((1, 1), (32, 64), (64, 64))
    assert "TF32" not in config.flags, "TF32 (on by default in TensorRT) is cleared unless allow_tf32=True"
    m = read_manifest(art)
    assert "fp16" not in m.precisions and set(m.engines) == {"fp16"}
    entry = m.engines["fp16"]
    assert (entry.engine, entry.tensorrt, entry.gpu, entry.compute_capability, entry.source_graph) == (
        "tensorrt-fp16/model.engine", "10.0-fake", "Fake GPU", "90", "fp32")
    assert set(entry.files) == {"tensorrt-fp16/model.engine", "tensorrt-fp16/timing.cache"}
    assert entry.files[entry.engine].sha256 == sha256_file(path)
    assert entry.parity is not None and entry.parity.reference == "fp32 onnx"
    assert entry.parity.max_abs_logit_diff < 1e-6 and entry.parity.spearman_mean == pytest.approx(1.0)

    engine = Reranker.load(art, "fp16", providers=["tensorrt"], prefix_reuse=False)
    fp32 = Reranker.load(art, "fp32")
    assert isinstance(engine.backend, TensorRTBackend)
    groups = [[(f"question {t}", f"memory {t} {i} " * (1 + i)) for i in range(5 + t)] for t in range(4)]
    barrier = threading.Barrier(len(groups))

    def score(pairs):
        barrier.wait()
        return [engine.predict(pairs, raw=True) for _ in range(5)]

    with ThreadPoolExecutor(len(groups)) as pool:
        results = list(pool.map(score, groups))
    for pairs, runs in zip(groups, results):
        for got in runs:
            np.testing.assert_allclose(got, fp32.predict(pairs, raw=True), atol=1e-6)
    assert cuda.live == {}, "every call frees exactly its own buffers"


def test_engine_builder_clears_tf32_unless_allowed(bert_artifact, tmp_path, monkeypatch):
    """TensorRT turns BuilderFlag.TF32 on by default; the engine keeps fp32 products in fp32 (as the CUDA provider
    runs them with allow_tf32=False) unless allow_tf32=True, which the manifest's method names. allow_tf32 must
    be a bool: a string such as "false" is refused before anything is built."""
    from memrerank.export import tensorrt as export_trt
    from memrerank.runtime.backends.cuda import CudaRuntime

    art = tmp_path / "a"
    shutil.copytree(bert_artifact, art)
    trt = fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(CudaRuntime, "load", classmethod(lambda cls: HostCuda()))
    export_trt.build_engine(art, "fp16", log=lambda m: None)
    assert read_manifest(art).engines["fp16"].method.endswith("TF32 off")
    export_trt.build_engine(art, "fp16", log=lambda m: None, allow_tf32=True)
    assert read_manifest(art).engines["fp16"].method.endswith("TF32 allowed")
    off, on = trt.built
    assert "TF32" not in off.flags and "TF32" in on.flags
    for bad in ("false", 1, None):
        with pytest.raises(TypeError, match=r"allow_tf32 must be True or False, got"):
            export_trt.build_engine(art, "fp16", log=lambda m: None, allow_tf32=bad)
    assert len(trt.built) == 2, "a bad allow_tf32 is refused before TensorRT builds anything"
