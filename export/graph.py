"""Graph export through Optimum's ONNX exporter.

The folded-head decoder graph is not a task Optimum knows (its Qwen3 configs export text generation with
full-vocabulary logits at every position), so it goes through Optimum's ``export`` with a custom OnnxConfig
(:meth:`DecoderYesNoFamily.onnx_config`); encoders use Optimum's own ``text-classification`` config. Optimum
moves weights to one external-data file when the graph passes protobuf's 2 GB limit.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

__all__ = ["export_onnx", "DEFAULT_OPSET"]

DEFAULT_OPSET = 17
_log = logging.getLogger(__name__)


def export_onnx(module: Any, onnx_config: Any, path: Path, opset: int = DEFAULT_OPSET) -> list[Path]:
    """Export ``module`` to ``path``; return the files written (graph first, then external data)."""
    import warnings

    from optimum.exporters.onnx.convert import export

    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about python-side shape values are expected here
        export(model=module, config=onnx_config, output=path, opset=opset)
    return sorted(path.parent.iterdir(), key=lambda p: (p != path, p.name))
