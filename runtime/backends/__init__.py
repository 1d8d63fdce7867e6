"""Execution backends: each implements :class:`~memrerank.runtime.backends.base.Backend`.

:func:`open_backend` picks the implementation for an artifact precision and the providers asked for: a TensorRT
engine when the first provider is TensorRT and the artifact has an engine of that precision, else an ONNX Runtime
session (CPU, CUDA, ...) over the precision's graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from memrerank.errors import ArtifactError, ProviderError
from memrerank.manifest import Manifest, verify_files
from memrerank.runtime.backends.base import Backend, PrefixCache, empty_past
from memrerank.runtime.backends.onnxruntime import PROVIDER_ALIASES, provider_name, resolve_providers

__all__ = ["Backend", "PrefixCache", "empty_past", "open_backend", "wants_tensorrt", "resolve_providers",
           "PROVIDER_ALIASES"]


def wants_tensorrt(providers: Sequence[str] | str | None) -> bool:
    """Whether the first provider asked for is TensorRT (alias or onnxruntime name)."""
    if providers is None:
        return False
    names = [p for p in providers.split(",") if p.strip()] if isinstance(providers, str) else list(providers)
    return bool(names) and isinstance(names[0], str) and provider_name(names[0].strip()) == "TensorrtExecutionProvider"


def open_backend(root: Path, manifest: Manifest, precision: str, providers: Sequence[str] | str | None = None,
                 threads: int | None = None, *, allow_tf32: bool = False, io_binding: bool | None = None) -> Backend:
    """The backend that runs ``precision`` of the artifact at ``root`` on ``providers`` (files verified first).

    ``io_binding``: bind inputs/outputs on the provider's device and keep the prefix cache there
    (:class:`~memrerank.runtime.backends.iobinding.BoundOrtBackend`); ``None`` = on for device providers (CUDA),
    off on the CPU, where plain ``run`` copies nothing anyway.

    Raises:
        ArtifactError: the precision is not in the artifact, or its files are missing or altered.
        ProviderError: a provider is unavailable, or TensorRT / the GPU is missing for an engine.
    """
    engine = manifest.engines.get(precision)
    if engine is not None and wants_tensorrt(providers):
        from memrerank.runtime.backends.tensorrt import TensorRTBackend

        verify_files(root, engine.files)
        try:
            return TensorRTBackend(root, precision, engine, manifest.prefix_reuse)
        except RuntimeError as exc:
            raise ProviderError(f"providers: 'tensorrt' asked for, but {exc}") from exc
    if precision not in manifest.precisions and precision in manifest.engines:
        raise ArtifactError(f"{root}: {precision!r} exists only as a TensorRT engine; load it with "
                            "providers=['tensorrt'] (--providers tensorrt)")
    entry = manifest.precision(precision)
    verify_files(root, entry.files)
    names = resolve_providers(providers)
    if io_binding is None:
        io_binding = names[0] != "CPUExecutionProvider"
    if io_binding:
        from memrerank.runtime.backends.iobinding import BoundOrtBackend as cls
    else:
        from memrerank.runtime.backends.onnxruntime import OrtBackend as cls
    return cls(root / entry.graph, providers=names, threads=threads, layout=manifest.prefix_reuse,
               allow_tf32=allow_tf32)
