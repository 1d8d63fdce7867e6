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

__all__ = ["export_onnx", "DEFAULT_OPSET", "EXTERNAL_DATA_BYTES"]

DEFAULT_OPSET = 17
#: Graphs whose weights pass this many bytes keep them in one external-data file (``model.onnx_data``).
#: Protobuf cannot serialize a message above 2 GiB, so every later step (fp16 conversion, quantizers, shape
#: inference) then works through file paths, never an in-memory copy; tests lower this to run that path on
#: tiny models.
EXTERNAL_DATA_BYTES = 2**30
_log = logging.getLogger(__name__)


def export_onnx(module: Any, onnx_config: Any, path: Path, opset: int = DEFAULT_OPSET) -> list[Path]:
    """Export ``module`` to ``path``; return the files written (graph first, then external data)."""
    import warnings

    from optimum.exporters.onnx.convert import export

    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about python-side shape values are expected here
        export(model=module, config=onnx_config, output=path, opset=opset)
    _externalize(path)
    return sorted(path.parent.iterdir(), key=lambda p: (p != path, p.name))


def _externalize(path: Path) -> None:
    """Move inline weights to ``<graph>_data`` when they pass :data:`EXTERNAL_DATA_BYTES` (Optimum already does
    so above protobuf's 2 GiB; a graph between the two is moved here). Every initializer moves, the smallest
    included, as torch's exporter writes a graph above 2 GiB: one layout for every large graph."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        return
    inline = sum(len(t.raw_data) for t in model.graph.initializer)
    if inline <= EXTERNAL_DATA_BYTES:
        return
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=path.name + "_data", size_threshold=0)
