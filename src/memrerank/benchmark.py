"""``memrerank bench``: latency, throughput, memory, size and fidelity per precision of one artifact.

Each precision is measured in a fresh subprocess, handed the caller's :class:`~memrerank.LoadOptions` with its
precision set, so cold start and peak RSS are its own. Besides latency and throughput each worker measures the
fast path: shared-prefix reuse on vs off (decoder artifacts; measured speed-up next to the ideal token ratio),
padding waste of the length-bucketed batches, the host share of wall time (tokenize + pack + post-process) at
:data:`HOST_K` candidates, and the packer on the native vs the numpy path (set through the reranker's ``packer``
hook). :func:`memrerank.report.markdown_table` renders the report.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from memrerank.report import markdown_table
from memrerank.runtime.options import LoadOptions, check_positive_int

__all__ = ["run_bench", "load_bench_data", "fast_path", "markdown_table", "KS", "BATCH_SIZES", "HOST_K",
           "REUSE_K"]

KS = (8, 32, 128)
BATCH_SIZES = (1, 8, 32)
#: Candidates per query for the host-overhead share (the issue's "100 candidates").
HOST_K = 100
#: Candidates per query for the prefix-reuse comparison (an assistant's typical memory shortlist).
REUSE_K = 32


def load_bench_data(path: str | Path | None) -> list[tuple[str, list[str], set[int] | None]]:
    """Queries with candidates (and relevant indices when the file has labels).

    Accepts JSONL lines of ``{"query","documents","relevant"?}`` or ``{"query","document","label"?}`` (grouped by
    query); ``None`` gives the built-in pairs.
    """
    if path is None:
        from memrerank.export.pairs import builtin_calibration_groups

        return [(q, docs, None) for q, docs in builtin_calibration_groups()]
    from memrerank.jsonl import iter_jsonl

    groups: dict[str, tuple[list[str], set[int] | None]] = {}
    for where, row in iter_jsonl(path, "--data"):
        if not isinstance(row, dict) or not isinstance(row.get("query"), str):
            raise ValueError(f"--data: {where} needs a string 'query'")
        if "documents" in row:
            docs = row["documents"]
            if not isinstance(docs, list) or not all(isinstance(d, str) for d in docs):
                raise ValueError(f"--data: {where} 'documents' must be a list of strings")
            rel = row.get("relevant")
            if rel is not None and (not isinstance(rel, list) or not all(
                    isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(docs) for i in rel)):
                raise ValueError(f"--data: {where} 'relevant' must list indices into 'documents' "
                                 f"(0..{len(docs) - 1})")
            groups[row["query"]] = (list(docs), set(rel) if rel is not None else None)
        elif "document" in row:
            if not isinstance(row["document"], str):
                raise ValueError(f"--data: {where} 'document' must be a string")
            docs, rel = groups.setdefault(row["query"], ([], set() if "label" in row else None))
            if rel is not None and row.get("label"):
                rel.add(len(docs))
            docs.append(row["document"])
        else:
            raise ValueError(f"--data: {where} expected 'documents' or 'document'")
    return [(q, d, r) for q, (d, r) in groups.items()]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


@dataclasses.dataclass(frozen=True)
class _WorkerSpec:
    """What one bench child measures: one precision of one artifact, loaded with ``options`` (handed to it as
    JSON, never a pickle: :meth:`to_json` / :meth:`from_json`, the options validated again on the way in)."""

    artifact: str
    options: LoadOptions
    data: list[tuple[str, list[str], None]]
    repeats: int
    ks: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    host_k: int | None

    def to_json(self) -> str:
        return json.dumps({**dataclasses.asdict(self), "options": self.options.as_dict()})

    @classmethod
    def from_json(cls, text: str) -> _WorkerSpec:
        raw = json.loads(text)
        return cls(raw["artifact"], LoadOptions(**raw["options"]), [(q, d, None) for q, d, _ in raw["data"]],
                   raw["repeats"], tuple(raw["ks"]), tuple(raw["batch_sizes"]), raw["host_k"])


def _worker(spec: _WorkerSpec) -> dict[str, Any]:
    """Runs in the child: everything measured for one precision."""
    t0 = time.perf_counter()
    from memrerank import Reranker

    data = spec.data
    r = Reranker.load(spec.artifact, spec.options)
    batch_size = r.batch_size  # the options' rows per call, or the backend's default
    q0, docs0 = data[0][0], data[0][1]
    r.predict([(q0, docs0[0])], raw=True)
    cold = time.perf_counter() - t0
    out: dict[str, Any] = {"cold_start_s": cold, "batch_size": batch_size, "latency_ms": {}, "pairs_per_s": {}}
    pool = [d for _, docs, _ in data for d in docs]
    for k in spec.ks:
        docs = [pool[i % len(pool)] for i in range(k)]
        r.rank(q0, docs)  # warm-up at this shape
        times = []
        for _ in range(spec.repeats):
            t = time.perf_counter()
            r.rank(q0, docs)
            times.append(time.perf_counter() - t)
        out["latency_ms"][str(k)] = {"p50": 1e3 * float(np.percentile(times, 50)),
                                     "p95": 1e3 * float(np.percentile(times, 95))}
    n = max(spec.ks)
    pairs = [(q0, pool[i % len(pool)]) for i in range(n)]
    for bs in spec.batch_sizes:
        r.batch_size = bs
        r.predict(pairs[: min(n, 2 * bs)], raw=True)
        t = time.perf_counter()
        r.predict(pairs, raw=True)
        out["pairs_per_s"][str(bs)] = n / (time.perf_counter() - t)
    r.batch_size = batch_size
    logits = [r.predict([(q, d) for d in docs], raw=True).tolist() for q, docs, _ in data]
    out["logits"] = logits
    out["fast_path"] = fast_path(r, data, pool, spec.repeats, spec.host_k)
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


def _timed(fn: Any, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def fast_path(r: Any, data: list, pool: list[str], repeats: int, host_k: int | None = HOST_K) -> dict[str, Any]:
    """Prefix reuse, padding waste, host-overhead share and native-vs-numpy packing for one loaded reranker.

    The packer comparison swaps the reranker's public ``packer`` hook and puts the original back afterwards.
    """
    from memrerank import kernels

    out: dict[str, Any] = {"packer": kernels.backend_name()}
    groups = [(q, (docs * (REUSE_K // max(1, len(docs)) + 1))[:REUSE_K]) for q, docs, _ in data][:8]
    n_pairs = sum(len(d) for _, d in groups)

    def run_groups(stats: dict | None = None) -> None:
        for q, docs in groups:
            r.rank(q, docs, stats=stats)

    reuse_on = r.prefix_reuse
    if reuse_on:
        reps = max(2, repeats // 3)
        best = {False: float("inf"), True: float("inf")}
        tokens: dict[bool, dict] = {}
        for mode in (False, True):
            r.prefix_reuse = mode
            tokens[mode] = {}
            run_groups(tokens[mode])  # warm-up, and the token counts
        for _ in range(reps):  # interleaved so drift hits both modes alike
            for mode in (False, True):
                r.prefix_reuse = mode
                t = time.perf_counter()
                run_groups()
                best[mode] = min(best[mode], time.perf_counter() - t)
        r.prefix_reuse = True
        ideal = tokens[False]["tokens"] / tokens[True]["tokens"]
        measured = best[False] / best[True]
        out["prefix_reuse"] = {
            "candidates_per_query": REUSE_K, "queries": len(groups),
            "pairs_per_s_off": n_pairs / best[False], "pairs_per_s_on": n_pairs / best[True],
            "speedup": measured, "ideal_token_ratio": ideal, "share_of_ideal": measured / ideal,
            "tokens_off": tokens[False]["tokens"], "tokens_on": tokens[True]["tokens"],
            "padding_waste_off": 1 - tokens[False]["tokens"] / tokens[False]["padded_tokens"],
            "padding_waste_on": 1 - tokens[True]["tokens"] / tokens[True]["padded_tokens"],
        }
    stats: dict[str, float] = {}
    run_groups(stats)
    out["padding_waste"] = 1 - stats["tokens"] / stats["padded_tokens"]

    if not host_k:
        return out
    q0 = data[0][0]
    docs = [pool[i % len(pool)] for i in range(host_k)]
    paths = [("numpy", kernels.pack_numpy)] + ([("native", kernels.pack_native)] if kernels.NATIVE else [])
    host: dict[str, Any] = {}
    original = r.packer
    try:
        for name, fn in paths:
            r.packer = fn
            r.rank(q0, docs)
            walls, shares, packs = [], [], []
            for _ in range(max(3, repeats)):
                st: dict[str, float] = {}
                t = time.perf_counter()
                r.rank(q0, docs, stats=st)
                wall = time.perf_counter() - t
                walls.append(wall)
                shares.append((st["tokenize_s"] + st["pack_s"] + st.get("post_s", 0.0)) / wall)
                packs.append(st["pack_s"])
            host[name] = {"candidates": host_k, "wall_ms": 1e3 * float(np.median(walls)),
                          "host_share": float(np.median(shares)), "pack_ms": 1e3 * float(np.median(packs))}
    finally:
        r.packer = original
    out["host"] = host
    return out


def _run_child(spec: _WorkerSpec) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(spec.to_json(), encoding="utf-8")
        proc = subprocess.run([sys.executable, "-m", "memrerank.benchmark", str(spec_path), str(out_path)],
                              capture_output=True, text=True, env=dict(os.environ))
        if proc.returncode != 0:
            raise RuntimeError(f"bench worker for {spec.options.precision} failed:\n{proc.stderr[-2000:]}")
        return json.loads(out_path.read_text())


def run_bench(artifact: str | Path, precisions: Sequence[str] | None = None, data: str | Path | None = None,
              options: LoadOptions | None = None, *, repeats: int = 10, ks: Sequence[int] = KS,
              batch_sizes: Sequence[int] = BATCH_SIZES, progress: bool | None = None,
              host_k: int | None = HOST_K) -> dict[str, Any]:
    """Measure every requested precision of ``artifact``; fidelity is computed against fp32.

    Args:
        artifact: the artifact directory.
        precisions: precisions to measure (``None`` = all exported); fp32 is always measured, as the reference.
        data: bench data (see :func:`load_bench_data`); ``None`` = the built-in pairs.
        options: how every worker loads the artifact (:class:`~memrerank.runtime.options.LoadOptions`: providers,
            threads, batch_size, max_batch_tokens, prefix_reuse, ...; default: all defaults). Its ``precision``
            is replaced by each precision measured. The providers are checked before any worker starts.
        repeats: timed repeats per latency point.
        ks: candidates per query for the latency points.
        batch_sizes: batch sizes for the throughput points.
        progress: a progress bar over the precisions on stderr (``None``: when stderr is a terminal).
        host_k: candidates for the host-overhead share (``None`` or 0 = not measured).

    Raises:
        ValueError: a precision not in the artifact, bad bench data, or ``repeats`` not a positive integer.
        TypeError: ``options`` is not a :class:`LoadOptions`.
        ProviderError: a provider this onnxruntime build does not have (the message lists those it has).
    """
    from memrerank.manifest import read_manifest
    from memrerank.progress import bar
    from memrerank.runtime.backends import resolve_providers

    options = LoadOptions.merge(options)
    check_positive_int(repeats, "repeats")
    root = Path(artifact)
    manifest = read_manifest(root)
    available = list(manifest.precisions)
    precisions = list(precisions or available)
    missing = [p for p in precisions if p not in available]
    if missing:
        raise ValueError(f"--precision: {missing} not in this artifact (it has {', '.join(available)})")
    if options.providers is not None:  # checked here, once, naming what this build has
        options = options.replace(providers=tuple(resolve_providers(list(options.providers))))
    if "fp32" not in precisions and "fp32" in available:  # the reference of every fidelity figure
        precisions = ["fp32", *precisions]
    groups = load_bench_data(data)
    spec = _WorkerSpec(str(root), options, [(q, d, None) for q, d, _ in groups], repeats, tuple(ks),
                       tuple(batch_sizes), host_k)
    results: dict[str, Any] = {}
    for p in bar(precisions, desc="bench", enabled=progress, unit="precision"):
        results[p] = _run_child(dataclasses.replace(spec, options=options.replace(precision=p)))
        results[p]["size_mb"] = manifest.precisions[p].size_bytes / 2**20
    _add_fidelity(results, groups)
    return {
        "artifact": str(root), "family": manifest.family, "threads": options.threads or "onnxruntime default",
        "providers": list(options.providers or ("CPUExecutionProvider",)),
        "batch_size": results[precisions[0]]["batch_size"],
        "options": options.replace(precision=precisions[0]).as_dict(),
        "data": str(data) if data else "built-in pairs", "queries": len(groups),
        "machine": _machine(), "precisions": results,
    }


def _add_fidelity(results: dict[str, Any], groups: list[tuple[str, list[str], set[int] | None]]) -> None:
    """Each precision's agreement with fp32 (and MAP where the data has labels); the logits are dropped. An
    artifact without fp32 (a streamed export) has no fidelity figures here: its manifest holds them vs PyTorch."""
    from memrerank.evaluation import average_precision
    from memrerank.export.metrics import spearman, topk_overlap

    ref = results["fp32"]["logits"] if "fp32" in results else None
    for res in results.values():
        if ref is not None:
            sp = [spearman(np.array(a), np.array(b)) for a, b in zip(res["logits"], ref)]
            tk = [topk_overlap(np.array(a), np.array(b), 10) for a, b in zip(res["logits"], ref)]
            res["fidelity"] = {"spearman_mean": float(np.mean(sp)), "top10_overlap": float(np.mean(tk))}
        labelled = [(np.array(a), g[2]) for a, g in zip(res["logits"], groups) if g[2]]
        if labelled:
            res["MAP"] = float(np.mean([average_precision(a, rel) for a, rel in labelled]))
    for res in results.values():
        if "MAP" in res and ref is not None:
            res["fidelity"]["delta_MAP"] = res["MAP"] - results["fp32"]["MAP"]
        del res["logits"]


def _machine() -> dict[str, Any]:
    import platform

    import onnxruntime

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version()}


def plot(report: dict[str, Any], path: str | Path) -> None:
    """Latency (p50, K=32 or the middle K) per precision, fidelity annotated on each bar."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ValueError("--plot needs matplotlib: pip install 'memrerank[bench]'") from exc
    names = list(report["precisions"])
    ks = sorted(int(k) for k in report["precisions"][names[0]]["latency_ms"])
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(ks)
    for j, k in enumerate(ks):
        vals = [report["precisions"][p]["latency_ms"][str(k)]["p50"] for p in names]
        bars = ax.bar(np.arange(len(names)) + j * width, vals, width, label=f"K={k}")
        if j == len(ks) - 1:
            for b, p in zip(bars, names):
                f = report["precisions"][p]["fidelity"]
                ax.annotate(f"ρ={f['spearman_mean']:.3f}\ntop10={f['top10_overlap']:.2f}",
                            (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(np.arange(len(names)) + width * (len(ks) - 1) / 2, names)
    ax.set_ylabel("p50 latency per query (ms)")
    ax.set_title(f"{Path(report['artifact']).name}: latency vs precision (fidelity vs fp32 annotated)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":  # worker entry: python -m memrerank.benchmark SPEC OUT
    Path(sys.argv[2]).write_text(json.dumps(_worker(_WorkerSpec.from_json(Path(sys.argv[1]).read_text("utf-8")))))
