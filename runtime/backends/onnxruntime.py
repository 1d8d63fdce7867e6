"""ONNX Runtime backend: one InferenceSession over an artifact's graph."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from memrerank.errors import ArtifactError, ProviderError

__all__ = ["PROVIDER_ALIASES", "resolve_providers", "OrtBackend"]

#: Short names accepted for ``providers=`` besides onnxruntime's full provider names.
PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "dml": "DmlExecutionProvider",
}


def resolve_providers(providers: Sequence[str] | str | None) -> list[str]:
    """Map aliases to provider names and check each is available; never falls back silently.

    Raises:
        ProviderError: listing the providers this onnxruntime build has.
    """
    if providers is None:
        return ["CPUExecutionProvider"]
    if isinstance(providers, str):
        providers = [providers]
    available = ort.get_available_providers()
    names = [PROVIDER_ALIASES.get(p.lower(), p) if isinstance(p, str) else p for p in providers]
    if not names:
        raise ProviderError("providers: empty list; pass None for CPU or e.g. ['cuda']")
    for asked, name in zip(providers, names):
        if name not in available:
            raise ProviderError(
                f"providers: {asked!r} is not available in this onnxruntime build; available: {', '.join(available)}"
                " (install onnxruntime-gpu for CUDA/TensorRT)"
            )
    return names


class OrtBackend:
    """Runs a reranker graph whose single output is one logit per row."""

    def __init__(self, path: str | Path, providers: Sequence[str] | str | None = None, threads: int | None = None):
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = int(threads)
        opts.log_severity_level = 3
        self.providers = resolve_providers(providers)
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=self.providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ArtifactError(
                f"onnxruntime could not load {path}: {exc}; re-export with `memrerank export MODEL -o OUT --force`"
            ) from exc
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_name = self.session.get_outputs()[0].name
        # Decoder graphs take an optional shared past (batch 1) per layer: past_key.{i} / past_value.{i}.
        self.past_names = [n for n in self.input_names if n.startswith(("past_key.", "past_value."))]
        self.present_names = [o.name for o in self.session.get_outputs()
                              if o.name.startswith(("present_key.", "present_value."))]
        unknown = set(self.input_names) - {"input_ids", "attention_mask", "token_type_ids"} - set(self.past_names)
        if unknown:
            raise ArtifactError(f"{path} expects inputs {sorted(unknown)} that memrerank does not provide")
        self._empty_past: dict[str, np.ndarray] = {}
        for i in self.session.get_inputs():
            if i.name in self.past_names:
                shape = [d if isinstance(d, int) else 0 for d in i.shape]
                if len(shape) != 4 or shape[1] < 1 or shape[3] < 1:
                    raise ArtifactError(f"{path}: past input {i.name} has unexpected shape {i.shape}")
                shape[0], shape[2] = 1, 0
                self._empty_past[i.name] = np.zeros(shape, dtype=np.float32)

    @property
    def has_past(self) -> bool:
        """Whether the graph can reuse a shared prefix (takes past inputs and returns presents)."""
        return bool(self.past_names) and len(self.present_names) == len(self.past_names)

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray | None,
                 past: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """Logits, one per row; ``past`` is a prefix cache from :meth:`prefix` shared by every row."""
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "token_type_ids" in self.input_names:
            feeds["token_type_ids"] = token_type_ids if token_type_ids is not None else np.zeros_like(input_ids)
        feeds = {k: v for k, v in feeds.items() if k in self.input_names}
        if self.past_names:
            feeds.update(past if past is not None else self._empty_past)
        out = self.session.run([self.output_name], feeds)[0]
        return np.asarray(out, dtype=np.float32).reshape(len(input_ids))

    def prefix(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Run the shared prefix once (batch 1) and return its cache, keyed by the past input names."""
        if not self.has_past:
            raise ArtifactError("this graph has no past inputs; re-export the artifact to get prefix reuse")
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), **self._empty_past}
        outs = self.session.run(self.present_names, feeds)
        return {name.replace("present_", "past_", 1): value for name, value in zip(self.present_names, outs)}
