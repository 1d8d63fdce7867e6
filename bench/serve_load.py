"""Loopback load test of `memrerank serve`: throughput and p50/p99 latency vs concurrency, with dynamic batching
(max wait 5 ms) and without (each request scored alone). Bounded: --requests per point, loopback only.

    python bench/serve_load.py --artifact bench/out/minilm-locomo/artifact --requests 120
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import DEFAULT_LOCOMO, RESULTS, environment, locomo_workload, write  # noqa: E402

HERE = Path(__file__).parent


def start(artifact: Path, precision: str, wait_ms: float, threads: int):
    import uvicorn

    from memrerank import LoadOptions
    from memrerank.serve import ServeConfig, create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(ServeConfig(artifact, LoadOptions(precision, threads=threads), max_wait_ms=wait_ms))
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=srv.run, daemon=True).start()
    while not srv.started:
        time.sleep(0.05)
    return srv, f"http://127.0.0.1:{port}"


def main() -> int:
    import httpx
    import numpy as np

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path, default=HERE / "out" / "minilm-locomo" / "artifact")
    ap.add_argument("--precision", default="int8")
    ap.add_argument("--locomo", type=Path, default=DEFAULT_LOCOMO)
    ap.add_argument("--requests", type=int, default=120)
    ap.add_argument("--k", type=int, default=20, help="documents per request")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "serve_load.json")
    args = ap.parse_args()
    work = locomo_workload(args.locomo, 40, args.k)
    results = []
    for wait in (0.0, 5.0):
        srv, url = start(args.artifact, args.precision, wait, args.threads)
        for conc in (1, 4, 16):
            lat: list[float] = []

            def one(i: int) -> None:
                q, docs = work[i % len(work)]
                with httpx.Client(timeout=120) as c:
                    t = time.perf_counter()
                    r = c.post(f"{url}/v1/rerank", json={"query": q, "documents": docs, "top_n": 5})
                    lat.append(time.perf_counter() - t)
                    r.raise_for_status()

            with ThreadPoolExecutor(conc) as pool:
                list(pool.map(one, range(min(8, args.requests))))  # warm-up
                lat.clear()
                t0 = time.perf_counter()
                list(pool.map(one, range(args.requests)))
                wall = time.perf_counter() - t0
            row = {"max_wait_ms": wait, "concurrency": conc, "requests": args.requests, "docs_per_request": args.k,
                   "requests_per_s": args.requests / wall, "pairs_per_s": args.requests * args.k / wall,
                   "p50_ms": 1e3 * float(np.percentile(lat, 50)), "p99_ms": 1e3 * float(np.percentile(lat, 99))}
            results.append(row)
            print(json.dumps(row), flush=True)
        srv.should_exit = True
        time.sleep(1)
    write(args.out, {"environment": environment(args.threads), "artifact": str(args.artifact),
                     "precision": args.precision, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
