"""MemReranker-4B on a laptop: the Qwen3-4B shape (random weights) exported as int4 by the streaming export, and
ranked beside llama.cpp Q4_K_M of the same checkpoint, one run.

Steps (each reused when its output exists in ``--workdir``):

1. ``ckpt/``: a random bf16 checkpoint of the shape (``bench/random_checkpoint.py``, 8 GB for Qwen3-4B);
2. ``memrerank export ckpt --precision int4`` in a child process under ``/usr/bin/time -v``: wall seconds and peak
   RSS of the whole export (PyTorch reference in bf16, the streamed int4 graph, onnxruntime validation). The budget
   is relaxed (``--fidelity top10=0,spearman=0``): random weights rank noise, and the int4-vs-PyTorch figures the
   manifest records are reported as they are;
   With ``--int8``, ``--precision int8`` alone is exported the same way (wall, peak RSS, size);
3. size on disk, cold start (load + first score in a fresh process) and that process's peak RSS while ranking
   one LoCoMo question's 20 candidate turns;
4. ``rank(question, 20 turns)`` on ``--threads`` threads with prefix reuse vs llama.cpp Q4_K_M (the checkpoint
   converted by llama.cpp's ``convert_hf_to_gguf.py`` to bf16, then ``llama_model_quantize`` to Q4_K_M; scored as
   ``bench/peers_decoder.py`` does: each document one sequence, only the last token's logits), interleaved
   rounds, p50 per question;
5. ``--also DIR``: another int4 artifact of the same checkpoint (another ``--int4-block``): its size, cold start,
   peak RSS and rank() p50 in the same rounds.

    python bench/laptop_4b.py --workdir W --llama-convert .../llama.cpp/convert_hf_to_gguf.py

Results: ``bench/results/laptop_4b.json``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from common import DEFAULT_LOCOMO, RESULTS, environment, interleaved, write  # noqa: E402
from random_checkpoint import write as write_checkpoint  # noqa: E402
from real_weights import cold_start, split_locomo  # noqa: E402


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def export(ckpt: Path, artifact: Path, precision: str = "int4") -> dict:
    """The streamed export in a child under ``/usr/bin/time -v``: wall seconds, peak RSS, its step seconds."""
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "memrerank.cli", "export", str(ckpt), "--precision", precision,
           "-o", str(artifact), "--force", "--fidelity", "top10=0,spearman=0", "--max-length", "8192"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise RuntimeError(f"export failed:\n{proc.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    manifest = json.loads((artifact / "manifest.json").read_text())
    entry = manifest["precisions"][precision]
    size = sum(p.stat().st_size for p in (artifact / precision).iterdir())
    return {"wall_s": round(wall, 1), "peak_rss_gib": round(rss_kb / 2**20, 3), "bytes": size,
            "step_seconds": manifest["export"].get("step_seconds"), "parity_vs_pytorch": entry.get("parity"),
            "fidelity_vs_pytorch": entry.get("fidelity", {}).get("fidelity"), "build": entry.get("build")}


def q4_gguf(ckpt: Path, workdir: Path, convert: Path, threads: int) -> tuple[Path, dict]:
    """llama.cpp's Q4_K_M of the checkpoint: converted to bf16 GGUF, then quantized by ``llama_model_quantize``."""
    import llama_cpp

    bf16, q4 = workdir / "model-bf16.gguf", workdir / "model-Q4_K_M.gguf"
    info: dict = {"converter": str(convert)}
    if not q4.exists():
        if not bf16.exists():
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(convert.parent / "gguf-py"), str(convert.parent)])}
            t = time.perf_counter()
            proc = subprocess.run([sys.executable, str(convert), str(ckpt), "--outfile", str(bf16), "--outtype",
                                   "bf16"], capture_output=True, text=True, env=env)
            if proc.returncode:
                raise RuntimeError(f"convert_hf_to_gguf.py failed:\n{proc.stderr[-3000:]}")
            info["convert_s"] = round(time.perf_counter() - t, 1)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
        params.nthread = threads
        t = time.perf_counter()
        if llama_cpp.llama_model_quantize(str(bf16).encode(), str(q4).encode(), ctypes.byref(params)) != 0:
            raise RuntimeError("llama_model_quantize to Q4_K_M failed")
        info["quantize_s"] = round(time.perf_counter() - t, 1)
        bf16.unlink()  # 8 GB: only the Q4_K_M file is needed from here on
    info["size_bytes"] = q4.stat().st_size
    return q4, info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--shape", default="qwen3-4b")
    ap.add_argument("--locomo", type=Path, default=DEFAULT_LOCOMO)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--questions", type=int, default=3)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--llama-convert", type=Path, default=None)
    ap.add_argument("--int8", action="store_true", help="also export --precision int8 alone (streamed) and record it")
    ap.add_argument("--also", type=Path, action="append", default=[],
                    help="another int4 artifact of the same checkpoint (e.g. --int4-block 128) measured beside: size, "
                         "cold start, peak RSS, rank() p50")
    ap.add_argument("--out", type=Path, default=RESULTS / "laptop_4b.json")
    args = ap.parse_args()
    env = environment(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    ckpt, artifact = args.workdir / "ckpt", args.workdir / "artifact-int4"
    result: dict = {"environment": env, "shape": args.shape, "weights": "random (normal, std 0.02), bf16"}
    if not (ckpt / "model.safetensors").exists():
        log(f"writing the random {args.shape} checkpoint")
        t = time.perf_counter()
        write_checkpoint(ckpt, args.shape)
        result["checkpoint_write_s"] = round(time.perf_counter() - t, 1)
    result["checkpoint_bytes"] = (ckpt / "model.safetensors").stat().st_size
    done = args.workdir / "export.json"
    if not done.exists():
        log("exporting int4 (streamed)")
        done.write_text(json.dumps(export(ckpt, artifact)))
    result["export"] = json.loads(done.read_text())
    log(f"export: {json.dumps(result['export'])[:400]}")
    result["int4_bytes"] = sum(p.stat().st_size for p in (artifact / "int4").iterdir())
    if args.int8:
        done8 = args.workdir / "export-int8.json"
        if not done8.exists():
            log("exporting int8 (streamed)")
            done8.write_text(json.dumps(export(ckpt, args.workdir / "artifact-int8", "int8")))
        result["int8_export"] = json.loads(done8.read_text())
        log(f"int8 export: {json.dumps(result['int8_export'])[:300]}")
    _, held = split_locomo(args.locomo, 16, args.questions, args.k)
    result["cold"] = cold_start(artifact, "int4", args.threads, held[:1])
    log(f"cold start {result['cold']}")
    others = {}
    for other in args.also:
        m = json.loads((other / "manifest.json").read_text())
        block = m["precisions"]["int4"]["build"]["block_size"]
        name = f"memrerank int4, blocks of {block} + prefix reuse"
        others[name] = other
        result.setdefault("variants", {})[name] = {
            "block_size": block, "int4_bytes": sum(p.stat().st_size for p in (other / "int4").iterdir()),
            "written_by": m.get("export", {}).get("command"),
            "cold": cold_start(other, "int4", args.threads, held[:1])}
        log(f"{name}: {result['variants'][name]}")

    from memrerank import LoadOptions, Reranker
    from memrerank.export.families.decoder_yes_no import DEFAULT_INSTRUCTION, QWEN3_RERANKER, format_body

    r = Reranker.load(artifact, LoadOptions("int4", threads=args.threads, prefix_reuse=True))
    scorers = {"memrerank int4 + prefix reuse": lambda q, d: np.array(
        [h.logit for h in sorted(r.rank(q, d), key=lambda h: h.index)])}
    for name, other in others.items():
        ro = Reranker.load(other, LoadOptions("int4", threads=args.threads, prefix_reuse=True))
        scorers[name] = lambda q, d, ro=ro: np.array([h.logit for h in sorted(ro.rank(q, d), key=lambda h: h.index)])
    if args.llama_convert is not None:
        from peers_decoder import llama_cpp_scorer

        q4, info = q4_gguf(ckpt, args.workdir, args.llama_convert, args.threads)
        result["llama_cpp_gguf"] = info
        template = (QWEN3_RERANKER.prefix + format_body(DEFAULT_INSTRUCTION, "{query}", "{document}")
                    + QWEN3_RERANKER.suffix)
        score, _tokens, meta, keep = llama_cpp_scorer(q4, args.threads, "logits", 4096, 512, template=template)
        scorers["llama.cpp Q4_K_M"] = lambda q, d: np.asarray(score(q, d))
        result["llama_cpp"] = meta
    logits = {n: [fn(q, d) for q, d in held] for n, fn in scorers.items()}  # warm-up
    per_q: dict[str, list[float]] = {n: [] for n in scorers}
    for q, d in held:
        runs = {n: (lambda fn=fn, q=q, d=d: fn(q, d)) for n, fn in scorers.items()}
        wall, _cpu, _ = interleaved(runs, args.rounds)
        for n in scorers:
            per_q[n] += wall[n]
    result["rank"] = {n: {"p50_s": round(statistics.median(v), 3), "min_s": round(min(v), 3), "calls": len(v)}
                      for n, v in per_q.items()}
    if "llama.cpp Q4_K_M" in scorers:
        a, b = (np.concatenate(logits[n]) for n in ("memrerank int4 + prefix reuse", "llama.cpp Q4_K_M"))
        peer = result["rank"]["llama.cpp Q4_K_M"]["p50_s"]
        ours = result["rank"]["memrerank int4 + prefix reuse"]["p50_s"]
        result["rank"]["speedup_vs_llama_cpp_p50"] = round(peer / ours, 3)
        for name in others:
            result["variants"][name]["speedup_vs_llama_cpp_p50"] = round(peer / result["rank"][name]["p50_s"], 3)
        result["agreement_int4_vs_llama_q4"] = {"pearson": float(np.corrcoef(a, b)[0, 1])}
    result["workload"] = f"{len(held)} LoCoMo questions x {args.k} turns, rank() per question, {args.rounds} rounds"
    write(args.out, result)
    log(json.dumps(result["rank"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
