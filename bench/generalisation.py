"""Does int8's fidelity budget hold beyond its calibration pairs? Both families, judged against fp32 on pairs from
a source their calibration never saw, beside held-out pairs from the calibration's own source (LoCoMo).

The other source is the bundled generated set ``src/memrerank/demo_heldout.jsonl`` (240 questions x 8 candidate
memories, one relevant; templates, names, places and values of its own, nothing from LoCoMo). Models:

* encoder: the real all-MiniLM-L6-v2 with the relevance head ``bench/peers_encoder.py`` fits on LoCoMo
  conversations 1-5, exported by that bench with 40 LoCoMo questions as ``--calib-data`` (its workdir is reused;
  made here by the same function when missing). LoCoMo held-out: conversations 6-10.
* decoder: the real Qwen2.5-Coder-1.5B artifact ``bench/real_weights.py`` exported with LoCoMo calibration pairs
  (``--decoder-artifact``; its held-out LoCoMo figures are in that bench's results). The model ranks memories barely
  above random, so its NDCG is reported but agreement with fp32 is the figure.

Per precision vs fp32: NDCG@10 on the labels and its ratio to fp32's, mean per-query Spearman, top-3 overlap (8
candidates per question), max |Δlogit|.

    python bench/generalisation.py --decoder-artifact /tmp/rw/work/artifact-fp32-int8

Results: ``bench/results/generalisation.json``, rendered by ``report.py`` (block ``generalisation``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from common import DEFAULT_LOCOMO, environment, write  # noqa: E402

TOP = 3  # of 8 candidates


def demo_queries(n: int):
    from memrerank.demo_data import load_heldout
    from memrerank.evaluation import Query

    return [Query(e.query, list(e.documents), {e.answer}, e.topic) for e in load_heldout()[:n]]


def agreement(queries, scores: list[np.ndarray], ref: list[np.ndarray]) -> dict:
    from memrerank.evaluation import evaluate_scores
    from memrerank.export.metrics import spearman, topk_overlap

    ndcg = evaluate_scores(queries, scores)["overall"]["NDCG@10"]
    ref_ndcg = evaluate_scores(queries, ref)["overall"]["NDCG@10"]
    a, b = np.concatenate(scores), np.concatenate(ref)
    return {"ndcg10": ndcg, "ndcg10_fp32": ref_ndcg, "ndcg_vs_fp32": ndcg / ref_ndcg,
            "spearman_mean": float(np.mean([spearman(x, y) for x, y in zip(scores, ref)])),
            f"top{TOP}_overlap": float(np.mean([topk_overlap(x, y, TOP) for x, y in zip(scores, ref)])),
            "top10_overlap": float(np.mean([topk_overlap(x, y, 10) for x, y in zip(scores, ref)])),
            "max_abs_logit_diff": float(np.max(np.abs(a - b))), "queries": len(queries), "pairs": int(len(a))}


def score(artifact: Path, precision: str, queries, threads: int) -> list[np.ndarray]:
    from memrerank import LoadOptions, Reranker

    r = Reranker.load(artifact, LoadOptions(precision, threads=threads))
    return [r.predict([(q.query, d) for d in q.documents], raw=True).astype(np.float64) for q in queries]


def measure(artifact: Path, sets: dict, threads: int) -> dict:
    out = {}
    for name, queries in sets.items():
        ref = score(artifact, "fp32", queries, threads)
        out[name] = agreement(queries, score(artifact, "int8", queries, threads), ref)
        print(f"{artifact.name} {name}: {json.dumps(out[name])}", file=sys.stderr, flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--locomo", type=Path, default=DEFAULT_LOCOMO)
    ap.add_argument("--encoder-workdir", type=Path, default=Path(__file__).parent / "out" / "minilm-locomo")
    ap.add_argument("--decoder-artifact", type=Path, default=None, help="real_weights.py's fp32+int8 artifact")
    ap.add_argument("--encoder-queries", type=int, default=240, help="generated held-out questions (encoder)")
    ap.add_argument("--decoder-queries", type=int, default=30, help="generated held-out questions (decoder)")
    ap.add_argument("--locomo-queries", type=int, default=300, help="held-out LoCoMo questions (encoder)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "generalisation.json")
    args = ap.parse_args()
    from peers_encoder import checkpoint_and_artifact, split_queries

    result: dict = {"environment": environment(args.threads), "other_source": "src/memrerank/demo_heldout.jsonl "
                    "(generated: templates, names, places and values of its own; 8 candidates, one relevant)"}
    train, test = split_queries(args.locomo)
    _, encoder, _ = checkpoint_and_artifact(args.encoder_workdir, train, args.threads)
    manifest = json.loads((encoder / "manifest.json").read_text())
    result["encoder"] = {
        "model": "all-MiniLM-L6-v2 + LoCoMo-fitted head (bench/peers_encoder.py)",
        "calibration": manifest.get("calibration_data"),
        "search": {k: manifest["precisions"]["int8"]["fidelity"].get(k) for k in ("fidelity", "kept_fp32")},
        "held_out": measure(encoder, {"locomo": test[: args.locomo_queries],
                                      "generated": demo_queries(args.encoder_queries)}, args.threads)}
    if args.decoder_artifact is not None:
        manifest = json.loads((args.decoder_artifact / "manifest.json").read_text())
        result["decoder"] = {
            "model": "Qwen2.5-Coder-1.5B real weights (bench/real_weights.py's artifact)",
            "calibration": manifest.get("calibration_data"),
            "search": {k: manifest["precisions"]["int8"]["fidelity"].get(k) for k in ("fidelity", "kept_fp32")},
            "held_out": measure(args.decoder_artifact, {"generated": demo_queries(args.decoder_queries)},
                                args.threads)}
    write(args.out, result)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
