"""The fused decoder graph: the decoder-yes-no graph written op by op with onnxruntime's fused operators.

Optimum traces :class:`~memrerank.export.families.decoder_yes_no.DecoderYesNoFamily`'s module into dozens of ops
per layer (attention written out as MatMul/Softmax/Concat, RoPE as Slice/Neg/Concat, RMSNorm as
Pow/ReduceMean/Sqrt/Div). This module writes
the same computation with one fused operator per step instead:

* attention: ONNX ``Attention`` (opset 23), grouped-query heads native, the additive mask and the past as inputs;
* rotary embedding: ``com.microsoft.RotaryEmbedding`` with explicit position ids;
* RMSNorm: ``SimplifiedLayerNormalization`` (Qwen3's q/k norms, first layer) and
  ``com.microsoft.SkipSimplifiedLayerNormalization`` (the residual add and the next norm in one op);
* one packed Q/K/V product (plus one ``Add`` for Qwen2's q/k/v biases) and one packed gate/up product per
  layer.

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

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["GRAPH_KINDS", "FUSED_GRAPHS", "FUSED_EPS", "FUSED_OPSET", "ROTATION_PROP", "Rotation", "write_fused_graph",
           "fused_op_counts"]

#: Execution providers a fused graph is written for (see the module docstring for how they differ).
FUSED_EPS = ("cpu", "cuda")
#: ``--graph`` names of the fused graphs → the provider each is written for.
FUSED_GRAPHS = {"fused": "cpu", "fused-cuda": "cuda"}
#: How export writes a decoder's fp32 graph: Optimum's trace of the PyTorch module, or one of the fused graphs.
GRAPH_KINDS = ("traced", *FUSED_GRAPHS)
#: The graph's metadata key that says its weights are rotated (:class:`Rotation`; the int8 plan reads it).
ROTATION_PROP = "memrerank.rotation"
#: ``Attention`` is an ONNX opset-23 operator.
FUSED_OPSET = 23
_MS = "com.microsoft"


@dataclass(frozen=True)
class Rotation:
    """An orthogonal change of basis written into the weights, so that int8 codes see no outlier channels.

    A real LLM's hidden states carry a few channels hundreds of times larger than the rest; a per-token int8 code
    spends its range on them. Rotating the residual stream by an orthogonal ``Q`` (QuaRot, Ashkboos et al. 2024;
    SpinQuant) spreads every channel over all of them and changes no score: RMSNorm is rotation-invariant once its
    weight is folded into the products that read it, so every weight that reads the stream is multiplied by ``Qᵀ``
    on its input side, every weight that writes it (embeddings, attention output, down projection) by ``Q`` on its
    output side, and the folded head reads the rotated final norm. Each value head is also rotated by a normalized
    Hadamard matrix (its inverse folded into the attention output product), which spreads the attention output
    product's input the same way. All of it is exact up to float rounding and free at run time: the graph is the
    same, only its weights differ. The SwiGLU down projection's input is not covered (a nonlinearity sits before
    it); the int8 plan handles it.

    ``seed`` picks ``Q``: a random orthogonal matrix (QR of a seeded Gaussian matrix).
    """

    seed: int = 0

    def residual(self, hidden: int) -> np.ndarray:
        """The ``hidden × hidden`` orthogonal matrix (float64)."""
        rng = np.random.default_rng(self.seed)
        q, r = np.linalg.qr(rng.standard_normal((hidden, hidden)))
        return q * np.sign(np.diag(r))[None, :]  # Haar-distributed

    @staticmethod
    def head(d: int) -> np.ndarray:
        """A normalized ``d × d`` Hadamard matrix (``d`` a power of two), else the identity."""
        from memrerank.export.graph import block_hadamard

        return np.eye(d) if d & (d - 1) else block_hadamard(d)

    def record(self) -> dict[str, Any]:
        """What the manifest says about it."""
        return {"method": "residual stream rotated by a seeded random orthogonal matrix, RMSNorm weights folded "
                          "into the products; value heads rotated by a Hadamard matrix (QuaRot-style, exact)",
                "seed": self.seed}


class _Writer:
    """Collects nodes and initializers with generated unique names, and each tensor's element type.

    The types are written as ``value_info``: onnx's shape inference does not know the ``com.microsoft`` operators,
    and without them the fp16 converter (``onnxruntime.transformers.float16``) cannot tell where to put casts.
    """

    def __init__(self, types: dict[str, int], sink: _ExternalSink | None = None, coder: Any = None) -> None:
        self.coder = coder
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.types = dict(types)
        self.sink = sink
        self._n = 0

    def const(self, name: str, value: Any, dtype: Any = None) -> str:
        """An initializer named ``name`` (the first value given under a name is kept); with a sink, one above
        1 KiB goes straight to the external-data file."""
        from onnx import numpy_helper

        if name in self.types:  # shared constants are written once
            return name
        array = np.asarray(value, dtype=dtype)
        if self.sink is not None and array.nbytes > 1024:
            tensor = self.sink.tensor(name, array)
        else:
            tensor = numpy_helper.from_array(np.ascontiguousarray(array), name)
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

    def product(self, x: str, weight_name: str, w: np.ndarray, name: str, one_row: bool = False) -> str:
        """``x · w`` for a weight product named ``name``: a plain ``MatMul``, or what :attr:`coder` writes in its
        place (the streaming export's quantized products, written without an fp32 graph in between).
        ``one_row``: the product runs on one row per pair (after the last-token selection)."""
        if self.coder is not None:
            return self.coder.product(self, x, weight_name, w, name, one_row=one_row)
        return self.op("MatMul", x, self.const(weight_name, w), name=name)

    def embedding(self, table_name: str, table: np.ndarray, ids: str) -> str:
        """The token-embedding lookup (``Gather``), or the coder's (int8 rows)."""
        if self.coder is not None:
            return self.coder.embedding(self, table_name, table, ids)
        return self.op("Gather", self.const(table_name, table), ids)

    def value_info(self, skip: set[str]) -> list[Any]:
        from onnx import helper

        # a coder's nodes may leave their outputs untyped: value_info is for the fp16 converter, which never
        # runs on a coded graph
        return [helper.make_tensor_value_info(o, self.types[o], None)
                for node in self.nodes for o in node.output if o and o not in skip and o in self.types]


def _arr(t: Any) -> np.ndarray:
    """A float32 numpy view of a torch tensor (a copy only when it is another dtype, e.g. a bf16 checkpoint)."""
    import torch

    return t.detach().to(torch.float32).cpu().numpy()


def _head_dim(config: Any) -> int:
    """The config's head size, after refusing what the fused graph does not cover (odd head_dim, sliding window)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim % 2:
        raise ValueError(f"the fused graph needs an even head_dim (RoPE rotates halves), got {head_dim}")
    layer_types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise ValueError("the fused graph does not support sliding-window layers; export with --graph traced")
    return int(head_dim)


def _check_biases(o_bias: bool, qkv_biases: list[bool]) -> None:
    """Refuse a layer the fused graph does not cover: an output-projection bias, or biases on some of q/k/v."""
    if o_bias:
        raise ValueError("the fused graph does not support an output projection with a bias")
    if any(qkv_biases) and not all(qkv_biases):
        raise ValueError("the fused graph needs a bias on all of q/k/v or on none")


def _assemble(config: Any, embed: np.ndarray, norm: np.ndarray, head: np.ndarray,
              rope: tuple[np.ndarray, np.ndarray], layers: list[Any], n_bytes: int,
              rotation: Rotation | None) -> dict[str, Any]:
    """The writer's weights dict (:func:`_weights`), with the embeddings, final norm and head in the rotated basis
    when ``rotation`` is given."""
    head_dim = _head_dim(config)
    rot = None
    if rotation is not None:
        q = rotation.residual(embed.shape[1])
        rot = {"q": q, "v": rotation.head(head_dim)}
        embed = _rotate_rows(embed, q)
        head = (q.T @ (norm.astype(np.float64)[:, None] * head)).astype(np.float32)
        norm = np.ones_like(norm)
    return {
        "heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads, "head_dim": head_dim,
        "eps": float(config.rms_norm_eps), "intermediate": int(config.intermediate_size),
        "hidden": int(embed.shape[1]), "embed": embed, "norm": norm, "head": head, "cos": rope[0], "sin": rope[1],
        "layers": layers, "bytes": n_bytes, "rotation": rot,
    }


def _weights(module: Any, rotation: Rotation | None = None) -> dict[str, Any]:
    """Config numbers and float32 numpy weights of a folded-head decoder module (``_FoldedYesNo.build``).

    ``layers`` holds one loader per layer (:func:`_layer_weights` of its torch layer): they are called one at a
    time, so the packed Q/K/V and gate/up copies of one layer exist at once, never the whole model's. ``bytes``
    is what the graph's fp32 weights would take.
    """
    import torch

    body, config = module.body, module.config
    head_dim = _head_dim(config)
    with torch.no_grad():
        n_pos = int(config.max_position_embeddings)
        probe = torch.zeros(1, dtype=torch.float32)
        cos, sin = body.rotary_emb(probe, torch.arange(n_pos)[None])  # (1, n_pos, head_dim): the model's own RoPE
    half = head_dim // 2
    rope = _rope_halves(cos, sin, half)
    for layer in body.layers:
        attn = layer.self_attn
        _check_biases(getattr(attn.o_proj, "bias", None) is not None,
                      [getattr(m, "bias", None) is not None for m in (attn.q_proj, attn.k_proj, attn.v_proj)])
    n_bytes = 4 * (sum(p.numel() for p in body.parameters()) + module.head.numel() + 2 * n_pos * half)
    embed, norm, head = _arr(body.embed_tokens.weight), _arr(body.norm.weight), _arr(module.head).reshape(-1, 1)
    return _assemble(config, embed, norm, head, rope,
                     [functools.partial(_layer_weights, layer) for layer in body.layers], n_bytes, rotation)


def _rotate_rows(x: np.ndarray, q: np.ndarray, rows: int = 8192) -> np.ndarray:
    """``x @ q`` in float32 (rounding ~1e-6 relative, far inside fp32 parity), a block of rows at a time."""
    out = np.empty_like(x, dtype=np.float32)
    q32 = q.astype(np.float32)
    for i in range(0, x.shape[0], rows):
        out[i:i + rows] = x[i:i + rows] @ q32
    return out


def _rotate_layer(lw: dict[str, np.ndarray | None], rot: dict[str, Any], n_kv: int, n_heads: int
                  ) -> dict[str, np.ndarray | None]:
    """A layer's weights in the rotated basis (:class:`Rotation`): norms folded into the products reading them,
    inputs by ``Qᵀ``, outputs by ``Q``, each value head by the Hadamard ``H`` (its inverse in the output product).
    """
    f32 = np.float32
    q, h = rot["q"].astype(f32), rot["v"].astype(f32)
    d = h.shape[0]

    def reads(w: np.ndarray, norm: np.ndarray) -> np.ndarray:  # float32 products: ~1e-6 relative rounding
        return q.T @ (norm[:, None] * w)

    qkv = reads(lw["qkv"], lw["in_norm"])
    v0 = qkv.shape[1] - n_kv * d
    qkv[:, v0:] = (qkv[:, v0:].reshape(-1, n_kv, d) @ h).reshape(qkv.shape[0], -1)
    bias = lw["qkv_bias"]
    if bias is not None:
        bias = bias.copy()
        bias[v0:] = (bias[v0:].reshape(n_kv, d) @ h).reshape(-1)
    o = lw["o"].reshape(n_heads, d, -1)
    o = np.einsum("ji,hjk->hik", h, o).reshape(n_heads * d, -1) @ q  # Hᵀ per head, then Q
    return {**lw, "qkv": qkv, "qkv_bias": bias, "in_norm": np.ones_like(lw["in_norm"]), "o": o,
            "post_norm": np.ones_like(lw["post_norm"]), "gate_up": reads(lw["gate_up"], lw["post_norm"]),
            "down": lw["down"] @ q}


def _layer_weights(layer: Any) -> dict[str, np.ndarray | None]:
    """One decoder layer's weights as the fused graph packs them (Q/K/V and gate/up concatenated)."""
    attn, mlp = layer.self_attn, layer.mlp
    biases = [getattr(m, "bias", None) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
    norms = [getattr(attn, name, None) for name in ("q_norm", "k_norm")]  # Qwen3 has them, Qwen2 not
    return {
        "in_norm": _arr(layer.input_layernorm.weight),
        "qkv": np.concatenate([_arr(attn.q_proj.weight), _arr(attn.k_proj.weight), _arr(attn.v_proj.weight)]).T,
        "qkv_bias": np.concatenate([_arr(b) for b in biases]) if biases[0] is not None else None,
        "q_norm": _arr(norms[0].weight) if norms[0] is not None else None,
        "k_norm": _arr(norms[1].weight) if norms[1] is not None else None,
        "o": _arr(attn.o_proj.weight).T,
        "post_norm": _arr(layer.post_attention_layernorm.weight),
        "gate_up": np.concatenate([_arr(mlp.gate_proj.weight), _arr(mlp.up_proj.weight)]).T,
        "down": _arr(mlp.down_proj.weight).T,
    }


@dataclass(frozen=True)
class CheckpointSource:
    """A decoder reranker read from its safetensors files one tensor at a time (the streaming export): what
    :func:`write_fused_graph` takes instead of a PyTorch module, so the model is never whole in memory.

    ``head``: the output rows the folded head subtracts (``(yes_id, no_id)``), or ``None`` for a "-seq-cls"
    conversion (its one-row ``score`` weight).
    """

    checkpoint: Any  # memrerank.export.checkpoint.Checkpoint
    config: Any  # the checkpoint's transformers config
    head: tuple[int, int] | None


def _prefix(ckpt: Any) -> str:
    """The name prefix of the decoder stack (``model.`` in a ``*ForCausalLM`` checkpoint)."""
    for name in ckpt.names():
        if name.endswith("embed_tokens.weight"):
            return name[: -len("embed_tokens.weight")]
    raise ValueError(f"{ckpt.root}: no embed_tokens.weight; not a Qwen2/Qwen3 decoder checkpoint")


def _rope_tables(config: Any, n_pos: int, half: int) -> tuple[np.ndarray, np.ndarray]:
    """The model's own RoPE tables (its transformers rotary class, built from the config alone)."""
    import importlib

    import torch

    module = importlib.import_module(f"transformers.models.{config.model_type}.modeling_{config.model_type}")
    cls = next(getattr(module, n) for n in dir(module) if n.endswith("RotaryEmbedding"))
    with torch.no_grad():
        cos, sin = cls(config=config)(torch.zeros(1, dtype=torch.float32), torch.arange(n_pos)[None])
    return _rope_halves(cos, sin, half)


def _rope_halves(cos: Any, sin: Any, half: int) -> tuple[np.ndarray, np.ndarray]:
    """The first halves of RoPE's (1, positions, head_dim) tables, after checking the rotate-half layout."""
    import torch

    if not torch.equal(cos[0, :, :half], cos[0, :, half:]):
        raise ValueError("the fused graph needs RoPE with rotate-half frequency layout (cos repeated twice)")
    return _arr(cos[0, :, :half]), _arr(sin[0, :, :half])


def _checkpoint_weights(src: CheckpointSource, rotation: Rotation | None = None) -> dict[str, Any]:
    """:func:`_weights` of a :class:`CheckpointSource`: the same numbers and arrays, read from the files (the
    token embeddings and two head rows now, each layer when its loader is called)."""
    ckpt, config = src.checkpoint, src.config
    head_dim = _head_dim(config)
    p = _prefix(ckpt)
    n_layers = int(config.num_hidden_layers)
    for i in range(n_layers):
        a = f"{p}layers.{i}.self_attn."
        _check_biases(f"{a}o_proj.bias" in ckpt, [f"{a}{m}_proj.bias" in ckpt for m in "qkv"])
    n_pos, half = int(config.max_position_embeddings), head_dim // 2
    cos, sin = _rope_tables(config, n_pos, half)
    embed_name = f"{p}embed_tokens.weight"
    if src.head is None:
        head = ckpt.rows("score.weight", [0])[0]
    else:
        tied = getattr(config, "tie_word_embeddings", False) or "lm_head.weight" not in ckpt
        rows = ckpt.rows(embed_name if tied else "lm_head.weight", list(src.head))
        head = rows[0] - rows[1]
    embed, norm = ckpt.tensor(embed_name), ckpt.tensor(f"{p}norm.weight")
    head = head.astype(np.float32).reshape(-1, 1)
    n_bytes = 4 * (sum(int(np.prod(ckpt.shape(n))) for n in ckpt.names() if n.startswith(p)) + head.size
                   + 2 * n_pos * half)
    return _assemble(config, embed, norm, head, (cos, sin),
                     [functools.partial(_checkpoint_layer, ckpt, f"{p}layers.{i}.") for i in range(n_layers)],
                     n_bytes, rotation)


def _checkpoint_layer(ckpt: Any, p: str) -> dict[str, np.ndarray | None]:
    """:func:`_layer_weights` of layer ``p`` read from the checkpoint's files."""
    a, m = p + "self_attn.", p + "mlp."

    def opt(name: str) -> np.ndarray | None:
        return ckpt.tensor(name) if name in ckpt else None

    qkv_bias = None
    if f"{a}q_proj.bias" in ckpt:
        qkv_bias = np.concatenate([ckpt.tensor(f"{a}{x}_proj.bias") for x in "qkv"])
    return {
        "in_norm": ckpt.tensor(p + "input_layernorm.weight"),
        "qkv": np.concatenate([ckpt.tensor(f"{a}{x}_proj.weight") for x in "qkv"]).T,
        "qkv_bias": qkv_bias,
        "q_norm": opt(a + "q_norm.weight"),
        "k_norm": opt(a + "k_norm.weight"),
        "o": ckpt.tensor(a + "o_proj.weight").T,
        "post_norm": ckpt.tensor(p + "post_attention_layernorm.weight"),
        "gate_up": np.concatenate([ckpt.tensor(m + "gate_proj.weight"), ckpt.tensor(m + "up_proj.weight")]).T,
        "down": ckpt.tensor(m + "down_proj.weight").T,
    }


class _ExternalSink:
    """Weights written straight into one external-data file as the graph is built: the graph in memory holds
    their file offsets only, so writing a model never holds a second copy of its weights. Each tensor starts on
    a 4 KiB boundary (onnxruntime may map the file)."""

    ALIGN = 4096

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.file = path.open("wb")
        self.offset = 0

    def tensor(self, name: str, value: np.ndarray) -> Any:
        from onnx import TensorProto, helper

        pad = -self.offset % self.ALIGN
        self.file.write(b"\0" * pad)
        start = self.offset + pad
        data = np.ascontiguousarray(value)
        self.file.write(memoryview(data).cast("B"))
        self.offset = start + data.nbytes
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(data.dtype), dims=data.shape)
        t.data_location = TensorProto.EXTERNAL
        for key, val in (("location", self.path.name), ("offset", str(start)), ("length", str(data.nbytes))):
            entry = t.external_data.add()
            entry.key, entry.value = key, val
        return t

    def close(self) -> None:
        self.file.close()


def write_fused_graph(module: Any, path: str | Path, *, ep: str = "cpu", external_data_bytes: int | None = None,
                      rotation: Rotation | None = None, coder: Any = None) -> list[Path]:
    """Write the fused graph of a folded-head decoder module (or of a checkpoint's files) to ``path``.

    Args:
        module: what :meth:`DecoderYesNoFamily.graph_module` returns (its ``body``, ``head`` and ``config``), or a
            :class:`CheckpointSource` (the streaming export: each weight read from the files when it is written).
        path: the ``.onnx`` file to write (its folder is created).
        ep: ``"cpu"`` or ``"cuda"`` (:data:`FUSED_EPS`; they differ only in how attention takes the grouped heads).
        external_data_bytes: weights above this many bytes go to ``<name>_data`` beside the graph (default:
            :data:`memrerank.export.graph.EXTERNAL_DATA_BYTES`).
        rotation: write the weights in a rotated basis (:class:`Rotation`; the same scores, int8-friendly).
        coder: writes the weight products and the embedding lookup in place of fp32 ones (e.g.
            :class:`memrerank.export.int4.Int4Coder`); the weights it writes are what ``external_data_bytes``
            is weighed against.

    Returns:
        The files written, graph first.

    Raises:
        ValueError: an unknown ``ep``, or a model the fused graph does not cover (the message says which part).
    """
    from onnx import TensorProto

    from memrerank.export.graph import EXTERNAL_DATA_BYTES

    _check_runtime(ep)
    path = Path(path)
    w = _checkpoint_weights(module, rotation) if isinstance(module, CheckpointSource) else _weights(module, rotation)
    f32, int64 = TensorProto.FLOAT, TensorProto.INT64
    past_names = [f"past_{kind}.{i}" for i in range(len(w["layers"])) for kind in ("key", "value")]
    limit = EXTERNAL_DATA_BYTES if external_data_bytes is None else external_data_bytes
    for stale in (path, path.parent / (path.name + "_data")):
        stale.unlink(missing_ok=True)
    n_bytes = w["bytes"] if coder is None else w["bytes"] // 6  # a coder writes 4- or 8-bit weights
    sink = _ExternalSink(path.parent / (path.name + "_data")) if n_bytes > limit else None
    g = _Writer({"input_ids": int64, "attention_mask": int64, **{n: f32 for n in past_names}}, sink, coder)
    shared = _shared(g, w, ep)
    x = g.embedding("embed_tokens", w.pop("embed"), "input_ids")  # its fp32 copy freed once written
    shared.shapes.update(_layer_shapes(g, w))
    presents: list[str] = []
    mlp_out: str | None = None
    for i, load in enumerate(w["layers"]):
        lw = load()
        if w["rotation"] is not None:
            lw = _rotate_layer(lw, w["rotation"], w["kv_heads"], w["heads"])
        x, mlp_out = _layer(g, shared, i, lw, x, mlp_out)
        presents += [f"present_key.{i}", f"present_value.{i}"]
    # named like the traced graph's final norm, so the fp16 builder keeps it (and the head) in fp32
    final = g.op("SkipSimplifiedLayerNormalization", mlp_out, x, g.const("norm", w["norm"]), outputs=4,
                 unused=(1, 2), domain=_MS, epsilon=w["eps"],
                 name="/model/norm/SkipSimplifiedLayerNormalization")[0]
    logits = g.op("MatMul", final, g.const("head", w["head"]), name="/head/MatMul")
    g.op("Reshape", logits, g.const("shape_logits", [-1, 1], np.int64), outputs=["logits"])
    props = {ROTATION_PROP: json.dumps(rotation.record())} if rotation is not None else None
    return _save_graph(g, path, past_names, presents, w["kv_heads"], w["head_dim"], props)


def _check_runtime(ep: str) -> None:
    """Refuse an unknown ``ep`` and an onnxruntime without ONNX ``Attention``, before any weight is read."""
    if ep not in FUSED_EPS:
        raise ValueError(f"ep: unknown {ep!r}; the fused graph is written for {', '.join(FUSED_EPS)}")
    import onnxruntime

    if tuple(int(p) for p in onnxruntime.__version__.split(".")[:2]) < (1, 23):
        raise ValueError(f"the fused graph needs onnxruntime 1.23 or later (ONNX Attention, opset 23); this is "
                         f"{onnxruntime.__version__}: `pip install -U onnxruntime`, or export with --graph traced")


@dataclass
class _Shared:
    """What every layer of the fused graph reads: the model's numbers, the provider the graph is written for,
    and the names of the tensors computed once from the inputs (``names``) and of the shape constants
    (``shapes``)."""

    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    eps: float
    ep: str
    names: dict[str, str]
    shapes: dict[str, str] = field(default_factory=dict)


def _shared(g: _Writer, w: dict[str, Any], ep: str) -> _Shared:
    """Shapes, positions (real tokens only, after the past), the additive mask (B, 1, S, P + S), each row's
    last real token and the rotary tables, written once before the layers."""
    from onnx import TensorProto

    n_kv, d, i64 = w["kv_heads"], w["head_dim"], np.int64
    zero, one = g.const("c_0", [0], i64), g.const("c_1", [1], i64)
    two, three = g.const("c_2", [2], i64), g.const("c_3", [3], i64)
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
    names = {"zero": zero, "one": one, "batch": batch, "seq": seq, "past_len": past_len,
             "position_ids": position_ids, "bias": bias, "kv_shape": kv_shape, "flat_last": flat_last,
             "cos": g.const("rope_cos", w["cos"]), "sin": g.const("rope_sin", w["sin"])}
    return _Shared(w["heads"], n_kv, d, len(w["layers"]), w["eps"], ep, names)


def _layer_shapes(g: _Writer, w: dict[str, Any]) -> dict[str, str]:
    """The split sizes and reshape targets every layer uses."""
    n_heads, n_kv, d, i64 = w["heads"], w["kv_heads"], w["head_dim"], np.int64
    hidden = w["hidden"]
    return {
        "split_qkv": g.const("split_qkv", [n_heads * d, n_kv * d, n_kv * d], i64),
        "split_mlp": g.const("split_mlp", [w["intermediate"], w["intermediate"]], i64),
        "heads_q": g.const("shape_q", [0, 0, n_heads, d], i64),
        "heads_kv": g.const("shape_kv", [0, 0, n_kv, d], i64),
        "flat_q": g.const("flat_q", [0, 0, n_heads * d], i64),
        "flat_kv": g.const("flat_kv", [0, 0, n_kv * d], i64),
        "row0": g.const("shape_row0", [1, -1, n_kv, d], i64),
        "rows_q": g.const("rows_q", [-1, n_heads * d], i64),
        "rows_h": g.const("rows_h", [-1, hidden], i64),
    }


def _layer(g: _Writer, s: _Shared, i: int, lw: dict[str, np.ndarray], x: str, mlp_out: str | None
           ) -> tuple[str, str]:
    """Decoder layer ``i``: its attention (writing ``present_key.i``/``present_value.i``) and MLP.

    ``x`` is the residual stream and ``mlp_out`` the previous layer's MLP output (``None`` for the first
    layer), added here in the fused norm. Returns the new residual stream and this layer's MLP output.
    """
    p, eps, n, c = f"layers.{i}.", s.eps, s.names, s.shapes
    zero, one = n["zero"], n["one"]
    if mlp_out is None:
        h = g.op("SimplifiedLayerNormalization", x, g.const(p + "input_layernorm", lw["in_norm"]),
                 axis=-1, epsilon=eps, stash_type=1)
    else:
        h, _, _, x = g.op("SkipSimplifiedLayerNormalization", mlp_out, x,
                          g.const(p + "input_layernorm", lw["in_norm"]), outputs=4, unused=(1, 2), domain=_MS,
                          epsilon=eps)
    # products named after their weights, with the layer index where graph_info looks for it (layers.N)
    qkv = g.product(h, p + "qkv_proj", lw["qkv"], f"/model/{p}qkv_proj/MatMul")
    if lw["qkv_bias"] is not None:  # Qwen2: q/k/v projections with a bias
        qkv = g.op("Add", qkv, g.const(p + "qkv_bias", lw["qkv_bias"]))
    q, k, v = g.op("Split", qkv, c["split_qkv"], outputs=3, axis=-1)
    if lw["q_norm"] is not None:  # Qwen3: RMSNorm over each head of q and k before RoPE
        q = g.op("Reshape", g.op("SimplifiedLayerNormalization", g.op("Reshape", q, c["heads_q"]),
                                 g.const(p + "q_norm", lw["q_norm"]), axis=-1, epsilon=eps, stash_type=1),
                 c["flat_q"])
    if lw["k_norm"] is not None:
        k = g.op("Reshape", g.op("SimplifiedLayerNormalization", g.op("Reshape", k, c["heads_kv"]),
                                 g.const(p + "k_norm", lw["k_norm"]), axis=-1, epsilon=eps, stash_type=1),
                 c["flat_kv"])
    q = g.op("RotaryEmbedding", q, n["position_ids"], n["cos"], n["sin"], domain=_MS, num_heads=s.heads,
             interleaved=0)
    k = g.op("RotaryEmbedding", k, n["position_ids"], n["cos"], n["sin"], domain=_MS, num_heads=s.kv_heads,
             interleaved=0)
    for name, t in ((f"present_key.{i}", k), (f"present_value.{i}", v)):  # row 0, (1, kv, S, d)
        g.op("Transpose", g.op("Reshape", g.op("Slice", t, zero, one, zero), c["row0"]), perm=[0, 2, 1, 3],
             outputs=[name])
    past_k, past_v = (g.op("Expand", f"past_{kind}.{i}", n["kv_shape"]) for kind in ("key", "value"))
    n_kv_attn = s.kv_heads
    if s.ep == "cuda":
        k, v, past_k, past_v = _repeat_kv(g, (k, v), (past_k, past_v), n["batch"], n["seq"], n["past_len"],
                                          s.kv_heads, s.heads // s.kv_heads, s.head_dim)
        n_kv_attn = s.heads
    y = g.op("Attention", q, k, v, n["bias"], past_k, past_v, outputs=3, q_num_heads=s.heads,
             kv_num_heads=n_kv_attn)[0]
    if i == s.layers - 1:  # only the last real token matters from here on: (B, 1, ·)
        y = g.op("Unsqueeze", g.op("Gather", g.op("Reshape", y, c["rows_q"]), n["flat_last"]), one)
        x = g.op("Unsqueeze", g.op("Gather", g.op("Reshape", x, c["rows_h"]), n["flat_last"]), one)
    last = i == s.layers - 1  # from here on the last layer runs one row per pair
    attn_out = g.product(y, p + "o_proj", lw["o"], f"/model/{p}o_proj/MatMul", one_row=last)
    h, _, _, x = g.op("SkipSimplifiedLayerNormalization", attn_out, x,
                      g.const(p + "post_attention_layernorm", lw["post_norm"]), outputs=4, unused=(1, 2),
                      domain=_MS, epsilon=eps)
    gate_up = g.product(h, p + "gate_up_proj", lw["gate_up"], f"/model/{p}gate_up_proj/MatMul", one_row=last)
    gate, up = g.op("Split", gate_up, c["split_mlp"],
                    outputs=2, axis=-1)
    act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)
    return x, g.product(act, p + "down_proj", lw["down"], f"/model/{p}down_proj/MatMul", one_row=last)


def _save_graph(g: _Writer, path: Path, past_names: list[str], presents: list[str], n_kv: int, d: int,
                props: dict[str, str] | None = None) -> list[Path]:
    """Wrap the written nodes into the model (the traced graph's inputs and outputs) and save it to ``path``
    (its large weights are already in the sink's file when there is one); return the files, graph first."""
    import onnx
    from onnx import TensorProto, helper

    f32, int64 = TensorProto.FLOAT, TensorProto.INT64
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
    if props:
        helper.set_model_props(model, props)
    path.parent.mkdir(parents=True, exist_ok=True)
    if g.sink is not None:
        g.sink.close()
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
