"""Which 4-bit recipe: symmetric vs asymmetric blocks, block size, rotated vs unrotated weights, on the real 1.5B weights,
every product 4-bit (no search), judged against fp32 on held-out LoCoMo pairs, one run.

Each variant is ``quantize_int4`` (blocks of 32, accuracy level 4) over an fp32 graph of the same checkpoint plus
the int8 embeddings, as the ``int4`` precision builds it with nothing kept. Kinds: ``asymmetric`` / ``symmetric``
blocks rounded to nearest, ``gptq`` / ``gptq-act`` (asymmetric blocks coded by GPTQ in the channels' order / in
order of falling activation weight, ``memrerank.export.int4.gptq_codes``, its
activations from the calibration questions, conversations 1-5; the seconds coding every block size asked are
``gptq_s``). Bases:

- ``rotated``: the artifact's fp32 graph as ``memrerank export`` writes it by default (weights in the rotated basis,
  :class:`memrerank.export.fused.Rotation`);
- ``unrotated``: the fp32 graph of ``memrerank export --no-rotate``.

Fidelity: the held-out questions of ``bench/real_weights.py`` (LoCoMo conversations 6–10, never calibrated on) vs
each graph's own fp32 artifact: mean per-question Spearman, top-10 overlap, max |Δlogit|; seconds to score them
(prefix reuse, ``--threads``; the variants one after another, so only indicative).

Caveat: these weights are the dequantized Q4_K_M of a GGUF (``bench/real_weights_fetch.py``): every tensor but
``attn_v`` and half of ``ffn_down`` (Q6_K) already lies on a 4-bit grid of blocks of 32 with a scale and a minimum,
in the unrotated basis. An asymmetric block of 32 in that basis can land close to that grid; a rotation mixes it
away. A checkpoint trained in bf16 has no such grid, so the unrotated advantage measured here is this checkpoint's.

    python bench/int4_recipes.py --rotated A/artifact --unrotated B/artifact

Results: ``bench/results/int4_recipes.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from common import DEFAULT_LOCOMO, RESULTS, environment, group_agreement, write  # noqa: E402
from real_weights import split_locomo  # noqa: E402


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rotated", type=Path, required=True, help="artifact with the default (rotated) fp32 graph")
    ap.add_argument("--unrotated", type=Path, required=True, help="artifact exported with --no-rotate")
    ap.add_argument("--locomo", type=Path, default=DEFAULT_LOCOMO)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--heldout-queries", type=int, default=12)
    ap.add_argument("--calib-queries", type=int, default=16,
                    help="LoCoMo questions (conversations 1-5) GPTQ measures its activations on")
    ap.add_argument("--variants", default="unrotated:asymmetric:32,unrotated:asymmetric:64,unrotated:asymmetric:128,"
                    "unrotated:symmetric:32,rotated:asymmetric:32,rotated:symmetric:32",
                    help="comma list of basis:kind:block")
    ap.add_argument("--out", type=Path, default=RESULTS / "int4_recipes.json")
    args = ap.parse_args()
    env = environment(args.threads)
    from memrerank import LoadOptions, Reranker
    from memrerank.export.fidelity import CalibSet
    from memrerank.export.int4 import (GPTQ_PAIRS, INT4_ACCURACY_LEVEL, INT4_BLOCK, gptq_codes_for,
                                       quantize_int4)
    from memrerank.export.quantize import graph_info, quantize_embeddings

    calib_groups, held = split_locomo(args.locomo, args.calib_queries, args.heldout_queries, args.k)
    sizes = [len(d) for _, d in held]
    variants, gptq_s = {}, 0.0
    wanted = [v.split(":") for v in args.variants.split(",")]  # basis:kind:block
    for basis, artifact in (("unrotated", args.unrotated), ("rotated", args.rotated)):
        mine = [(kind, int(block)) for b, kind, block in wanted if b == basis]
        if not mine:
            continue
        graph = artifact / "fp32" / "model.onnx"
        info = graph_info(graph)
        gptq, gptq_s = {}, 0.0
        if any(kind.startswith("gptq") for kind, _ in mine):
            # before the fp32 reranker loads: H's passes hold their own fp32 session
            t = time.perf_counter()
            calib = CalibSet(artifact, calib_groups, reference=False)
            gptq = gptq_codes_for(graph, info.weight_nodes, calib,
                                  sorted({(block, kind == "gptq-act") for kind, block in mine
                                          if kind.startswith("gptq")}), log=log)
            gptq_s = time.perf_counter() - t
            del calib
            log(f"GPTQ codes, blocks of {sorted(gptq)}: {gptq_s:.0f} s")
        fp32 = Reranker.load(artifact, LoadOptions("fp32", threads=args.threads))
        ref = np.concatenate([fp32.predict([(q, d) for d in docs], raw=True) for q, docs in held])
        for kind, block in mine:
            name = f"{basis}, {kind}, blocks of {block}"
            with tempfile.TemporaryDirectory(prefix=".int4-recipe-", dir=artifact.parent) as tmp:
                out = Path(tmp) / "model.onnx"
                t = time.perf_counter()
                quantize_int4(graph, out, info.weight_nodes, info.external_data, block=block,
                              symmetric=kind == "symmetric",
                              codes=gptq.get((block, kind == "gptq-act")) if kind.startswith("gptq") else None)
                quantize_embeddings(out, list(info.embedding_nodes), info.external_data)
                built = time.perf_counter() - t
                size = sum(p.stat().st_size for p in Path(tmp).iterdir())
                r = fp32.with_graph(out, LoadOptions(threads=args.threads))
                t = time.perf_counter()
                logits = np.concatenate([r.predict([(q, d) for d in docs], raw=True) for q, docs in held])
                seconds = time.perf_counter() - t
                del r
            variants[name] = {**group_agreement(logits, ref, sizes), "seconds": round(seconds, 1),
                              "build_s": round(built, 1), "bytes": size, "block": block}
            log(f"{name}: {variants[name]}")
        del fp32
    gptq_record = {"gptq_s": round(gptq_s, 1), "gptq_calibration": f"{GPTQ_PAIRS} pairs of {len(calib_groups)} "
                   f"LoCoMo questions x {args.k} turns (conversations 1-5)"} if gptq_s else {}
    write(args.out, {"environment": env, "default_block_size": INT4_BLOCK, "accuracy_level": INT4_ACCURACY_LEVEL,
                     "held_out": f"{len(held)} LoCoMo questions x {args.k} turns (conversations 6-10)",
                     **gptq_record, "every_product_4bit": True, "variants": variants,
                     "caveat": "weights dequantized from Q4_K_M: a 4-bit grid of blocks of 32 with scale and minimum "
                               "in the unrotated basis (Q6_K for attn_v and half of ffn_down)"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
