"""TensorRT engine backend: runs ``OUT/tensorrt-<precision>/model.engine`` (built by ``memrerank build-engine``).

Same call contract as :class:`memrerank.runtime.backends.onnxruntime.OrtBackend` (logits per row; optional
shared past for prefix reuse). Needs the ``tensorrt`` package and an NVIDIA GPU; without them loading fails fast
with the install hint. The engine's manifest entry is checked against this machine's TensorRT version and GPU
before deserializing (engines are not portable).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["TensorRTBackend"]

class TensorRTBackend:
    """One TensorRT execution context over a serialized engine."""

    def __init__(self, root: Path, precision: str, entry: dict[str, Any], manifest: dict[str, Any]) -> None:
        from memrerank.export.tensorrt import check_engine_compat, require_tensorrt
        from memrerank.runtime.backends.cuda import CudaRuntime

        trt = require_tensorrt()
        self.cuda = CudaRuntime.load()
        check_engine_compat(entry, trt_version=trt.__version__, gpu=self.cuda.device_name(),
                            capability=self.cuda.capability(), root=root, precision=precision)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine((root / entry["engine"]).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {root / entry['engine']}; rebuild it with "
                               f"`memrerank build-engine {root} --precision {precision}`")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_name = "logits"
        self.providers = ["TensorRT engine"]
        layout = manifest.get("prefix_reuse") or {}
        self.past_names = [n for n in self.input_names if n.startswith(("past_key.", "past_value."))]
        self._empty_past = {n: np.zeros((1, layout.get("kv_heads", 1), 0, layout.get("head_dim", 1)), np.float32)
                            for n in self.past_names}
        self.has_past = False  # the engine's profile fixes the past range; prefix reuse runs on ONNX Runtime

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray | None,
                 past: dict[str, np.ndarray] | None = None) -> np.ndarray:
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "token_type_ids" in self.input_names:
            feeds["token_type_ids"] = token_type_ids if token_type_ids is not None else np.zeros_like(input_ids)
        feeds.update(past if past is not None else self._empty_past)
        for name in self.input_names:
            array = np.ascontiguousarray(feeds[name])
            self.context.set_input_shape(name, array.shape)
            self.context.set_tensor_address(name, self.cuda.to_device(array))
        out = np.empty((len(input_ids), 1), dtype=np.float32)
        out_ptr = self.cuda.malloc(out.nbytes)
        try:
            self.context.set_tensor_address(self.output_name, out_ptr)
            for i in range(self.engine.num_io_tensors):  # present_* outputs: scratch buffers
                name = self.engine.get_tensor_name(i)
                if name not in self.input_names and name != self.output_name:
                    shape = self.context.get_tensor_shape(name)
                    self.context.set_tensor_address(name, self.cuda.to_device(np.zeros(tuple(shape), np.float32)))
            if not self.context.execute_async_v3(0):
                raise RuntimeError("TensorRT execution failed")
            self.cuda.synchronize()
            self.cuda.to_host(out_ptr, out)
        finally:
            self.cuda.free(out_ptr)
            self.cuda.release()
        return out.reshape(len(input_ids))

    def prefix(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        raise RuntimeError("prefix reuse is not available on TensorRT engines; load with prefix_reuse=False")
