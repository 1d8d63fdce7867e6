"""CPU int8 flavours side by side: speed, fidelity vs fp32 and batch independence, one artifact, one run.

Flavours (each built from the artifact's fp32 graph, weight MatMul/Gemm only, int8 embedding tables):

- ``per-tensor``: the former ``int8`` (Optimum ORTQuantizer dynamic preset). ``DynamicQuantizeLinear`` takes one
  activation scale per input tensor, i.e. per batch: a score moves with the other documents in its call.
- ``per-row``: what ``int8`` builds now (``memrerank.export.quantize.quantize_per_row``): one activation scale
  per token row, so a row's result depends on that row alone.
- ``static``: ``int8-static`` (QDQ, activation ranges calibrated at export; batch-independent as well).
- ``weight-only``: int8 weights, fp32 activations: onnxruntime's ``MatMulNBits`` (8 bits, one symmetric scale per
  block of 32 weights, accuracy level 0: fp32 compute), built with its ``MatMulNBitsQuantizer``. Not a memrerank
  precision: measured to see what a graph as small as ``int8`` costs where activations stay fp32.
- ``block``: the same weights with ``accuracy_level=4``: onnxruntime quantizes each row's activations per block
  of 32 (finer than ``per-row``'s one scale per row) and runs the int8 kernels (llama.cpp's Q8_0 scheme).

Each flavour is measured as built plainly (every weight product quantized) and, when the plain build misses the
fidelity budget, after the export's sensitivity search (what ``memrerank export`` would write). Speed: the
LoCoMo workload through ``Reranker.predict`` (the fp32 artifact's reranker with its backend swapped for the
flavour's graph), variants interleaved round by round, same thread count; wall-clock and CPU-time (this thread:
with one intra-op thread onnxruntime runs on the caller's thread, so CPU time is what a loaded machine perturbs
least). Fidelity: the export's budget metrics on the built-in calibration pairs, and the same metrics on the
timing workload (held out). Batch independence: max |Δlogit| of documents scored alone vs among 200 others.

    python bench/int8_flavours.py --model minilm --workdir /tmp/int8-minilm --threads 1
    python bench/int8_flavours.py --model qwen3-0.6b-shape --workdir /tmp/int8-q06 --threads 1 --queries 2 --k 16 \\
        --flavours per-tensor,per-row,weight-only,block --no-search --artifact $W/out \\
        --export-int8 $W/out/int8/model.onnx --check-only "fp32,per-tensor plain,per-row plain,block plain"
    # $W: bench/export_time.py's workdir (its default 0.6B export)

Results: ``bench/results/int8_flavours_<model>.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from common import DEFAULT_LOCOMO, environment, group_agreement, locomo_workload, write  # noqa: E402

FLAVOURS = ("per-tensor", "per-row", "static", "weight-only", "block")
NBITS_BLOCK = 32  # weights per MatMulNBits scale (llama.cpp's Q8_0 block)


def _artifact(model: str, workdir: Path) -> Path:
    """The fp32 artifact of ``model`` under ``workdir`` (exported once, reused)."""
    from memrerank.export import export_model

    artifact = workdir / "artifact"
    if (artifact / "manifest.json").exists():
        return artifact
    if model == "minilm":
        import models

        ckpt = models.make_minilm_cross_encoder(workdir / "checkpoint")
    else:
        from peers_decoder import build_checkpoint

        ckpt = build_checkpoint(workdir / "checkpoint")
    export_model(str(ckpt), artifact, precisions=["fp32"], graph="traced", log=lambda m: print(m, file=sys.stderr))
    return artifact


def _matmul_nbits(src: Path, out: Path, external: bool, accuracy_level: int, exclude=()) -> None:
    """Write ``src`` with every weight MatMul not in ``exclude`` as onnxruntime's 8-bit ``MatMulNBits`` (its own
    quantizer: symmetric, one scale per block of :data:`NBITS_BLOCK` weights) to ``out``."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    from memrerank.export.graph import save_graph

    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), nodes_to_exclude=sorted(exclude), algo_config=(
        DefaultWeightOnlyQuantConfig(block_size=NBITS_BLOCK, is_symmetric=True, bits=8,
                                     accuracy_level=accuracy_level)))
    quantizer.process()
    for stale in (out, out.parent / (out.name + "_data")):
        stale.unlink(missing_ok=True)
    save_graph(quantizer.model.model, out, external)


def _nbits(accuracy_level: int):
    """A builder of int8 ``MatMulNBits`` graphs (:func:`_matmul_nbits`) with int8 embedding tables."""

    def build(fp32: Path, out: Path, info, calib=None, exclude=None):
        from memrerank.export.quantize import quantize_embeddings
        from memrerank.manifest import Build

        exclude = set(exclude or [])
        _matmul_nbits(fp32, out, info.external_data, accuracy_level, exclude)
        tables = quantize_embeddings(out, [n for n in info.embedding_nodes if n not in exclude], info.external_data)
        return Build(method=f"onnxruntime MatMulNBits, 8-bit symmetric weights per {NBITS_BLOCK}-block, "
                            f"accuracy_level {accuracy_level}", batch_independent=True,
                     extra={"embeddings": f"{tables} table(s) int8 with one symmetric scale per row" if tables
                            else "fp32"})

    return build


def _weight_only_rest(graph: Path, out: Path, external: bool) -> dict:
    """``graph`` (e.g. the export's int8) with every weight MatMul it left fp32 made weight-only int8
    (``MatMulNBits``, accuracy level 0); its int8 products and embedding tables are kept as they are."""
    _matmul_nbits(graph, out, external, accuracy_level=0)
    return {"method": f"{graph}: its fp32 weight MatMuls as MatMulNBits 8-bit per {NBITS_BLOCK}-block, accuracy "
                      "level 0", "batch_independent": True}


def _dir_bytes(graph: Path) -> int:
    """Size on disk of a graph with its external data (every file of its directory)."""
    return sum(p.stat().st_size for p in graph.parent.iterdir() if p.is_file())


def _builders() -> dict[str, object]:
    from memrerank.export.quantize import build_int8, build_int8_per_tensor, build_int8_static

    return {"per-tensor": build_int8_per_tensor, "per-row": build_int8, "static": build_int8_static,
            "weight-only": _nbits(0), "block": _nbits(4)}


def _build(name, fp32: Path, out: Path, info, calib, budget, searched: bool) -> dict:
    """Build one flavour (plain, or through the export's sensitivity search) and return its record."""
    from memrerank.export.fidelity import search_exclusions

    builder = _builders()[name]
    build_info: dict = {}

    def build(exclude: list[str]) -> None:
        build_info.update(builder(fp32, out, info, calib, exclude).to_dict())  # a manifest Build

    t0 = time.perf_counter()
    if searched:
        report = search_exclusions(build, out, calib, info.groups, budget, lambda m: print(m, file=sys.stderr))
        fid, kept = report["fidelity"], report.get("kept_fp32_nodes", [])
    else:
        build([])
        fid, kept = calib.fidelity(calib.score(out)), []
    return {"graph": str(out), "build_s": round(time.perf_counter() - t0, 1), "fidelity": fid,
            "meets_budget": budget.met(fid), "kept_fp32_nodes": len(kept), "quantized_nodes": len(info.weight_nodes)
            - len(kept), "batch_independent": build_info.get("batch_independent", name != "per-tensor"),
            "size_bytes": _dir_bytes(out)}


def _batch_independence(artifact: Path, graph: str | None, docs: list[str], query: str, threads: int) -> dict:
    """Max |Δlogit| of two documents scored alone vs first and last among 200 others.

    ``default``: the reranker as ``serve`` runs it (the manifest's padding side; a decoder's single pair goes
    through the whole-pair path, a crowd through prefix reuse). ``aligned`` (decoders): right padding and one
    path (no prefix reuse), so only batch composition differs.
    """
    from memrerank import LoadOptions, Reranker
    from memrerank.manifest import DECODER_YES_NO

    others = [docs[i % len(docs)] for i in range(200)]
    configs = {"default": (None, None)}
    if read_family(artifact) == DECODER_YES_NO:
        configs["aligned"] = ("right", False)
    out = {}
    for name, (side, reuse) in configs.items():
        options = LoadOptions("fp32", threads=threads, prefix_reuse=reuse)
        reranker = Reranker.load(artifact, options)
        if graph is not None:
            reranker = reranker.with_graph(graph, options)
        if side is not None:
            reranker.padding_side = side
        worst = 0.0
        for target, pos in ((docs[0], 0), (docs[1], 200)):
            alone = reranker.predict([(query, target)], raw=True)[0]
            crowd = reranker.predict([(query, d) for d in others[:pos] + [target] + others[pos:]], raw=True)[pos]
            worst = max(worst, abs(float(crowd) - float(alone)))
        out[name] = worst
    return out


def read_family(artifact: Path) -> str:
    from memrerank.manifest import read_manifest

    return read_manifest(artifact).family


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("minilm", "qwen3-0.6b-shape"), required=True)
    ap.add_argument("--workdir", type=Path, required=True, help="artifact and flavour graphs (reused when present)")
    ap.add_argument("--locomo", type=Path, default=DEFAULT_LOCOMO)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--fidelity", default=None, help="budget as for memrerank export (default: its default)")
    ap.add_argument("--flavours", default=",".join(FLAVOURS))
    ap.add_argument("--no-search", action="store_true", help="plain builds only")
    ap.add_argument("--rebuild", action="store_true", help="rebuild flavour graphs that already exist")
    ap.add_argument("--check-threads", type=int, default=2, help="threads for the alone-vs-200 check (untimed)")
    ap.add_argument("--no-check", action="store_true", help="skip the alone-vs-200 check (speed and fidelity only)")
    ap.add_argument("--check-only", default=None,
                    help="comma-separated variants (e.g. 'fp32,per-row plain') to run the alone-vs-200 check on; "
                         "default every variant")
    ap.add_argument("--artifact", type=Path, default=None,
                    help="an exported artifact to use (default: the fp32 export under --workdir, made once)")
    ap.add_argument("--export-int8", type=Path, default=None,
                    help="the int8 graph `memrerank export` wrote for this artifact: also measured as it is "
                         "('export' variant) and with its fp32-kept weight products made weight-only int8 "
                         "('export+weight-only')")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    flavours = [f for f in args.flavours.split(",") if f]
    bad = [f for f in flavours if f not in FLAVOURS]
    if bad:
        raise SystemExit(f"--flavours: unknown {bad}; choose from {', '.join(FLAVOURS)}")

    from memrerank import LoadOptions, Reranker
    from memrerank.export.fidelity import CalibSet, FidelityBudget
    from memrerank.export.pairs import builtin_calibration_groups
    from memrerank.export.quantize import graph_info

    artifact = args.artifact or _artifact(args.model, args.workdir)
    fp32 = artifact / "fp32" / "model.onnx"
    info = graph_info(fp32)
    budget = FidelityBudget.parse(args.fidelity)
    calib = None  # the fp32 reference on the calibration pairs: computed only when a flavour is (re)built
    records_path = args.workdir / "flavours.json"
    records: dict[str, dict] = json.loads(records_path.read_text()) if records_path.exists() else {}
    for name in flavours:
        for searched in (False, True):
            if searched and (args.no_search or records.get(f"{name} plain", {}).get("meets_budget")):
                continue
            key = f"{name} {'searched' if searched else 'plain'}"
            out = args.workdir / "flavours" / key.replace(" ", "-") / "model.onnx"
            if key in records and out.exists() and not args.rebuild and records[key].get("budget") == vars(budget):
                continue
            print(f"building {key}", file=sys.stderr, flush=True)
            calib = calib or CalibSet(artifact, builtin_calibration_groups())
            records[key] = {**_build(name, fp32, out, info, calib, budget, searched), "budget": vars(budget)}
            records_path.write_text(json.dumps(records, indent=2))
            gc.collect()
    if args.export_int8 is not None:
        mixed = args.workdir / "flavours" / "export+weight-only" / "model.onnx"
        for key, graph in (("export given", args.export_int8), ("export+weight-only given", mixed)):
            if key in records and Path(records[key]["graph"]).exists() and not args.rebuild \
                    and records[key].get("budget") == vars(budget):
                continue
            print(f"measuring {key}", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            build_info = {}
            if graph == mixed:
                build_info = _weight_only_rest(args.export_int8, mixed, info.external_data)
            calib = calib or CalibSet(artifact, builtin_calibration_groups())
            fid = calib.fidelity(calib.score(graph))
            records[key] = {"graph": str(graph), "build_s": round(time.perf_counter() - t0, 1), "fidelity": fid,
                            "meets_budget": budget.met(fid), "batch_independent": True, **build_info,
                            "size_bytes": _dir_bytes(graph),
                            "budget": vars(budget)}
            records_path.write_text(json.dumps(records, indent=2))
        flavours += ["export", "export+weight-only"]
    variants = ["fp32"] + [k for k in records if k.split()[0] in flavours]

    work = locomo_workload(args.locomo, args.queries, args.k)
    pairs = [(q, d) for q, docs in work for d in docs]
    sizes = [len(docs) for _, docs in work]
    options = LoadOptions("fp32", threads=args.threads)
    fp32 = Reranker.load(artifact, options)
    rerankers = {"fp32": fp32, **{key: fp32.with_graph(records[key]["graph"], options) for key in variants[1:]}}

    def score(key: str) -> np.ndarray:
        return rerankers[key].predict(pairs, raw=True)

    logits = {k: score(k) for k in variants}  # also the warm-up
    wall: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    for rnd in range(args.repeats):
        for key in variants if rnd % 2 == 0 else variants[::-1]:  # interleaved, alternating order
            t, c = time.perf_counter(), time.thread_time()
            score(key)
            cpu[key].append(time.thread_time() - c)
            wall[key].append(time.perf_counter() - t)
        print(f"round {rnd + 1}/{args.repeats}: " + ", ".join(f"{k} {len(pairs) / min(wall[k]):.1f}"
                                                            for k in variants), file=sys.stderr, flush=True)
    checked = set(variants) if args.check_only is None else {k.strip() for k in args.check_only.split(",")}
    results: dict[str, dict] = {}
    for key in variants:
        results[key] = {
            "pairs_per_s": len(pairs) / min(wall[key]), "pairs_per_cpu_s": len(pairs) / min(cpu[key]),
            "wall_s": {"min": min(wall[key]), "median": statistics.median(wall[key])},
            "cpu_s": {"min": min(cpu[key]), "median": statistics.median(cpu[key])},
            "held_out": group_agreement(logits[key], logits["fp32"], sizes) if key != "fp32" else None,
            "alone_vs_200_max_abs_logit_diff": {} if args.no_check or key not in checked else _batch_independence(
                artifact, records[key]["graph"] if key != "fp32" else None, work[0][1], work[0][0],
                args.check_threads),
            **({k: v for k, v in records[key].items() if k != "graph"} if key != "fp32" else
               {"size_bytes": _dir_bytes(fp32)}),
        }
    for key in variants[1:]:
        base = f"per-tensor {key.split()[1]}"
        if base in results and not key.startswith("per-tensor"):
            results[key]["vs_per_tensor_same_build"] = {
                "pairs_per_s": results[key]["pairs_per_s"] / results[base]["pairs_per_s"],
                "pairs_per_cpu_s": results[key]["pairs_per_cpu_s"] / results[base]["pairs_per_cpu_s"]}
    tokens = [len(fp32.encoder.encode(q, d).ids[0]) for q, d in work[:1]]
    out = args.out or HERE / "results" / f"int8_flavours_{args.model}.json"
    write(out, {
        "model": args.model, "artifact": str(artifact),
        "workload": f"{len(work)} LoCoMo queries x {args.k} candidate turns ({len(pairs)} pairs), "
                    f"Reranker.predict, batch_size {fp32.batch_size}, prefix_reuse {fp32.prefix_reuse}",
        "example_pair_tokens": tokens, "repeats": args.repeats, "budget": vars(budget),
        "calibration_pairs": len(builtin_calibration_groups()[0][1]) * len(builtin_calibration_groups()),
        "environment": environment(args.threads), "results": results})
    print(f"{'variant':<22} {'pairs/s':>8} {'pairs/cpu-s':>11} {'spearman':>9} {'top10':>6} {'kept':>5} "
          f"{'Δ alone/200':>11} {'(aligned)':>10}")
    nan = float("nan")
    for key, r in results.items():
        f = r.get("fidelity") or {}
        delta = r["alone_vs_200_max_abs_logit_diff"]
        print(f"{key:<22} {r['pairs_per_s']:8.2f} {r['pairs_per_cpu_s']:11.2f} {f.get('spearman_mean', 1):9.4f} "
              f"{f.get('top10_overlap', 1):6.3f} {r.get('kept_fp32_nodes', 0):5d} {delta.get('default', nan):11.2e} "
              f"{delta.get('aligned', nan):10.2e}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
