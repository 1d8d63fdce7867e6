"""Precision builders: fp16, int8 (dynamic, per-row activation scales) and int8-static (QDQ), registered by name.

Each builder turns the validated fp32 graph into ``OUT/<precision>/model.onnx``. Only MatMul/Gemm nodes that
multiply by a weight are quantized (attention's activation×activation products and the folded reranker head
stay fp32): quantizing every op — the all-op static default — ruins the ranking. Both int8 precisions are
batch-independent (a document's score never depends on what shares its call) and record it in their build.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memrerank.export.graph import _plain_weight, block_hadamard, save_graph
from memrerank.manifest import Build

__all__ = ["PRECISION_BUILDERS", "register_precision", "GraphInfo", "graph_info", "weight_matmuls",
           "quantize_per_row", "build_int8_per_tensor"]

#: Precision name → its builder: ``builder(fp32, out, info, calib, exclude)`` writes ``out`` and returns the
#: manifest's ``build`` record of the graph it wrote.
PRECISION_BUILDERS: dict[str, Callable[..., Build]] = {}


def register_precision(name: str, kept_as: tuple[str, ...] = ("fp32",)
                       ) -> Callable[[Callable[..., Build]], Callable[..., Build]]:
    """Decorator registering the builder of one precision (name as in ``memrerank.manifest.PRECISIONS``).

    ``kept_as``: how the products its sensitivity search keeps may run, tried in this order (the builder takes
    a ``kept_as`` argument when there is more than ``"fp32"``); recorded as the builder's ``kept_as``.
    """

    def wrap(fn: Callable[..., Build]) -> Callable[..., Build]:
        fn.kept_as = kept_as  # type: ignore[attr-defined]
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
        matmul_nodes: every MatMul/Gemm node; the ones not quantized are passed as ``nodes_to_exclude`` (an
            empty ``nodes_to_quantize`` means "all nodes" to the quantizers).
        embedding_nodes: Gather nodes looking up rows of a large weight table (token embeddings), quantized by
            :func:`quantize_embeddings`; group ``embeddings``.
    """

    weight_nodes: list[str]
    head_nodes: list[str]
    groups: dict[str, list[str]] = field(default_factory=dict)
    external_data: bool = False
    embedding_nodes: list[str] = field(default_factory=list)
    matmul_nodes: list[str] = field(default_factory=list)


_LAYER = re.compile(r"layers?\.(\d+)[./]")
_SUFFIX = re.compile(r"(.*?)(?:_(\d+))?")  # a module name and its repeat index: "/mlp/up_proj_27" -> 27


def weight_matmuls(model: Any) -> list[str]:
    """Names of MatMul/Gemm nodes that multiply by an initializer (a weight)."""
    inits = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and any(x in inits for x in n.input[1:])]


#: A Gather over an initializer with at least this many rows is a token-embedding lookup.
EMBEDDING_MIN_ROWS = 1000


def embedding_gathers(model: Any) -> list[str]:
    """Gather nodes whose data is a 2-D weight table of at least :data:`EMBEDDING_MIN_ROWS` rows."""
    dims = {i.name: list(i.dims) for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "Gather" and len(dims.get(n.input[0], [])) == 2
            and dims[n.input[0]][0] >= EMBEDDING_MIN_ROWS]


def _layers_by_scope(names: list[str]) -> dict[str, int]:
    """Layer index from a module scope in the node name: ``/model/layers.3/self_attn/q_proj/MatMul`` → 3."""
    out = {}
    for n in names:
        m = _LAYER.search(n)
        if m:
            out[n] = int(m.group(1))
    return out


def _layers_by_suffix(names: list[str]) -> dict[str, int]:
    """Layer index when the exporter dropped the scopes (seen at real decoder size): a module repeated once per
    layer gets a numeric suffix from its second occurrence on, ``/q_proj/MatMul``, ``/q_proj_1/MatMul``, …
    ``/mlp/down_proj_27/MatMul``. Only modules that occur more than once count; the rest stay unassigned."""
    from collections import Counter

    parsed = {}
    for n in names:
        m = _SUFFIX.fullmatch(n.rsplit("/", 1)[0])  # always matches: the suffix is optional
        parsed[n] = (m.group(1), int(m.group(2) or 0))
    counts = Counter(base for base, _ in parsed.values())
    return {n: i for n, (base, i) in parsed.items() if counts[base] > 1}


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
    frontier = [model.graph.output[0].name]  # the logits (decoder graphs also output the prefix cache)
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
    body = [n for n in weights if n not in head_set]
    layer_of = _layers_by_scope(body)
    if not layer_of:
        layer_of = _layers_by_suffix(body)
    groups: dict[str, list[str]] = {}
    for n in body:
        groups.setdefault(f"layer {layer_of[n]}" if n in layer_of else "other", []).append(n)
    embeddings = embedding_gathers(model)
    if embeddings:
        groups["embeddings"] = embeddings
    return GraphInfo(weight_nodes=[w for w in weights if w not in head_set], head_nodes=head, groups=groups,
                     external_data=external, embedding_nodes=embeddings,
                     matmul_nodes=[n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm")])


def int8_rows(table: Any) -> tuple[Any, Any]:
    """An embedding table as int8 codes with one symmetric scale per row: ``(codes, scales (rows, 1))``."""
    import numpy as np

    table = np.asarray(table, dtype=np.float32)
    scale = np.abs(table).max(axis=1, keepdims=True) / 127.0
    scale[scale == 0] = 1.0
    return np.clip(np.rint(table / scale), -127, 127).astype(np.int8), scale.astype(np.float32)


def write_int8_lookup(g: Any, table_name: str, table: Any, ids: str) -> str:
    """The token-embedding lookup of a streamed graph (the fused writer ``g``) over int8 rows
    (:func:`int8_rows`, :func:`int8_lookup_nodes`); returns its output."""
    from onnx import TensorProto

    q, scale = int8_rows(table)
    g.const(table_name + "_int8", q)
    g.const(table_name + "_row_scale", scale)
    out = table_name + "_lookup"
    nodes = int8_lookup_nodes(table_name, ids, out, "/model/embed_tokens/Gather")
    g.nodes.extend(nodes)
    g.types.update({o: TensorProto.FLOAT for node in nodes for o in node.output})
    g.types[out + "_int8"] = TensorProto.INT8
    return out


def int8_lookup_nodes(base: str, ids: str, out: str, name: str) -> list[Any]:
    """``out = Gather(base_int8, ids) · Gather(base_row_scale, ids)`` (:func:`int8_rows`' tables): only the rows a
    batch looks up are expanded to fp32."""
    import onnx
    from onnx import helper

    return [
        helper.make_node("Gather", [base + "_int8", ids], [out + "_int8"], name=name),
        helper.make_node("Cast", [out + "_int8"], [out + "_f"], to=onnx.TensorProto.FLOAT, name=name + "_dequant_cast"),
        helper.make_node("Gather", [base + "_row_scale", ids], [out + "_scale"], name=name + "_scale"),
        helper.make_node("Mul", [out + "_f", out + "_scale"], [out], name=name + "_dequant"),
    ]


def quantize_embeddings(path: Path, nodes: list[str], external: bool) -> int:
    """Store each embedding table as int8 with one symmetric scale per row, in place.

    ``Gather(W, ids)`` becomes ``Gather(W_int8, ids) → Cast → Mul(Gather(scale, ids))``: each looked-up row is
    dequantized exactly as stored, so only the rows a batch uses are expanded to fp32. The quantizers' own Gather
    support uses one scale for the whole table, which a few outlier rows would make coarse for all the others.
    Returns the number of tables converted.
    """
    import onnx
    from onnx import numpy_helper

    if not nodes:
        return 0
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    wanted = set(nodes)
    done = 0
    new_nodes = []
    for node in model.graph.node:
        if node.name not in wanted or node.op_type != "Gather" or node.input[0] not in inits:
            new_nodes.append(node)
            continue
        axis = [a for a in node.attribute if a.name == "axis"]
        if axis and axis[0].i != 0:
            raise ValueError(f"{node.name}: embedding Gather on axis {axis[0].i} is not supported")
        q, scale = int8_rows(numpy_helper.to_array(inits[node.input[0]]))
        base = node.input[0]
        model.graph.initializer.remove(inits[base])
        model.graph.initializer.extend([numpy_helper.from_array(q, base + "_int8"),
                                        numpy_helper.from_array(scale, base + "_row_scale")])
        new_nodes += int8_lookup_nodes(base, node.input[1], node.output[0], node.name)
        done += 1
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    data = path.parent / (path.name + "_data")
    data.unlink(missing_ok=True)
    save_graph(model, path, external)
    return done


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the quantizers' advisory warnings (onnxruntime logs them on the root logger) for one call."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


@register_precision("fp16")
def build_fp16(fp32: Path, out: Path, info: GraphInfo, calib: Any = None, exclude: list[str] | None = None
               ) -> Build:
    """fp16 weights and activations (onnxruntime.transformers.float16, fp32 I/O); head and final norm stay fp32.

    Meant for GPU providers: on CPU, onnxruntime runs fp16 no faster than fp32.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    nodes = onnx.load(str(fp32), load_external_data=False).graph.node
    final_norm = [n.name for n in nodes if re.search(r"^/(body|model)/norm/", n.name)]
    blocked = list(dict.fromkeys(info.head_nodes + final_norm + list(exclude or [])))
    # A path, not a ModelProto: the converter then infers shapes with infer_shapes_path, which works above
    # protobuf's 2 GiB (in-memory shape inference serializes the whole model and fails at real decoder size).
    converted = convert_float_to_float16(str(fp32), keep_io_types=True, node_block_list=blocked)
    save_graph(converted, out, info.external_data)
    return Build(method="onnxruntime.transformers.float16 (keep_io_types)",
                 extra={"fp32_nodes": blocked, "note": "a GPU precision: expect no speed-up on CPU"})


def _dynamic(fp32: Path, out: Path, info: GraphInfo, exclude: list[str]) -> None:
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    nodes = [n for n in info.weight_nodes if n not in set(exclude)]
    if not nodes:  # everything kept in fp32
        _copy_graph(fp32, out, info)
        return
    config = AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True, nodes_to_quantize=nodes,
                                                nodes_to_exclude=_others(info, nodes),
                                                operators_to_quantize=["MatMul", "Gemm"])
    work = out.parent / (out.name + ".work")
    shutil.rmtree(work, ignore_errors=True)
    with _quiet():
        ORTQuantizer.from_pretrained(fp32.parent, file_name=fp32.name).quantize(
            save_dir=work, quantization_config=config, use_external_data_format=info.external_data)
    _move_graph(work, out)


def _others(info: GraphInfo, nodes: list[str]) -> list[str]:
    keep = set(nodes)
    return [n for n in info.matmul_nodes if n not in keep]


def _copy_graph(fp32: Path, out: Path, info: GraphInfo) -> None:
    import onnx

    for stale in (out, out.parent / (out.name + "_data")):
        stale.unlink(missing_ok=True)
    save_graph(onnx.load(str(fp32)), out, info.external_data)


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
    save_graph(model, out, external)
    shutil.rmtree(work, ignore_errors=True)


#: Smallest activation scale: a row whose max |x| / 127 is below it (an all-zero row) gets this scale, so its
#: codes are finite (128, i.e. zero) and its product exactly zero.
ROW_SCALE_FLOOR = 1e-30

def quantize_per_row(fp32: Path, out: Path, nodes: list[str], external: bool, *, model: Any = None,
                     smooth: dict[str, Any] | None = None, lower_bounds: dict[str, float] | None = None,
                     outliers: dict[str, Any] | None = None, hadamard: dict[str, int] | None = None,
                     two_pass: set[str] | frozenset[str] = frozenset(), two_pass_last: int = 0,
                     two_pass_last_skip: Collection[str] = ()) -> int:
    """Quantize weight MatMul/Gemm nodes with per-row (per-token) dynamic activation scales; write ``out``.

    Dynamic quantization as onnxruntime does it (``DynamicQuantizeLinear``) takes one activation scale for the
    whole input tensor, i.e. over every row of the batch, so a document's codes, and its score, move with the
    other documents in its call. Here each row of the activation ``x`` (one token) gets its own symmetric scale
    ``s = max|x_row| / 127``::

        x_q = QuantizeLinear(x, s, 128)   per row (axis 0 of x viewed as rows × K; uint8 for the u8 × s8 kernels)
        y   = MatMulIntegerToFloat(x_q, W_q, s, w_scale, 128)   (W_q: int8, one symmetric scale per column)

    onnxruntime applies a per-row ``a_scale`` to the product in place, after the integer GEMM. Integer products
    are exact and every scale belongs to one row or one column, so each token's result depends on that token
    alone. Nodes sharing an input share its codes. A Gemm is quantized when it is a plain ``A·B (+C)``
    (``transA`` 0, ``alpha``/``beta`` 1; its bias is added after the scaling); other products stay fp32.

    Args:
        fp32: the graph to quantize.
        out: where to write the int8 graph.
        nodes: names of the products to quantize.
        external: write the weights to an external-data file.
        model: the graph as an already loaded ``ModelProto`` to use instead of reading ``fp32`` (changed in place).
        smooth: activation name → per-channel divisor ``s`` (:func:`memrerank.export.optimize.smoothing_factors`):
            its codes are taken of ``x / s`` and each product's weight rows are multiplied by ``s``.
        lower_bounds: activation name → a value ``L < 0`` nothing goes below (GELU outputs): coded on 0..255
            with the fixed zero point ``zp`` of :data:`memrerank.export.optimize.GELU_ZERO_POINT` and the row
            scale ``max(max x_row / (255 - zp), -L / zp)`` (one reduction, about twice the resolution).
        outliers: activation name → input channels kept out of the codes (LLM.int8()'s decomposition, with
            the channels fixed at export): they are zeroed before coding, so they no longer set each row's
            scale, and their part of every product, ``x[..., idx] · W[idx, :]``, runs in fp32 beside the int8
            product. The channel set is a constant, so a row's result still depends on that row alone.
        hadamard: activation name → block size ``b`` (a power of two dividing its channels): the activation is
            multiplied by a block-diagonal normalized Hadamard matrix before coding (each run of ``b`` channels
            mixed, fp32) and every product's weight rows by its transpose, so the product is unchanged and an
            outlier channel's size is shared by its block (QuaRot's online rotation, for an input no offline
            rotation reaches: the SwiGLU down projection's). Takes the place of smoothing and outlier channels
            for that activation.
        two_pass: products (of ``nodes``) whose activation is coded twice: the first codes as above, then the
            rounding error they leave, ``r = x - s·(x_q - 128)`` (at most half a step per value), coded per row
            the same way, and the product is the sum of two integer products by the same int8 weight,
            ``(x_q·W_q)·s·w_s + (r_q·W_q)·s_r·w_s``. The activation's error shrinks ~127-fold (about 15
            bits), the weight stays int8 and the row independence holds; it costs a second integer product
            and the coding of ``r``, where keeping the product fp32 costs its whole fp32 weight and an fp32
            product.
        two_pass_last: the other products (of ``nodes``) code twice only the activation rows of each sequence's
            last ``two_pass_last`` real tokens (by the graph's ``attention_mask`` input; fewer when a row has
            fewer): those rows are gathered, their rounding error coded and multiplied as above, and the sum
            written back over the first pass's rows. A decoder's score is read at its last token, whose own
            products carry its error straight to the logit, while the other tokens reach it through attention
            (their independent rounding errors averaged); the extra work is ``two_pass_last`` rows per sequence.
            The rows are each sequence's own, so a row's result still depends on that row alone. Needs products
            whose input is ``(batch, sequence, channels)`` aligned with ``attention_mask``.
        two_pass_last_skip: products (of ``nodes``) whose last tokens are coded once all the same (for
            measuring which products need it: ``bench/two_pass_products.py``).

    Returns:
        The number of nodes quantized.
    """
    import onnx

    if model is None:
        model = onnx.load(str(fp32))
    coder = _RowCoder(model, smooth or {}, lower_bounds or {}, outliers or {}, hadamard or {}, set(two_pass),
                      two_pass_last, set(two_pass_last_skip))
    return rewrite_products(model, nodes, coder.replace, out, external)


def rewrite_products(model: Any, nodes: Collection[str], replace: Callable[..., list[Any]], out: Path,
                     external: bool) -> int:
    """Write ``model`` to ``out`` with each plain weight product named in ``nodes`` replaced by the nodes
    ``replace(node, w, bias, transposed)`` returns (``w`` as K × N float32; see ``_plain_weight``); returns how
    many were replaced. Weight initializers no node reads any more are dropped, the ``com.microsoft`` opset is
    declared, a stale ``out`` (and its data) removed."""
    from onnx import helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    wanted, replaced, new_nodes = set(nodes), set(), []
    for node in graph.node:
        weight = _plain_weight(node, inits) if node.name in wanted else None
        if weight is None:
            new_nodes.append(node)
            continue
        new_nodes += replace(node, *weight)
        replaced.add(node.input[1])
    del graph.node[:]
    graph.node.extend(new_nodes)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for name in replaced - used:
        graph.initializer.remove(inits[name])
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    for stale in (out, out.parent / (out.name + "_data")):
        stale.unlink(missing_ok=True)
    save_graph(model, out, external)
    return len(replaced)


class _RowCoder:
    """The rewrite of :func:`quantize_per_row`, one weight product at a time.

    An activation read by several products is coded once (its codes, row scales and zero point are kept in
    ``rows``), and a weight shared by several products is stored once per transposition and smoothing
    (``weights``: the prefix of its int8 codes and column scales). New initializers go straight into the
    graph.
    """

    def __init__(self, model: Any, smooth: dict[str, Any], lower_bounds: dict[str, float],
                 outliers: dict[str, Any] | None = None, hadamard: dict[str, int] | None = None,
                 two_pass: set[str] | None = None, two_pass_last: int = 0,
                 two_pass_last_skip: set[str] | None = None) -> None:
        import numpy as np
        from onnx import numpy_helper

        self.graph = model.graph
        self.two_pass = two_pass or set()
        if two_pass_last < 0:
            raise ValueError(f"two_pass_last must be >= 0, got {two_pass_last}")
        if two_pass_last and "attention_mask" not in {i.name for i in model.graph.input}:
            raise ValueError("two_pass_last needs the graph's attention_mask input to find each row's last tokens")
        self.two_pass_last = two_pass_last
        self.two_pass_last_skip = two_pass_last_skip or set()
        self.last_index: tuple[str, str] | None = None  # (flat row indices, their column form), made once
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        self.hadamard = dict(hadamard or {})
        self.smooth = {x: v for x, v in smooth.items() if x not in self.hadamard}
        self.lower_bounds = {x: v for x, v in lower_bounds.items() if x not in self.hadamard}
        self.outliers = {x: np.asarray(idx, np.int64) for x, idx in (outliers or {}).items()
                         if len(idx) and x not in self.hadamard}
        self.outlier_x: dict[str, str] = {}  # activation -> its outlier channels, gathered once (fp32)
        consts = {"_pr_zp": np.array(128, np.uint8), "_pr_inv127": np.array(1.0 / 127.0, np.float32),
                  "_pr_floor": np.array(ROW_SCALE_FLOOR, np.float32), "_pr_flat": np.array([-1], np.int64)}
        self.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
        self.rows: dict[str, tuple[str, str, str]] = {}  # activation -> (uint8 codes, row scales, zero point)
        # (activation, last tokens only) -> codes and row scales of its rounding error
        self.residual_rows: dict[tuple[str, bool], tuple[str, str]] = {}
        self.coded: dict[str, tuple[str, int]] = {}  # activation -> (what was coded: x after any rotation, k)
        self.weights: dict[tuple[str, bool, str], str] = {}  # (weight, transposed, smoothed input) -> tag
        self.widths: set[str] = set()  # (n,) constants written for the last-token rows' output shapes
        # activation -> its rows stacked over its last tokens' error codes: (codes, scales, sizes, lead shape)
        self.stacked: dict[str, tuple[str, str, str, str]] = {}

    def replace(self, node: Any, w: Any, bias: str | None, transposed: bool) -> list[Any]:
        """The nodes computing ``node`` (a plain product by the weight ``w``, plus ``bias``) from int8 codes,
        preceded by the coding of its activation the first time that activation is read."""
        import numpy as np
        from onnx import helper

        x, tag = node.input[0], node.name or node.output[0]
        w_outliers = None
        if x in self.outliers:  # their rows run in fp32; zeroed here so they do not widen the column scales
            idx = self.outliers[x]
            w_outliers, w = w[idx, :].astype(np.float32), w.copy()
            w[idx, :] = 0.0
        if x in self.smooth:
            w = w * np.asarray(self.smooth[x], np.float32)[:, None]
        if x in self.hadamard:  # rows mixed by Hᵀ block by block, as the activation is by H
            b = self.hadamard[x]
            h = block_hadamard(b)
            w = np.matmul(h.T, w.astype(np.float64).reshape(-1, b, w.shape[1])).reshape(w.shape).astype(np.float32)
        new = [] if x in self.rows else self._code_activation(x, tag, w.shape[0])
        codes, row_scale, zero_point = self.rows[x]
        changed = x in self.smooth or x in self.outliers or x in self.hadamard
        w_tag = self._store_weight((node.input[1], transposed, x if changed else ""), tag, w)
        out_name = node.output[0]
        product = out_name if bias is None and w_outliers is None else out_name + "_int8"
        two_pass = node.name in self.two_pass
        first = product + "_pass1" if two_pass else product
        last = bool(self.two_pass_last) and not two_pass and node.name not in self.two_pass_last_skip
        if (two_pass or last) and x in self.lower_bounds:
            raise ValueError(f"{node.name}: two-pass codes need symmetric codes; {x} has offset codes")
        if not last:  # else one product over the rows stacked on the last rows' errors
            new.append(helper.make_node(
                "MatMulIntegerToFloat", [codes, w_tag + "_w_int8", row_scale, w_tag + "_w_scale", zero_point],
                [first], name=tag + "_quant", domain="com.microsoft"))
        if two_pass:  # the same weight by the codes of the first codes' rounding error, added
            new += [] if (x, False) in self.residual_rows else self._code_residual(x, tag)
            r_codes, r_scale = self.residual_rows[(x, False)]
            new += [helper.make_node("MatMulIntegerToFloat", [r_codes, w_tag + "_w_int8", r_scale,
                                                              w_tag + "_w_scale", zero_point],
                                     [product + "_pass2"], name=tag + "_quant_residual", domain="com.microsoft"),
                    helper.make_node("Add", [first, product + "_pass2"], [product], name=tag + "_two_pass")]
        elif last:  # the last tokens' rows: their rounding error's product added in place
            new += [] if (x, True) in self.residual_rows else self._code_residual(x, tag, last=True)
            new += self._stack_last_rows(x, tag, w_tag, int(w.shape[1]), product)
        if w_outliers is not None:
            summed = out_name if bias is None else out_name + "_sum"
            new += self._add_outlier_part(x, tag, product, w_outliers, summed)
            product = summed
        if bias is not None:
            new.append(helper.make_node("Add", [product, bias], [out_name], name=tag + "_bias"))
        return new

    def _code_residual(self, x: str, tag: str, last: bool = False) -> list[Any]:
        """Nodes coding what ``x``'s first codes leave out, ``r = x' - s·(x_q - 128)`` (``x'``: ``x`` as it was
        coded, after any rotation, smoothing or outlier zeroing), per row; recorded in ``residual_rows``.
        ``last``: only the rows of each sequence's last tokens (:meth:`_last_rows`), gathered first."""
        import numpy as np
        from onnx import helper, numpy_helper

        if not self.residual_rows:  # the zero point as a float, added with the first residual
            self.graph.initializer.append(numpy_helper.from_array(np.array(128.0, np.float32), "_pr_zp_f"))
        src, k = self.coded[x]
        codes, scale, _zero_point = self.rows[x]
        p = f"{tag}_res"
        nodes = []
        if last:
            nodes += self._last_rows()
            idx = self.last_index[0]  # type: ignore[index]
            self.graph.initializer.append(numpy_helper.from_array(np.array([-1, k], np.int64), p + "_2d_in"))
            for name, t, shape in (("src", src, p + "_2d_in"), ("codes", codes, p + "_2d_in"),
                                   ("scale", scale, "_pr_col")):
                nodes += [helper.make_node("Reshape", [t, shape], [f"{p}_{name}_rows"], name=f"{p}_{name}_rows"),
                          helper.make_node("Gather", [f"{p}_{name}_rows", idx], [f"{p}_{name}_last"], axis=0,
                                           name=f"{p}_{name}_last")]
            src, codes, scale = f"{p}_src_last", f"{p}_codes_last", f"{p}_scale_last"
        nodes += [helper.make_node("Cast", [codes], [p + "_codes_f"], to=1, name=p + "_codes_f"),  # 1: FLOAT
                 helper.make_node("Sub", [p + "_codes_f", "_pr_zp_f"], [p + "_centred"], name=p + "_centred"),
                 helper.make_node("Mul", [p + "_centred", scale], [p + "_dequant"], name=p + "_dequant"),
                 helper.make_node("Sub", [src, p + "_dequant"], [p + "_error"], name=p + "_error")]
        more, inits, (r_codes, r_scale) = _row_codes(p + "_error", f"{tag}_res_row", k, self.opset)
        self.graph.initializer.extend(inits)
        self.residual_rows[(x, last)] = (r_codes, r_scale)
        if last:
            more += self._stack_rows(x, p, r_codes, r_scale)
        return nodes + more

    def _stack_rows(self, x: str, p: str, r_codes: str, r_scale: str) -> list[Any]:
        """Nodes stacking ``x``'s codes as rows (B·S, k) over the codes of its last tokens' rounding errors
        (B·n, k), and their row scales alike, so each product by a weight runs once over both (one integer
        product, one prepacked weight); recorded in ``stacked[x]`` with the two row counts and ``x``'s leading
        shape (B, S)."""
        from onnx import helper

        codes = self.rows[x][0]
        rows = (f"{p}_codes_rows", f"{p}_scale_rows")  # (B·S, k) and (B·S, 1), made by _code_residual
        nodes = [helper.make_node("Concat", [rows[0], r_codes], [p + "_codes_all"], axis=0, name=p + "_codes_all"),
                 helper.make_node("Concat", [rows[1], r_scale], [p + "_scale_all"], axis=0, name=p + "_scale_all"),
                 helper.make_node("Shape", [rows[0]], [p + "_n_all"], name=p + "_n_all"),
                 helper.make_node("Shape", [r_codes], [p + "_m_all"], name=p + "_m_all"),
                 helper.make_node("Shape", [codes], [p + "_x_shape"], name=p + "_x_shape")]
        for name, src, start, end in (("_n", p + "_n_all", "_pr_0_1d", "_pr_1_1d"),
                                      ("_m", p + "_m_all", "_pr_0_1d", "_pr_1_1d"),
                                      ("_lead", p + "_x_shape", "_pr_0_1d", "_pr_flat")):
            nodes.append(helper.make_node("Slice", [src, start, end], [p + name], name=p + name))
        nodes.append(helper.make_node("Concat", [p + "_n", p + "_m"], [p + "_sizes"], axis=0, name=p + "_sizes"))
        self.stacked[x] = (p + "_codes_all", p + "_scale_all", p + "_sizes", p + "_lead")
        return nodes

    def _stack_last_rows(self, x: str, tag: str, w_tag: str, n_out: int, product: str) -> list[Any]:
        """Nodes computing ``product`` (``x`` by the weight ``w_tag``, n_out columns) with the rows of each
        sequence's last tokens two-pass: one integer product over ``x``'s rows stacked on their rounding
        errors' codes, split, the errors' product added to the last tokens' rows (Gather, Add, ScatterND: a
        row listed twice is written twice with the same value), reshaped to ``x``'s leading shape."""
        import numpy as np
        from onnx import helper, numpy_helper

        codes_all, scale_all, sizes, lead = self.stacked[x]
        zero_point = self.rows[x][2]
        idx, idx_col = self.last_index  # type: ignore[misc]
        width = f"_pr_width_{n_out}"
        if width not in self.widths:
            self.graph.initializer.append(numpy_helper.from_array(np.array([n_out], np.int64), width))
            self.widths.add(width)
        p = tag + "_last"
        return [
            helper.make_node("MatMulIntegerToFloat", [codes_all, w_tag + "_w_int8", scale_all, w_tag + "_w_scale",
                                                      zero_point],
                             [p + "_all"], name=tag + "_quant_last_two_pass", domain="com.microsoft"),
            helper.make_node("Split", [p + "_all", sizes], [p + "_rows", p + "_pass2"], axis=0, name=p + "_split"),
            helper.make_node("Gather", [p + "_rows", idx], [p + "_pass1"], axis=0, name=p + "_gather"),
            helper.make_node("Add", [p + "_pass1", p + "_pass2"], [p + "_sum"], name=p + "_sum"),
            helper.make_node("ScatterND", [p + "_rows", idx_col, p + "_sum"], [p + "_scattered"],
                             name=p + "_scatter"),
            helper.make_node("Concat", [lead, width], [p + "_shape"], axis=0, name=p + "_shape"),
            helper.make_node("Reshape", [p + "_scattered", p + "_shape"], [product], name=p + "_out")]

    def _last_rows(self) -> list[Any]:
        """Nodes (once per graph) computing, from ``attention_mask`` (B, S), the flat row indices (B·n,) into
        the (B·S) tokens of each sequence's last ``n`` real tokens, the last first; a sequence with fewer real
        tokens repeats its first one (the same row gathered and written twice, with the same value), a
        padding-only row its first position (which nothing reads)."""
        import numpy as np
        from onnx import TensorProto, helper, numpy_helper

        if self.last_index is not None:
            return []
        p, n = "_pr_last", self.two_pass_last
        i64 = np.int64
        consts = {p + "_back": np.arange(n, dtype=i64)[None, :], p + "_0": np.array(0, i64),
                  p + "_1": np.array(1, i64), p + "_ax1": np.array([1], i64), p + "_flat": np.array([-1], i64),
                  "_pr_col": np.array([-1, 1], i64), "_pr_0_1d": np.array([0], i64), "_pr_1_1d": np.array([1], i64)}
        self.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())

        def node(op: str, inputs: list[str], out: str, **kw: Any) -> Any:
            return helper.make_node(op, inputs, [p + out], name=p + out, **kw)

        nodes = [
            node("Cast", ["attention_mask"], "_mask", to=TensorProto.INT64),
            node("Shape", [p + "_mask"], "_shape"),
            node("Gather", [p + "_shape", p + "_0"], "_batch", axis=0),
            node("Gather", [p + "_shape", p + "_1"], "_seq", axis=0),
            node("Range", [p + "_0", p + "_seq", p + "_1"], "_steps"),
            # the last real position of each row (either padding side), and how many real tokens it has
            node("Mul", [p + "_mask", p + "_steps"], "_at"),
            node("ReduceSum", [p + "_mask", p + "_ax1"], "_real", keepdims=1),
            node("Range", [p + "_0", p + "_batch", p + "_1"], "_rows"),
            node("Mul", [p + "_rows", p + "_seq"], "_starts"),
            node("Sub", [p + "_real", p + "_1"], "_real_m1"),
            node("Max", [p + "_real_m1", p + "_0"], "_room"),
            node("Min", [p + "_back", p + "_room"], "_steps_back"),  # (B, n): 0, 1, … capped at real - 1
            node("Unsqueeze", [p + "_starts", p + "_ax1"], "_starts_col"),
        ]
        if self.opset < 18:
            nodes.append(node("ReduceMax", [p + "_at"], "_last", axes=[1], keepdims=1))
        else:
            nodes.append(node("ReduceMax", [p + "_at", p + "_ax1"], "_last", keepdims=1))
        nodes += [node("Add", [p + "_starts_col", p + "_last"], "_flat_last"),
                  node("Sub", [p + "_flat_last", p + "_steps_back"], "_idx2d"),
                  node("Reshape", [p + "_idx2d", p + "_flat"], "_idx"),
                  node("Reshape", [p + "_idx2d", "_pr_col"], "_idx_col")]
        self.last_index = (p + "_idx", p + "_idx_col")
        return nodes

    def _add_outlier_part(self, x: str, tag: str, product: str, w_outliers: Any, result: str) -> list[Any]:
        """``result = product + x[..., idx] · W[idx, :]`` (fp32), the gathered channels shared by ``x``'s
        products."""
        from onnx import helper, numpy_helper

        self.graph.initializer.append(numpy_helper.from_array(w_outliers, tag + "_w_outliers"))
        return [
            helper.make_node("MatMul", [self.outlier_x[x], tag + "_w_outliers"], [tag + "_outlier_part"],
                             name=tag + "_outlier_matmul"),
            helper.make_node("Add", [product, tag + "_outlier_part"], [result], name=tag + "_outlier_add")]

    def _code_activation(self, x: str, tag: str, k: int) -> list[Any]:
        """Nodes coding activation ``x`` (last axis ``k``) per row, divided first by its smoothing factors
        when it has some (one Mul shared by every product reading ``x``); records the codes' names in
        ``rows``."""
        import numpy as np
        from onnx import helper, numpy_helper

        new = []
        src = x
        if x in self.hadamard:
            b = self.hadamard[x]
            if k % b:
                raise ValueError(f"{x}: {k} channels are not a multiple of the Hadamard block {b}")
            h = numpy_helper.from_array(block_hadamard(b).astype(np.float32), f"{tag}_hadamard")
            blocks = numpy_helper.from_array(np.array([-1, b], np.int64), f"{tag}_hadamard_blocks")
            self.graph.initializer.extend([h, blocks])
            new += [helper.make_node("Shape", [x], [f"{tag}_hadamard_shape"], name=f"{tag}_hadamard_shape"),
                    helper.make_node("Reshape", [x, blocks.name], [f"{tag}_hadamard_in"],
                                     name=f"{tag}_hadamard_in"),
                    helper.make_node("MatMul", [f"{tag}_hadamard_in", h.name], [f"{tag}_hadamard_mixed"],
                                     name=f"{tag}_hadamard"),
                    helper.make_node("Reshape", [f"{tag}_hadamard_mixed", f"{tag}_hadamard_shape"],
                                     [f"{tag}_rotated"], name=f"{tag}_hadamard_out")]
            src = f"{tag}_rotated"
        if x in self.outliers:
            idx = numpy_helper.from_array(self.outliers[x], f"{tag}_outlier_idx")
            self.graph.initializer.append(idx)
            self.outlier_x[x] = f"{tag}_outlier_x"
            new.append(helper.make_node("Gather", [x, idx.name], [self.outlier_x[x]], axis=-1,
                                        name=f"{tag}_outlier_gather"))
        if x in self.smooth or x in self.outliers:
            inverse = np.ones(k, np.float32)
            if x in self.smooth:
                inverse = (1.0 / np.asarray(self.smooth[x], np.float32)).astype(np.float32)
            if x in self.outliers:
                inverse[self.outliers[x]] = 0.0  # the fp32 part carries these channels
            divide = numpy_helper.from_array(inverse, f"{tag}_smooth_inv")
            self.graph.initializer.append(divide)
            new.append(helper.make_node("Mul", [x, divide.name], [f"{tag}_smoothed"], name=f"{tag}_smooth"))
            src = f"{tag}_smoothed"
        if x in self.lower_bounds:
            nodes_x, inits_x, self.rows[x] = _offset_codes(src, f"{tag}_row", self.lower_bounds[x],
                                                           self.opset)
        else:
            nodes_x, inits_x, (codes_x, scale_x) = _row_codes(src, f"{tag}_row", k, self.opset)
            self.rows[x] = (codes_x, scale_x, "_pr_zp")
        self.coded[x] = (src, k)
        self.graph.initializer.extend(inits_x)
        return new + nodes_x

    def _store_weight(self, key: tuple[str, bool, str], tag: str, w: Any) -> str:
        """The prefix of ``w``'s int8 codes (symmetric, one scale per column), stored the first time ``key``
        is seen."""
        import numpy as np
        from onnx import numpy_helper

        if key not in self.weights:
            scale = np.abs(w).max(axis=0) / 127.0
            scale[scale == 0] = 1.0
            q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
            self.graph.initializer.extend([
                numpy_helper.from_array(q, tag + "_w_int8"),
                numpy_helper.from_array(scale.astype(np.float32), tag + "_w_scale")])
            self.weights[key] = tag
        return self.weights[key]


def _row_codes(x: str, p: str, k: int, opset: int) -> tuple[list[Any], list[Any], tuple[str, str]]:
    """Nodes turning activation ``x`` (last axis ``k``) into uint8 codes with one symmetric scale per row.

    Returns the nodes, the initializers they add, and the names of the codes (shaped like ``x``) and of the row
    scales (``x``'s shape with a last axis of 1).
    """
    import numpy as np
    from onnx import helper, numpy_helper

    inits = [numpy_helper.from_array(np.array([-1, k], np.int64), p + "_2d")]
    if opset < 18:  # ReduceMax/ReduceMin took their axes as an attribute before opset 18
        reduce = [helper.make_node(op, [x], [p + suffix], keepdims=1, axes=[-1], name=p + suffix)
                  for op, suffix in (("ReduceMax", "_max"), ("ReduceMin", "_min"))]
    else:
        inits.append(numpy_helper.from_array(np.array([-1], np.int64), p + "_axis"))
        reduce = [helper.make_node(op, [x, p + "_axis"], [p + suffix], keepdims=1, name=p + suffix)
                  for op, suffix in (("ReduceMax", "_max"), ("ReduceMin", "_min"))]
    nodes = reduce + [
        # max|x| per row without writing |x|: max(max x, -min x)
        helper.make_node("Neg", [p + "_min"], [p + "_neg_min"], name=p + "_neg_min"),
        helper.make_node("Max", [p + "_max", p + "_neg_min"], [p + "_absmax"], name=p + "_absmax"),
        helper.make_node("Mul", [p + "_absmax", "_pr_inv127"], [p + "_scale_raw"], name=p + "_scale_raw"),
        # an all-zero row: a tiny scale, codes 128 (zero), and a product of exactly zero
        helper.make_node("Max", [p + "_scale_raw", "_pr_floor"], [p + "_scale"], name=p + "_scale"),
        # QuantizeLinear takes per-axis scales as a 1-D tensor: view x as (rows, k), one scale per row
        helper.make_node("Reshape", [p + "_scale", "_pr_flat"], [p + "_scale_1d"], name=p + "_scale_1d"),
        helper.make_node("Shape", [p + "_scale_1d"], [p + "_rows"], name=p + "_rows"),
        helper.make_node("Expand", ["_pr_zp", p + "_rows"], [p + "_zp_1d"], name=p + "_zp_1d"),
        helper.make_node("Reshape", [x, p + "_2d"], [p + "_x2d"], name=p + "_x2d"),
        helper.make_node("QuantizeLinear", [p + "_x2d", p + "_scale_1d", p + "_zp_1d"], [p + "_u8_2d"], axis=0,
                         name=p + "_quant"),
        helper.make_node("Shape", [x], [p + "_shape"], name=p + "_shape"),
        helper.make_node("Reshape", [p + "_u8_2d", p + "_shape"], [p + "_u8"], name=p + "_u8"),
    ]
    return nodes, inits, (p + "_u8", p + "_scale")


def _offset_codes(x: str, p: str, lower: float, opset: int) -> tuple[list[Any], list[Any], tuple[str, str, str]]:
    """Nodes coding ``x`` (never below ``lower`` < 0) as uint8 with a fixed zero point, one scale per row.

    ``s = max(max x_row / (255 - zp), -lower / zp)`` keeps ``x_row / s + zp`` within 0..255 for every value the
    activation can take, so nothing is clipped; codes and scales depend on the row alone.

    Returns:
        The nodes, the initializers they add, and the names of the codes, the row scales and the zero point.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    from memrerank.export.optimize import GELU_ZERO_POINT as zp

    if not lower < 0:
        raise ValueError(f"{x}: offset codes need a negative lower bound, got {lower}")
    inits = [numpy_helper.from_array(np.array(1.0 / (255 - zp), np.float32), p + "_inv_range"),
             numpy_helper.from_array(np.array(-lower / zp, np.float32), p + "_floor"),
             numpy_helper.from_array(np.array(zp, np.uint8), p + "_zp"),
             numpy_helper.from_array(np.array([-1], np.int64), p + "_last")]
    if opset < 18:
        reduce = helper.make_node("ReduceMax", [x], [p + "_max"], keepdims=1, axes=[-1], name=p + "_max")
    else:
        inits.append(numpy_helper.from_array(np.array([-1], np.int64), p + "_axis"))
        reduce = helper.make_node("ReduceMax", [x, p + "_axis"], [p + "_max"], keepdims=1, name=p + "_max")
    nodes = [
        reduce,
        helper.make_node("Mul", [p + "_max", p + "_inv_range"], [p + "_scale_raw"], name=p + "_scale_raw"),
        helper.make_node("Max", [p + "_scale_raw", p + "_floor"], [p + "_scale"], name=p + "_scale"),
        helper.make_node("Reshape", [p + "_scale", "_pr_flat"], [p + "_scale_1d"], name=p + "_scale_1d"),
        helper.make_node("Shape", [p + "_scale_1d"], [p + "_rows"], name=p + "_rows"),
        helper.make_node("Expand", [p + "_zp", p + "_rows"], [p + "_zp_1d"], name=p + "_zp_1d"),
        helper.make_node("Shape", [x], [p + "_shape"], name=p + "_shape"),
        helper.make_node("Gather", [p + "_shape", p + "_last"], [p + "_k"], axis=0, name=p + "_k"),
        helper.make_node("Concat", ["_pr_flat", p + "_k"], [p + "_2d"], axis=0, name=p + "_2d"),
        helper.make_node("Reshape", [x, p + "_2d"], [p + "_x2d"], name=p + "_x2d"),
        helper.make_node("QuantizeLinear", [p + "_x2d", p + "_scale_1d", p + "_zp_1d"], [p + "_u8_2d"], axis=0,
                         name=p + "_quant"),
        helper.make_node("Reshape", [p + "_u8_2d", p + "_shape"], [p + "_u8"], name=p + "_u8"),
    ]
    return nodes, inits, (p + "_u8", p + "_scale", p + "_zp")


#: The int8 precision is batch-independent: a row's codes and scales depend on that row alone (see
#: :func:`quantize_per_row`), so a document scores the same alone or among any others.
INT8_METHOD = ("per-row (per-token) symmetric dynamic activation scales, U8 codes with zero point 128, "
               "per-channel symmetric S8 weights, MatMulIntegerToFloat (per-row a_scale) on weight MatMul/Gemm")


#: How the products the sensitivity search keeps may run, best first (:func:`build_int8`'s ``kept_as``).
KEPT_AS = {"two-pass": "int8 weights, activation coded twice (the second codes its rounding error): ~15-bit "
                       "activations through two integer products",
           "fp32": "fp32 weights and product"}


@register_precision("int8", kept_as=tuple(KEPT_AS))
def build_int8(fp32: Path, out: Path, info: GraphInfo, calib: Any = None, exclude: list[str] | None = None,
               kept_as: str = "fp32", two_pass_last_skip: Collection[str] = ()) -> Build:
    """Per-row dynamic quantization: int8 weights per channel, activations quantized per token on the fly
    (:func:`quantize_per_row`), so scores do not depend on what shares a batch; int8 embedding tables.

    With calibration pairs, the graph is first prepared by :func:`memrerank.export.optimize.plan_int8`: the last
    layer computes the first token only where the head reads nothing else (checked against the fp32 graph),
    products that run on one row per pair stay fp32, LayerNorm outputs are smoothed and GELU outputs get offset
    codes. Every constant is fixed at export, so the graph stays batch-independent.

    ``exclude``: the products the sensitivity search keeps, run as ``kept_as`` says (:data:`KEPT_AS`):
    ``"fp32"``, or ``"two-pass"`` where the plan allows it (decoders: their weights stay int8 and their
    activation gets a second code for its rounding error); otherwise fp32. ``two_pass_last_skip``: products
    whose last tokens are coded once (measurement only, see :func:`quantize_per_row`).
    """
    from memrerank.export.optimize import plan_int8

    if kept_as not in KEPT_AS:
        raise ValueError(f"kept_as: unknown {kept_as!r}; choose from {', '.join(KEPT_AS)}")
    exclude = set(exclude or [])
    plan = plan_int8(fp32, info, calib)
    two_pass = exclude - set(plan.one_row) if kept_as == "two-pass" and plan.two_pass else set()
    keep = (exclude - two_pass) | set(plan.one_row)
    nodes = [n for n in info.weight_nodes if n not in keep]
    # with the last tokens coded twice, a product that reads only last tokens runs two-pass whole
    whole = (set(plan.last_row) & set(nodes)) - two_pass if plan.two_pass_last else set()
    out.parent.mkdir(parents=True, exist_ok=True)
    if nodes:
        quantize_per_row(fp32, out, nodes, info.external_data, model=plan.copy_model(), smooth=plan.smooth,
                         lower_bounds=plan.lower_bounds, outliers=plan.outliers, hadamard=plan.hadamard,
                         two_pass=two_pass | whole, two_pass_last=plan.two_pass_last,
                         two_pass_last_skip=two_pass_last_skip)
    elif plan.model is not None:
        for stale in (out, out.parent / (out.name + "_data")):
            stale.unlink(missing_ok=True)
        save_graph(plan.copy_model(), out, info.external_data)
    else:
        _copy_graph(fp32, out, info)
    tables = quantize_embeddings(out, [n for n in info.embedding_nodes if n not in exclude], info.external_data)
    kept = {"kept_as": "two-pass" if two_pass else "fp32", "two_pass_products": len(two_pass)} if exclude else {}
    if whole:  # products after the last-token selection, two-pass whole (beside those the search kept)
        kept["two_pass_last_token_products"] = len(whole)
    return Build(method=INT8_METHOD, batch_independent=True, extra={"embeddings": _embeddings_record(tables),
                                                                    **plan.record, **kept})


class Int8Coder:
    """The ``int8`` precision of a decoder written while the fused graph is written (the streaming export), as
    :func:`build_int8` builds it from a rotated fused graph, without the sensitivity search: each weight product
    coded per row (:class:`_RowCoder`, the same nodes), the SwiGLU down projection's input rotated by a block
    Hadamard (:data:`~memrerank.export.optimize.DECODER_HADAMARD_BLOCK`), each sequence's last
    :data:`~memrerank.export.optimize.DECODER_TWO_PASS_LAST` tokens coded twice and the products that run on
    last tokens only (the last layer's, after the last-token selection) two-pass whole, the token embeddings
    int8 rows, the folded head fp32. For a rotated graph that is the whole int8 plan: nothing in it is measured.
    """

    def __init__(self) -> None:
        import onnx
        from onnx import TensorProto, helper

        from memrerank.export.optimize import DECODER_TWO_PASS_LAST

        # the coder adds its initializers to a graph of its own; each product's are moved into the writer's
        self._shell = helper.make_model(helper.make_graph(
            [], "shell", [helper.make_tensor_value_info(n, TensorProto.INT64, None)
                          for n in ("input_ids", "attention_mask")], []),
            opset_imports=[helper.make_opsetid("", 23)])
        self._onnx = onnx
        self._coder = _RowCoder(self._shell, {}, {}, two_pass_last=DECODER_TWO_PASS_LAST)
        self.two_pass_last = DECODER_TWO_PASS_LAST
        self.products = 0
        self.two_pass_products = 0
        self.hadamard = 0
        self.tables = 0

    def _drain(self, g: Any) -> None:
        from onnx import numpy_helper

        inits = self._shell.graph.initializer
        for t in list(inits):
            g.const(t.name, numpy_helper.to_array(t))
        del inits[:]

    def product(self, g: Any, x: str, weight_name: str, w: Any, name: str, one_row: bool = False) -> str:
        from onnx import TensorProto, helper

        from memrerank.export.optimize import DECODER_HADAMARD_BLOCK, _hadamard_block

        if one_row:  # after the last-token selection every row is a last token: two-pass whole
            self._coder.two_pass.add(name)
            self.two_pass_products += 1
        if "down_proj" in name and (b := _hadamard_block(int(w.shape[0]), DECODER_HADAMARD_BLOCK)):
            self._coder.hadamard[x] = b
            self.hadamard += 1
        out = name + "_out"
        nodes = self._coder.replace(helper.make_node("MatMul", [x, weight_name], [out], name=name), w, None, False)
        self._drain(g)
        g.nodes.extend(nodes)
        g.types[out] = TensorProto.FLOAT
        self.products += 1
        return out

    def embedding(self, g: Any, table_name: str, table: Any, ids: str) -> str:
        self.tables += 1
        return write_int8_lookup(g, table_name, table, ids)

    def build(self) -> Build:
        return Build(method=INT8_METHOD, batch_independent=True, extra={
            "embeddings": _embeddings_record(self.tables), "streamed": True, "int8_products": self.products,
            "online_hadamard": {"activations": self.hadamard},
            "two_pass_last_tokens": {"tokens": self.two_pass_last}, "two_pass_last_token_products":
                self.two_pass_products,
            "smoothing": {"activations": 0, "why": "rotated weights: inputs coded as they are"}})


def _embeddings_record(tables: int) -> str:
    return f"{tables} table(s) int8 with one symmetric scale per row" if tables else "fp32"


def build_int8_per_tensor(fp32: Path, out: Path, info: GraphInfo, calib: Any = None,
                          exclude: list[str] | None = None) -> Build:
    """The former int8 (kept for comparison; not a precision an export writes): Optimum's ORTQuantizer dynamic
    preset, whose ``DynamicQuantizeLinear`` takes one activation scale per input tensor, i.e. per batch, so a
    score moves with the other documents in its call."""
    exclude = list(exclude or [])
    _dynamic(fp32, out, info, exclude)
    tables = quantize_embeddings(out, [n for n in info.embedding_nodes if n not in set(exclude)], info.external_data)
    return Build(method="optimum ORTQuantizer dynamic, avx512_vnni preset, per-channel S8 weights, "
                        "MatMul/Gemm", batch_independent=False,
                 extra={"embeddings": _embeddings_record(tables)})


class _Reader:
    """onnxruntime CalibrationDataReader over pre-tokenized calibration batches."""

    def __init__(self, feeds: list[dict[str, Any]]) -> None:
        self._it: Iterator[dict[str, Any]] = iter(feeds)

    def get_next(self) -> dict[str, Any] | None:
        return next(self._it, None)


@register_precision("int8-static")
def build_int8_static(fp32: Path, out: Path, info: GraphInfo, calib: Any = None,
                      exclude: list[str] | None = None) -> Build:
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
    if not nodes:  # everything kept in fp32
        _copy_graph(fp32, out, info)
        return Build(method="all weight products kept in fp32", batch_independent=True,
                     extra={"calibration_pairs": calib.n_pairs})
    with _quiet():
        quantize_static(
            str(fp32), str(out), _Reader(calib.feeds(fp32)), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul", "Gemm"], nodes_to_quantize=nodes,
            nodes_to_exclude=_others(info, nodes), per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax, use_external_data_format=info.external_data,
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
        )
    return Build(method="onnxruntime quantize_static QDQ, MinMax ranges, per-channel S8 weights, "
                        "U8 activations, weight MatMul/Gemm only",
                 batch_independent=True,  # activation scales fixed at export
                 extra={"calibration_pairs": calib.n_pairs})
