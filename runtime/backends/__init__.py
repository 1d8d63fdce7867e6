"""Execution backends: each implements :class:`~memrerank.runtime.backends.base.Backend`.

:func:`open_backend` picks the implementation for an artifact precision and the providers asked for: a TensorRT
engine when the first provider is TensorRT and the artifact has an engine of that precision, else an ONNX Runtime
session (CPU, CUDA, ...) over the precision's graph.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from memrerank.errors import ArtifactError, ProviderError
from memrerank.manifest import Manifest, artifact_path, is_weight_data, load_verified
from memrerank.runtime.backends.base import Backend, BatchBudget, PrefixCache, empty_past
from memrerank.runtime.backends.onnxruntime import (
    LOADS_EXTERNAL_DATA_FROM_BYTES,
    PROVIDER_ALIASES,
    resolve_providers,
)

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
        ArtifactError: the precision is not in the artifact, or its files are outside it, missing, altered or
            changed while loading.
        ProviderError: a provider is unavailable, or TensorRT / the GPU is missing for an engine.
    """
    precision = options.precision
    engine = manifest.engines.get(precision)
    if engine is not None and options.wants_tensorrt:
        from memrerank.runtime.backends.tensorrt import TensorRTBackend

        def deserialize(contents: Mapping[str, bytes]) -> TensorRTBackend:
            try:  # the engine bytes that were hashed are the bytes deserialized
                return TensorRTBackend(root, precision, engine, manifest.prefix_reuse, blob=contents[engine.engine])
            except RuntimeError as exc:
                raise ProviderError(f"providers: 'tensorrt' asked for, but {exc}") from exc

        return load_verified(root, engine.files, deserialize)
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
    graph = artifact_path(root, entry.graph)
    # The graph's bytes are read once, hash-checked and handed to onnxruntime; its external weight data, which
    # onnxruntime opens by path beside the graph, is hashed on a thread while the session is built and must still
    # be the file that was hashed afterwards (memrerank.manifest.load_verified). An onnxruntime that cannot find
    # external data for a graph given as bytes (before 1.21) opens the graph by path too, under the same check.
    external = any(is_weight_data(rel) for rel in entry.files)
    by_path = (entry.graph,) if external and not LOADS_EXTERNAL_DATA_FROM_BYTES else ()
    return load_verified(root, entry.files, lambda contents: cls(
        graph, providers=names, threads=options.threads, layout=manifest.prefix_reuse,
        allow_tf32=options.allow_tf32, model=contents.get(entry.graph)), by_path=by_path)
