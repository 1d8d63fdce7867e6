"""Precision builders: fp16, int8 (dynamic) and int8-static (QDQ), registered by name.

Each builder turns the validated fp32 graph into ``OUT/<precision>/model.onnx``. Only MatMul/Gemm nodes that
multiply by a weight are quantized (attention's activation×activation products and the folded reranker head
stay fp32): quantizing every op — the all-op static default — ruins the ranking.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["PRECISION_BUILDERS", "register_precision", "GraphInfo", "graph_info", "weight_matmuls"]

PRECISION_BUILDERS: dict[str, Callable[..., dict[str, Any]]] = {}


def register_precision(name: str) -> Callable[[Callable[..., dict[str, Any]]], Callable[..., dict[str, Any]]]:
    """Decorator registering the builder of one precision (name as in ``memrerank.manifest.PRECISIONS``)."""

    def wrap(fn: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        PRECISION_BUILDERS[name] = fn
        return fn

    return wrap


@dataclass
class GraphInfo:
    """What the builders need to know about the fp32 graph.

    Attributes:
        weight_nodes: MatMul/Gemm nodes with a weight initializer input (the quantizable ones).
        head_nodes: nodes between the last weight product and the output (kept fp32 everywhere).
        groups: weight nodes grouped by transformer layer (``layer 3``) or ``other`` (embeddings side, pooler).
        external_data: whether the fp32 graph keeps its weights in an external file.
    """

    weight_nodes: list[str]
    head_nodes: list[str]
    groups: dict[str, list[str]] = field(default_factory=dict)
    external_data: bool = False


_LAYER = re.compile(r"layers?\.(\d+)[./]")


def weight_matmuls(model: Any) -> list[str]:
    """Names of MatMul/Gemm nodes that multiply by an initializer (a weight)."""
    inits = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and any(x in inits for x in n.input[1:])]


def graph_info(path: Path) -> GraphInfo:
    """Inspect the fp32 graph (without loading external weights)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    external = any(
        i.data_location == onnx.TensorProto.EXTERNAL for i in model.graph.initializer
    )
    weights = weight_matmuls(model)
    # Walk back from the output to the first weight product: that product and everything after it is the head.
    producer = {o: n for n in model.graph.node for o in n.output}
    head: list[str] = []
    frontier = [o.name for o in model.graph.output]
    seen: set[str] = set()
    weight_set = set(weights)
    while frontier:
        name = frontier.pop()
        node = producer.get(name)
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        head.append(node.name)
        if node.name in weight_set:
            continue  # stop at the head's own product
        frontier.extend(node.input)
        if len(head) > 64:  # the head is a handful of nodes; a long walk means there is no separate head
            head = []
            break
    head_set = set(head)
    groups: dict[str, list[str]] = {}
    for n in weights:
        if n in head_set:
            continue
        m = _LAYER.search(n)
        groups.setdefault(f"layer {int(m.group(1))}" if m else "other", []).append(n)
    return GraphInfo(weight_nodes=[w for w in weights if w not in head_set], head_nodes=head, groups=groups,
                     external_data=external)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the quantizers' advisory warnings (onnxruntime logs them on the root logger) for one call."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _save(model: Any, path: Path, external: bool) -> None:
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    if external:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + "_data", size_threshold=1024)
    else:
        onnx.save(model, str(path))


@register_precision("fp16")
def build_fp16(fp32: Path, out: Path, info: GraphInfo, calib: Any = None, exclude: list[str] | None = None
               ) -> dict[str, Any]:
    """fp16 weights and activations (onnxruntime.transformers.float16, fp32 I/O); head and final norm stay fp32.

    Meant for GPU providers: on CPU, onnxruntime runs fp16 no faster than fp32.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(fp32))
    final_norm = [n.name for n in model.graph.node if re.search(r"^/(body|model)/norm/", n.name)]
    blocked = list(dict.fromkeys(info.head_nodes + final_norm + list(exclude or [])))
    converted = convert_float_to_float16(model, keep_io_types=True, node_block_list=blocked)
    _save(converted, out, info.external_data)
    return {"method": "onnxruntime.transformers.float16 (keep_io_types)", "fp32_nodes": blocked,
            "note": "a GPU precision: expect no speed-up on CPU"}


def _dynamic(fp32: Path, out: Path, info: GraphInfo, exclude: list[str]) -> None:
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    nodes = [n for n in info.weight_nodes if n not in set(exclude)]
    config = AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True, nodes_to_quantize=nodes,
                                                operators_to_quantize=["MatMul", "Gemm"])
    work = out.parent / (out.name + ".work")
    shutil.rmtree(work, ignore_errors=True)
    with _quiet():
        ORTQuantizer.from_pretrained(fp32.parent, file_name=fp32.name).quantize(
            save_dir=work, quantization_config=config, use_external_data_format=info.external_data)
    _move_graph(work, out)


def _move_graph(work: Path, out: Path) -> None:
    """Move the one graph (and its data file) Optimum wrote under ``work`` to ``out``."""
    import onnx

    graphs = list(work.glob("*.onnx"))
    if len(graphs) != 1:
        raise RuntimeError(f"expected one quantized graph in {work}, found {graphs}")
    model = onnx.load(str(graphs[0]))
    external = any(f.name != graphs[0].name and not f.name.endswith(".json") for f in work.iterdir())
    for stale in (out, out.parent / (out.name + "_data")):
        stale.unlink(missing_ok=True)
    _save(model, out, external)
    shutil.rmtree(work, ignore_errors=True)


@register_precision("int8")
def build_int8(fp32: Path, out: Path, info: GraphInfo, calib: Any = None, exclude: list[str] | None = None
               ) -> dict[str, Any]:
    """Dynamic quantization: signed int8 weights per channel on weight MatMul/Gemm (Optimum's ORTQuantizer,
    AVX-512 VNNI preset); activations quantized on the fly."""
    _dynamic(fp32, out, info, list(exclude or []))
    return {"method": "optimum ORTQuantizer dynamic, avx512_vnni preset, per-channel S8 weights, MatMul/Gemm"}


class _Reader:
    """onnxruntime CalibrationDataReader over pre-tokenized calibration batches."""

    def __init__(self, feeds: list[dict[str, Any]]) -> None:
        self._it: Iterator[dict[str, Any]] = iter(feeds)

    def get_next(self) -> dict[str, Any] | None:
        return next(self._it, None)


@register_precision("int8-static")
def build_int8_static(fp32: Path, out: Path, info: GraphInfo, calib: Any = None,
                      exclude: list[str] | None = None) -> dict[str, Any]:
    """Static QDQ quantization of weight MatMul/Gemm with activation ranges calibrated on query–document pairs.

    onnxruntime.quantization is called directly: Optimum's ``ORTQuantizer.fit`` needs a ``datasets.Dataset``, and
    our calibration pairs are already tokenized by the artifact's own pair encoder.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if calib is None:
        raise ValueError("int8-static needs calibration pairs")
    nodes = [n for n in info.weight_nodes if n not in set(exclude or [])]
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in (out, out.parent / (out.name + "_data")):
        stale.unlink(missing_ok=True)
    with _quiet():
        quantize_static(
            str(fp32), str(out), _Reader(calib.feeds(fp32)), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul", "Gemm"], nodes_to_quantize=nodes, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax, use_external_data_format=info.external_data,
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
        )
    return {"method": "onnxruntime quantize_static QDQ, MinMax ranges, per-channel S8 weights, U8 activations, "
                      "weight MatMul/Gemm only", "calibration_pairs": calib.n_pairs}
