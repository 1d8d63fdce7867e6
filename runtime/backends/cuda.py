"""The few CUDA runtime calls the TensorRT engine backend needs, through ctypes (no torch, no cuda-python).

Loading fails with :data:`CUDA_HINT` when there is no CUDA runtime library or no device. Buffers belong to whoever
asked for them (no shared list): two threads never free each other's memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

import numpy as np

__all__ = ["CudaRuntime", "CUDA_HINT"]

CUDA_HINT = ("no usable NVIDIA GPU: the CUDA runtime (libcudart) or a device is missing. TensorRT engines and the "
             "CUDA/TensorRT providers need an NVIDIA GPU with its driver; on CPU use the fp32/int8 ONNX precisions.")
_H2D, _D2H = 1, 2


class CudaRuntime:
    """Device memory and copies via libcudart."""

    _instance: CudaRuntime | None = None

    def __init__(self, lib: Any) -> None:
        self.lib = lib

    @classmethod
    def load(cls) -> CudaRuntime:
        if cls._instance is not None:
            return cls._instance
        names = [ctypes.util.find_library("cudart"), "libcudart.so", "libcudart.so.12", "libcudart.so.13"]
        lib = None
        for name in filter(None, names):
            try:
                lib = ctypes.CDLL(name)
                break
            except OSError:
                continue
        if lib is None:
            raise RuntimeError(CUDA_HINT)
        count = ctypes.c_int(0)
        if lib.cudaGetDeviceCount(ctypes.byref(count)) != 0 or count.value < 1:
            raise RuntimeError(CUDA_HINT)
        cls._instance = cls(lib)
        return cls._instance

    def _check(self, code: int, what: str) -> None:
        if code != 0:
            self.lib.cudaGetErrorString.restype = ctypes.c_char_p
            raise RuntimeError(f"CUDA {what} failed: {self.lib.cudaGetErrorString(code).decode()}")

    def malloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        self._check(self.lib.cudaMalloc(ctypes.byref(ptr), ctypes.c_size_t(max(nbytes, 1))), "cudaMalloc")
        return int(ptr.value or 0)

    def free(self, ptr: int) -> None:
        self.lib.cudaFree(ctypes.c_void_p(ptr))

    def to_device(self, array: np.ndarray) -> int:
        """Copy ``array`` to a new device buffer; the caller owns it and frees it with :meth:`free`."""
        array = np.ascontiguousarray(array)
        ptr = self.malloc(array.nbytes)
        try:
            self._check(self.lib.cudaMemcpy(ctypes.c_void_p(ptr), array.ctypes.data_as(ctypes.c_void_p),
                                            ctypes.c_size_t(array.nbytes), _H2D), "cudaMemcpy H2D")
        except BaseException:
            self.free(ptr)
            raise
        return ptr

    def to_host(self, ptr: int, out: np.ndarray) -> np.ndarray:
        self._check(self.lib.cudaMemcpy(out.ctypes.data_as(ctypes.c_void_p), ctypes.c_void_p(ptr),
                                        ctypes.c_size_t(out.nbytes), _D2H), "cudaMemcpy D2H")
        return out

    def synchronize(self) -> None:
        self._check(self.lib.cudaDeviceSynchronize(), "cudaDeviceSynchronize")

    def device_name(self) -> str:
        props = ctypes.create_string_buffer(4096)  # cudaDeviceProp (~1 KB); its first field is char name[256]
        fn = getattr(self.lib, "cudaGetDeviceProperties_v2", None) or self.lib.cudaGetDeviceProperties  # CUDA 12+
        self._check(fn(props, 0), "cudaGetDeviceProperties")
        return props.raw[:256].split(b"\0", 1)[0].decode(errors="replace")

    def capability(self) -> str:
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self.lib.cudaDeviceGetAttribute(ctypes.byref(major), 75, 0), "cudaDeviceGetAttribute")
        self._check(self.lib.cudaDeviceGetAttribute(ctypes.byref(minor), 76, 0), "cudaDeviceGetAttribute")
        return f"{major.value}{minor.value}"
