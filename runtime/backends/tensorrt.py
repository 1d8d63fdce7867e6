"""TensorRT engine backend: runs ``OUT/tensorrt-<precision>/model.engine`` (built by ``memrerank build-engine``).

Implements :class:`~memrerank.runtime.backends.base.Backend` over whole pairs (the engine's profile fixes the past
range; prefix reuse runs on ONNX Runtime). Needs the ``tensorrt`` package and an NVIDIA GPU; without them loading
fails fast with :data:`INSTALL_HINT`. The engine's manifest entry is checked against this machine's TensorRT
version and GPU before deserializing (engines are not portable): :func:`check_engine_compat`. The exporter
(``memrerank.export.tensorrt``) uses the same hint and check; the runtime never imports the exporter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from memrerank.errors import ArtifactError
from memrerank.manifest import CacheLayout, EngineEntry
from memrerank.runtime.backends.base import GPU_BUDGET, BatchBudget, PrefixCache, empty_past

__all__ = ["INSTALL_HINT", "TensorRTBackend", "check_engine_compat", "require_tensorrt"]

INSTALL_HINT = ("TensorRT is not available: it needs an NVIDIA GPU with its driver and the TensorRT Python package "
                "from NVIDIA's index — pip install 'memrerank[tensorrt]' --extra-index-url https://pypi.nvidia.com "
                "(see the README's 'GPU and TensorRT' section). On CPU use the fp32/int8 ONNX precisions.")


def require_tensorrt() -> Any:
    """Import TensorRT and check a CUDA device exists; raise RuntimeError with :data:`INSTALL_HINT` otherwise."""
    try:
        import tensorrt as trt  # type: ignore[import-not-found]
    except ImportError as exc:
        raise RuntimeError(INSTALL_HINT) from exc
    from memrerank.runtime.backends.cuda import CudaRuntime

    CudaRuntime.load()  # raises with the hint when no driver/device
    return trt


def check_engine_compat(entry: EngineEntry, *, trt_version: str, gpu: str, capability: str, root: Path,
                        precision: str) -> None:
    """Refuse an engine built for another GPU or TensorRT version, saying how to rebuild it."""
    problems = []
    if entry.tensorrt != trt_version:
        problems.append(f"TensorRT {entry.tensorrt} (this machine has {trt_version})")
    if entry.compute_capability != capability or entry.gpu != gpu:
        problems.append(f"{entry.gpu} sm_{entry.compute_capability} (this machine: {gpu} sm_{capability})")
    if problems:
        raise ArtifactError(
            f"{root}: the {precision} TensorRT engine was built for " + " and ".join(problems) +
            f"; engines are not portable — rebuild it here with `memrerank build-engine {root} --precision "
            f"{precision}`")


class TensorRTBackend:
    """One TensorRT execution context over a serialized engine.

    ``blob``: the engine's bytes, already read and hash-checked (:func:`memrerank.manifest.load_verified`);
    ``None`` reads ``root / entry.engine``.
    """

    def __init__(self, root: Path, precision: str, entry: EngineEntry, layout: CacheLayout | None, *,
                 blob: bytes | None = None) -> None:
        import threading

        from memrerank.runtime.backends.cuda import CudaRuntime

        trt = require_tensorrt()
        self.cuda = CudaRuntime.load()
        check_engine_compat(entry, trt_version=trt.__version__, gpu=self.cuda.device_name(),
                            capability=self.cuda.capability(), root=root, precision=precision)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        if blob is None:
            blob = (root / entry.engine).read_bytes()
        self.engine = runtime.deserialize_cuda_engine(blob)
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {root / entry.engine}; rebuild it with "
                               f"`memrerank build-engine {root} --precision {precision}`")
        self.context = self.engine.create_execution_context()
        # One execution context holds shapes and addresses between set_* and execute: one call at a time.
        self._lock = threading.Lock()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]
        self.output_name = "logits"
        self.providers = ["TensorRT engine"]
        self.budget: BatchBudget = GPU_BUDGET
        self.past_names = [n for n in self.input_names if n.startswith(("past_key.", "past_value."))]
        self._empty_past = empty_past(layout, self.past_names) if self.past_names else {}

    @property
    def has_past(self) -> bool:
        return False  # the engine's profile fixes the past range; prefix reuse runs on ONNX Runtime

    def empty_past(self) -> dict[str, np.ndarray]:
        return dict(self._empty_past)

    def score(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray | None = None,
              past: PrefixCache | None = None) -> np.ndarray:
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "token_type_ids" in self.input_names:
            feeds["token_type_ids"] = token_type_ids if token_type_ids is not None else np.zeros_like(input_ids)
        feeds.update(past if past is not None else self._empty_past)
        out = np.empty((len(input_ids), 1), dtype=np.float32)
        buffers: list[int] = []  # this call's device memory, freed before it returns
        with self._lock:
            try:
                for name in self.input_names:
                    array = np.ascontiguousarray(feeds[name])
                    self.context.set_input_shape(name, array.shape)
                    buffers.append(self.cuda.to_device(array))
                    self.context.set_tensor_address(name, buffers[-1])
                out_ptr = self.cuda.malloc(out.nbytes)
                buffers.append(out_ptr)
                self.context.set_tensor_address(self.output_name, out_ptr)
                for name in self.output_names:  # present_* outputs: scratch buffers
                    if name != self.output_name:
                        shape = tuple(self.context.get_tensor_shape(name))
                        buffers.append(self.cuda.malloc(int(np.prod(shape)) * 4))
                        self.context.set_tensor_address(name, buffers[-1])
                if not self.context.execute_async_v3(0):
                    raise RuntimeError("TensorRT execution failed")
                self.cuda.synchronize()
                self.cuda.to_host(out_ptr, out)
            finally:
                for ptr in buffers:
                    self.cuda.free(ptr)
        return out.reshape(len(input_ids))

    def prefix(self, ids: np.ndarray) -> PrefixCache:
        raise RuntimeError("prefix reuse is not available on TensorRT engines; load with prefix_reuse=False")
