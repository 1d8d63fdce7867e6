"""What an int8 graph needs besides quantized products: the graph changes and activation facts ``int8`` builds with.

Measured on the real all-MiniLM-L6-v2 cross-encoder (``bench/encoder_levers.py``,
``bench/results/encoder_levers.json``); each change keeps a document's score independent of what shares its
batch, because every constant it adds is fixed at export:

* **first token only in the last layer** (:func:`first_token_last_layer`): a cross-encoder's head reads the first
  token of the last layer's output, and every op of a layer except attention works on each token alone. The
  last layer therefore needs keys and values for every token but its query, output projection and FFN for the
  first token only: ~15 % less work for a 6-layer model (more for 12), fp32-exact (logits move by ~1e-6). The
  export checks the changed graph against the unchanged one on the calibration pairs and keeps the unchanged
  one when they differ by more than :data:`FIRST_TOKEN_TOLERANCE`.
* **products on one row per pair stay fp32** (:func:`one_row_products`): the pooler and, after the change above,
  the last layer's query/output/FFN products run on one row per pair, so int8 would save nothing there and
  only add error (quantizing BERT's pooler alone costs ~0.03 top-10 overlap on the held-out LoCoMo pairs).
* **smoothing of LayerNorm outputs** (:func:`smoothing_factors`, SmoothQuant's scale migration): BERT's
  LayerNorm outputs carry a few outlier channels (channel 99 of MiniLM: 13-15× the median channel's range); a
  per-token activation scale is then set by that channel and every other one is coded coarsely. Dividing
  channel ``j`` by ``s_j = max|x_j|^α / max|W_j,:|^(1-α)`` (one ``Mul`` before the codes) and multiplying row
  ``j`` of the weight by ``s_j`` leaves the product unchanged in exact arithmetic and moves range from the
  activation to the weight, which has a scale per output column.
* **offset codes for GELU outputs** (:func:`gelu_inputs`): GELU never goes below :data:`GELU_MIN`, so its
  output (the FFN's second product's input) is coded on 0..255 with the fixed zero point
  :data:`GELU_ZERO_POINT` instead of symmetric ±127: about twice the resolution for the same kernel, and one
  reduction (the row maximum) instead of two.

What was measured and left out (same file): onnxruntime's BERT fusions (fused ``Attention``,
``MultiHeadAttention``, ``SkipLayerNormalization``, ``EmbedLayerNormalization``) are slower than the unfused
graph on onnxruntime 1.32's CPU kernels; the bias of ``MatMulIntegerToFloat`` gives wrong results together
with per-row activation scales; 8-bit ``MatMulNBits`` (per-block activation codes) runs at half the speed of
``MatMulIntegerToFloat``.
"""

from __future__ import annotations

import tempfile
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FIRST_TOKEN_TOLERANCE", "PLAN_PAIRS", "SMOOTH_ALPHA", "GELU_MIN", "GELU_ZERO_POINT", "OUTLIER_RATIO",
           "DECODER_SMOOTH_ALPHA", "Int8Plan", "plan_int8", "outlier_channels", "activation_stats_of_file",
           "first_token_last_layer", "one_row_products", "smoothing_factors", "gelu_inputs", "layernorm_inputs"]

#: Largest |Δlogit| between the first-token graph and the unchanged one on the calibration pairs (fp32 both).
FIRST_TOKEN_TOLERANCE = 1e-4
#: Calibration pairs the first-token graph is checked on, and whose activations set the smoothing and offsets
#: (whole query groups / evenly spaced batches up to this many; an export's calibration set may hold thousands).
PLAN_PAIRS = 512
#: SmoothQuant's migration strength: 0 leaves activations as they are, 1 moves all their range to the weights.
#: 0.75 met the export's budget on MiniLM where 0.5 and 0.3 did not on every set (encoder_levers.json).
SMOOTH_ALPHA = 0.75
#: An input channel of a decoder product whose calibration range passes this many times the median channel's runs
#: in fp32 beside the int8 product (:func:`outlier_channels`).
OUTLIER_RATIO = 8.0
#: SmoothQuant's strength on a decoder's product inputs (see :func:`_decoder_plan` for what was measured).
DECODER_SMOOTH_ALPHA = 0.5
#: Block of the online Hadamard rotation of a decoder's SwiGLU down-projection input (0: none; smoothing and
#: outlier channels instead).
DECODER_HADAMARD_BLOCK = 128
#: A decoder's int8 codes the activation rows of each sequence's last this many real tokens twice (the score is
#: read at the last token). Real Qwen2.5-Coder-1.5B, rotated fused graph, 6 held-out LoCoMo questions x 20 turns
#: (64 tokens a pair padded), prefix reuse, batch 16, 2 threads, Spearman / top-10 vs fp32 (seconds in the graph;
#: fp32 95.7 s): one pass 0.965 / 0.95 (33.6 s); last 4 tokens 0.992 / 0.967; last 8 0.996 / 1.0 (37.1 s, 2.58x
#: fp32); last 16 0.994 / 1.0 (51.3 s); every row two-pass (batch 1) 0.997 / 1.0.
DECODER_TWO_PASS_LAST = 8
#: Below the minimum of GELU(x) = x·Φ(x) (−0.169971 at x ≈ −0.7518), with room for rounding.
GELU_MIN = -0.17
#: Zero point of GELU-output codes: rows whose maximum passes |GELU_MIN|·(255−zp)/zp ≈ 2.5 get (255−zp)/127 ≈ 1.9×
#: finer codes than symmetric ones; smaller rows get the scale floor |GELU_MIN|/zp.
GELU_ZERO_POINT = 16
_FIRST = "_first_token"
_ROW_OPS_SKIPPED = ("Shape", "Size")  # they read a tensor's shape, not its rows


@dataclass
class Int8Plan:
    """What :func:`memrerank.export.quantize.build_int8` quantizes from, and how.

    Attributes:
        model: the graph to quantize (the fp32 graph, or its first-token form), or ``None``: the fp32 file as it
            is (nothing applied; not loaded, so a large graph is not held twice). Copy it before changing it.
        one_row: weight products that run on one row per pair (kept fp32).
        smooth: activation name → per-channel divisor (:func:`smoothing_factors`).
        lower_bounds: activation name → a bound no value goes below (GELU outputs), coded with a fixed zero point.
        outliers: activation name → input channels that run in fp32 beside the int8 product
            (:func:`outlier_channels`; decoders).
        hadamard: activation name → block size of the online Hadamard rotation it gets before coding (the
            SwiGLU down projection's input of a decoder; :func:`memrerank.export.quantize.quantize_per_row`).
        two_pass: products the sensitivity search keeps can run as two-pass int8 (their activation coded twice,
            :func:`memrerank.export.quantize.quantize_per_row`) instead of fp32: decoder graphs, whose inputs
            have symmetric codes.
        two_pass_last: every other product codes the rows of each sequence's last this many tokens twice
            (``quantize_per_row``'s ``two_pass_last``; decoders, :data:`DECODER_TWO_PASS_LAST`); 0: none.
        last_row: products that run on each sequence's last token only (after the graph selects it): with
            ``two_pass_last``, every row of theirs is a last token, so they run two-pass whole.
        record: what was done, for the precision's ``build`` record in the manifest.
    """

    model: Any
    one_row: list[str] = field(default_factory=list)
    smooth: dict[str, np.ndarray] = field(default_factory=dict)
    lower_bounds: dict[str, float] = field(default_factory=dict)
    outliers: dict[str, np.ndarray] = field(default_factory=dict)
    hadamard: dict[str, int] = field(default_factory=dict)
    two_pass: bool = False
    two_pass_last: int = 0
    last_row: list[str] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)

    def copy_model(self) -> Any:
        """A copy of :attr:`model` to change (``None`` when the plan has none)."""
        import onnx

        if self.model is None:
            return None
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        return model


# One plan per (calibration set, fp32 graph): the sensitivity search builds int8 many times from the same graph.
_PLANS: weakref.WeakKeyDictionary[Any, dict[tuple[Any, ...], Int8Plan]] = weakref.WeakKeyDictionary()


def plan_int8(fp32: Path, info: Any, calib: Any = None, *, alpha: float = SMOOTH_ALPHA,
              first_token: bool = True) -> Int8Plan:
    """Prepare the int8 build of ``fp32``: first-token last layer, products kept fp32, smoothing, GELU codes.

    Without calibration pairs (``calib`` is ``None``) nothing can be checked or measured: the plan is the fp32
    graph as it is, quantized plainly (pooler excepted).

    Args:
        fp32: the fp32 graph.
        info: its :class:`~memrerank.export.quantize.GraphInfo`.
        calib: the export's :class:`~memrerank.export.fidelity.CalibSet` (feeds, fp32 reference logits).
        alpha: smoothing strength (:data:`SMOOTH_ALPHA`).
        first_token: try the first-token last layer (``False``: measure without it).
    """
    import onnx

    key = (str(Path(fp32).resolve()), Path(fp32).stat().st_mtime_ns, alpha, first_token)
    if calib is not None:
        try:
            cached = _PLANS.setdefault(calib, {}).get(key)
        except TypeError:  # not weak-referenceable: no cache
            cached = None
        if cached is not None:
            return cached
    # The graph's structure only (no external weights): a graph nothing here applies to (a decoder) is then
    # quantized from its file as before, without a second copy of its weights in memory.
    skeleton = _skeleton(Path(fp32))
    trial = onnx.ModelProto()
    trial.CopyFrom(skeleton)
    first = ("not asked for" if not first_token else first_token_last_layer(trial) if calib is not None
             else "no calibration pairs to check it on")
    record: dict[str, Any] = {}
    model = None
    if isinstance(first, str):
        record["first_token_last_layer"] = {"applied": False, "why": first}
    else:
        model, record["first_token_last_layer"] = _try_first_token(onnx.load(str(fp32)), calib, info.external_data)
    weights = set(info.weight_nodes)
    one_row = [n for n in one_row_products(model if model is not None else skeleton) if n in weights]
    quantized = [n for n in info.weight_nodes if n not in set(one_row)]
    candidates_ln = layernorm_inputs(skeleton, quantized) if calib is not None else []
    candidates_gelu = gelu_inputs(skeleton, quantized) if calib is not None else []
    if model is None and (candidates_ln or candidates_gelu):
        model = onnx.load(str(fp32))
    plan = Int8Plan(model=model, one_row=one_row, record=record)
    record["fp32_nodes"] = one_row
    if candidates_ln or candidates_gelu:
        stats = _activation_stats(model, sorted(set(candidates_ln) | set(candidates_gelu)),
                                  _spread(calib.feeds(Path(fp32)), PLAN_PAIRS), info.external_data)
        w_range = _weight_row_ranges(model, quantized)
        plan.smooth = smoothing_factors({x: stats[x][0] for x in candidates_ln}, w_range, alpha)
        plan.lower_bounds = {x: GELU_MIN for x in candidates_gelu if stats[x][1] >= GELU_MIN}
    record["smoothing"] = {"method": "SmoothQuant scale migration on LayerNorm outputs", "alpha": alpha,
                           "activations": len(plan.smooth)} if plan.smooth else {"activations": 0}
    record["gelu_codes"] = ({"lower_bound": GELU_MIN, "zero_point": GELU_ZERO_POINT,
                             "activations": len(plan.lower_bounds)} if plan.lower_bounds else {"activations": 0})
    if calib is not None and _is_decoder(skeleton):
        plan.smooth, plan.outliers, plan.hadamard, decoder = _decoder_plan(Path(fp32), skeleton, quantized, calib)
        record.update(decoder)
        plan.two_pass = True
        if any(i.name == "attention_mask" for i in skeleton.graph.input):
            plan.two_pass_last = DECODER_TWO_PASS_LAST
            wanted = set(quantized)
            plan.last_row = [n for n in last_row_products(skeleton) if n in wanted]
            record["two_pass_last_tokens"] = {
                "tokens": DECODER_TWO_PASS_LAST, "last_token_products": len(plan.last_row),
                "method": "the rows of each sequence's last tokens coded twice (the second code takes the first's "
                          "rounding error) in every product; products after the last-token selection two-pass "
                          "whole"}
    if calib is not None:
        try:
            _PLANS.setdefault(calib, {})[key] = plan
        except TypeError:
            pass
    return plan


def _is_decoder(model: Any) -> bool:
    """A decoder-yes-no graph: it takes a shared past."""
    return any(i.name.startswith("past_key.") for i in model.graph.input)


def outlier_channels(act_range: np.ndarray, ratio: float = OUTLIER_RATIO) -> np.ndarray:
    """The input channels whose calibration range passes ``ratio`` times the median channel's: in a real LLM a
    handful per activation, hundreds of times larger than the rest (the SwiGLU down projection's input most of
    all), which would otherwise set every token's int8 scale."""
    a = np.asarray(act_range, np.float64)
    return np.flatnonzero(a > ratio * max(float(np.median(a)), 1e-30)).astype(np.int64)


def _decoder_plan(fp32: Path, skeleton: Any, quantized: list[str], calib: Any
                  ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, int], dict[str, Any]]:
    """Smoothing, outlier channels and online rotations of every quantized product's input of a decoder graph,
    from one fp32 pass over the calibration pairs (:func:`activation_stats_of_file`) and the weights' row
    ranges read one tensor at a time (neither reads the whole model into this process).

    Measured on the real Qwen2.5-Coder-1.5B, held-out LoCoMo pairs (12 questions x 20 turns), every product
    int8, Spearman vs fp32 / max |Δlogit|:

    * unrotated graph: plain 0.874 / 0.52; smoothing alone (α 0.5) 0.930; outlier channels alone (8x the median)
      0.923; both 0.954 / 0.29 (keeping the 28 down projections fp32 instead: 0.941).
    * rotated graph (``export --rotate``, :class:`~memrerank.export.fused.Rotation`): no channel of a rotated
      input passes 8x the median; with the down projection's input given a block Hadamard (128) and no
      smoothing 0.977 / 0.17 (smoothing α 0.5 on top: 0.972; the down projection smoothed with outlier channels
      instead of rotated: 0.955; Hadamard block 64: 0.970).

    * two-pass codes (:func:`memrerank.export.quantize.quantize_per_row`'s ``two_pass``; same split, every
      product int8, this rotated recipe): one pass 0.968 / 0.20 (a second run of the 0.977 above), two passes
      on every product 0.997 / 0.08, on the 28 down projections only 0.969, on q/k/v only 0.977: the error is
      spread over the products, so the search (which keeps products two-pass, :data:`Int8Plan.two_pass`)
      picks them by block. Speed on 60 of those pairs (prefix reuse, 2 threads, quiet machine, interleaved):
      fp32 58.7 s, one pass 18.8 s (3.1x), two passes on every product 32.3 s (1.8x).

    So a rotated graph's inputs are coded as they are (smoothing only moves weight range into them); an
    unrotated one's are smoothed, with outlier channels in fp32. Both are found on the raw ranges: an outlier
    channel runs in fp32 unsmoothed, the others are coded after smoothing. The SwiGLU down projection's input (the
    largest outliers, which no offline rotation reaches) gets a block Hadamard rotation
    (:data:`DECODER_HADAMARD_BLOCK`).
    """
    wanted = set(quantized)
    products = [n for n in skeleton.graph.node if n.name in wanted]
    inputs = sorted({n.input[0] for n in products})
    if not inputs:
        return {}, {}, {}, {"smoothing": {"activations": 0}, "outlier_channels": {"activations": 0}}
    k = _input_channels(skeleton, products)
    hadamard = {x: b for x in {n.input[0] for n in products if "down_proj" in n.name}
                if (b := _hadamard_block(k.get(x, 0), DECODER_HADAMARD_BLOCK))}
    if _rotation_of(skeleton):  # nothing to measure: a rotated input has no outlier channel and is not smoothed
        record: dict[str, Any] = {
            "smoothing": {"activations": 0, "why": "rotated weights (export --rotate): inputs coded as they are"},
            "outlier_channels": {"activations": 0, "why": "rotated weights: no channel stands out"}}
        return {}, {}, hadamard, _with_hadamard(record, hadamard)
    stats = activation_stats_of_file(fp32, inputs, _spread(calib.feeds(fp32), PLAN_PAIRS))
    coded = [x for x in inputs if x not in hadamard]
    outliers = {x: idx for x in coded if len(idx := outlier_channels(stats[x][0]))}
    smooth = smoothing_factors({x: stats[x][0] for x in coded}, _weight_row_ranges_of_file(fp32, skeleton, quantized),
                               DECODER_SMOOTH_ALPHA)
    ratios = {x: float(np.max(stats[x][0]) / max(float(np.median(stats[x][0])), 1e-30)) for x in inputs}
    record = {
        "smoothing": {"method": "SmoothQuant scale migration on every product input", "alpha":
                      DECODER_SMOOTH_ALPHA, "activations": len(smooth)},
        "outlier_channels": {"method": "LLM.int8() decomposition: channels above the ratio run in fp32 beside "
                                       "the int8 product (fixed at export)", "ratio": OUTLIER_RATIO,
                             "activations": len(outliers), "channels": int(sum(len(v) for v in outliers.values())),
                             "largest_max_over_median": round(max(ratios.values()), 1)}}
    return smooth, outliers, hadamard, _with_hadamard(record, hadamard)


def _hadamard_block(k: int, most: int) -> int:
    """The largest power of two up to ``most`` that divides ``k`` channels and leaves more than one block
    (0: none of at least 16)."""
    b = most
    while b >= 16 and (k % b or k <= b):
        b //= 2
    return b if b >= 16 else 0


def _with_hadamard(record: dict[str, Any], hadamard: dict[str, int]) -> dict[str, Any]:
    if hadamard:
        record["online_hadamard"] = {"method": "block-diagonal Hadamard rotation before coding, its transpose "
                                               "folded into the weights (SwiGLU down-projection inputs)",
                                     "blocks": sorted(set(hadamard.values())), "activations": len(hadamard)}
    return record


def _rotation_of(model: Any) -> dict[str, Any] | None:
    """The rotation a fused graph's weights were written in (its ``memrerank.rotation`` metadata), or None."""
    import json

    from memrerank.export.fused import ROTATION_PROP

    value = next((p.value for p in model.metadata_props if p.key == ROTATION_PROP), None)
    return json.loads(value) if value else None


def _input_channels(skeleton: Any, products: list[Any]) -> dict[str, int]:
    """Each product input's channel count, from its weight's first dimension."""
    dims = {i.name: list(i.dims) for i in skeleton.graph.initializer}
    return {n.input[0]: int(dims[n.input[1]][0]) for n in products if len(dims.get(n.input[1], [])) == 2}


def _weight_row_ranges_of_file(fp32: Path, skeleton: Any, nodes: list[str]) -> dict[str, np.ndarray]:
    """:func:`_weight_row_ranges` of a graph file, reading one weight at a time from its external data."""
    from onnx import numpy_helper

    inits = {i.name: i for i in skeleton.graph.initializer}
    wanted = set(nodes)
    out: dict[str, np.ndarray] = {}
    for n in skeleton.graph.node:
        if n.name not in wanted or n.op_type != "MatMul" or n.input[1] not in inits:
            continue
        r = np.abs(numpy_helper.to_array(inits[n.input[1]], str(fp32.parent))).max(axis=1)
        out[n.input[0]] = r if n.input[0] not in out else np.maximum(out[n.input[0]], r)
    return out


def _skeleton(fp32: Path) -> Any:
    """The graph without its weights: external data is not read, except tensors of at most one dimension (index
    constants, norm vectors: a few KB), which torch's exporter also stores outside a graph above 2 GiB."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    model = onnx.load(str(fp32), load_external_data=False)
    constants = [a.t for n in model.graph.node for a in n.attribute if a.type == onnx.AttributeProto.TENSOR]
    for t in [*model.graph.initializer, *constants]:
        if len(t.dims) <= 1 and uses_external_data(t):
            load_external_data_for_tensor(t, str(fp32.parent))
            t.data_location = onnx.TensorProto.DEFAULT
            del t.external_data[:]
    return model


def _try_first_token(model: Any, calib: Any, external: bool) -> tuple[Any, dict[str, Any]]:
    """The first-token form of ``model`` when it matches the unchanged graph on ``calib``; else ``(None, why)``."""
    changed = model
    why = first_token_last_layer(changed)
    if isinstance(why, str):
        return None, {"applied": False, "why": why}
    from memrerank.export.graph import save_graph

    with tempfile.TemporaryDirectory(prefix="memrerank-first-token-") as tmp:
        path = Path(tmp) / "model.onnx"
        save_graph(changed, path, external)
        rows = _first_groups(calib, PLAN_PAIRS)
        try:
            logits = np.asarray(calib.score(path, [rows]))
        except Exception as exc:  # onnxruntime refuses the graph: keep the unchanged one
            return None, {"applied": False, "why": f"onnxruntime could not run it: {exc}"[:300]}
    diff = float(np.max(np.abs(logits[rows] - np.asarray(calib.reference)[rows])))
    if not diff <= FIRST_TOKEN_TOLERANCE:
        return None, {"applied": False, "why": f"max |Δlogit| {diff:.3g} vs the unchanged graph "
                                               f"> {FIRST_TOKEN_TOLERANCE:g}"}
    return changed, {"applied": True, "products_on_first_token": why, "max_abs_logit_diff": diff,
                     "pairs": int(len(rows))}


def _first_groups(calib: Any, max_pairs: int) -> np.ndarray:
    """Rows of whole query groups, from the first, until ``max_pairs`` (at least one group)."""
    rows: list[np.ndarray] = []
    for group in calib.group_rows:
        if rows and sum(len(r) for r in rows) + len(group) > max_pairs:
            break
        rows.append(np.asarray(group))
    return np.concatenate(rows)


def _spread(feeds: list[dict[str, np.ndarray]], max_rows: int) -> list[dict[str, np.ndarray]]:
    """Evenly spaced batches (feeds are length-sorted) holding about ``max_rows`` rows in all."""
    total = sum(len(f["input_ids"]) for f in feeds)
    if total <= max_rows:
        return feeds
    step = total / max_rows
    return feeds[::max(1, int(round(step)))]


def first_token_last_layer(model: Any) -> list[str] | str:
    """Let the last attention layer compute its first token only, in place; keys and values keep every token.

    Applies to graphs whose output reads the first token of the last hidden state (``Gather`` index 0 on the
    sequence axis: BERT's pooler, RoBERTa/XLM-R/ELECTRA classification heads). The last ``Softmax`` locates the
    last attention; walking back from its score product through non-weight ops finds the query and key
    products, and from the context product the value product, all three reading the layer input ``h``. Every
    other reader of ``h`` (query product, residual add, shape reads) then reads ``h[:, :1]``, and the additive
    mask is cut to its first query row (axis -2; a size-1 axis there stays as it is).

    Returns:
        The weight products that now run on the first token only, or a sentence saying why the graph was
        left unchanged.
    """
    from onnx import helper, numpy_helper

    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    inits = {i.name for i in g.initializer}
    readers: dict[str, list[Any]] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    consts = _constants(g)
    if not any(_selects_first_token(n, consts) for n in g.node if n.op_type == "Gather"):
        return "the head does not read the first token of the last hidden state"
    static = _static_names(g)
    softmax = [n for n in g.node if n.op_type == "Softmax"]
    if not softmax:
        return "no attention (Softmax) in the graph"
    add = producer.get(softmax[-1].input[0])
    scores = add
    mask_input = None
    if add is not None and add.op_type == "Add":
        sides = [producer.get(x) for x in add.input]
        on_path = [i for i, p in enumerate(sides) if p is not None and _leads_to(p, "MatMul", producer, static, inits)]
        if len(on_path) != 1:
            return "the last attention's mask add is not recognised"
        scores = _walk_to(sides[on_path[0]], "MatMul", producer, static)
        mask_input = 1 - on_path[0]
    if scores is None or scores.op_type != "MatMul":
        return "the last attention's score product is not recognised"
    context = [n for n in readers.get(softmax[-1].output[0], []) if n.op_type == "MatMul"]
    if len(context) != 1 or context[0].input[0] != softmax[-1].output[0]:
        return "the last attention's context product is not recognised"
    q = _weight_product_before(scores.input[0], producer, static, inits)
    k = _weight_product_before(scores.input[1], producer, static, inits)
    v = _weight_product_before(context[0].input[1], producer, static, inits)
    if q is None or k is None or v is None or not (q.input[0] == k.input[0] == v.input[0]):
        return "the last attention's query/key/value products do not read one layer input"
    h = q.input[0]
    keep_all = {k.name, v.name}
    consts = [numpy_helper.from_array(np.array([0], np.int64), f"{_FIRST}_start"),
              numpy_helper.from_array(np.array([1], np.int64), f"{_FIRST}_end"),
              numpy_helper.from_array(np.array([1], np.int64), f"{_FIRST}_seq_axis"),
              numpy_helper.from_array(np.array([-2], np.int64), f"{_FIRST}_query_axis")]
    first = h + _FIRST
    for n in readers[h]:
        if n.name in keep_all:
            continue
        for i, x in enumerate(n.input):
            if x == h:
                n.input[i] = first
    g.initializer.extend(consts)
    nodes = list(g.node)
    at = next((i + 1 for i, n in enumerate(nodes) if h in n.output), 0)  # a graph input: slice at the start
    nodes.insert(at, helper.make_node("Slice", [h, f"{_FIRST}_start", f"{_FIRST}_end", f"{_FIRST}_seq_axis"],
                                      [first], name=f"{_FIRST}/Slice"))
    if mask_input is not None:  # keys on the last axis, queries on the one before (a size-1 axis stays as it is)
        mask = add.input[mask_input]
        cut = mask + _FIRST + "_query"
        nodes.insert(nodes.index(add), helper.make_node(
            "Slice", [mask, f"{_FIRST}_start", f"{_FIRST}_end", f"{_FIRST}_query_axis"], [cut],
            name=f"{_FIRST}/mask_Slice"))
        add.input[mask_input] = cut
    del g.node[:]
    g.node.extend(nodes)
    return one_row_products(model)


def one_row_products(model: Any) -> list[str]:
    """Weight products whose input has one row per pair: downstream of a first-token selection (a ``Gather``
    of index 0 or a ``Slice`` 0:1 on the sequence axis)."""
    consts = _constants(model.graph)
    return _products_after(model, lambda n: _selects_first_token(n, consts))


def last_row_products(model: Any) -> list[str]:
    """Weight products downstream of a last-token selection: a ``Gather`` of activations whose indices are
    computed from the ``attention_mask`` input (the fused decoder graph's last layer reads only each row's last
    real token). Gathers from constants (rotary tables indexed by positions) select no rows."""
    g = model.graph
    static = _static_names(g)
    from_mask: set[str] = {"attention_mask"}
    for n in g.node:
        if any(x in from_mask for x in n.input):
            from_mask.update(n.output)
    return _products_after(model, lambda n: n.op_type == "Gather" and len(n.input) > 1
                           and n.input[1] in from_mask and n.input[0] not in static)


def _products_after(model: Any, selects: Callable[[Any], bool]) -> list[str]:
    """Weight products whose input rows come from a node ``selects`` picks. A product's rows follow its first
    input; any other op's output follows its data inputs (shape reads are not data)."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    picked: set[str] = set()
    out: list[str] = []
    for n in g.node:
        if n.op_type in _ROW_OPS_SKIPPED:
            continue
        if selects(n):
            picked.update(n.output)
            continue
        if n.op_type in ("MatMul", "Gemm", "MatMulIntegerToFloat"):
            if n.input and n.input[0] in picked:
                picked.update(n.output)
                if _is_weight_product(n, inits):
                    out.append(n.name)
            continue
        if any(x in picked for x in n.input):
            picked.update(n.output)
    return out


def layernorm_inputs(model: Any, nodes: list[str]) -> list[str]:
    """Inputs of the products ``nodes`` that a ``LayerNormalization`` writes (candidates for smoothing)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    wanted = set(nodes)
    out = []
    for n in model.graph.node:
        if n.name in wanted and n.input:
            p = producer.get(n.input[0])
            if p is not None and p.op_type == "LayerNormalization" and n.input[0] not in out:
                out.append(n.input[0])
    return out


def gelu_inputs(model: Any, nodes: list[str]) -> list[str]:
    """Inputs of the products ``nodes`` that a GELU writes: a ``Gelu``/``BiasGelu`` op, or the exported
    ``x · 0.5 · (1 + erf(x / √2))`` (a ``Mul`` with an ``Erf`` at most three ops above it)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    wanted = set(nodes)
    out = []
    for n in model.graph.node:
        if n.name not in wanted or not n.input or n.input[0] in out:
            continue
        p = producer.get(n.input[0])
        if p is None:
            continue
        if p.op_type in ("Gelu", "BiasGelu") or (p.op_type == "Mul" and _has_above(p, "Erf", producer, 3)):
            out.append(n.input[0])
    return out


def smoothing_factors(act_range: dict[str, np.ndarray], weight_range: dict[str, np.ndarray],
                      alpha: float = SMOOTH_ALPHA) -> dict[str, np.ndarray]:
    """SmoothQuant's per-channel divisors ``s_j = max|x_j|^α / max|W_j,:|^(1-α)``, scaled to a geometric mean of 1.

    Args:
        act_range: activation name → max |x| per input channel, over the calibration tokens.
        weight_range: activation name → max |W| per input row, over every product that reads it.
        alpha: migration strength in [0, 1].
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothing alpha must be in [0, 1], got {alpha}")
    out = {}
    for x, a in act_range.items():
        w = weight_range[x]
        a = np.maximum(np.asarray(a, np.float64), 1e-6 * max(float(np.max(a)), 1e-30))
        w = np.maximum(np.asarray(w, np.float64), 1e-6 * max(float(np.max(w)), 1e-30))
        s = a ** alpha / w ** (1.0 - alpha)
        out[x] = (s / np.exp(np.mean(np.log(s)))).astype(np.float32)
    return out


def _activation_stats(model: Any, names: list[str], feeds: list[dict[str, np.ndarray]], external: bool
                      ) -> dict[str, tuple[np.ndarray, float]]:
    """Per activation: max |x| per channel and the minimum, over the real tokens of ``feeds``."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for x in names:
        if x not in known:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    with tempfile.TemporaryDirectory(prefix="memrerank-stats-") as tmp:
        from memrerank.export.graph import save_graph

        path = Path(tmp) / "model.onnx"
        save_graph(probe, path, external)
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return _reduce_stats(session, names, feeds)


def activation_stats_of_file(graph: Path, names: list[str], feeds: list[dict[str, np.ndarray]]
                             ) -> dict[str, tuple[np.ndarray, float]]:
    """:func:`_activation_stats` of a graph file without reading its weights into this process: a copy of the
    graph's structure with ``names`` as extra outputs is written beside it, so its external data is shared and
    only onnxruntime's session holds the weights (a 1.5B decoder: one copy, not three)."""
    return _reduce_stats(probe_session(graph, names), names, feeds)


def probe_session(graph: Path, names: list[str], *, only: bool = False) -> Any:
    """A CPU onnxruntime session of ``graph`` with the activations ``names`` as extra outputs (``only``: as its
    only outputs, so onnxruntime prunes what comes after them), without reading its weights into this process: a
    copy of the graph's structure is written beside it (sharing its external data) and removed once loaded."""
    import uuid

    import onnx
    import onnxruntime as ort

    probe = onnx.load(str(graph), load_external_data=False)
    if only:
        del probe.graph.output[:]
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, None)
                              for x in names if x not in known)
    path = graph.parent / f".probe-{uuid.uuid4().hex}.onnx"
    try:
        onnx.save(probe, str(path))
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    finally:
        path.unlink(missing_ok=True)


def _reduce_stats(session: Any, names: list[str], feeds: list[dict[str, np.ndarray]]
                  ) -> dict[str, tuple[np.ndarray, float]]:
    """Max |x| per channel and the minimum of each activation in ``names``, over the real tokens of ``feeds``."""
    ranges = {x: np.zeros(0) for x in names}
    lows = {x: np.inf for x in names}
    for feed in feeds:
        mask = feed["attention_mask"].astype(bool)
        for x, value in zip(names, session.run(names, feed)):
            rows = value[mask] if value.ndim == 3 and value.shape[:2] == mask.shape else value.reshape(
                -1, value.shape[-1])
            r = np.abs(rows).max(axis=0)
            ranges[x] = r if ranges[x].size == 0 else np.maximum(ranges[x], r)
            lows[x] = min(lows[x], float(rows.min()))
    return {x: (ranges[x], lows[x]) for x in names}


def _weight_row_ranges(model: Any, nodes: list[str]) -> dict[str, np.ndarray]:
    """Activation name → max |W| per input row over the quantized products that read it."""
    from memrerank.export.graph import _plain_weight

    inits = {i.name: i for i in model.graph.initializer}
    wanted = set(nodes)
    out: dict[str, np.ndarray] = {}
    for n in model.graph.node:
        if n.name not in wanted:
            continue
        weight = _plain_weight(n, inits)
        if weight is None:
            continue
        r = np.abs(weight[0]).max(axis=1)
        out[n.input[0]] = r if n.input[0] not in out else np.maximum(out[n.input[0]], r)
    return out


def _constants(g: Any) -> dict[str, np.ndarray]:
    from onnx import TensorProto, helper, numpy_helper

    # index constants are small and stored in the graph; a tensor in external data (the weights of a graph above
    # 2 GB, e.g. a decoder's norm vectors) is never one, and the graph may have been loaded without its data
    out = {i.name: numpy_helper.to_array(i) for i in g.initializer
           if len(i.dims) <= 1 and i.data_location != TensorProto.EXTERNAL}
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and a.t.data_location != TensorProto.EXTERNAL:
                    out[n.output[0]] = numpy_helper.to_array(helper.get_attribute_value(a))
    return out


def _selects_first_token(n: Any, consts: dict[str, np.ndarray]) -> bool:
    """``Gather(x, 0, axis=1)`` or ``Slice(x, 0, 1, axis 1)``: the first token of a (batch, sequence, ...) tensor."""
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
    if n.op_type == "Gather" and len(n.input) == 2 and attrs.get("axis", 0) == 1:
        idx = consts.get(n.input[1])
        return idx is not None and idx.size == 1 and int(idx.reshape(-1)[0]) == 0
    if n.op_type == "Slice" and len(n.input) >= 4:
        vals = [consts.get(x) for x in n.input[1:4]]
        if any(v is None or v.size != 1 for v in vals):
            return False
        start, end, axis = (int(v.reshape(-1)[0]) for v in vals)
        return (start, end, axis) == (0, 1, 1)
    return False


def _is_weight_product(n: Any, inits: Any) -> bool:
    return n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in inits


def _static_names(g: Any) -> set[str]:
    """Tensors that do not depend on the data: initializers, constants, shape reads and what only they feed
    (bias ``Identity`` copies, the attention scale ``Sqrt``, reshape targets)."""
    static = {i.name for i in g.initializer}
    for n in g.node:
        if n.op_type in ("Constant", *_ROW_OPS_SKIPPED) or all(x in static for x in n.input if x):
            static.update(n.output)
    return static


def _data_inputs(node: Any, static: set[str]) -> list[str]:
    return [x for x in node.input if x and x not in static]


def _walk_to(node: Any, op: str, producer: dict[str, Any], static: set[str], depth: int = 6) -> Any:
    """From ``node`` up through single data inputs (scale Mul/Div, Transpose, ...) to the first ``op`` node."""
    for _ in range(depth):
        if node is None or node.op_type == op:
            return node
        data = _data_inputs(node, static)
        if len(data) != 1:
            return None
        node = producer.get(data[0])
    return node if node is not None and node.op_type == op else None


def _leads_to(node: Any, op: str, producer: dict[str, Any], static: set[str], inits: set[str]) -> bool:
    found = _walk_to(node, op, producer, static)
    return found is not None and not _is_weight_product(found, inits)


def _weight_product_before(name: str, producer: dict[str, Any], static: set[str], inits: set[str],
                           depth: int = 8) -> Any:
    """The weight product a chain of single-data-input ops (bias Add, Reshape, Transpose, scale Mul) starts from."""
    node = producer.get(name)
    for _ in range(depth):
        if node is None:
            return None
        if _is_weight_product(node, inits):
            return node
        data = _data_inputs(node, static)
        if len(data) != 1:
            return None
        node = producer.get(data[0])
    return None


def _has_above(node: Any, op: str, producer: dict[str, Any], depth: int) -> bool:
    frontier = [node]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for x in n.input:
                p = producer.get(x)
                if p is not None:
                    if p.op_type == op:
                        return True
                    nxt.append(p)
        frontier = nxt
    return False
