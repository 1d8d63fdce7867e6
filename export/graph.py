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

__all__ = ["export_onnx", "save_graph", "block_hadamard", "DEFAULT_OPSET", "EXTERNAL_DATA_BYTES"]

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


# ------------------------------------------------- helpers shared by the precision builders (quantize, optimize)
def save_graph(model: Any, path: Path, external: bool) -> None:
    """Write ``model`` to ``path`` (folder created); ``external``: every tensor above 1 KiB into one
    ``<name>_data`` file beside it (a graph above protobuf's 2 GB limit, or one whose source was stored so)."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    if external:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + "_data", size_threshold=1024)
    else:
        onnx.save(model, str(path))


def _plain_weight(node: Any, inits: dict[str, Any]) -> tuple[Any, str | None, bool] | None:
    """``(W as (K, N) float32, bias input or None, whether W was stored transposed)`` of a MatMul/Gemm by a 2-D
    weight, or None when the node is not a plain product by an initializer (left in fp32)."""
    import numpy as np
    from onnx import helper, numpy_helper

    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in inits:
        return None
    w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
    if w.ndim != 2:
        return None
    if node.op_type == "MatMul":
        return w, None, False
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
        return None
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    transposed = bool(attrs.get("transB", 0))
    return (w.T if transposed else w), bias, transposed


def block_hadamard(b: int) -> Any:
    """The normalized ``b × b`` Sylvester Hadamard matrix (``b`` a power of two; symmetric and orthogonal)."""
    import numpy as np

    if b < 1 or b & (b - 1):
        raise ValueError(f"a Hadamard block must be a power of two, got {b}")
    h = np.ones((1, 1))
    while h.shape[0] < b:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(b)
