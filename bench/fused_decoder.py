"""The fused decoder graph vs the traced one on the CPU: the Qwen3-Reranker-0.6B shape (random weights), one
LoCoMo question × 20 candidate turns, ``Reranker.rank`` end to end, whole pairs and prefix reuse, fp32.

The traced artifact comes from ``export_model`` (validated against PyTorch at export; its parity figures are copied
into the result). The fused artifact is that artifact with its fp32 graph replaced by ``write_fused_graph``'s (what
``export_model(graph="fused")`` writes) without re-running the export's PyTorch validation, which takes half an
hour at this size on a shared 2-core machine; instead the result records the fused graph's logits against the
traced graph's on the benchmark's own pairs, both scoring paths (the fused graph's parity against transformers is
tested on the tiny checkpoint, tests/test_fused.py). The four configurations (traced/fused ×
whole/reuse) run interleaved, round after round, so a change of load on the shared machine hits them alike: the
ratios are the result, absolute times are noisy. The load average is recorded before and after.

    python bench/fused_decoder.py --threads 2 --repeats 5   # writes results/fused_decoder_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import DEFAULT_LOCOMO, environment, locomo_workload, write  # noqa: E402
from peers_decoder import build_checkpoint  # noqa: E402

HERE = Path(__file__).parent


def _export(ckpt: Path, out: Path) -> Path:
    from memrerank.export import export_model

    if not (out / "manifest.json").exists():
        t = time.perf_counter()
        export_model(str(ckpt), out, precisions=["fp32"], graph="traced", log=lambda m: print(m, file=sys.stderr))
        print(f"exported traced in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return out


def _fused_copy(ckpt: Path, traced: Path, out: Path) -> Path:
    """``traced`` with its fp32 graph written by :func:`write_fused_graph` instead (manifest files updated)."""
    import dataclasses
    import gc
    import shutil

    from transformers import AutoConfig

    from memrerank.export.families import family_for
    from memrerank.export.fused import FUSED_OPSET, write_fused_graph
    from memrerank.manifest import file_entries, read_manifest, write_manifest

    if (out / "manifest.json").exists():
        return out
    t = time.perf_counter()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in traced.iterdir():
        if f.is_file():
            shutil.copy2(f, tmp / f.name)
    config = AutoConfig.from_pretrained(ckpt)
    family = family_for(config)(str(ckpt), config, revision=None, trust_remote_code=False, instruction=None,
                                max_length=None)
    family.load()
    files = write_fused_graph(family.graph_module(), tmp / "fp32" / "model.onnx")
    del family
    gc.collect()
    manifest = read_manifest(tmp)
    # the parity was measured for the traced graph; see the result's score_agreement instead
    fp32 = dataclasses.replace(manifest.precision("fp32"), files=file_entries(tmp, tuple(files)), parity=None)
    export = dataclasses.replace(manifest.export, graph="fused", opset=FUSED_OPSET,
                                 command="bench/fused_decoder.py (graph swapped)")
    write_manifest(tmp, dataclasses.replace(manifest.with_precision("fp32", fp32), export=export))
    tmp.rename(out)
    print(f"wrote the fused graph in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--locomo", type=Path, default=DEFAULT_LOCOMO)
    ap.add_argument("--workdir", type=Path, default=HERE / "out" / "qwen3-0.6b-shape")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--k", type=int, default=20, help="candidate turns for the question")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds (after one warm-up round)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "fused_decoder_cpu.json")
    args = ap.parse_args()

    import numpy as np

    from memrerank import Reranker
    from memrerank.export.fused import fused_op_counts
    from memrerank.manifest import read_manifest

    ckpt = build_checkpoint(args.workdir / "checkpoint")
    traced = _export(ckpt, args.workdir / "artifact-traced-fp32")
    artifacts = {"traced": traced, "fused": _fused_copy(ckpt, traced, args.workdir / "artifact-fused-fp32")}
    (query, docs), = locomo_workload(args.locomo, 1, args.k)
    load_before = os.getloadavg()
    rerankers = {g: Reranker.load(a, "fp32", threads=args.threads) for g, a in artifacts.items()}
    configs = [(g, reuse) for reuse in (False, True) for g in ("traced", "fused")]
    times: dict[str, list[float]] = {f"{g}/{'reuse' if reuse else 'whole'}": [] for g, reuse in configs}
    scores: dict[str, np.ndarray] = {}
    for round_ in range(args.repeats + 1):  # round 0 warms up
        for g, reuse in configs:
            r = rerankers[g]
            r.prefix_reuse = reuse
            t = time.perf_counter()
            ranked = r.rank(query, docs)
            dt = time.perf_counter() - t
            name = f"{g}/{'reuse' if reuse else 'whole'}"
            scores[name] = np.array([x.logit for x in sorted(ranked, key=lambda x: x.index)])
            if round_:
                times[name].append(dt)
        print(f"round {round_}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items() if v), file=sys.stderr,
              flush=True)
    load_after = os.getloadavg()

    def stats(v: list[float]) -> dict[str, float]:
        return {"min_s": min(v), "median_s": statistics.median(v), "pairs_per_s": len(docs) / min(v)}

    results = {k: stats(v) for k, v in times.items()}
    for mode in ("whole", "reuse"):  # per round, so each ratio compares runs seconds apart
        ratios = [t / f for t, f in zip(times[f"traced/{mode}"], times[f"fused/{mode}"])]
        results[f"fused_speedup_{mode}"] = {"median": statistics.median(ratios), "min": min(ratios),
                                            "max": max(ratios), "per_round": ratios}
    agreement = {f"{mode}: fused vs traced max|Δlogit|": float(np.max(np.abs(scores[f"fused/{mode}"]
                                                                          - scores[f"traced/{mode}"])))
                 for mode in ("whole", "reuse")}
    p = read_manifest(traced).precision("fp32").parity
    parity = {"traced": {"max_abs_logit_diff_vs_pytorch": p.max_abs_logit_diff,
                         "by_run": p.extra.get("max_abs_logit_diff_by_run")}}
    ops = {g: fused_op_counts(a / "fp32" / "model.onnx") for g, a in artifacts.items()}
    tokens = len(rerankers["traced"].encoder.encode(query, docs[0]).ids[0])
    report = {
        "workload": f"1 LoCoMo question x {len(docs)} candidate turns, Reranker.rank end to end "
                    f"(first pair {tokens} tokens); Qwen3-Reranker-0.6B shape, random weights, fp32, CPU provider",
        "method": f"{args.repeats} timed rounds after a warm-up, the 4 configurations interleaved in each round; "
                  "speedup = traced time / fused time within a round",
        "environment": environment(args.threads),
        "loadavg_before": load_before, "loadavg_after": load_after,
        "results": results,
        "score_agreement": agreement,
        "traced_parity_vs_pytorch_at_export": parity,
        "graph_nodes": {g: sum(c.values()) for g, c in ops.items()},
        "fused_ops": {k: v for k, v in ops["fused"].items() if k in (
            "Attention", "com.microsoft:RotaryEmbedding", "com.microsoft:SkipSimplifiedLayerNormalization",
            "SimplifiedLayerNormalization", "MatMul")},
    }
    write(args.out, report)
    print(json.dumps({k: report[k] for k in ("results", "score_agreement", "graph_nodes")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
