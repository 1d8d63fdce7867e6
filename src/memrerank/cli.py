"""``memrerank`` command line: export, rank, info, demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from memrerank.errors import MemrerankError
from memrerank.manifest import PRECISIONS

__all__ = ["main", "build_parser"]


def _precision_list(text: str) -> list[str]:
    items = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in items if p not in PRECISIONS]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"unknown precision {bad or text!r}; choose from {', '.join(PRECISIONS)}")
    return items


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(prog="memrerank", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="export a Hugging Face reranker to a validated artifact directory")
    p.add_argument("model", help="hub id (e.g. Qwen/Qwen3-Reranker-0.6B) or local checkpoint directory")
    p.add_argument("-o", "--output", required=True, type=Path, help="artifact directory to write")
    p.add_argument("--precision", type=_precision_list, default=["fp32"],
                   help=f"comma-separated precisions ({', '.join(PRECISIONS)}); default fp32")
    p.add_argument("--max-length", type=int, default=None, help="longest pair in tokens (default: the model's)")
    p.add_argument("--instruction", default=None, help="default instruction for decoder rerankers")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own Python code")
    p.add_argument("--calib-data", type=Path, default=None,
                   help="JSONL of {\"query\",\"document\"} pairs for int8-static ranges and fidelity checks "
                        "(default: built-in pairs)")
    p.add_argument("--fidelity", default=None,
                   help="budget every quantized precision must keep vs fp32, e.g. top10=0.95,spearman=0.99 (default)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--target", choices=("onnx", "tensorrt"), default="onnx",
                   help="tensorrt: also build TensorRT engines for the fp16/int8 precisions asked for (needs an "
                        "NVIDIA GPU and TensorRT)")
    p.add_argument("--profile", default=None,
                   help="TensorRT optimization profile min,opt,max as BATCHxSEQ (default: 1x1,32x128,64x1024)")

    p = sub.add_parser("rank", help="rank documents for a query with an artifact")
    p.add_argument("artifact", type=Path)
    p.add_argument("--query", required=True)
    p.add_argument("--docs", required=True, type=Path,
                   help="documents: a .jsonl of strings or {'text'|'document': ...} objects, or a text file, one per line")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--threshold", type=float, default=None, help="keep hits with calibrated probability >= T")
    p.add_argument("--instruction", default=None)
    p.add_argument("--precision", choices=PRECISIONS + ("auto",), default="fp32")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = sub.add_parser("serve", help="local rerank service (Cohere /v1/rerank and TEI /rerank APIs)")
    p.add_argument("artifact", type=Path)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--precision", choices=PRECISIONS + ("auto",), default="auto")
    p.add_argument("--workers", type=int, default=1, help="server processes (each loads the artifact)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads per worker")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="dynamic batching: longest wait for company")
    p.add_argument("--max-batch-pairs", type=int, default=256, help="dynamic batching: most pairs merged")
    p.add_argument("--max-documents", type=int, default=1000, help="limit: documents per request")
    p.add_argument("--max-request-bytes", type=int, default=4 * 2**20, help="limit: request body bytes")
    p.add_argument("--max-tokens-per-document", type=int, default=8192, help="limit: tokens per document")
    p.add_argument("--ray", action="store_true", help="serve on Ray Serve instead of uvicorn (the ray extra)")
    p.add_argument("--replicas", type=int, default=1, help="--ray: replicas, each loading the artifact")
    p.add_argument("--address", default=None, help="--ray: Ray cluster address (default: a local Ray instance)")

    p = sub.add_parser("rescore", help="re-score a JSONL/Parquet table of (id, query, document) rows on Ray")
    p.add_argument("artifact", type=Path)
    p.add_argument("input", nargs="+", help="input file(s) or directories (*.jsonl or *.parquet)")
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.add_argument("--precision", choices=PRECISIONS + ("auto",), default="auto")
    p.add_argument("--actors", type=int, default=1, help="Reranker actors (each loads the artifact once)")
    p.add_argument("--threads-per-actor", type=int, default=1, help="CPUs and onnxruntime threads per actor")
    p.add_argument("--batch-size", type=int, default=256, help="rows per actor call")
    p.add_argument("--id-column", default="id")
    p.add_argument("--query-column", default="query")
    p.add_argument("--document-column", default="document")
    p.add_argument("--keep-text", action="store_true", help="also write the query and document columns")
    p.add_argument("--output-format", choices=("jsonl", "parquet"), default=None, help="default: the input's")
    p.add_argument("--output-prefix", default="", help="prefix of the score/logit/truncated column names")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--address", default=None, help="Ray cluster address (default: a local Ray instance)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--instruction", default=None, help="decoder artifacts: task instruction (default: the artifact's)")

    p = sub.add_parser("build-engine", help="build TensorRT engines for an existing artifact (NVIDIA GPU)")
    p.add_argument("artifact", type=Path)
    p.add_argument("--precision", default="fp16", help="comma-separated: fp16, int8")
    p.add_argument("--profile", default=None, help="min,opt,max as BATCHxSEQ (default: 1x1,32x128,64x1024)")
    p.add_argument("--workspace-gb", type=float, default=4.0)

    p = sub.add_parser("info", help="summarise an artifact's manifest (or, with --system, this machine's runtime)")
    p.add_argument("artifact", type=Path, nargs="?")
    p.add_argument("--json", action="store_true", help="print the whole manifest (or the system report) as JSON")
    p.add_argument("--system", action="store_true",
                   help="which kernel path (native/numpy), onnxruntime providers and CPU features are in use")

    p = sub.add_parser("bench", help="latency, throughput, memory, size and fidelity per precision")
    p.add_argument("artifact", type=Path)
    p.add_argument("--precisions", type=_precision_list, default=None, help="comma-separated (default: all exported)")
    p.add_argument("--data", type=Path, default=None,
                   help="JSONL of {query,documents[,relevant]} or {query,document[,label]} (default: built-in pairs)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    p.add_argument("--repeats", type=int, default=10, help="timed repeats per latency point")
    p.add_argument("--json", type=Path, default=None, help="write the full report here")
    p.add_argument("--plot", type=Path, default=None, help="write a latency/fidelity plot (PNG, needs matplotlib)")

    p = sub.add_parser("eval", help="retrieval quality (MAP, MRR, NDCG@10, Recall@k) on a memory benchmark")
    p.add_argument("artifact", type=Path)
    p.add_argument("--data", required=True, type=Path, help="LoCoMo's locomo10.json, or a JSONL of queries")
    p.add_argument("--benchmark", choices=("locomo", "jsonl"), default=None, help="default: from the file suffix")
    p.add_argument("--precisions", type=_precision_list, default=None, help="comma-separated (default: all exported)")
    p.add_argument("--candidates", choices=("sessions", "turns"), default="sessions",
                   help="LoCoMo candidates: turns of the evidence sessions (± --window) or of the whole conversation")
    p.add_argument("--window", type=int, default=0, help="LoCoMo: neighbouring sessions added on each side")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N queries only")
    p.add_argument("--json", type=Path, default=None, help="write the metrics here")

    p = sub.add_parser("calibrate", help="fit per-precision score calibration and store it in the manifest")
    p.add_argument("artifact", type=Path)
    p.add_argument("--data", required=True, type=Path,
                   help="JSONL of {query,document,label?} (no labels = teacher mode: match fp32) or LoCoMo's json")
    p.add_argument("--method", choices=("auto", "temperature", "platt"), default="auto",
                   help="auto: Platt (temperature + bias) where the bias helps, else temperature")
    p.add_argument("--precisions", type=_precision_list, default=None, help="comma-separated (default: all exported)")
    p.add_argument("--holdout", type=float, default=0.2, help="share of queries held out for the report")
    p.add_argument("--limit", type=int, default=None, help="LoCoMo: first N questions only")
    p.add_argument("--plot", type=Path, default=None, help="reliability diagram PNG (needs matplotlib)")
    p.add_argument("--json", type=Path, default=None, help="write the report here")

    p = sub.add_parser("demo", help="export the default reranker, rank example agent memories, print figures")
    p.add_argument("--model", default=None,
                   help="checkpoint to use (default: Qwen/Qwen3-Reranker-0.6B when the hub is reachable, "
                        "else the embedded all-MiniLM-L6-v2 body)")
    p.add_argument("-o", "--output", type=Path, default=Path.home() / ".cache" / "memrerank" / "demo")
    p.add_argument("--force", action="store_true", help="re-export even if the demo artifact exists")
    return parser


def _read_docs(path: Path) -> list[str]:
    if not path.is_file():
        raise MemrerankError(f"--docs: {path} does not exist")
    if path.suffix == ".jsonl":
        from memrerank.jsonl import iter_jsonl

        docs = []
        for where, item in iter_jsonl(path, "--docs"):
            if isinstance(item, dict):
                item = item.get("text", item.get("document"))
            if not isinstance(item, str):
                raise MemrerankError(f"--docs: {where} must be a string or an object with a 'text' field")
            docs.append(item)
        return docs
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _cmd_export(args: argparse.Namespace) -> int:
    from memrerank.export import export_model

    engines: list[str] = []
    if args.target == "tensorrt":  # fail fast, before minutes of export, when TensorRT or the GPU is missing
        from memrerank.export.tensorrt import require_tensorrt

        engines = [p for p in ("fp16", "int8") if p in args.precision]
        if not engines:
            raise ValueError("--target tensorrt builds fp16 and/or int8 engines: add them to --precision")
        try:
            require_tensorrt()
        except RuntimeError as exc:
            raise MemrerankError(str(exc)) from exc
    elif args.profile:
        raise ValueError("--profile is a TensorRT option; pass --target tensorrt")
    out = export_model(args.model, args.output, precisions=args.precision, max_length=args.max_length,
                       instruction=args.instruction, force=args.force, revision=args.revision,
                       trust_remote_code=args.trust_remote_code, calib_data=args.calib_data,
                       fidelity=args.fidelity, command=" ".join(sys.argv),
                       log=lambda m: print(m, file=sys.stderr))
    if engines:
        _build_engines(out, engines, args.profile, 4.0)
    print(info_text(out))
    return 0


def _cmd_rank(args: argparse.Namespace) -> int:
    from memrerank import Reranker

    docs = _read_docs(args.docs)
    reranker = Reranker.load(args.artifact, precision=args.precision)
    hits = reranker.rank(args.query, docs, top_k=args.top_k, threshold=args.threshold, instruction=args.instruction)
    if args.json:
        print(json.dumps([h.__dict__ for h in hits], ensure_ascii=False, indent=2))
    else:
        print(f"{'rank':>4}  {'score':>6}  {'logit':>8}  {'idx':>4}  text")
        for r, h in enumerate(hits, 1):
            text = h.text.replace("\n", " ")
            text = text if len(text) <= 80 else text[:77] + "..."
            print(f"{r:>4}  {h.score:6.3f}  {h.logit:8.3f}  {h.index:>4}  {text}{' [truncated]' if h.truncated else ''}")
    return 0


def info_text(root: Path) -> str:
    """Human summary of an artifact: family, source, precisions with parity, calibration."""
    from memrerank.manifest import read_manifest

    m = read_manifest(root)
    src, tok = m["source"], m["tokens"]
    lines = [
        f"artifact    {root}",
        f"family      {m['family']}",
        f"source      {src['model']} ({src['architecture']}, revision {src.get('revision') or 'unknown'})",
        f"tokens      max_length={tok['max_length']} padding={tok['padding_side']} pad_id={tok['pad_id']}"
        + (f" yes_id={tok['yes_id']} no_id={tok['no_id']}" if tok.get("yes_id") is not None else ""),
    ]
    if m["family"] == "decoder-yes-no":
        lines.append(f"instruction {m['template']['default_instruction']!r}")
    for name, entry in m["precisions"].items():
        size = sum(f["bytes"] for f in entry["files"].values())
        par = entry.get("parity", {})
        tol = par.get("tolerance")
        parity = (f"max|Δlogit| vs {par.get('reference', '?')} = {par.get('max_abs_logit_diff', float('nan')):.2e} "
                  f"(tol {f'{tol:.0e}' if tol is not None else 'n/a'}), "
                  f"spearman {par.get('spearman_mean', float('nan')):.4f}")
        if "top10_overlap" in par:
            fid = entry.get("fidelity", {})
            parity += (f", top10 {par['top10_overlap']:.3f}, budget {'met' if fid.get('meets_budget') else 'MISSED'}"
                       f", kept fp32: {', '.join(fid.get('kept_fp32') or []) or 'none'}")
        lines.append(f"precision   {name:<11} {size / 2**20:8.1f} MiB  {parity}")
    calib = m.get("calibration") or {}
    for name in m["precisions"]:
        block = calib.get(name)
        if block:
            after = block.get("metrics", {}).get("after", {})
            extra = f", held-out ECE {after['ece']:.4f}" if "ece" in after else ""
            lines.append(f"calibration {name:<11} {block['method']} {block.get('params')} "
                         f"({block.get('mode', '?')} mode, {block.get('data_size', '?')} pairs, {block.get('fit_date', '?')}{extra})")
        else:
            lines.append(f"calibration {name:<11} none: scores are sigmoid(logit)")
    return "\n".join(lines)


def _build_engines(artifact: Path, precisions: list[str], profile_text: str | None, workspace_gb: float) -> None:
    from memrerank.export.tensorrt import ENGINE_PRECISIONS, build_engine, parse_profile, require_tensorrt
    from memrerank.manifest import read_manifest

    bad = [p for p in precisions if p not in ENGINE_PRECISIONS]
    if bad:
        raise ValueError(f"--precision: TensorRT engines are built for {', '.join(ENGINE_PRECISIONS)}, not {bad}")
    manifest = read_manifest(artifact)
    profile = parse_profile(profile_text, int(manifest["tokens"]["max_length"])) if profile_text else None
    try:
        require_tensorrt()
    except RuntimeError as exc:
        raise MemrerankError(str(exc)) from exc
    for p in precisions:
        build_engine(artifact, p, profile, workspace_gb, log=lambda m: print(m, file=sys.stderr))


def _cmd_serve(args: argparse.Namespace) -> int:
    from memrerank.serve import Limits, serve

    if args.workers < 1 or args.max_documents < 1 or args.max_request_bytes < 1 or args.max_tokens_per_document < 1:
        raise ValueError("--workers and the --max-* limits must be positive")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"memrerank serve: listening on {args.host}, reachable beyond this machine", file=sys.stderr)
    if args.ray:
        from memrerank.scale import serve_on_ray

        if args.workers != 1:
            raise ValueError("--workers is for the uvicorn server; with --ray use --replicas")
        serve_on_ray(args.artifact, host=args.host, port=args.port, address=args.address,
                     precision=args.precision, num_replicas=args.replicas, threads=args.threads or 1,
                     max_wait_ms=args.max_wait_ms, max_batch_pairs=args.max_batch_pairs,
                     max_documents=args.max_documents, max_request_bytes=args.max_request_bytes,
                     max_tokens_per_document=args.max_tokens_per_document)
        return 0
    serve(args.artifact, args.host, args.port, args.precision, args.workers,
          Limits(args.max_documents, args.max_request_bytes, args.max_tokens_per_document), args.max_wait_ms,
          args.max_batch_pairs, args.threads)
    return 0


def _cmd_rescore(args: argparse.Namespace) -> int:
    from memrerank.scale import rescore

    report = rescore(args.input, args.output, args.artifact, precision=args.precision, actors=args.actors,
                     threads_per_actor=args.threads_per_actor, batch_size=args.batch_size,
                     id_column=args.id_column, query_column=args.query_column,
                     document_column=args.document_column, keep_text=args.keep_text,
                     output_format=args.output_format, output_prefix=args.output_prefix, overwrite=args.overwrite,
                     address=args.address, num_cpus=args.num_cpus, instruction=args.instruction)
    print(json.dumps(report.as_dict(), indent=2))
    return 0


def _cmd_build_engine(args: argparse.Namespace) -> int:
    _build_engines(args.artifact, [p.strip() for p in args.precision.split(",") if p.strip()], args.profile,
                   args.workspace_gb)
    return 0


def system_info() -> dict[str, Any]:
    """What the runtime will use on this machine (no artifact needed)."""
    import platform

    import numpy
    import onnxruntime
    import tokenizers

    from memrerank import __version__, kernels

    flags: list[str] = []
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                have = set(line.split(":", 1)[1].split())
                flags = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "fma")
                         if f in have]
    except OSError:
        pass
    why = ("compiled extension memrerank.kernels._kernels" if kernels.NATIVE else
           "MEMRERANK_NO_KERNELS is set" if os.environ.get("MEMRERANK_NO_KERNELS", "0") not in ("", "0") else
           "no compiled extension in this install (built without a compiler?)")
    return {
        "memrerank": __version__, "kernels": kernels.backend_name(), "kernels_detail": why,
        "onnxruntime": onnxruntime.__version__, "providers": onnxruntime.get_available_providers(),
        "numpy": numpy.__version__, "tokenizers": tokenizers.__version__, "python": platform.python_version(),
        "cpu": cpu, "cores": os.cpu_count(), "cpu_features": flags,
    }


def _cmd_info(args: argparse.Namespace) -> int:
    if args.system:
        info = system_info()
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            for key, value in info.items():
                print(f"{key:<14} {', '.join(value) if isinstance(value, list) else value}")
        return 0
    if args.artifact is None:
        raise ValueError("info: pass an artifact directory, or --system for this machine's runtime")
    if args.json:
        from memrerank.manifest import read_manifest

        print(json.dumps(read_manifest(args.artifact), indent=2, ensure_ascii=False))
    else:
        print(info_text(args.artifact))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from memrerank.demo import run_demo

    return run_demo(model=args.model, out=args.output, force=args.force)


def _cmd_bench(args: argparse.Namespace) -> int:
    from memrerank.benchmark import markdown_table, plot, run_bench

    report = run_bench(args.artifact, args.precisions, args.data, batch_size=args.batch_size, threads=args.threads,
                       repeats=args.repeats)
    print(markdown_table(report))
    for name, r in report["precisions"].items():
        if name == "fp16":
            print("note: fp16 is a GPU precision; on the CPU provider it is not expected to be faster than fp32")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.plot:
        plot(report, args.plot)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from memrerank import Reranker
    from memrerank.evaluation import evaluate_scores, load_jsonl_queries, load_locomo
    from memrerank.manifest import read_manifest

    kind = args.benchmark or ("jsonl" if args.data.suffix == ".jsonl" else "locomo")
    if not args.data.is_file():
        raise MemrerankError(f"--data: {args.data} does not exist")
    if kind == "locomo":
        loaded = load_locomo(args.data, candidates=args.candidates, window=args.window, limit=args.limit)
        print(f"LoCoMo: {len(loaded.queries)} queries; repaired {loaded.repaired_ids} malformed evidence ids, "
              f"dropped {loaded.dropped_ids} ids naming no turn and {loaded.dropped_queries} queries without evidence")
    else:
        loaded = load_jsonl_queries(args.data)
        loaded.queries = loaded.queries[: args.limit] if args.limit else loaded.queries
    precisions = args.precisions or list(read_manifest(args.artifact)["precisions"])
    results: dict[str, Any] = {}
    for p in precisions:
        r = Reranker.load(args.artifact, precision=p)
        scores = [r.predict([(q.query, d) for d in q.documents], raw=True) for q in loaded.queries]
        results[p] = evaluate_scores(loaded.queries, scores)
        cats = sorted(results[p], key=lambda c: (c == "overall", c))
        metrics = [k for k in results[p]["overall"] if k != "queries"]
        print(f"\n{p}\n| category | queries | " + " | ".join(metrics) + " |\n|" + "---|" * (len(metrics) + 2))
        for c in cats:
            row = results[p][c]
            print(f"| {c} | {row['queries']} | " + " | ".join(f"{row[m]:.4f}" for m in metrics) + " |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from memrerank.calibration.run import calibrate_artifact

    rep = calibrate_artifact(args.artifact, args.data, method=args.method, precisions=args.precisions,
                             holdout=args.holdout, limit=args.limit, plot=args.plot,
                             log=lambda m: print(m, file=sys.stderr))
    print(calibration_table(rep))
    if args.json:
        args.json.write_text(json.dumps(rep, indent=2))
    return 0


def calibration_table(rep: dict[str, Any]) -> str:
    """Before/after Markdown table of a calibration report."""
    labelled = rep["mode"] == "labels"
    cols = ["ece", "brier", "log_loss"] if labelled else ["mean_abs_diff_to_teacher", "log_loss"]
    head = ["precision", "method"] + [f"{c} before → after" for c in cols] + ["agree@0.3/0.5/0.7 vs fp32 before → after"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p, r in rep["precisions"].items():
        row = [p, r["method"]] + [f"{r['before'][c]:.4f} → {r['after'][c]:.4f}" for c in cols]
        ag = r.get("agreement_vs_fp32")
        row.append(" / ".join(f"{ag['before'][t]:.3f}" for t in ag["before"]) + " → "
                   + " / ".join(f"{ag['after'][t]:.3f}" for t in ag["after"]) if ag else "—")
        lines.append("| " + " | ".join(row) + " |")
    tail = f"\n{rep['mode']} mode, {rep['pairs']} pairs, {rep['held_out']} held out"
    if labelled:
        tail += f"; base rate {rep['base_rate']:.4f} (constant predictor log-loss {rep['base_rate_log_loss']:.4f})"
    return "\n".join(lines) + tail


_COMMANDS: dict[str, Any] = {"build-engine": _cmd_build_engine, "serve": _cmd_serve, "rescore": _cmd_rescore, "calibrate": _cmd_calibrate, "export": _cmd_export, "rank": _cmd_rank, "info": _cmd_info, "demo": _cmd_demo,
                             "bench": _cmd_bench, "eval": _cmd_eval}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``memrerank`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except (MemrerankError, FileExistsError, FileNotFoundError, ValueError, TypeError) as exc:
        print(f"memrerank {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
