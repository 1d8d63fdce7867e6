"""The fast path, measured: prefix reuse vs the ideal token ratio (0.6B-shaped decoder, fp32 and int8), padding
waste, host-overhead share and native vs numpy packer (real MiniLM-L6 encoder, 100 candidates), cold start,
import time, and the peak RSS of bench/memory.py.

    python bench/fast_path.py --locomo ../shared/data/locomo/locomo10.json --threads 2

Prefix reuse and host overhead come from ``memrerank bench`` (memrerank.benchmark), run here on LoCoMo
queries × 32 candidate turns (decoder) and × 100 (encoder); results go to bench/results/fast_path.json (and out/fast_path.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import DEFAULT_LOCOMO, RESULTS, environment, locomo_workload, write  # noqa: E402

HERE = Path(__file__).parent
IMPORT_PROBE = ("import time; t=time.perf_counter(); import memrerank; a=time.perf_counter()-t; "
                "from memrerank import Reranker; b=time.perf_counter()-t; "
                "import sys; heavy=[m for m in ('torch','transformers','optimum') if m in sys.modules]; "
                "print(a, b, ','.join(heavy))")
COLD_PROBE = ("import time, sys; t=time.perf_counter(); from memrerank import Reranker; "
              "r=Reranker.load(sys.argv[1], sys.argv[2], threads=int(sys.argv[3])); "
              "r.rank('When did Caroline go to the LGBTQ support group?', "
              "['Caroline went to the support group on 7 May 2023.', 'Melanie painted a sunrise.']); "
              "print(time.perf_counter()-t)")


def _jsonl(path: Path, work: list[tuple[str, list[str]]]) -> Path:
    path.write_text("".join(json.dumps({"query": q, "documents": d}) + "\n" for q, d in work))
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--locomo", type=Path, default=DEFAULT_LOCOMO)
    ap.add_argument("--decoder", type=Path, default=HERE / "out" / "qwen3-0.6b-shape" / "artifact")
    ap.add_argument("--encoder", type=Path, default=HERE / "out" / "minilm-locomo" / "artifact")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--queries", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--no-decoder-bench", action="store_true",
                    help="skip `memrerank bench` on the decoder (prefix reuse is measured by bench/reuse.py)")
    ap.add_argument("--out", type=Path, default=RESULTS / "fast_path.json")
    args = ap.parse_args()

    from memrerank import LoadOptions
    from memrerank.benchmark import run_bench
    from memrerank.report import markdown_table

    options = LoadOptions(threads=args.threads)
    report: dict = {"environment": environment(args.threads)}
    dec_data = _jsonl(HERE / "out" / "locomo_q32.jsonl", locomo_workload(args.locomo, args.queries, 32))
    enc_data = _jsonl(HERE / "out" / "locomo_q100.jsonl", locomo_workload(args.locomo, args.queries, 100))
    if not args.no_decoder_bench:
        report["decoder"] = run_bench(args.decoder, ["fp32", "int8"], dec_data, options, ks=(32,),
                                      batch_sizes=(32,), repeats=3, host_k=None)
    report["encoder"] = run_bench(args.encoder, ["fp32", "int8"], enc_data, options, ks=(100,),
                                  batch_sizes=(32,), repeats=args.repeats)
    imp = []
    for _ in range(5):
        out = subprocess.run([sys.executable, "-c", IMPORT_PROBE], capture_output=True, text=True, check=True)
        a, b, heavy = (out.stdout.split() + [""])[:3]
        imp.append((float(a), float(b), heavy))
    report["import"] = {"import_memrerank_s": min(x[0] for x in imp), "import_runtime_s": min(x[1] for x in imp),
                        "heavy_modules_loaded": imp[0][2] or "none"}
    colds = []
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", COLD_PROBE, str(args.decoder), "int8", str(args.threads)],
                             capture_output=True, text=True, check=True)
        colds.append(float(out.stdout.split()[-1]))
    report["cold_start_int8_0.6b_s"] = {"min": min(colds), "runs": colds}
    write(args.out, report)
    md = (["## decoder (0.6B shape, random weights), LoCoMo queries × 32 turns", markdown_table(report["decoder"]),
           ""] if "decoder" in report else []) + [
        "## encoder (real all-MiniLM-L6-v2 + LoCoMo head), LoCoMo queries × 100 turns",
        markdown_table(report["encoder"]), "", f"import: {report['import']}",
        f"cold start int8 0.6B (load + first rank, fresh process): {report['cold_start_int8_0.6b_s']}",
        "memory: bench/memory.py (bench/results/memory.json)"]
    (HERE / "out" / "fast_path.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
