"""Which products need the last tokens' second code: the real-weights int8 rebuilt with the last-token two-pass
limited to some product kinds, judged against fp32 on held-out LoCoMo pairs and timed, one run.

The decoder ``int8`` codes each sequence's last 8 tokens twice in every weight product (``quantize_per_row``'s
``two_pass_last``); the write-back of those rows (``Split`` and ``ScatterND`` over the product's whole output) is a
tenth of the int8 graph's time, most of it in the gate/up product, the widest. Variants, each built from the
artifact's fp32 graph with the export's own plan and calibration pairs (``build_int8`` with
``two_pass_last_skip``):

- ``every product``: what ``int8`` builds;
- ``not gate/up``, ``o + down only``, ``down only``: the other products' last tokens coded once.

Fidelity: the held-out questions of ``bench/real_weights.py`` (LoCoMo conversations 6–10, never calibrated on) vs
the fp32 graph: mean per-question Spearman, top-10 overlap, max |Δlogit|. Speed: ``Reranker.predict`` per
question (prefix reuse), the variants interleaved question by question, seconds summed.

    python bench/two_pass_products.py --workdir W   # W: bench/real_weights.py's --workdir (artifact, calib.jsonl)

Results: ``bench/results/two_pass_products.json``.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from common import DEFAULT_LOCOMO, RESULTS, environment, group_agreement, write  # noqa: E402
from real_weights import split_locomo  # noqa: E402

#: Variant → a pattern of the products whose last tokens are coded once (None: none).
VARIANTS = {"every product": None, "not gate/up": r"gate_up", "o + down only": r"qkv|gate_up",
            "down only": r"qkv|gate_up|o_proj"}


def build(artifact: Path, out_dir: Path, calib_path: Path) -> dict[str, Path]:
    """Each variant's int8 graph under ``out_dir`` (built once, reused)."""
    from memrerank.export.fidelity import CalibSet, load_calib_jsonl
    from memrerank.export.quantize import build_int8, graph_info

    fp32 = artifact / "fp32" / "model.onnx"
    info = graph_info(fp32)
    graphs = {name: out_dir / re.sub(r"\W+", "-", name) / "model.onnx" for name in VARIANTS}
    todo = [n for n, g in graphs.items() if not g.exists()]
    if todo:
        calib = CalibSet(artifact, load_calib_jsonl(calib_path), reference=False)
        for name in todo:
            skip = [n for n in info.weight_nodes if VARIANTS[name] and re.search(VARIANTS[name], n)]
            t = time.perf_counter()
            build_int8(fp32, graphs[name], info, calib, two_pass_last_skip=skip)
            print(f"{name}: built in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    return graphs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True, help="bench/real_weights.py's workdir")
    ap.add_argument("--artifact", default="artifact-fp32-int8")
    ap.add_argument("--locomo", type=Path, default=DEFAULT_LOCOMO)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--heldout-queries", type=int, default=12)
    ap.add_argument("--out", type=Path, default=RESULTS / "two_pass_products.json")
    args = ap.parse_args()
    env = environment(args.threads)
    from memrerank import LoadOptions, Reranker

    artifact = args.workdir / args.artifact
    graphs = build(artifact, args.workdir / "two-pass-products", args.workdir / "calib.jsonl")
    _, held = split_locomo(args.locomo, 16, args.heldout_queries, args.k)
    fp32 = Reranker.load(artifact, LoadOptions("fp32", threads=args.threads))
    ref = [fp32.predict([(q, d) for d in docs], raw=True) for q, docs in held]
    del fp32
    base = Reranker.load(artifact, LoadOptions("int8", threads=args.threads))
    rerankers = {n: base.with_graph(g, LoadOptions(threads=args.threads)) for n, g in graphs.items()}
    logits = {n: [] for n in graphs}
    seconds = dict.fromkeys(graphs, 0.0)
    for q, docs in held:  # interleaved question by question
        for name, r in rerankers.items():
            t = time.perf_counter()
            logits[name].append(r.predict([(q, d) for d in docs], raw=True))
            seconds[name] += time.perf_counter() - t
    sizes = [len(docs) for _, docs in held]
    result = {"environment": env, "artifact": str(artifact),
              "held_out": f"{len(held)} LoCoMo questions x {args.k} turns (conversations 6-10)",
              "variants": {n: {"skipped_pattern": VARIANTS[n],
                               **group_agreement(np.concatenate(logits[n]), np.concatenate(ref), sizes),
                               "seconds": round(seconds[n], 2),
                               "speed_vs_every_product": round(seconds["every product"] / seconds[n], 3)}
                           for n in graphs}}
    write(args.out, result)
    for n, r in result["variants"].items():
        print(f"{n:15s} Spearman {r['spearman_mean']:.4f} top-10 {r['top10_overlap']:.3f} "
              f"max|d| {r['max_abs_logit_diff']:.3f}  {r['seconds']:.1f} s ({r['speed_vs_every_product']:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
