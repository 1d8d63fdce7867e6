"""Render the README's benchmark tables (and target checks) from the JSON the peer benches wrote.

    python bench/report.py            # reads bench/out/peers_decoder.json and bench/out/peers_encoder.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).parent / "out"


def _check(name: str, value: float, target: float) -> str:
    if value >= target:
        return f"- {name}: {value:.2f}× (target ≥ {target}×) — met"
    return f"- {name}: {value:.2f}× (target ≥ {target}×) — MISSED by a factor of {target / value:.2f}"


def decoder(path: Path) -> str:
    d = json.loads(path.read_text())
    r = d["results"]
    lines = [f"Workload: {d['workload']}, ~{d['example_pair_tokens'][0]} tokens per pair; {d['environment']}", "",
             "| scorer | pairs/s | vs official recipe |", "|---|---|---|"]
    lines += [f"| {k} | {v['pairs_per_s']:.2f} | {v['vs_official']:.2f}× |" for k, v in r.items()]
    off = r["transformers official recipe fp32"]["pairs_per_s"]
    lines += ["", _check("decoder int8 vs official recipe", r["memrerank int8"]["pairs_per_s"] / off, 4.0),
              _check("decoder int8 vs memrerank fp32",
                     r["memrerank int8"]["pairs_per_s"] / r["memrerank fp32"]["pairs_per_s"], 2.5)]
    if "memrerank int8 + prefix reuse" in r:
        lines.append(_check("decoder int8 + prefix reuse vs official recipe",
                            r["memrerank int8 + prefix reuse"]["pairs_per_s"] / off, 10.0))
    return "\n".join(lines)


def encoder(path: Path) -> str:
    d = json.loads(path.read_text())
    r = d["results"]
    lines = [f"Quality: {d['quality_set']}; speed: {d['speed_set']}; {d['environment']}", "",
             "| scorer | pairs/s | vs ST onnx-qint8 | NDCG@10 | NDCG@10 vs its fp32 | top-10 overlap vs its fp32 |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {k} | {v['pairs_per_s']:.1f} | {v['vs_st_onnx_qint8']:.2f}× | {v['NDCG@10']:.4f} | "
              f"{100 * v['ndcg_vs_fp32']:.1f} % | {v['top10_vs_fp32']:.3f} |" for k, v in r.items()]
    i8 = r["memrerank int8"]
    lines += ["", _check("encoder int8 vs sentence-transformers onnx-qint8", i8["vs_st_onnx_qint8"], 1.5),
              f"- encoder int8 NDCG@10 vs fp32: {100 * i8['ndcg_vs_fp32']:.1f} % (target ≥ 99.5 %) — "
              + ("met" if i8["ndcg_vs_fp32"] >= 0.995 else "MISSED"),
              f"- encoder int8 top-10 overlap vs fp32: {i8['top10_vs_fp32']:.3f} (target ≥ 0.95) — "
              + ("met" if i8["top10_vs_fp32"] >= 0.95 else "MISSED")]
    return "\n".join(lines)


def main() -> int:
    for title, fn, name in (("Decoder", decoder, "peers_decoder.json"), ("Encoder", encoder, "peers_encoder.json")):
        path = OUT / name
        if path.exists():
            print(f"### {title}\n\n{fn(path)}\n")
        else:
            print(f"### {title}\n\n(no {path}; run bench/peers_{title.lower()}.py first)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
