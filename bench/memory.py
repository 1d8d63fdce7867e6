"""Peak RSS while scoring many long pairs: N candidates × T tokens for one query, int8 0.6B-shaped decoder.

Runs in its own process and samples RSS every 50 ms from a thread, so the peak covers load and scoring:
    python bench/memory.py --artifact bench/out/qwen3-0.6b-shape/artifact --n 1000 --tokens 512
Documents are LoCoMo turns joined and cut (at a token boundary) so every pair is exactly T tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

from common import DEFAULT_LOCOMO, RESULTS, environment, write


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def long_documents(reranker, query: str, locomo: Path, n: int, tokens: int) -> list[str]:
    from memrerank.evaluation import load_locomo

    split = reranker.encoder.split(query, [])
    room = tokens - len(split.head) - len(split.tail)
    turns = [d for q in load_locomo(locomo, candidates="sessions", window=2).queries[:400] for d in q.documents]
    text = " ".join(dict.fromkeys(turns))
    lead = reranker.encoder.doc_lead if hasattr(reranker.encoder, "doc_lead") else ""
    docs, start = [], 0
    words = text.split(" ")
    while len(docs) < n:
        chunk = " ".join(words[start:start + room * 2])
        start = (start + room // 2) % max(1, len(words) - room * 2)
        enc = reranker.tokenizer.encode(lead + chunk, add_special_tokens=False)
        if len(enc.ids) < room:
            continue
        cut = enc.offsets[room - 1][1] - len(lead)
        doc = chunk[:cut]
        if len(reranker.tokenizer.encode(lead + doc, add_special_tokens=False).ids) == room:
            docs.append(doc)
    return docs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path, default=Path(__file__).parent / "out" / "qwen3-0.6b-shape" / "artifact")
    ap.add_argument("--precision", default="int8")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-batch-tokens", type=int, default=None)
    ap.add_argument("--locomo", type=Path, default=DEFAULT_LOCOMO)
    ap.add_argument("--out", type=Path, default=RESULTS / "memory.json")
    args = ap.parse_args()

    samples: list[tuple[float, float]] = []
    stop = threading.Event()
    t0 = time.perf_counter()

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.perf_counter() - t0, rss_mb()))
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()
    from memrerank import Reranker
    from memrerank.runtime.backends.base import DEFAULT_MAX_BATCH_TOKENS

    kw = {"max_batch_tokens": args.max_batch_tokens} if args.max_batch_tokens else {}
    r = Reranker.load(args.artifact, args.precision, threads=args.threads, **kw)
    query = "What did Caroline research after the support group meeting?"
    docs = long_documents(r, query, args.locomo, args.n, args.tokens)
    loaded = rss_mb()
    stats: dict = {}
    t = time.perf_counter()
    hits = r.rank(query, docs, top_k=10, stats=stats)
    elapsed = time.perf_counter() - t
    stop.set()
    peak = max(s for _, s in samples + [(0, rss_mb())])
    result = {
        "environment": environment(args.threads),
        "artifact": str(args.artifact), "precision": args.precision, "candidates": args.n,
        "tokens_per_pair": args.tokens, "prefix_reuse": r.prefix_reuse,
        "max_batch_tokens": args.max_batch_tokens or DEFAULT_MAX_BATCH_TOKENS,
        "rss_after_load_and_tokenize_mb": round(loaded, 1), "peak_rss_mb": round(peak, 1),
        "seconds": round(elapsed, 1), "pairs_per_s": round(args.n / elapsed, 2),
        "padding_waste": round(1 - stats["tokens"] / stats["padded_tokens"], 4), "top1": hits[0].index,
        "rss_trace_mb": [round(s, 1) for _, s in samples[:: max(1, len(samples) // 200)]],
    }
    write(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k != "rss_trace_mb"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
