"""ONNX Runtime backend: one InferenceSession over an artifact's graph."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from memrerank.errors import ArtifactError, ProviderError
from memrerank.manifest import CacheLayout
from memrerank.runtime.backends.base import CPU_BUDGET, GPU_BUDGET, BatchBudget, PrefixCache, empty_past

__all__ = ["PROVIDER_ALIASES", "LOADS_EXTERNAL_DATA_FROM_BYTES", "resolve_providers", "OrtBackend"]

#: Short names accepted for ``providers=`` besides onnxruntime's full provider names.
PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "dml": "DmlExecutionProvider",
}

def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


#: Whether this onnxruntime finds a graph's external data when the graph comes as bytes (the session option
#: ``session.model_external_initializers_file_folder_path``, onnxruntime 1.21): the graph is then parsed from
#: the very bytes that were hash-checked (:func:`memrerank.manifest.load_verified`).
LOADS_EXTERNAL_DATA_FROM_BYTES = _version(ort.__version__) >= (1, 21)

#: Providers whose calls are GPU kernel launches: they get the GPU batch budget, every other the CPU's.
_GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def provider_name(provider: str) -> str:
    """An alias (``"cuda"``) or a full onnxruntime provider name → the full name."""
    return PROVIDER_ALIASES.get(provider.lower(), provider)


def resolve_providers(providers: Sequence[str] | str | None) -> list[str]:
    """Map aliases to provider names and check each is available; never falls back silently.

    Raises:
        ProviderError: listing the providers this onnxruntime build has.
    """
    if providers is None:
        return ["CPUExecutionProvider"]
    if isinstance(providers, str):
        providers = [p for p in providers.split(",") if p.strip()] or [providers]
    names = []
    for p in providers:
        if not isinstance(p, str):
            raise TypeError(f"providers: expected provider names (str), got {type(p).__name__}")
        names.append(provider_name(p.strip()))
    if not names:
        raise ProviderError("providers: empty list; pass None for CPU or e.g. ['cuda']")
    available = ort.get_available_providers()
    for asked, name in zip(providers, names):
        if name not in available:
            raise ProviderError(
                f"providers: {asked!r} is not available in this onnxruntime build; available: {', '.join(available)}"
                " (install onnxruntime-gpu for CUDA/TensorRT)"
            )
    return names


class OrtBackend:
    """Runs a reranker graph whose first output is one logit per row (see :class:`~.base.Backend`).

    Args:
        path: the ONNX graph.
        providers: onnxruntime providers or aliases; ``None`` = CPU.
        threads: intra-op threads (``None`` = onnxruntime's default).
        layout: the artifact's prefix-reuse layout (decoder graphs with a shared past), else ``None``.
        allow_tf32: CUDA only: let fp32 matrix products use TF32 (faster, but logits move by ~1e-3).
        model: the graph's bytes, already read (and hash-checked): the session is built from them, not by opening
            ``path`` again; ``path`` then names the graph in messages and its folder is where onnxruntime finds
            the external weight data. ``None``: onnxruntime opens ``path``.
    """

    def __init__(self, path: str | Path, providers: Sequence[str] | str | None = None, threads: int | None = None,
                 layout: CacheLayout | None = None, *, allow_tf32: bool = False, model: bytes | None = None) -> None:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = int(threads)
        opts.log_severity_level = 3
        if model is not None:
            opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                          str(Path(path).resolve().parent))
        asked = resolve_providers(providers)
        options = [{"use_tf32": "1" if allow_tf32 else "0"} if p == "CUDAExecutionProvider" else {} for p in asked]
        try:
            self.session = ort.InferenceSession(str(path) if model is None else model, sess_options=opts,
                                                providers=asked, provider_options=options)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ArtifactError(
                f"onnxruntime could not load {path}: {exc}; re-export with `memrerank export MODEL -o OUT --force`"
            ) from exc
        # onnxruntime drops a provider whose libraries fail to load (no CUDA/cuDNN, no device) and carries on
        # with the rest: check what the session really runs on.
        got = self.session.get_providers()
        dropped = [p for p in asked if p not in got]
        if dropped:
            raise ProviderError(
                f"providers: onnxruntime could not start {', '.join(dropped)} (the session runs on "
                f"{', '.join(got)}): its libraries (CUDA, cuDNN, TensorRT) or the device are missing; see "
                "onnxruntime's log with ORT_LOGGING_LEVEL=0, or ask for providers=['cpu']")
        self.providers: list[str] = [p for p in asked if p in got]
        self.budget: BatchBudget = GPU_BUDGET if self.providers[0] in _GPU_PROVIDERS else CPU_BUDGET
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_name = self.session.get_outputs()[0].name
        # Decoder graphs take an optional shared past (batch 1) per layer: past_key.{i} / past_value.{i}.
        self.past_names = [n for n in self.input_names if n.startswith(("past_key.", "past_value."))]
        self.present_names = [o.name for o in self.session.get_outputs()
                              if o.name.startswith(("present_key.", "present_value."))]
        unknown = set(self.input_names) - {"input_ids", "attention_mask", "token_type_ids"} - set(self.past_names)
        if unknown:
            raise ArtifactError(f"{path} expects inputs {sorted(unknown)} that memrerank does not provide")
        if self.past_names:
            if layout is None:
                raise ArtifactError(f"{path} takes a past but the manifest has no prefix_reuse layout; re-export "
                                    "with `memrerank export MODEL -o OUT --force`")
            missing = sorted(set(self.past_names) - set(layout.past_names))
            if missing:
                raise ArtifactError(f"{path}: past inputs {missing[:3]} do not match the manifest's layout "
                                    f"({layout.layers} layers); re-export the artifact")
        self._empty_past = empty_past(layout, self.past_names) if self.past_names else {}

    @property
    def has_past(self) -> bool:
        """Whether the graph can reuse a shared prefix (takes past inputs and returns presents)."""
        return bool(self.past_names) and len(self.present_names) == len(self.past_names)

    def empty_past(self) -> dict[str, np.ndarray]:
        return dict(self._empty_past)

    def score(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray | None = None,
              past: PrefixCache | None = None) -> np.ndarray:
        """Logits, one per row; ``past`` is a prefix cache from :meth:`prefix` shared by every row."""
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "token_type_ids" in self.input_names:
            feeds["token_type_ids"] = token_type_ids if token_type_ids is not None else np.zeros_like(input_ids)
        feeds = {k: v for k, v in feeds.items() if k in self.input_names}
        if self.past_names:
            feeds.update(past if past is not None else self._empty_past)
        out = self.session.run([self.output_name], feeds)[0]
        return np.asarray(out, dtype=np.float32).reshape(len(input_ids))

    def prefix(self, ids: np.ndarray) -> PrefixCache:
        """Run the shared prefix once (batch 1) and return its cache, keyed by the past input names."""
        if not self.has_past:
            raise ArtifactError("this graph has no past inputs; re-export the artifact to get prefix reuse")
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), **self._empty_past}
        outs = self.session.run(self.present_names, feeds)
        return {name.replace("present_", "past_", 1): value for name, value in zip(self.present_names, outs)}
