"""The fused decoder graph: the decoder-yes-no graph written op by op with onnxruntime's fused operators.

Optimum traces :class:`~memrerank.export.families.decoder_yes_no.DecoderYesNoFamily`'s module into dozens of ops
per layer (attention written out as MatMul/Softmax/Concat, RoPE as Slice/Neg/Concat, RMSNorm as
Pow/ReduceMean/Sqrt/Div). This module writes
the same computation with one fused operator per step instead:

* attention: ONNX ``Attention`` (opset 23), grouped-query heads native, the additive mask and the past as inputs;
* rotary embedding: ``com.microsoft.RotaryEmbedding`` with explicit position ids;
* RMSNorm: ``SimplifiedLayerNormalization`` (q/k norms, first layer) and
  ``com.microsoft.SkipSimplifiedLayerNormalization`` (the residual add and the next norm in one op);
* one packed Q/K/V product and one packed gate/up product per layer.

Inputs and outputs are those of the traced graph, so the runtime runs it unchanged: ``input_ids`` and
``attention_mask`` (either padding side; positions count real tokens only), the batch-1 shared past
``past_key.i``/``past_value.i`` and the batch-1 ``present_key.i``/``present_value.i`` (row 0's keys and values after
RoPE), and ``logits`` = the folded head at the last real token, one per row.

Why not ``com.microsoft.GroupQueryAttention``: with a past, it refuses more than one row of more than one token
("batch_size must be 1 when sequence_length > 1 and past context is given", onnxruntime 1.32), which is exactly
the prefix-reuse suffix pass (N documents on one shared prefix). ``Attention`` takes it. Neither op broadcasts a
batch-1 past, so the past is expanded to the batch inside the graph (one copy per layer and call; on the CPU it
costs less than the unfused attention it replaces).

Providers: the ``cpu`` graph (``--graph fused``) keeps the key/value heads grouped. onnxruntime's CUDA ``Attention``
runs grouped heads only through flash / memory-efficient kernels, which take neither fp32 nor a float mask with a
past; the ``cuda`` graph (``--graph fused-cuda``) therefore repeats the key/value heads to the query heads (the
kernel's multi-head path). Both give the same scores and both run on the CPU; the fp16 precision of a GPU artifact
is converted from its fp32 graph, so a GPU artifact is exported with ``--graph fused-cuda``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["GRAPH_KINDS", "FUSED_GRAPHS", "FUSED_EPS", "FUSED_OPSET", "write_fused_graph", "fused_op_counts"]

#: Execution providers a fused graph is written for (see the module docstring for how they differ).
FUSED_EPS = ("cpu", "cuda")
#: ``--graph`` names of the fused graphs → the provider each is written for.
FUSED_GRAPHS = {"fused": "cpu", "fused-cuda": "cuda"}
#: How export writes a decoder's fp32 graph: Optimum's trace of the PyTorch module, or one of the fused graphs.
GRAPH_KINDS = ("traced", *FUSED_GRAPHS)
#: ``Attention`` is an ONNX opset-23 operator.
FUSED_OPSET = 23
_MS = "com.microsoft"


class _Writer:
    """Collects nodes and initializers with generated unique names, and each tensor's element type.

    The types are written as ``value_info``: onnx's shape inference does not know the ``com.microsoft`` operators,
    and without them the fp16 converter (``onnxruntime.transformers.float16``) cannot tell where to put casts.
    """

    def __init__(self, types: dict[str, int]) -> None:
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.types = dict(types)
        self._n = 0

    def const(self, name: str, value: Any, dtype: Any = None) -> str:
        """An initializer named ``name`` (the first value given under a name is kept)."""
        from onnx import numpy_helper

        if name in self.types:  # shared constants are written once
            return name
        tensor = numpy_helper.from_array(np.ascontiguousarray(np.asarray(value, dtype=dtype)), name)
        self.inits.append(tensor)
        self.types[name] = tensor.data_type
        return name

    def _out_type(self, op_type: str, inputs: tuple[str, ...], attrs: dict[str, Any]) -> int:
        from onnx import TensorProto

        if op_type == "Shape":
            return TensorProto.INT64
        if op_type in ("GreaterOrEqual", "And"):
            return TensorProto.BOOL
        if op_type == "Cast":
            return attrs["to"]
        return self.types[inputs[1] if op_type == "Where" else inputs[0]]

    def op(self, op_type: str, *inputs: str, outputs: int | list[str] = 1, domain: str = "",
           name: str | None = None, unused: tuple[int, ...] = (), **attrs: Any) -> Any:
        """Add a node; returns its output name (or names). Outputs listed in ``unused`` are left unnamed."""
        from onnx import helper

        self._n += 1
        base = name or f"{op_type}_{self._n}"
        outs = outputs if isinstance(outputs, list) else [
            "" if i in unused else f"{base}_out{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=base, domain=domain, **attrs))
        kind = self._out_type(op_type, inputs, attrs)
        self.types.update((o, kind) for o in outs if o)
        return outs[0] if len(outs) == 1 else outs

    def value_info(self, skip: set[str]) -> list[Any]:
        from onnx import helper

        return [helper.make_tensor_value_info(o, self.types[o], None)
                for node in self.nodes for o in node.output if o and o not in skip]


def _weights(module: Any) -> dict[str, Any]:
    """Config numbers and float32 numpy weights of a folded-head decoder module (``_FoldedYesNo.build``)."""
    import torch

    body, config = module.body, module.config
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    if head_dim % 2:
        raise ValueError(f"the fused graph needs an even head_dim (RoPE rotates halves), got {head_dim}")
    layer_types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise ValueError("the fused graph does not support sliding-window layers; export with --graph traced")

    def arr(t: Any) -> np.ndarray:
        return t.detach().to(torch.float32).cpu().numpy()

    with torch.no_grad():
        n_pos = int(config.max_position_embeddings)
        probe = torch.zeros(1, dtype=torch.float32)
        cos, sin = body.rotary_emb(probe, torch.arange(n_pos)[None])  # (1, n_pos, head_dim): the model's own RoPE
        half = head_dim // 2
        if not torch.equal(cos[0, :, :half], cos[0, :, half:]):
            raise ValueError("the fused graph needs RoPE with rotate-half frequency layout (cos repeated twice)")
    layers = []
    for layer in body.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if any(getattr(p, "bias", None) is not None for p in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)):
            raise ValueError("the fused graph does not support attention projections with a bias")
        layers.append({
            "in_norm": arr(layer.input_layernorm.weight),
            "qkv": np.concatenate([arr(attn.q_proj.weight), arr(attn.k_proj.weight), arr(attn.v_proj.weight)]).T,
            "q_norm": arr(attn.q_norm.weight),
            "k_norm": arr(attn.k_norm.weight),
            "o": arr(attn.o_proj.weight).T,
            "post_norm": arr(layer.post_attention_layernorm.weight),
            "gate_up": np.concatenate([arr(mlp.gate_proj.weight), arr(mlp.up_proj.weight)]).T,
            "down": arr(mlp.down_proj.weight).T,
        })
    return {
        "heads": n_heads, "kv_heads": n_kv, "head_dim": head_dim, "eps": float(config.rms_norm_eps),
        "intermediate": int(config.intermediate_size), "embed": arr(body.embed_tokens.weight),
        "norm": arr(body.norm.weight), "head": arr(module.head).reshape(-1, 1),
        "cos": arr(cos[0, :, :half]), "sin": arr(sin[0, :, :half]), "layers": layers,
    }


def write_fused_graph(module: Any, path: str | Path, *, ep: str = "cpu", external_data_bytes: int | None = None
                      ) -> list[Path]:
    """Write the fused graph of a folded-head decoder module to ``path``.

    Args:
        module: what :meth:`DecoderYesNoFamily.graph_module` returns (its ``body``, ``head`` and ``config``).
        path: the ``.onnx`` file to write (its folder is created).
        ep: ``"cpu"`` or ``"cuda"`` (:data:`FUSED_EPS`; they differ only in how attention takes the grouped heads).
        external_data_bytes: weights above this many bytes go to ``<name>_data`` beside the graph (default:
            :data:`memrerank.export.graph.EXTERNAL_DATA_BYTES`).

    Returns:
        The files written, graph first.

    Raises:
        ValueError: an unknown ``ep``, or a model the fused graph does not cover (the message says which part).
    """
    import onnx
    from onnx import TensorProto, helper

    from memrerank.export.graph import EXTERNAL_DATA_BYTES

    if ep not in FUSED_EPS:
        raise ValueError(f"ep: unknown {ep!r}; the fused graph is written for {', '.join(FUSED_EPS)}")
    import onnxruntime

    if tuple(int(p) for p in onnxruntime.__version__.split(".")[:2]) < (1, 23):
        raise ValueError(f"the fused graph needs onnxruntime 1.23 or later (ONNX Attention, opset 23); this is "
                         f"{onnxruntime.__version__}: `pip install -U onnxruntime`, or export with --graph traced")
    w = _weights(module)
    n_layers, n_heads, n_kv, d = len(w["layers"]), w["heads"], w["kv_heads"], w["head_dim"]
    hidden, eps = w["embed"].shape[1], w["eps"]
    f32, int64 = TensorProto.FLOAT, TensorProto.INT64
    past_names = [f"past_{kind}.{i}" for i in range(n_layers) for kind in ("key", "value")]
    g = _Writer({"input_ids": int64, "attention_mask": int64, **{n: f32 for n in past_names}})
    i64 = np.int64
    zero, one = g.const("c_0", [0], i64), g.const("c_1", [1], i64)
    two, three = g.const("c_2", [2], i64), g.const("c_3", [3], i64)

    # Shapes, positions (real tokens only, after the past) and the additive mask (B, 1, S, P + S).
    ids_shape = g.op("Shape", "input_ids")
    batch = g.op("Slice", ids_shape, zero, one)
    seq = g.op("Slice", ids_shape, one, two)
    past_len = g.op("Slice", g.op("Shape", "past_key.0"), two, three)
    seq_scalar = g.op("Squeeze", seq, zero)
    steps = g.op("Range", g.const("c_0s", 0, i64), seq_scalar, g.const("c_1s", 1, i64))  # (S,)
    counted = g.op("Sub", g.op("CumSum", "attention_mask", one), one)
    position_ids = g.op("Add", g.op("Max", counted, g.const("c_0b", 0, i64)), past_len)  # (B, S)
    causal = g.op("GreaterOrEqual", g.op("Unsqueeze", steps, one), g.op("Unsqueeze", steps, zero))  # (S, S)
    keep = g.op("Unsqueeze", g.op("Cast", "attention_mask", to=TensorProto.BOOL), one)  # (B, 1, S)
    # A finite minimum, not -inf: a fully masked pad row stays finite (as in the traced graph).
    own_bias = g.op("Where", g.op("And", causal, keep), g.const("c_allow", 0.0, np.float32),
                    g.const("c_block", np.finfo(np.float32).min, np.float32))  # (B, S, S)
    pads = g.op("Concat", zero, zero, past_len, zero, zero, zero, axis=0)
    bias = g.op("Unsqueeze", g.op("Pad", own_bias, pads, g.const("c_0f", 0.0, np.float32)), one)  # (B,1,S,P+S)
    kv_shape = g.op("Concat", batch, g.const("c_kv", [n_kv], i64), past_len, g.const("c_d", [d], i64), axis=0)
    # The last real token of each row, as an index into the (B*S) flattened tokens.
    last = g.op("ReduceMax", g.op("Mul", "attention_mask", steps), one, keepdims=0)  # (B,)
    batch_scalar = g.op("Squeeze", batch, zero)
    flat_last = g.op("Add", g.op("Mul", g.op("Range", g.const("c_0r", 0, i64), batch_scalar,
                                             g.const("c_1r", 1, i64)), seq_scalar), last)  # (B,)

    cos, sin = g.const("rope_cos", w["cos"]), g.const("rope_sin", w["sin"])
    x = g.op("Gather", g.const("embed_tokens", w["embed"]), "input_ids")
    split_qkv = g.const("split_qkv", [n_heads * d, n_kv * d, n_kv * d], i64)
    split_mlp = g.const("split_mlp", [w["intermediate"], w["intermediate"]], i64)
    heads_q, heads_kv = g.const("shape_q", [0, 0, n_heads, d], i64), g.const("shape_kv", [0, 0, n_kv, d], i64)
    flat_q, flat_kv = g.const("flat_q", [0, 0, n_heads * d], i64), g.const("flat_kv", [0, 0, n_kv * d], i64)
    row0 = g.const("shape_row0", [1, -1, n_kv, d], i64)
    rows_q, rows_h = g.const("rows_q", [-1, n_heads * d], i64), g.const("rows_h", [-1, hidden], i64)
    presents, mlp_out = [], None
    for i, lw in enumerate(w["layers"]):
        p = f"layers.{i}."
        if mlp_out is None:
            h = g.op("SimplifiedLayerNormalization", x, g.const(p + "input_layernorm", lw["in_norm"]),
                     axis=-1, epsilon=eps, stash_type=1)
        else:
            h, _, _, x = g.op("SkipSimplifiedLayerNormalization", mlp_out, x,
                              g.const(p + "input_layernorm", lw["in_norm"]), outputs=4, unused=(1, 2), domain=_MS,
                              epsilon=eps)
        qkv = g.op("MatMul", h, g.const(p + "qkv_proj", lw["qkv"]))
        q, k, v = g.op("Split", qkv, split_qkv, outputs=3, axis=-1)
        q = g.op("Reshape", g.op("SimplifiedLayerNormalization", g.op("Reshape", q, heads_q),
                                 g.const(p + "q_norm", lw["q_norm"]), axis=-1, epsilon=eps, stash_type=1), flat_q)
        k = g.op("Reshape", g.op("SimplifiedLayerNormalization", g.op("Reshape", k, heads_kv),
                                 g.const(p + "k_norm", lw["k_norm"]), axis=-1, epsilon=eps, stash_type=1), flat_kv)
        q = g.op("RotaryEmbedding", q, position_ids, cos, sin, domain=_MS, num_heads=n_heads, interleaved=0)
        k = g.op("RotaryEmbedding", k, position_ids, cos, sin, domain=_MS, num_heads=n_kv, interleaved=0)
        for name, t in ((f"present_key.{i}", k), (f"present_value.{i}", v)):  # row 0, (1, kv, S, d)
            g.op("Transpose", g.op("Reshape", g.op("Slice", t, zero, one, zero), row0), perm=[0, 2, 1, 3],
                 outputs=[name])
            presents.append(name)
        past_k, past_v = (g.op("Expand", f"past_{kind}.{i}", kv_shape) for kind in ("key", "value"))
        q_heads = n_heads
        if ep == "cuda":
            k, v, past_k, past_v = _repeat_kv(g, (k, v), (past_k, past_v), batch, seq, past_len, n_kv,
                                              n_heads // n_kv, d)
            n_kv_attn = n_heads
        else:
            n_kv_attn = n_kv
        y = g.op("Attention", q, k, v, bias, past_k, past_v, outputs=3, q_num_heads=q_heads,
                 kv_num_heads=n_kv_attn)[0]
        if i == n_layers - 1:  # only the last real token matters from here on: (B, 1, ·)
            y = g.op("Unsqueeze", g.op("Gather", g.op("Reshape", y, rows_q), flat_last), one)
            x = g.op("Unsqueeze", g.op("Gather", g.op("Reshape", x, rows_h), flat_last), one)
        attn_out = g.op("MatMul", y, g.const(p + "o_proj", lw["o"]))
        h, _, _, x = g.op("SkipSimplifiedLayerNormalization", attn_out, x,
                          g.const(p + "post_attention_layernorm", lw["post_norm"]), outputs=4, unused=(1, 2),
                          domain=_MS, epsilon=eps)
        gate, up = g.op("Split", g.op("MatMul", h, g.const(p + "gate_up_proj", lw["gate_up"])), split_mlp,
                        outputs=2, axis=-1)
        act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)
        mlp_out = g.op("MatMul", act, g.const(p + "down_proj", lw["down"]))
    # named like the traced graph's final norm, so the fp16 builder keeps it (and the head) in fp32
    final = g.op("SkipSimplifiedLayerNormalization", mlp_out, x, g.const("norm", w["norm"]), outputs=4, unused=(1, 2),
                 domain=_MS, epsilon=eps, name="/model/norm/SkipSimplifiedLayerNormalization")[0]
    g.op("Reshape", g.op("MatMul", final, g.const("head", w["head"])), g.const("shape_logits", [-1, 1], i64),
         outputs=["logits"])

    inputs = [helper.make_tensor_value_info(n, int64, ["batch_size", "sequence_length"])
              for n in ("input_ids", "attention_mask")]
    inputs += [helper.make_tensor_value_info(n, f32, [1, n_kv, "past_length", d]) for n in past_names]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch_size", 1])]
    outputs += [helper.make_tensor_value_info(n, f32, [1, n_kv, "sequence_length", d]) for n in presents]
    graph = helper.make_graph(g.nodes, "memrerank_fused_decoder", inputs, outputs, initializer=g.inits,
                              value_info=g.value_info({"logits", *presents}))
    model = helper.make_model(graph, producer_name="memrerank", opset_imports=[
        helper.make_opsetid("", FUSED_OPSET), helper.make_opsetid(_MS, 1)])
    model.ir_version = 10  # onnxruntime 1.18+ reads IR 10
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    limit = EXTERNAL_DATA_BYTES if external_data_bytes is None else external_data_bytes
    if sum(t.ByteSize() for t in g.inits) > limit:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + "_data", size_threshold=1024)
    else:
        onnx.save(model, str(path))
    return sorted((p for p in path.parent.iterdir() if p.name in (path.name, path.name + "_data")),
                  key=lambda p: (p != path, p.name))


def _repeat_kv(g: _Writer, own: tuple[str, str], past: tuple[str, str], batch: str, seq: str, past_len: str,
               n_kv: int, group: int, d: int) -> tuple[str, str, str, str]:
    """Repeat key/value heads ``group`` times, kv-major (query head h reads kv head h // group, as transformers'
    ``repeat_kv``): own (B, S, kv·d) → (B, S, H·d), past (B, kv, P, d) → (B, H, P, d)."""
    i64 = np.int64
    kv_c, g_c, d_c = (g.const(f"c_rep_{n}", [v], i64) for n, v in (("kv", n_kv), ("g", group), ("d", d)))
    heads = g.const("c_rep_h", [n_kv * group], i64)
    own_5 = g.op("Concat", batch, seq, kv_c, g_c, d_c, axis=0)
    own_flat = g.const("c_rep_flat", [0, 0, n_kv * group * d], i64)
    past_5 = g.op("Concat", batch, kv_c, g_c, past_len, d_c, axis=0)
    past_4 = g.op("Concat", batch, heads, past_len, d_c, axis=0)
    ax3, ax2 = g.const("c_rep_ax3", [3], i64), g.const("c_rep_ax2", [2], i64)
    split = g.const("c_rep_kvd", [0, 0, n_kv, d], i64)
    out = [g.op("Reshape", g.op("Expand", g.op("Unsqueeze", g.op("Reshape", t, split), ax3), own_5), own_flat)
           for t in own]
    # allowzero: an empty past has P = 0, which Reshape would otherwise read as "copy this dimension"
    out += [g.op("Reshape", g.op("Expand", g.op("Unsqueeze", t, ax2), past_5), past_4, allowzero=1) for t in past]
    return out[0], out[1], out[2], out[3]


def fused_op_counts(path: str | Path) -> dict[str, int]:
    """Operator counts of a graph (``domain:op`` for non-ONNX domains), to check what a graph is made of."""
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        key = f"{node.domain}:{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
        counts[key] = counts.get(key, 0) + 1
    return counts
