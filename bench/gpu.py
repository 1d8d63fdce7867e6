"""GPU side by side: memrerank on onnxruntime's CUDA provider vs the official Qwen3-Reranker recipe in PyTorch on the
same GPU, same pairs, one run (rounds interleaved). Writes JSON; the README's GPU table comes from it.

    python bench/gpu.py --out bench/results/gpu.json [--locomo PATH] [--shape 0.6b] [--device cuda]

Measured per variant: p50/p90 of one ``rank()`` (one question × ``--k`` candidates, end to end: tokenize, pack,
model, calibrate, sort) for memrerank fp16/fp32 with prefix reuse on and off, and of the official recipe in PyTorch
(fp16, sdpa; with and without ``logits_to_keep=1``); parity: fp32 on the GPU vs fp32 on the CPU (max |Δlogit|),
fp16 vs fp32 on the GPU (max |Δlogit|, Spearman, top-10 overlap); model calls per ``rank()``.

Random weights of the real shape (no hub here): latency and parity only. ``--shape tiny --device cpu`` is the smoke
test that runs on any machine (the same code path, CPU provider, a 2-layer model).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import DEFAULT_LOCOMO, locomo_workload, write  # noqa: E402
from peers_decoder import INSTRUCTION, PREFIX, SUFFIX  # noqa: E402

SHAPES = {
    "0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16),
}


def build_checkpoint(path: Path, shape: str) -> Path:
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from models import qwen_tokenizer_dir

    if (path / "config.json").exists():
        return path
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=151669, max_position_embeddings=40960, rope_theta=1000000, rms_norm_eps=1e-6,
                         tie_word_embeddings=True, pad_token_id=151643, eos_token_id=151645,
                         architectures=["Qwen3ForCausalLM"], **SHAPES[shape])
    Qwen3ForCausalLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(qwen_tokenizer_dir()).save_pretrained(path)
    return path


def workload(locomo: Path | None, k: int) -> tuple[str, list[str]]:
    if locomo is not None and locomo.is_file():
        return locomo_workload(locomo, 1, k)[0]
    from memrerank.export.pairs import builtin_calibration_groups

    query, docs = builtin_calibration_groups()[0]
    return query, (docs * (k // len(docs) + 1))[:k]


def official(ckpt: Path, device: str, logits_to_keep: bool):
    """The model card's recipe, moved to ``device`` in fp16 (fp32 on the CPU) with sdpa attention."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.float16 if device == "cuda" else torch.float32
    tok = AutoTokenizer.from_pretrained(ckpt, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
    pre, suf = tok.encode(PREFIX, add_special_tokens=False), tok.encode(SUFFIX, add_special_tokens=False)
    extra = {"logits_to_keep": 1} if logits_to_keep else {}

    def rank(query: str, docs: list[str]) -> list[float]:
        bodies = [f"<Instruct>: {INSTRUCTION}\n<Query>: {query}\n<Document>: {d}" for d in docs]
        enc = tok(bodies, padding=False, truncation="longest_first", return_attention_mask=False,
                  max_length=8192 - len(pre) - len(suf))
        enc["input_ids"] = [pre + ids + suf for ids in enc["input_ids"]]
        batch = tok.pad(enc, padding=True, return_tensors="pt").to(device)
        with torch.no_grad():
            last = model(**batch, **extra).logits[:, -1, :]
            scores = torch.stack([last[:, no], last[:, yes]], dim=1).float().log_softmax(dim=1)[:, 1].exp()
        out = scores.tolist()  # syncs the device
        return sorted(range(len(out)), key=lambda i: -out[i])

    return rank


def timed(fns: dict[str, object], args: tuple, rounds: int) -> dict[str, dict[str, float]]:
    """Interleaved: each round runs every variant once; p50/p90 over rounds (after 3 warm-up calls each)."""
    for fn in fns.values():
        for _ in range(3):
            fn(*args)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn(*args)
            times[name].append(time.perf_counter() - t)
    return {name: {"p50_ms": statistics.median(v) * 1e3,
                   "p90_ms": sorted(v)[int(0.9 * (len(v) - 1))] * 1e3, "min_ms": min(v) * 1e3}
            for name, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--locomo", type=Path, default=DEFAULT_LOCOMO)
    ap.add_argument("--shape", choices=tuple(SHAPES), default="0.6b")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--k", type=int, default=20, help="candidates per question")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--workdir", type=Path, default=Path(__file__).parent / "out" / "gpu")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gpu.json")
    args = ap.parse_args()

    import numpy as np
    import onnxruntime as ort

    from memrerank import Reranker
    from memrerank.export import export_model
    from memrerank.export.metrics import spearman, topk_overlap

    provider = "cuda" if args.device == "cuda" else "cpu"
    ckpt = build_checkpoint(args.workdir / f"checkpoint-{args.shape}", args.shape)
    art = args.workdir / f"artifact-{args.shape}"
    if not (art / "manifest.json").exists():
        t = time.perf_counter()
        export_model(str(ckpt), art, precisions=["fp32", "fp16"], force=True, graph="traced",
                     log=lambda m: print(m, file=sys.stderr))
        print(f"export {time.perf_counter() - t:.0f} s", file=sys.stderr)
    query, docs = workload(args.locomo, args.k)
    pairs = [(query, d) for d in docs]

    rerankers = {f"memrerank {p}{' + reuse' if reuse else ''}": Reranker.load(art, p, providers=[provider],
                                                                             prefix_reuse=reuse)
                 for p in ("fp16", "fp32") for reuse in (True, False)}
    calls = {}
    for name, r in rerankers.items():
        stats: dict[str, float] = {}
        inner, count = r.backend.score, [0]

        def counting(*a, _inner=inner, _count=count, **kw):
            _count[0] += 1
            return _inner(*a, **kw)

        r.backend.score = counting
        r.rank(query, docs, stats=stats)
        r.backend.score = inner
        calls[name] = count[0]
    fns = {name: (lambda q, d, _r=r: _r.rank(q, d)) for name, r in rerankers.items()}
    fns["official recipe, PyTorch " + ("fp16" if args.device == "cuda" else "fp32")] = official(ckpt, args.device,
                                                                                                 False)
    fns["official recipe + logits_to_keep=1"] = official(ckpt, args.device, True)
    timing = timed(fns, (query, docs), args.rounds)

    fp32_dev = rerankers["memrerank fp32"].predict(pairs, raw=True)
    fp16_dev = rerankers["memrerank fp16"].predict(pairs, raw=True)
    fp32_cpu = Reranker.load(art, "fp32").predict(pairs, raw=True)
    parity = {"fp32_device_vs_cpu_max_abs": float(np.max(np.abs(fp32_dev - fp32_cpu))),
              "fp16_vs_fp32_device_max_abs": float(np.max(np.abs(fp16_dev - fp32_dev))),
              "fp16_vs_fp32_spearman": float(spearman(fp16_dev, fp32_dev)),
              "fp16_vs_fp32_top10": float(topk_overlap(fp16_dev, fp32_dev, 10))}
    env = {"device": args.device, "shape": args.shape, "k": args.k, "rounds": args.rounds, "query": query,
           "onnxruntime": ort.__version__, "providers": ort.get_available_providers()}
    try:
        import torch

        env.update(torch=torch.__version__, gpu=torch.cuda.get_device_name(0) if args.device == "cuda" else None)
    except ImportError:
        pass
    base = timing[next(n for n in timing if n.startswith("official recipe, PyTorch"))]["p50_ms"]
    for row in timing.values():
        row["speedup_vs_official"] = base / row["p50_ms"]
    write(args.out, {"environment": env, "timing": timing, "model_calls_per_rank": calls, "parity": parity})
    for name, row in timing.items():
        print(f"{name:<40} p50 {row['p50_ms']:8.2f} ms  ({row['speedup_vs_official']:.2f}x official)"
              + (f"  calls {calls[name]}" if name in calls else ""))
    print(parity)
    return 0


if __name__ == "__main__":
    sys.exit(main())
