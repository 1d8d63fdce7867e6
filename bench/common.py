"""Shared helpers for the bench scripts: workloads from LoCoMo, timing, environment description."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

DEFAULT_LOCOMO = Path(__file__).resolve().parents[2] / "shared" / "data" / "locomo" / "locomo10.json"


def locomo_workload(path: Path, n_queries: int, k: int, skip: int = 0):
    """``n_queries`` LoCoMo questions, each with ``k`` candidate turns (the evidence sessions, then neighbours)."""
    from memrerank.evaluation import load_locomo

    out = []
    for q in load_locomo(path, candidates="sessions", window=2).queries[skip:]:
        if len(q.documents) >= k:
            out.append((q.query, q.documents[:k]))
        if len(out) == n_queries:
            break
    return out


def time_it(fn: Callable[[], object], repeats: int = 3) -> dict[str, float]:
    """Run once to warm up, then ``repeats`` timed runs; min and median seconds."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return {"min_s": min(times), "median_s": statistics.median(times)}


RESULTS = Path(__file__).resolve().parent / "results"


def _git_commit() -> str:
    """The checkout's commit, with ``-dirty`` when tracked files differ from it (``unknown`` outside git).

    The benches' own outputs (``bench/results/``, ``docs/reliability.png``) and Markdown (the README blocks
    ``report.py`` writes, prose) do not count: a bench run after another has rewritten its JSON still measures the
    committed code."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)bench/results", ":(exclude)docs/reliability.png",
                                ":(exclude,glob)**/*.md"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def environment(threads: int) -> dict[str, object]:
    """What a result depends on: versions, CPU, threads, the date (UTC), the git commit and the load average
    when the run started (the machines here are shared: a high load average means noisy absolute figures)."""
    import datetime

    import onnxruntime
    import torch
    import transformers

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    env = {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "torch": torch.__version__,
           "transformers": transformers.__version__, "onnxruntime": onnxruntime.__version__,
           "python": platform.python_version(),
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "commit": _git_commit(), "loadavg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    try:
        import sentence_transformers

        env["sentence_transformers"] = sentence_transformers.__version__
    except ImportError:
        pass
    return env


def int8_fidelity(artifact: Path) -> dict | None:
    """The int8 precision's fidelity record, read through the typed manifest, as manifest.json spells it."""
    from memrerank.manifest import read_manifest

    return read_manifest(artifact).to_dict()["precisions"]["int8"].get("fidelity")


def write(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))


def group_agreement(logits, ref, sizes: list[int], diff_key: str = "max_abs_logit_diff") -> dict:
    """Agreement of ``logits`` with ``ref`` over consecutive query groups of ``sizes``: mean per-query Spearman,
    mean top-10 overlap, and the largest absolute difference (under ``diff_key``)."""
    import numpy as np

    from memrerank.export.metrics import spearman, topk_overlap

    logits, ref = np.asarray(logits), np.asarray(ref)
    sp, top, start = [], [], 0
    for n in sizes:
        a, b = logits[start:start + n], ref[start:start + n]
        sp.append(spearman(a, b))
        top.append(topk_overlap(a, b, 10))
        start += n
    return {"spearman_mean": float(np.mean(sp)), "top10_overlap": float(np.mean(top)),
            diff_key: float(np.max(np.abs(logits - ref)))}


def interleaved(runs: dict[str, Callable[[], object]], rounds: int, *,
                cpu_clock: Callable[[], float] = time.process_time,
                progress: Callable[[int, dict[str, list[float]]], None] | None = None
                ) -> tuple[dict[str, list[float]], dict[str, list[float]], list[float]]:
    """Run every callable once per round, the order reversed every other round (a shared machine drifts; ratios
    within a round stay meaningful). Returns wall seconds and CPU seconds (``cpu_clock``) per run and round, and
    the 1-minute load average at the start of each round."""
    wall: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    loads = []
    for rnd in range(rounds):
        loads.append(float(Path("/proc/loadavg").read_text().split()[0]))
        for name in list(runs) if rnd % 2 == 0 else list(runs)[::-1]:
            t, c = time.perf_counter(), cpu_clock()
            runs[name]()
            cpu[name].append(cpu_clock() - c)
            wall[name].append(time.perf_counter() - t)
        if progress is not None:
            progress(rnd, cpu)
    return wall, cpu, loads
