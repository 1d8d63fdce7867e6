"""Prefix reuse on vs off, fp32 and int8, the 0.6B-shaped decoder on LoCoMo queries × 32 turns — just the
fast-path part of ``memrerank bench`` (memrerank.benchmark.fast_path), with more interleaved repeats:

    python bench/reuse.py --repeats 9      # writes bench/results/reuse.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import RESULTS, environment, write  # noqa: E402

HERE = Path(__file__).parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path, default=HERE / "out" / "qwen3-0.6b-shape" / "artifact")
    ap.add_argument("--data", type=Path, default=HERE / "out" / "locomo_q32.jsonl", help="written by fast_path.py")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--out", type=Path, default=RESULTS / "reuse.json")
    args = ap.parse_args()
    from memrerank import Reranker
    from memrerank.benchmark import fast_path
    from memrerank.kernels import DEFAULT_CALL_OVERHEAD

    data = [(row["query"], row["documents"], None) for row in map(json.loads, args.data.read_text().splitlines())]
    out = {"environment": environment(args.threads), "call_overhead": DEFAULT_CALL_OVERHEAD,
           "repeats": args.repeats, "workload": f"{len(data)} LoCoMo questions x 32 candidate turns"}
    for precision in ("fp32", "int8"):
        r = Reranker.load(args.artifact, precision, threads=args.threads)
        out[precision] = fast_path(r, data, [], args.repeats, host_k=None)["prefix_reuse"]
        print(precision, json.dumps(out[precision]), flush=True)
        del r
    write(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
