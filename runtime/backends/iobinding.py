"""ONNX Runtime with IO binding: the backend for device providers (CUDA through onnxruntime-gpu).

Plain ``session.run`` copies every input to the device and every output back to the host on each call; for prefix
reuse that means the prefix cache (layers × 2 tensors) makes a host round trip for every batch of the query. Here
inputs go to the device once per call, the prefix pass's ``present_*`` outputs stay on the device as ``OrtValue``
objects and are bound as the ``past_*`` inputs of every batch of that query, and only the logits come back.

The same code runs with ``device="cpu"`` (what the tests check on machines without a GPU: same scores as
:class:`~memrerank.runtime.backends.onnxruntime.OrtBackend`, cache never converted to numpy).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from memrerank.errors import ArtifactError
from memrerank.manifest import CacheLayout
from memrerank.runtime.backends.base import PrefixCache
from memrerank.runtime.backends.onnxruntime import OrtBackend

__all__ = ["BoundOrtBackend", "DEVICE_OF_PROVIDER"]

#: onnxruntime device name of the memory each provider computes in.
DEVICE_OF_PROVIDER = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda",
                      "CPUExecutionProvider": "cpu"}


class BoundOrtBackend(OrtBackend):
    """:class:`OrtBackend` whose calls go through ``io_binding`` on the first provider's device.

    Args:
        device: onnxruntime device name (``"cuda"``, ``"cpu"``); default: the first provider's.
        device_id: which device.
        (other arguments as :class:`OrtBackend`)
    """

    def __init__(self, path: str | Path, providers: Sequence[str] | str | None = None, threads: int | None = None,
                 layout: CacheLayout | None = None, *, allow_tf32: bool = False, device: str | None = None,
                 device_id: int = 0, model: bytes | None = None) -> None:
        super().__init__(path, providers, threads, layout, allow_tf32=allow_tf32, model=model)
        self.device = device or DEVICE_OF_PROVIDER.get(self.providers[0], "cpu")
        self.device_id = device_id
        # The empty past lives on the device too: bound, not copied, on every whole-pair call.
        self._empty_values = {n: self._to_device(v) for n, v in self._empty_past.items()}

    def _to_device(self, array: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, self.device_id)

    def _bind_inputs(self, binding: ort.IOBinding, feeds: dict[str, np.ndarray], past: PrefixCache | None) -> None:
        for name, array in feeds.items():
            binding.bind_ortvalue_input(name, self._to_device(array))
        for name, value in (past if past is not None else self._empty_values).items():
            if not isinstance(value, ort.OrtValue):
                raise ArtifactError(f"{type(self).__name__}: past {name} is a {type(value).__name__}, not a cache "
                                    "from this backend's prefix(); build the cache with the same backend")
            binding.bind_ortvalue_input(name, value)

    def score(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray | None = None,
              past: PrefixCache | None = None) -> np.ndarray:
        """Logits, one per row; ``past`` (device-resident, from :meth:`prefix`) is bound, never copied."""
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "token_type_ids" in self.input_names:
            feeds["token_type_ids"] = token_type_ids if token_type_ids is not None else np.zeros_like(input_ids)
        binding = self.session.io_binding()
        self._bind_inputs(binding, {k: v for k, v in feeds.items() if k in self.input_names},
                          past if self.past_names else {})
        binding.bind_output(self.output_name, self.device, self.device_id)
        for name in self.present_names:  # the whole-pair pass's presents are not needed: leave them on the device
            binding.bind_output(name, self.device, self.device_id)
        self.session.run_with_iobinding(binding)
        out = binding.get_outputs()[0].numpy()
        return np.asarray(out, dtype=np.float32).reshape(len(input_ids))

    def prefix(self, ids: np.ndarray) -> PrefixCache:
        """Run the shared prefix once; its keys/values stay on the device as ``OrtValue`` objects."""
        if not self.has_past:
            raise ArtifactError("this graph has no past inputs; re-export the artifact to get prefix reuse")
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        binding = self.session.io_binding()
        self._bind_inputs(binding, {"input_ids": ids, "attention_mask": np.ones_like(ids)}, None)
        binding.bind_output(self.output_name, self.device, self.device_id)
        for name in self.present_names:
            binding.bind_output(name, self.device, self.device_id)
        self.session.run_with_iobinding(binding)
        values = binding.get_outputs()
        names = [self.output_name, *self.present_names]
        return {name.replace("present_", "past_", 1): value for name, value in zip(names, values)
                if name in self.present_names}
