"""Calibration figures on LoCoMo-derived labelled pairs (held-out conversations 6–10, which the MiniLM head never
saw): writes the pairs as JSONL under bench/out and runs ``memrerank calibrate`` on the peers_encoder artifact; the
report goes to bench/results/calibration.json (with the environment), the reliability diagram to docs/reliability.png.

    python bench/calibrate_locomo.py --locomo ../shared/data/locomo/locomo10.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import DEFAULT_LOCOMO, RESULTS, environment, write  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--locomo", type=Path, default=DEFAULT_LOCOMO)
    ap.add_argument("--artifact", type=Path, default=Path(__file__).parent / "out" / "minilm-locomo" / "artifact")
    ap.add_argument("--queries", type=int, default=400)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    args = ap.parse_args()

    from memrerank.cli import main as cli
    from memrerank.evaluation import load_locomo

    queries = load_locomo(args.locomo).queries
    samples = sorted({q.group for q in queries})
    held = [q for q in queries if q.group in samples[5:]][: args.queries]
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / "locomo_labelled_pairs.jsonl"
    data.write_text("\n".join(json.dumps({"query": q.query, "document": d, "label": int(i in q.relevant)})
                              for q in held for i, d in enumerate(q.documents)))
    report = args.out / "calibration.json"
    code = cli(["calibrate", str(args.artifact), "--data", str(data), "--method", "auto",
                "--plot", str(Path(__file__).parents[1] / "docs" / "reliability.png"), "-o", str(report)])
    if code == 0:
        write(RESULTS / "calibration.json", {"environment": environment(None), "questions": len(held),
                                            "report": json.loads(report.read_text())})
    return code


if __name__ == "__main__":
    sys.exit(main())
