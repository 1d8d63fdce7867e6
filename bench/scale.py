"""`memrerank rescore` on a local 2-CPU Ray instance: pairs/s for 1 vs 2 Reranker actors, and each actor's memory.

Rows are LoCoMo questions × candidate turns (grouped by question, as a memory store lists them), written to a JSONL
with ids. Configurations run interleaved (--rounds), each a whole `rescore` job: read, actor start-up (artifact load),
scoring, write. The in-process `Reranker.predict` over the same pairs is the no-Ray reference. Per-actor memory is
the peak RSS (VmHWM) of each `MapBatches(RerankActor)` worker process, read from /proc while the job runs.

    python bench/scale.py --artifact bench/out/minilm-locomo/artifact --precision int8 --queries 200 --k 20
    python bench/scale.py --artifact bench/out/qwen3-0.6b-shape/artifact --name qwen3-0.6b-shape --queries 24 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import DEFAULT_LOCOMO, RESULTS, environment, locomo_workload, write  # noqa: E402

HERE = Path(__file__).parent
CONFIGS = ((1, 1), (2, 1), (1, 2))  # (actors, threads per actor); 2 CPUs in all


class ActorMemory:
    """Polls /proc for Ray worker processes running the RerankActor; keeps each one's peak RSS."""

    def __init__(self, marker: str = "RerankActor", every_s: float = 0.2, skip: set[int] | None = None) -> None:
        self.marker, self.every_s = marker, every_s
        self.skip = skip if skip is not None else set()  # pids of earlier jobs' actors, still exiting
        self.peak_kib: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for proc in Path("/proc").iterdir():
                if not proc.name.isdigit() or int(proc.name) in self.skip:
                    continue
                try:
                    if self.marker not in (proc / "cmdline").read_bytes().decode(errors="replace"):
                        continue
                    for line in (proc / "status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            kib = int(line.split()[1])
                            self.peak_kib[int(proc.name)] = max(kib, self.peak_kib.get(int(proc.name), 0))
                except OSError:
                    continue
            self._stop.wait(self.every_s)

    def __enter__(self) -> ActorMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.skip |= set(self.peak_kib)


class IdentityActor:
    """Same Ray worker, same pyarrow batches, no model: the floor every actor's memory starts from."""

    def __call__(self, batch):
        return batch.drop_columns(["query", "document"])


def worker_floor_mib(src: Path, out: Path, seen: set[int]) -> list[float]:
    import ray

    with ActorMemory("IdentityActor", skip=seen) as mem:
        ds = ray.data.read_json(str(src), num_cpus=0)
        ds.map_batches(IdentityActor, batch_format="pyarrow", batch_size=256,
                       compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1).write_json(str(out))
    return sorted(v / 1024 for v in mem.peak_kib.values())


def main() -> int:
    import ray

    from memrerank import LoadOptions, Reranker
    from memrerank.scale import RescoreJob, rescore

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path, default=HERE / "out" / "minilm-locomo" / "artifact")
    ap.add_argument("--precision", default="int8")
    ap.add_argument("--locomo", type=Path, default=DEFAULT_LOCOMO)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--k", type=int, default=20, help="candidates per question")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--block-rows", type=int, default=256, help="rows per actor call")
    ap.add_argument("--name", default="minilm", help="results go to bench/results/scale_<name>.json")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    work = locomo_workload(args.locomo, args.queries, args.k)
    pairs = [(q, d) for q, docs in work for d in docs]
    tmp = Path(tempfile.mkdtemp(prefix="memrerank-scale-"))
    src = tmp / "pairs.jsonl"
    with src.open("w") as f:
        for i, (q, d) in enumerate(pairs):
            f.write(json.dumps({"id": i, "query": q, "document": d}) + "\n")

    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning", log_to_driver=False)
    seen: set[int] = set()
    floor = worker_floor_mib(src, tmp / "identity", seen)
    print(f"Ray worker without a model (identity actor): peak RSS {[round(p) for p in floor]} MiB", flush=True)
    runs: dict[str, list[dict]] = {f"{a}x{t}": [] for a, t in CONFIGS}
    inproc: dict[str, list[float]] = {"threads=1": [], "threads=2": []}
    try:
        for r in range(args.rounds):
            for actors, threads in CONFIGS:
                out = tmp / f"out-{actors}x{threads}-{r}"
                with ActorMemory(skip=seen) as mem:
                    rep = rescore(RescoreJob(src, out, args.artifact, LoadOptions(args.precision, threads=threads),
                                             actors=actors, block_rows=args.block_rows))
                assert rep.rows == len(pairs), (rep.rows, len(pairs))
                peaks = sorted(v / 1024 for v in mem.peak_kib.values())
                runs[f"{actors}x{threads}"].append({"seconds": rep.seconds, "pairs_per_s": rep.pairs_per_s,
                                                    "rows_per_batch": rep.block_rows,
                                                    "actor_peak_rss_mib": peaks})
                print(f"round {r} {actors} actor(s) x {threads} thread(s): {rep.pairs_per_s:.1f} pairs/s "
                      f"({rep.seconds:.1f} s), actor peak RSS {[round(p) for p in peaks]} MiB", flush=True)
                shutil.rmtree(out)
            for threads in (1, 2):
                rr = Reranker.load(args.artifact, args.precision, threads=threads)
                t = time.perf_counter()
                rr.predict(pairs)
                dt = time.perf_counter() - t
                inproc[f"threads={threads}"].append(len(pairs) / dt)
                print(f"round {r} in-process Reranker threads={threads}: {len(pairs) / dt:.1f} pairs/s", flush=True)
                del rr
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    best = {k: max(v, key=lambda x: x["pairs_per_s"]) for k, v in runs.items()}
    summary = {
        "pairs": len(pairs), "queries": len(work), "k": args.k, "precision": args.precision,
        "artifact": str(args.artifact), "rounds": args.rounds,
        "rescore_best": {k: {"pairs_per_s": v["pairs_per_s"], "seconds": v["seconds"],
                             "actor_peak_rss_mib": v["actor_peak_rss_mib"]} for k, v in best.items()},
        "in_process_best_pairs_per_s": {k: max(v) for k, v in inproc.items()},
        "ray_worker_floor_rss_mib": floor,
        "speedup_2_actors_vs_1": best["2x1"]["pairs_per_s"] / best["1x1"]["pairs_per_s"],
        "runs": runs, "in_process": inproc, "environment": environment(2),
    }
    write(args.out or RESULTS / f"scale_{args.name}.json", summary)
    print(json.dumps({k: summary[k] for k in ("rescore_best", "in_process_best_pairs_per_s",
                                              "speedup_2_actors_vs_1")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
