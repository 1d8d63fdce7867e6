"""Execution backends: each implements :class:`~memrerank.runtime.backends.base.Backend`.

:func:`open_backend` picks the implementation for an artifact precision and the providers asked for: a TensorRT
engine when the first provider is TensorRT and the artifact has an engine of that precision, else an ONNX Runtime
session (CPU, CUDA, ...) over the precision's graph.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from memrerank.errors import ArtifactError, ProviderError
from memrerank.manifest import Manifest, verify_files, verify_files_while
from memrerank.runtime.backends.base import Backend, BatchBudget, PrefixCache, empty_past
from memrerank.runtime.backends.onnxruntime import PROVIDER_ALIASES, resolve_providers

if TYPE_CHECKING:
    from memrerank.runtime.options import LoadOptions

__all__ = ["Backend", "BatchBudget", "PrefixCache", "empty_past", "open_backend", "resolve_providers",
           "PROVIDER_ALIASES"]


def open_backend(root: Path, manifest: Manifest, options: LoadOptions) -> Backend:
    """The backend that runs ``options.precision`` of the artifact at ``root`` on ``options.providers`` (files
    verified first; ``precision`` must be resolved, not ``"auto"``).

    ``options.io_binding``: bind inputs/outputs on the provider's device and keep the prefix cache there
    (:class:`~memrerank.runtime.backends.iobinding.BoundOrtBackend`); ``None`` = on for device providers (CUDA),
    off on the CPU, where plain ``run`` copies nothing anyway.

    Raises:
        ArtifactError: the precision is not in the artifact, or its files are missing or altered.
        ProviderError: a provider is unavailable, or TensorRT / the GPU is missing for an engine.
    """
    precision = options.precision
    engine = manifest.engines.get(precision)
    if engine is not None and options.wants_tensorrt:
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
    names = resolve_providers(options.providers)
    io_binding = names[0] != "CPUExecutionProvider" if options.io_binding is None else options.io_binding
    if io_binding:
        from memrerank.runtime.backends.iobinding import BoundOrtBackend as cls
    else:
        from memrerank.runtime.backends.onnxruntime import OrtBackend as cls
    # the graph is hash-checked before onnxruntime parses it; its weight data while the session is built
    return verify_files_while(root, entry.files, lambda: cls(
        root / entry.graph, providers=names, threads=options.threads, layout=manifest.prefix_reuse,
        allow_tf32=options.allow_tf32))
