"""The ``memrerank`` console script: export, rank, serve, rescore, build-engine, info, bench, eval, calibrate,
demo.

One vocabulary across the commands, one flag per idea:

* ``--precision``: one precision or ``auto`` where one reranker is loaded (rank, serve, rescore); a comma list
  where several are (export, build-engine, bench, eval, calibrate).
* How a reranker is loaded and run: ``--providers``, ``--threads``, ``--batch-size`` (model rows per call),
  ``--max-batch-tokens``, ``--prefix-reuse/--no-prefix-reuse``, ``--allow-tf32``, ``--io-binding/--no-io-binding``
  — the fields of :class:`memrerank.LoadOptions`, one flag each, wherever a reranker is loaded (rank, serve,
  rescore, bench, eval, calibrate, demo); :func:`load_options` turns them into the one ``LoadOptions`` the command
  passes on.
* ``-o/--output``: what the command writes (export: the artifact directory; rescore: the output directory; bench,
  eval, calibrate: a JSON copy of the report; demo: its directory).
* ``--force``: replace what ``-o`` names (export, rescore) or rebuild it (demo).
* ``--json``: print the command's result as JSON on stdout instead of text; ``-q/--quiet``: no progress bars or
  progress messages. Every command has both.

memrerank's own errors (bad input, a missing artifact, an unavailable provider), the system's (permission denied,
disk full) and a bad flag print one line and exit 2. Before any work (loading a model, starting Ray, a benchmark)
the outputs are checked: a directory a command creates (export, rescore ``-o``) needs its nearest existing parent
to be a writable directory; a file it writes (bench, eval, calibrate ``-o``, ``--plot``) needs its parent directory
to exist and be writable.

ARTIFACT (and export's MODEL) is a local directory when it exists. One that does not exist is "no such artifact
directory" (export: "no such checkpoint directory"), never a hub download, when it looks like a path: it starts
with ``/``, ``.`` or ``~``, holds a backslash or more than one ``/``, or its first component is a directory here
(``arts/qwen3-rr`` with ``./arts`` present). Only the remaining ``org/name`` form is a hub id (exported into the
cache on first use: :mod:`memrerank.runtime.hub`).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import stat
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from memrerank import __version__
from memrerank.errors import MemrerankError
from memrerank.manifest import PRECISIONS
from memrerank.report import calibration_table, eval_table, info_text, markdown_table, rank_table

if TYPE_CHECKING:
    from memrerank.runtime.options import LoadOptions

__all__ = ["main", "build_parser", "load_options", "system_info", "COMMANDS"]

#: One line per command, in the order ``memrerank -h`` lists them.
#: ``memrerank export --graph`` choices: :data:`memrerank.export.fused.GRAPH_KINDS` (not imported here, so the CLI
#: starts without the export extra; tests/test_fused.py checks the two agree).
EXPORT_GRAPHS = ("traced", "fused", "fused-cuda")

COMMANDS = {
    "export": "export a Hugging Face reranker to an artifact",
    "rank": "rank documents for a query with an artifact",
    "serve": "HTTP rerank service (Cohere and TEI APIs)",
    "rescore": "re-score a JSONL/Parquet table of pairs on Ray",
    "build-engine": "build TensorRT engines for an artifact (NVIDIA GPU)",
    "info": "describe an artifact, or this machine (--system)",
    "bench": "speed, memory and fidelity per precision",
    "eval": "retrieval quality (MAP, MRR, NDCG@10) on a benchmark",
    "calibrate": "fit score calibration and store it in the artifact",
    "demo": "export a default reranker and rank example memories",
}
_DESCRIPTION = ("Export Hugging Face rerankers to validated ONNX artifacts and score\n"
                "query-document pairs with them, without torch.\n\ncommands:\n"
                + "\n".join(f"  {name:<14}{text}" for name, text in COMMANDS.items()))
_EPILOG = ("'memrerank COMMAND -h' shows a command's options. In every command --json\n"
           "prints JSON to stdout, -q silences progress and -o/--output names what the\n"
           "command writes.")


class _Parser(argparse.ArgumentParser):
    """argparse with main's one-line errors (``memrerank rank: error: ...``, exit 2) instead of usage + error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} -h')\n")


# ------------------------------------------------------------------------------------------- argument types
def _precision_list(text: str) -> list[str]:
    items = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in items if p not in PRECISIONS]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"unknown precision {bad or text!r}; choose from {', '.join(PRECISIONS)}")
    return items


def _provider_list(text: str) -> tuple[str, ...]:
    items = tuple(p.strip() for p in text.split(",") if p.strip())
    if not items:
        raise argparse.ArgumentTypeError("expected comma-separated providers, e.g. cpu or cuda,cpu")
    return items


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


class _ArgPath(type(Path())):  # type: ignore[misc]
    """A Path that remembers the text it was typed as (``Path("./a/b")`` reads ``a/b``)."""

    raw: str


def _artifact_arg(text: str) -> Path:
    path = _ArgPath(text)
    path.raw = text
    return path


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port in 1..65535, got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


# --------------------------------------------------------------------------------------- shared arguments
def _add_precision(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--precision", choices=PRECISIONS + ("auto",), default=default,
                   help="exported precision, or auto: the fastest that met its fidelity budget "
                        f"(default {default})")


def _add_precisions(p: argparse.ArgumentParser, default: list[str] | None = None, what: str = "") -> None:
    p.add_argument("--precision", type=_precision_list, default=default,
                   help=f"comma-separated precisions ({what or ', '.join(PRECISIONS)}); default: "
                        + (",".join(default) if default else "every exported one"))


def _add_load_options(p: argparse.ArgumentParser) -> None:
    """One flag per :class:`memrerank.LoadOptions` field (the precision has its own), the same in every command
    that loads a reranker."""
    g = p.add_argument_group("how the reranker is loaded and run (memrerank.LoadOptions)")
    g.add_argument("--providers", type=_provider_list, default=None,
                   help="comma-separated onnxruntime providers, best first: cpu, cuda, tensorrt or full names "
                        "(default: cpu)")
    g.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="onnxruntime intra-op threads (default: onnxruntime's; rescore: per actor, also the "
                        "CPUs each reserves, default 1)")
    g.add_argument("--batch-size", type=_positive_int, default=None, metavar="N",
                   help="most rows per model call (default: the runtime's, 32 on the CPU, 64 on a GPU)")
    g.add_argument("--max-batch-tokens", type=_positive_int, default=None, metavar="N",
                   help="most padded tokens per model call; bounds peak memory (default: the runtime's)")
    g.add_argument("--prefix-reuse", action=argparse.BooleanOptionalAction, default=None,
                   help="decoder artifacts: score documents against the query's cached prefix (default: on where "
                        "the artifact supports it; same scores either way)")
    g.add_argument("--allow-tf32", action="store_true",
                   help="CUDA: let fp32 products use TF32 (faster; logits move by ~1e-3)")
    g.add_argument("--io-binding", action=argparse.BooleanOptionalAction, default=None,
                   help="bind inputs and outputs on the provider's device (default: on for GPU providers; same "
                        "scores either way)")


def _add_output(p: argparse.ArgumentParser, what: str, *, required: bool = False, default: Path | None = None,
                metavar: str = "FILE") -> None:
    p.add_argument("-o", "--output", type=Path, required=required, default=default, metavar=metavar,
                   help=f"what this command writes: {what}" + (f" (default {default})" if default else ""))


def load_options(args: argparse.Namespace) -> LoadOptions:
    """The one :class:`memrerank.LoadOptions` of a command, from its shared load flags.

    Where the command takes a comma list of precisions, the options keep the default precision and the command
    replaces it per precision.
    """
    from memrerank.runtime.options import LoadOptions

    precision = getattr(args, "precision", None)
    return LoadOptions.merge(
        None, precision=precision if isinstance(precision, str) else None, providers=args.providers,
        threads=args.threads, batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens,
        prefix_reuse=args.prefix_reuse, allow_tf32=args.allow_tf32, io_binding=args.io_binding)


def _progress(args: argparse.Namespace) -> bool | None:
    """False with --quiet, else None: a bar when stderr is a terminal."""
    return False if args.quiet else None


def _log(args: argparse.Namespace) -> Callable[[str], None]:
    """Progress messages: to stderr, none with --quiet."""
    return (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr))


# --------------------------------------------------------------------------------------- the commands' flags
#: name -> (register(parser), what --json prints, description); filled by @_arguments below.
_ARGUMENTS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], str, str | None]] = {}


def _arguments(name: str, json_what: str, description: str | None = None) -> Callable:
    """Register a function adding command ``name``'s own flags; build_parser adds -q and --json to every one."""
    def register(fn: Callable[[argparse.ArgumentParser], None]) -> Callable[[argparse.ArgumentParser], None]:
        _ARGUMENTS[name] = (fn, json_what, description)
        return fn

    return register


@_arguments("export", "the artifact's manifest",
            "Export a Hugging Face reranker to a validated artifact directory (ONNX graphs, tokenizer, manifest).")
def _register_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="hub id (e.g. Qwen/Qwen3-Reranker-0.6B) or local checkpoint directory")
    _add_output(p, "the artifact directory", required=True, metavar="DIR")
    _add_precisions(p, ["fp32"])
    p.add_argument("--max-length", type=_positive_int, default=None,
                   help="longest pair in tokens (default: the model's)")
    p.add_argument("--instruction", default=None, help="default instruction for decoder rerankers")
    p.add_argument("--system-prompt", default=None, metavar="TEXT",
                   help="decoder yes/no rerankers: the system message (default: the Qwen3-Reranker one)")
    p.add_argument("--prompt-suffix", default=None, metavar="TEXT",
                   help="decoder yes/no rerankers: the text after the document, \\n for a newline (default: the "
                        "Qwen3-Reranker suffix; for Qwen2 models the same without its think block)")
    p.add_argument("--yes-token", default=None, metavar="TOKEN", help="decoder yes/no rerankers (default: yes)")
    p.add_argument("--no-token", default=None, metavar="TOKEN", help="decoder yes/no rerankers (default: no)")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own Python code")
    p.add_argument("--allow-pickle", action="store_true",
                   help="load weights that exist only as a pickle (pytorch_model.bin); by default only "
                        "safetensors load, because unpickling can run code")
    p.add_argument("--graph", choices=EXPORT_GRAPHS, default=None,
                   help="decoder rerankers: 'fused' writes onnxruntime's fused attention/rotary/RMSNorm operators "
                        "for the CPU, 'fused-cuda' for the CUDA provider (same scores; onnxruntime >= 1.23); "
                        "'traced' is Optimum's trace. Default: fused for decoder rerankers (traced where the "
                        "fused graph does not cover the model, and with --target tensorrt), traced for encoders")
    p.add_argument("--rotate", action=argparse.BooleanOptionalAction, default=None,
                   help="fused graphs: write the weights in a rotated basis (same scores; int8 codes see no outlier "
                        "channels on the residual stream); default: on for --graph fused/fused-cuda")
    p.add_argument("--int4-block", type=int, default=None, metavar="N",
                   help="input channels per block of the int4 precision: 16, 32 (default), 64, 128 or 256; larger "
                        "blocks make a smaller file and less resident memory, with coarser weights")
    p.add_argument("--int4-coding", choices=("rtn", "gptq", "gptq-act"), default=None,
                   help="how int4 chooses its 4-bit codes: rtn (default, round to nearest), gptq or gptq-act (error "
                        "compensation from the calibration pairs' activations; needs fp32 among the precisions)")
    p.add_argument("--calib-data", type=Path, default=None,
                   help="JSONL of {\"query\",\"document\"} pairs for int8-static ranges and fidelity checks "
                        "(default: built-in pairs)")
    p.add_argument("--fidelity", default=None,
                   help="budget every quantized precision must keep vs fp32, e.g. top10=0.95,spearman=0.99 "
                        "(default; int4: top10=0.90,spearman=0.98)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--target", choices=("onnx", "tensorrt"), default="onnx",
                   help="tensorrt: also build TensorRT engines for the fp16/int8 precisions asked for (needs an "
                        "NVIDIA GPU and TensorRT)")
    p.add_argument("--profile", default=None,
                   help="TensorRT optimization profile min,opt,max as BATCHxSEQ (default: 1x1,32x128,64x1024)")


@_arguments("rank", "the hits")
def _register_rank(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", type=_artifact_arg)
    p.add_argument("--query", required=True)
    p.add_argument("--docs", required=True, type=Path,
                   help="documents: a .jsonl of strings or {'text'|'document': ...} objects, or a text file, one per line")
    p.add_argument("--top-k", type=_positive_int, default=None)
    p.add_argument("--threshold", type=float, default=None, help="keep hits with calibrated probability >= T")
    p.add_argument("--instruction", default=None)
    _add_precision(p, "fp32")
    _add_load_options(p)


@_arguments("serve", "the resolved configuration (one line, at startup)",
            "Local rerank service: Cohere /v1/rerank and /v2/rerank, TEI and vLLM /rerank, vLLM /score APIs, "
            "dynamic batching, limits.")
def _register_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", type=Path)
    p.add_argument("--host", default="127.0.0.1",
                   help="bind address (default: loopback only; beyond it, --api-key or --allow-unauthenticated)")
    p.add_argument("--port", type=_port, default=8080, help="TCP port, 1..65535 (default 8080)")
    _add_precision(p, "auto")
    _add_load_options(p)
    p.add_argument("--workers", type=_positive_int, default=1, help="server processes (each loads the artifact)")
    p.add_argument("--instruction", default=None,
                   help="decoder artifacts: the task instruction of a request that names none (default: the "
                        "artifact's)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="dynamic batching: longest wait for company")
    p.add_argument("--max-batch-pairs", type=_positive_int, default=256, help="dynamic batching: most pairs merged")
    p.add_argument("--max-documents", type=_positive_int, default=1000, help="limit: documents per request")
    p.add_argument("--max-request-bytes", type=_positive_int, default=4 * 2**20, help="limit: request body bytes")
    p.add_argument("--max-tokens-per-document", type=_positive_int, default=8192, help="limit: tokens per document")
    p.add_argument("--max-request-tokens", type=_positive_int, default=None,
                   help="limit: tokens of work per request, each document cut to the model's length (default 262144)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every request but /health (default: the "
                        "MEMRERANK_API_KEY environment variable; none)")
    p.add_argument("--allow-unauthenticated", action="store_true",
                   help="allow a non-loopback --host without an API key")
    p.add_argument("--allowed-host", action="append", default=None, metavar="HOST",
                   help="a Host header name to answer (repeatable; '*' any; default: localhost, 127.0.0.1, [::1] "
                        "on a loopback bind, any host beyond it)")
    p.add_argument("--max-concurrency", type=_positive_int, default=None,
                   help="requests being scored; beyond, 503 with Retry-After; bodies being received share "
                        "max-concurrency x max-request-bytes (default 32)")
    p.add_argument("--max-connections", type=_positive_int, default=None,
                   help="open connections; beyond, 503 (default 128)")
    p.add_argument("--max-queued-tokens", type=_positive_int, default=None,
                   help="queue of admitted, unscored work in tokens; beyond, 503 with Retry-After (default 1048576)")
    p.add_argument("--header-timeout", type=_seconds, default=None,
                   help="seconds to receive a request's headers; then 408 (default 10)")
    p.add_argument("--body-timeout", type=_seconds, default=None,
                   help="seconds to receive a request's body; then 408 (default 30)")
    p.add_argument("--ray", action="store_true", help="serve on Ray Serve instead of uvicorn (the ray extra)")
    p.add_argument("--replicas", type=_positive_int, default=1, help="--ray: replicas, each loading the artifact")
    p.add_argument("--address", default=None, help="--ray: Ray cluster address (default: a local Ray instance)")


@_arguments("rescore", "the job report",
            "Re-score a JSONL/Parquet table of (id, query, document) rows with Reranker actors on Ray Data.")
def _register_rescore(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", type=_artifact_arg)
    p.add_argument("input", nargs="+", help="input file(s) or directories (*.jsonl or *.parquet)")
    _add_output(p, "the output directory of scores", required=True, metavar="DIR")
    p.add_argument("--force", action="store_true",
                   help="replace a non-empty output directory (without --resume, also discard what an interrupted "
                        "job of it left)")
    p.add_argument("--resume", action="store_true",
                   help="finish the interrupted job of this output: keep its committed blocks, score only the rows "
                        "they lack (refused if the input files, the artifact or a setting changed)")
    p.add_argument("--allow-duplicate-ids", action="store_true",
                   help="score rows whose ids repeat or are null (default: refused; such a job cannot --resume)")
    _add_precision(p, "auto")
    _add_load_options(p)
    p.add_argument("--actors", type=_positive_int, default=1, help="Reranker actors (each loads the artifact once)")
    p.add_argument("--block-rows", type=_positive_int, default=256, metavar="N",
                   help="table rows per actor call (each actor's reranker splits them by --batch-size and "
                        "--max-batch-tokens); default 256")
    p.add_argument("--id-column", default="id")
    p.add_argument("--query-column", default="query")
    p.add_argument("--document-column", default="document")
    p.add_argument("--keep-text", action="store_true", help="also write the query and document columns")
    p.add_argument("--output-format", choices=("jsonl", "parquet"), default=None, help="default: the input's")
    p.add_argument("--output-prefix", default="", help="prefix of the score/logit/truncated column names")
    p.add_argument("--address", default=None, help="Ray cluster address (default: a local Ray instance)")
    p.add_argument("--num-cpus", type=_positive_int, default=None,
                   help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--instruction", default=None, help="decoder artifacts: task instruction (default: the artifact's)")


@_arguments("build-engine", "the built engines' manifest entries")
def _register_build_engine(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", type=_artifact_arg)
    _add_precisions(p, ["fp16"], "fp16, int8")
    p.add_argument("--profile", default=None, help="min,opt,max as BATCHxSEQ (default: 1x1,32x128,64x1024)")
    p.add_argument("--workspace-gb", type=float, default=4.0)
    p.add_argument("--allow-tf32", action="store_true",
                   help="keep TensorRT's TF32 for fp32 layers (faster; logits move by ~1e-3); default: cleared")


@_arguments("info", "the whole manifest (or the system report)",
            "Summarise an artifact's manifest or, with --system, what the runtime uses on this machine.")
def _register_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", type=_artifact_arg, nargs="?")
    p.add_argument("--system", action="store_true",
                   help="which kernel path (native/numpy), onnxruntime providers and CPU features are in use")


@_arguments("bench", "the full report",
            "Latency, throughput, cold start, peak memory, size and fidelity vs fp32 per precision of an artifact "
            "(each precision in its own process).")
def _register_bench(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", type=_artifact_arg)
    _add_precisions(p)
    p.add_argument("--data", type=Path, default=None,
                   help="JSONL of {query,documents[,relevant]} or {query,document[,label]} (default: built-in pairs)")
    p.add_argument("--repeats", type=_positive_int, default=10, help="timed repeats per latency point")
    _add_load_options(p)
    _add_output(p, "a JSON copy of the report")
    p.add_argument("--plot", type=Path, default=None, help="write a latency/fidelity plot (PNG, needs matplotlib)")


@_arguments("eval", "the metrics",
            "Retrieval quality (MAP, MRR, NDCG@10, Recall@k) per category on a memory benchmark.")
def _register_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", type=_artifact_arg)
    p.add_argument("--data", required=True, type=Path, help="LoCoMo's locomo10.json, or a JSONL of queries")
    p.add_argument("--benchmark", choices=("locomo", "jsonl"), default=None, help="default: from the file suffix")
    _add_precisions(p)
    p.add_argument("--candidates", choices=("sessions", "turns"), default="sessions",
                   help="LoCoMo candidates: turns of the evidence sessions (± --window) or of the whole conversation")
    p.add_argument("--window", type=int, default=0, help="LoCoMo: neighbouring sessions added on each side")
    p.add_argument("--limit", type=_positive_int, default=None, help="evaluate the first N queries only")
    _add_load_options(p)
    _add_output(p, "a JSON copy of the metrics")


@_arguments("calibrate", "the report",
            "Fit per-precision score calibration on pairs and store it in the artifact's manifest.")
def _register_calibrate(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", type=_artifact_arg)
    p.add_argument("--data", required=True, type=Path,
                   help="JSONL of {query,document,label?} (no labels = teacher mode: match fp32) or LoCoMo's json")
    p.add_argument("--method", choices=("auto", "temperature", "platt"), default="auto",
                   help="auto: Platt (temperature + bias) where the bias helps, else temperature")
    _add_precisions(p)
    p.add_argument("--holdout", type=float, default=0.2, help="share of queries held out for the report")
    p.add_argument("--limit", type=_positive_int, default=None, help="LoCoMo: first N questions only")
    p.add_argument("--plot", type=Path, default=None, help="reliability diagram PNG (needs matplotlib)")
    _add_load_options(p)
    _add_output(p, "a JSON copy of the report")


@_arguments("demo", "the results (rankings, latency per precision, next commands)",
            "Export the default reranker, rank example agent memories, print latency and fidelity.")
def _register_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="checkpoint to use (default: Qwen/Qwen3-Reranker-0.6B when the hub is reachable, "
                        "else the embedded all-MiniLM-L6-v2 body)")
    _add_output(p, "the demo's directory (artifact, its stamp, memories.txt)",
                default=Path.home() / ".cache" / "memrerank" / "demo", metavar="DIR")
    p.add_argument("--force", action="store_true", help="re-export even if the demo artifact exists")
    _add_load_options(p)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = _Parser(prog="memrerank", description=_DESCRIPTION, epilog=_EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"memrerank {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="one of the commands above")
    for name, line in COMMANDS.items():
        register, json_what, description = _ARGUMENTS[name]
        # no help= here: the description above lists the commands, one line each
        p = sub.add_parser(name, description=description or line[0].upper() + line[1:] + ".")
        register(p)
        p.add_argument("-q", "--quiet", action="store_true",
                       help="no progress bars or progress messages (bars show only when stderr is a terminal)")
        p.add_argument("--json", action="store_true", help=f"print {json_what} as JSON to stdout instead of text")
    return parser


# ------------------------------------------------------------------------------------------------- helpers
def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False))


def _write_json(path: Path | None, obj: Any) -> None:
    """Write a report: a regular file is replaced atomically (a full disk leaves the previous one whole); a
    device or pipe (``/dev/stdout``) is written in place."""
    if path is None:
        return
    from memrerank.atomic import write_file_atomic

    data = (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    try:
        regular = stat.S_ISREG(path.stat().st_mode)
    except FileNotFoundError:
        regular = True
    try:
        if regular:
            write_file_atomic(path, data)
        else:
            with open(path, "wb") as f:
                f.write(data)
    except OSError as exc:  # name the report, not a temporary file (or no file: a failed flush)
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None


#: ``-o`` of these commands names a directory the command creates (with any missing parents).
_DIRECTORY_OUTPUTS = ("export", "rescore")
#: Flags naming files a command writes (bench, eval, calibrate).
_FILE_FLAGS = (("output", "-o"), ("plot", "--plot"))


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse, before any work, an output the command could not write (see the module docstring)."""
    if args.command in _DIRECTORY_OUTPUTS:
        _check_writable(Path(args.output), "-o", directory=True)
    elif args.command in ("bench", "eval", "calibrate"):
        for attr, flag in _FILE_FLAGS:
            if getattr(args, attr, None) is not None:
                _check_writable(Path(getattr(args, attr)), flag, directory=False)


def _check_writable(path: Path, flag: str, *, directory: bool) -> None:
    if "://" in str(path):  # rescore to a remote filesystem: Ray Data's writers check it
        return
    path = path.expanduser()
    if directory:
        parent = path.absolute().parent
        while not parent.exists() and parent != parent.parent:  # the command creates the missing ones
            parent = parent.parent
    else:
        if path.is_dir():
            raise MemrerankError(f"{flag} {path}: is a directory; name a file")
        if path.exists() and not path.is_file():  # a device or pipe (/dev/stdout): written as it is
            return
        parent = path.absolute().parent
        if not parent.exists():
            raise MemrerankError(f"{flag} {path}: no such directory {parent}")
    if not parent.is_dir():
        raise MemrerankError(f"{flag} {path}: {parent} is not a directory")
    try:  # os.access says yes to root even on a read-only or pseudo filesystem (/sys): try it
        os.rmdir(tempfile.mkdtemp(prefix=".memrerank-probe-", dir=parent))
    except OSError as exc:
        raise MemrerankError(f"{flag} {path}: cannot write in {parent} ({exc.strerror or exc})") from None


def _os_error(exc: OSError) -> str:
    """One line for an error of the system (permission denied, disk full): what, its errno name, which file."""
    what = exc.strerror or str(exc)
    if exc.errno in errno.errorcode:
        what += f" [{errno.errorcode[exc.errno]}]"
    files = [str(f) for f in (exc.filename, exc.filename2) if f is not None]
    return f"{what}: {' -> '.join(files)}" if files else what


def _check_reference(text: str, what: str) -> None:
    """Refuse a missing local path (``what`` names it) before anything treats it as a hub id."""
    from memrerank.runtime.hub import is_model_reference

    if Path(text).expanduser().exists():
        return
    if not is_model_reference(text):  # a missing path, never a hub id (runtime.hub.looks_like_a_path)
        hint = "make one with `memrerank export MODEL -o DIR`" if what == "artifact" else "a local checkpoint " \
               "directory, or a hub id org/name whose org is no directory here"
        raise MemrerankError(f"no such {what} directory: {text} ({hint})")


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


def _build_engines(artifact: Path, precisions: list[str], profile_text: str | None, workspace_gb: float,
                   log: Callable[[str], None], allow_tf32: bool = False) -> None:
    from memrerank.export.tensorrt import ENGINE_PRECISIONS, build_engine, parse_profile, require_tensorrt
    from memrerank.manifest import read_manifest

    bad = [p for p in precisions if p not in ENGINE_PRECISIONS]
    if bad:
        raise ValueError(f"--precision: TensorRT engines are built for {', '.join(ENGINE_PRECISIONS)}, not {bad}")
    manifest = read_manifest(artifact)
    profile = parse_profile(profile_text, manifest.tokens.max_length) if profile_text else None
    try:
        require_tensorrt()
    except RuntimeError as exc:
        raise MemrerankError(str(exc)) from exc
    for p in precisions:
        build_engine(artifact, p, profile, workspace_gb, log=log, allow_tf32=allow_tf32)


def system_info() -> dict[str, Any]:
    """What the runtime will use on this machine (no artifact needed)."""
    import platform

    import numpy
    import onnxruntime
    import tokenizers

    from memrerank import kernels

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


# ------------------------------------------------------------------------------------------------ commands
def _prompt(args: argparse.Namespace) -> Any:
    """A YesNoPrompt from --system-prompt/--prompt-suffix/--yes-token/--no-token (None when none is given).
    ``\\n`` in them is a newline, so a suffix can be typed on one line."""
    pieces = [args.system_prompt, args.prompt_suffix, args.yes_token, args.no_token]
    if all(p is None for p in pieces):
        return None
    from memrerank.export.families.decoder_yes_no import YesNoPrompt

    system, suffix, yes, no = (p.replace("\\n", "\n") if p is not None else None for p in pieces)
    return YesNoPrompt.chatml(system, suffix=suffix, yes=yes, no=no)


def _cmd_export(args: argparse.Namespace) -> int:
    from memrerank.export import export_model, require_export_extra

    require_export_extra()  # without the export extra: one install line (MissingExtraError), no traceback
    engines: list[str] = []
    if args.target == "tensorrt":  # fail fast, before minutes of export, when TensorRT or the GPU is missing
        from memrerank.runtime.backends.tensorrt import require_tensorrt

        engines = [p for p in ("fp16", "int8") if p in args.precision]
        if not engines:
            raise ValueError("--target tensorrt builds fp16 and/or int8 engines: add them to --precision")
        try:
            require_tensorrt()
        except RuntimeError as exc:
            raise MemrerankError(str(exc)) from exc
    elif args.profile:
        raise ValueError("--profile is a TensorRT option; pass --target tensorrt")
    graph = args.graph
    if graph is None and engines:
        graph = "traced"  # TensorRT parses standard ONNX operators, not onnxruntime's fused ones
    out = export_model(args.model, args.output, precisions=args.precision, max_length=args.max_length,
                       instruction=args.instruction, force=args.force, revision=args.revision,
                       trust_remote_code=args.trust_remote_code, calib_data=args.calib_data,
                       fidelity=args.fidelity, allow_pickle=args.allow_pickle, graph=graph,
                       rotate=args.rotate, int4_block=args.int4_block, int4_coding=args.int4_coding,
                       prompt=_prompt(args),
                       command=" ".join(sys.argv),
                       log=_log(args), progress=_progress(args))
    if engines:
        _build_engines(out, engines, args.profile, 4.0, _log(args))
    if args.json:
        from memrerank.manifest import read_manifest

        _print_json(read_manifest(out).to_dict())
    else:
        print(info_text(out))
    return 0


def _cmd_rank(args: argparse.Namespace) -> int:
    from memrerank import Reranker

    docs = _read_docs(args.docs)
    reranker = Reranker.load(args.artifact, load_options(args))
    hits = reranker.rank(args.query, docs, top_k=args.top_k, threshold=args.threshold,
                         instruction=args.instruction)
    if args.json:
        _print_json([dataclasses.asdict(h) for h in hits])
    else:
        print(rank_table(hits))
    return 0


def _serve_startup(args: argparse.Namespace, config: Any) -> dict[str, Any]:
    """What ``serve`` starts, as the startup line reports it: the config with ``auto`` resolved where the
    artifact is on this machine (with --ray it may live only on the cluster's nodes)."""
    options = config.options
    precision = options.precision
    if precision == "auto" and (Path(config.artifact) / "manifest.json").is_file():
        from memrerank.manifest import read_manifest

        precision = read_manifest(config.artifact).pick_auto(options.first_provider)
    host = f"[{args.host}]" if ":" in args.host and not args.host.startswith("[") else args.host
    return {"url": f"http://{host}:{args.port}", "artifact": config.artifact, "precision": precision,
            "options": options.as_dict(), "limits": dataclasses.asdict(config.limits),
            "max_wait_ms": config.max_wait_ms, "max_batch_pairs": config.max_batch_pairs,
            "instruction": config.instruction,
            "auth": "api-key" if config.api_key else "none", "allowed_hosts": list(config.allowed_hosts),
            **{k: getattr(config, k) for k in ("max_concurrency", "max_connections", "max_queued_tokens",
                                               "header_timeout_s", "body_timeout_s")},
            "server": "ray" if args.ray else "uvicorn",
            **({"replicas": args.replicas, "address": args.address} if args.ray else {"workers": args.workers})}


def _cmd_serve(args: argparse.Namespace) -> int:
    from memrerank.serve import Limits, ServeConfig, serve
    from memrerank.serve_guard import is_loopback

    if args.ray and args.workers != 1:
        raise ValueError("--workers is for the uvicorn server; with --ray use --replicas")
    given = {"max_concurrency": args.max_concurrency, "max_connections": args.max_connections,
             "max_queued_tokens": args.max_queued_tokens, "header_timeout_s": args.header_timeout,
             "body_timeout_s": args.body_timeout, "allowed_hosts": args.allowed_host}
    request_tokens = {} if args.max_request_tokens is None else {"max_request_tokens": args.max_request_tokens}
    config = ServeConfig(
        artifact=str(args.artifact), options=load_options(args),
        limits=Limits(args.max_documents, args.max_request_bytes, args.max_tokens_per_document, **request_tokens),
        max_wait_ms=args.max_wait_ms, max_batch_pairs=args.max_batch_pairs,
        api_key=args.api_key if args.api_key is not None else (os.environ.get("MEMRERANK_API_KEY") or None),
        allow_unauthenticated=args.allow_unauthenticated, instruction=args.instruction,
        **{k: v for k, v in given.items() if v is not None})
    if args.instruction is not None and (Path(config.artifact) / "manifest.json").is_file():  # before workers
        from memrerank.manifest import read_manifest
        from memrerank.serve import takes_instruction

        manifest = read_manifest(config.artifact)
        if not takes_instruction(manifest):
            raise ValueError(f"--instruction: {config.artifact} is a {manifest.family} artifact, whose "
                             "template has no instruction; leave --instruction out")
    bound = config.bound_to(args.host)  # a non-loopback bind without a key is refused here, before loading
    if not is_loopback(args.host):
        print(f"memrerank serve: listening on {args.host}, reachable beyond this machine"
              f"{'' if bound.api_key else ' WITHOUT authentication'}", file=sys.stderr)
    if not args.ray and config.options.providers:  # each worker loads in its own process: refuse a missing one
        from memrerank.runtime.backends import resolve_providers

        resolve_providers(list(config.options.providers))
    startup = _serve_startup(args, bound)
    if args.json:
        print(json.dumps(startup, ensure_ascii=False), flush=True)
    else:
        _log(args)(f"memrerank serve: {startup['artifact']} ({startup['precision']}) on {startup['url']} "
                   f"({startup['server']})")
    if args.ray:
        from memrerank.scale import serve_on_ray

        serve_on_ray(config, host=args.host, port=args.port, replicas=args.replicas, address=args.address)
    else:
        serve(config, args.host, args.port, args.workers)
    return 0


def _cmd_rescore(args: argparse.Namespace) -> int:
    from memrerank.progress import on_terminal
    from memrerank.scale import RescoreJob, rescore

    job = RescoreJob(
        input=args.input, output=str(args.output), artifact=str(args.artifact), options=load_options(args),
        actors=args.actors, block_rows=args.block_rows, id_column=args.id_column, query_column=args.query_column,
        document_column=args.document_column, keep_text=args.keep_text, output_format=args.output_format,
        output_prefix=args.output_prefix, force=args.force, resume=args.resume,
        allow_duplicate_ids=args.allow_duplicate_ids, address=args.address, num_cpus=args.num_cpus,
        instruction=args.instruction, verbose=_progress(args) is None and on_terminal())  # Ray Data's bars
    report = rescore(job).as_dict()
    if args.json:
        _print_json(report)
    else:
        for key, value in report.items():
            print(f"{key:<16} {value}")
    return 0


def _cmd_build_engine(args: argparse.Namespace) -> int:
    from memrerank.manifest import read_manifest

    _build_engines(args.artifact, args.precision, args.profile, args.workspace_gb, _log(args), args.allow_tf32)
    if args.json:
        engines = read_manifest(args.artifact).to_dict().get("engines", {})
        _print_json({p: engines[p] for p in args.precision})
    else:
        print(info_text(args.artifact))
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    if args.system:
        info = system_info()
        if args.json:
            _print_json(info)
        else:
            for key, value in info.items():
                print(f"{key:<14} {', '.join(value) if isinstance(value, list) else value}")
        return 0
    if args.artifact is None:
        raise ValueError("info: pass an artifact directory, or --system for this machine's runtime")
    if args.json:
        from memrerank.manifest import read_manifest

        _print_json(read_manifest(args.artifact).to_dict())
    else:
        print(info_text(args.artifact))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from memrerank.demo import run_demo

    return run_demo(model=args.model, out=args.output, force=args.force, options=load_options(args),
                    as_json=args.json, quiet=args.quiet)


def _cmd_bench(args: argparse.Namespace) -> int:
    from memrerank.benchmark import plot, run_bench

    report = run_bench(args.artifact, args.precision, args.data, load_options(args), repeats=args.repeats,
                       progress=_progress(args))
    if "fp16" in report["precisions"] and report["providers"][0] == "CPUExecutionProvider":
        _log(args)("note: fp16 is a GPU precision; on the CPU provider it is not expected to be faster than fp32")
    if args.json:
        _print_json(report)
    else:
        print(markdown_table(report))
    _write_json(args.output, report)
    if args.plot:
        plot(report, args.plot)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from memrerank.evaluation import evaluate_artifact, load_jsonl_queries, load_locomo

    kind = args.benchmark or ("jsonl" if args.data.suffix == ".jsonl" else "locomo")
    if not args.data.is_file():
        raise MemrerankError(f"--data: {args.data} does not exist")
    if kind == "locomo":
        loaded = load_locomo(args.data, candidates=args.candidates, window=args.window, limit=args.limit)
        summary = (f"LoCoMo: {len(loaded.queries)} queries; repaired {loaded.repaired_ids} malformed evidence ids, "
                   f"dropped {loaded.dropped_ids} ids naming no turn and {loaded.dropped_queries} queries without "
                   "evidence")
        if args.json:
            _log(args)(summary)
        else:
            print(summary)
    else:
        loaded = load_jsonl_queries(args.data)
        loaded.queries = loaded.queries[: args.limit] if args.limit else loaded.queries
    results = evaluate_artifact(args.artifact, loaded.queries, args.precision, load_options(args),
                                progress=_progress(args))
    if args.json:
        _print_json(results)
    else:
        print("\n\n".join(eval_table(p, r) for p, r in results.items()))
    _write_json(args.output, results)
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from memrerank.calibrate import calibrate_artifact

    report = calibrate_artifact(args.artifact, args.data, args.method, args.precision, load_options(args),
                                holdout=args.holdout, limit=args.limit, plot=args.plot, log=_log(args),
                                progress=_progress(args))
    if args.json:
        _print_json(report)
    else:
        print(calibration_table(report))
    _write_json(args.output, report)
    return 0


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "export": _cmd_export, "rank": _cmd_rank, "serve": _cmd_serve, "rescore": _cmd_rescore,
    "build-engine": _cmd_build_engine, "info": _cmd_info, "bench": _cmd_bench, "eval": _cmd_eval,
    "calibrate": _cmd_calibrate, "demo": _cmd_demo,
}


def _resolve_artifact_argument(args: argparse.Namespace) -> None:
    """A hub id or checkpoint directory given as ARTIFACT: export it into the cache on first use (runtime.hub).
    A missing local path is refused first, never looked up on the hub (the rule: the module docstring)."""
    if args.command == "export":
        _check_reference(args.model, "checkpoint")
        return
    if getattr(args, "artifact", None) is None:
        return
    text = getattr(args.artifact, "raw", str(args.artifact))
    _check_reference(text, "artifact")
    args.artifact = Path(args.artifact).expanduser()
    from memrerank.runtime.backends import resolve_providers
    from memrerank.runtime.hub import is_model_reference, resolve_artifact

    if not is_model_reference(args.artifact):
        return
    precision = getattr(args, "precision", "fp32") or "auto"  # info: fp32; bench/eval/calibrate default: auto
    if args.command == "build-engine":
        precision = "fp32"  # engines are built from the fp32 (or int8-static) graph
    providers = getattr(args, "providers", None)
    provider = resolve_providers(list(providers) if providers else None)[0]
    args.artifact = resolve_artifact(args.artifact, precision, provider, quiet=args.quiet)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``memrerank`` console script.

    Returns:
        0 on success, 2 after a one-line message for memrerank's own errors (bad input, a missing or altered
        artifact, an unavailable provider, an output that cannot be written) and the system's (``OSError``:
        permission denied, disk full). Anything else is a bug and keeps its traceback.

    Raises:
        SystemExit: 2 after a one-line message for a bad flag or value (argparse), 0 after ``-h``/``--version``.
    """
    args = build_parser().parse_args(argv)
    try:
        _check_outputs(args)  # before anything loads, starts or runs
        _resolve_artifact_argument(args)
        return _COMMANDS[args.command](args)
    except (MemrerankError, FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"memrerank {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the system's: permission denied, disk full, a read-only filesystem
        print(f"memrerank {args.command}: error: {_os_error(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
