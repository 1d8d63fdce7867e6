"""Scale-out on Ray (the ``ray`` extra): batch re-scoring with Ray Data and the rerank service on Ray Serve.

* :func:`rescore` re-scores a large JSONL or Parquet table of ``(id, query, document)`` rows with a pool of
  :class:`Reranker` actors (``map_batches``, one artifact loaded per actor) and writes ``id`` (and every other input
  column but the texts) with ``score``, ``logit`` and ``truncated``. Works on a local Ray instance (started for you)
  or any cluster ``ray.init(address=...)`` reaches; every node must see the artifact at the same path.
* :func:`build_app` / :func:`serve_on_ray` wrap the same FastAPI service as ``memrerank serve`` (Cohere
  ``/v1/rerank``, TEI ``/rerank``, ``/health``, ``/v1/models``, ``/metrics``) in a Ray Serve deployment with
  ``num_replicas`` replicas, each loading the artifact once; ``serve run memrerank.scale:build_app artifact=OUT``
  works too.

``import memrerank.scale`` needs no Ray; the functions import it when called.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from memrerank.errors import ArtifactError, MemrerankError
from memrerank.manifest import PRECISIONS, pick_auto_precision, read_manifest

__all__ = ["RerankActor", "RescoreError", "RescoreReport", "build_app", "rescore", "serve_on_ray"]

FORMATS = ("jsonl", "parquet")
_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
OUTPUT_COLUMNS = ("score", "logit", "truncated")
_RAY_FORMAT = {"jsonl": "json", "parquet": "parquet"}  # Ray Data's read_*/write_* names


class RescoreError(MemrerankError):
    """A Ray re-scoring job failed in an actor (bad rows, an artifact an actor cannot read); names the cause."""


def _ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise ValueError("memrerank.scale needs the ray extra: pip install 'memrerank[ray]'") from exc
    return ray


@dataclass(frozen=True)
class RescoreReport:
    """What :func:`rescore` did."""

    rows: int
    seconds: float
    pairs_per_s: float
    actors: int
    threads_per_actor: int
    precision: str
    output: str
    output_format: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class RerankActor:
    """The ``map_batches`` callable: loads one :class:`Reranker` per actor and scores pyarrow batches.

    Rows sharing a query inside a batch are tokenized together (and share the decoder prefix), so inputs sorted or
    grouped by query score fastest.
    """

    def __init__(self, artifact: str, precision: str, threads: int, query_column: str, document_column: str,
                 id_column: str, keep_text: bool, prefix: str, batch_tokens: int | None = None,
                 instruction: str | None = None) -> None:
        from memrerank import Reranker

        kwargs = {"max_batch_tokens": batch_tokens} if batch_tokens else {}
        self.reranker = Reranker.load(artifact, precision=precision, threads=threads, **kwargs)
        self.query_column, self.document_column, self.id_column = query_column, document_column, id_column
        self.keep_text, self.prefix, self.instruction = keep_text, prefix, instruction

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        queries = batch.column(self.query_column).to_pylist()
        docs = batch.column(self.document_column).to_pylist()
        for name, values in ((self.query_column, queries), (self.document_column, docs)):
            bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
            if bad is not None:
                row_id = batch.column(self.id_column)[bad].as_py()
                raise ValueError(
                    f"row {self.id_column}={row_id!r}: column {name!r} is {type(values[bad]).__name__}, not a "
                    "string; every row needs a text query and document (drop or fill such rows before rescoring)")
        logits, truncated = self.reranker.predict(list(zip(queries, docs)), raw=True, return_truncated=True,
                                                  instruction=self.instruction)
        scores = self.reranker.calibrator(logits)
        out = batch
        if not self.keep_text:
            out = out.drop_columns([self.query_column, self.document_column])
        for name, values in zip(OUTPUT_COLUMNS, (scores, logits, truncated)):
            out = out.append_column(self.prefix + name, pa.array(values))
        return out


def _input_format(paths: list[str], given: str | None) -> str:
    if given is not None:
        if given not in FORMATS:
            raise ValueError(f"input_format: unknown {given!r}; choose one of {', '.join(FORMATS)}")
        return given
    found = set()
    for p in paths:
        local = Path(p)
        names = [q.name for q in local.iterdir() if q.is_file()] if local.is_dir() else [p]
        found |= {_SUFFIXES[s] for s in (Path(n).suffix.lower() for n in names) if s in _SUFFIXES}
    if len(found) != 1:
        what = "no .jsonl/.parquet files" if not found else "both JSONL and Parquet files"
        raise ValueError(f"input {paths[0]!r}: found {what}; name files *.jsonl or *.parquet, or pass "
                         "input_format='jsonl'|'parquet'")
    return found.pop()


def _check_output(output: str, overwrite: bool) -> None:
    if "://" in output:  # remote filesystems: Ray Data's SaveMode decides
        return
    out = Path(output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"output {output!r} exists and is not empty; choose a new directory or pass "
                              "overwrite=True (--overwrite) to replace its contents")


def rescore(input: str | Path | list[str | Path], output: str | Path, artifact: str | Path, *,
            precision: str = "auto", actors: int = 1, threads_per_actor: int = 1, batch_size: int = 256,
            id_column: str = "id", query_column: str = "query", document_column: str = "document",
            keep_text: bool = False, input_format: str | None = None, output_format: str | None = None,
            output_prefix: str = "", overwrite: bool = False, address: str | None = None,
            num_cpus: int | None = None, max_batch_tokens: int | None = None, instruction: str | None = None,
            verbose: bool = False) -> RescoreReport:
    """Re-score every ``(query, document)`` row of a JSONL/Parquet table on Ray; writes a directory of files.

    Args:
        input: a file, a directory of files, or a list of them (local paths or any URI Ray Data reads).
        output: the output directory (JSONL ``*.json`` files or Parquet, see ``output_format``).
        artifact: an artifact directory written by ``memrerank export``, at the same path on every node.
        precision: an exported precision, or ``"auto"`` (the fastest one that met its fidelity budget on CPU).
        actors: size of the :class:`RerankActor` pool (each loads the artifact once).
        threads_per_actor: CPUs each actor reserves and its onnxruntime intra-op threads.
        batch_size: rows per ``map_batches`` call (the reranker cuts them again by its token budget).
        id_column / query_column / document_column: input column names; ``id_column`` is written back.
        keep_text: also write the query and document columns (default: ids, other input columns and scores).
        input_format / output_format: ``"jsonl"`` or ``"parquet"``; default: from the file names / the input's.
        output_prefix: prepended to the ``score``, ``logit`` and ``truncated`` column names (when the input
            already has columns of those names, e.g. when re-scoring an earlier output).
        overwrite: replace a non-empty output directory.
        address: Ray cluster address (``"auto"``, ``"ray://head:10001"``); ``None`` = the running Ray instance
            if any, else a local one.
        num_cpus: CPUs of a local Ray instance started here (``None`` = all).
        max_batch_tokens: the reranker's token budget per model call (``None`` = its default).
        instruction: decoder artifacts: the task instruction (``None`` = the artifact's default).
        verbose: keep Ray Data's progress bars and INFO logs (default: warnings only).

    Returns:
        A :class:`RescoreReport` (rows written, wall seconds including actor start-up, pairs/s).
    """
    from memrerank.runtime.reranker import _positive_int

    ray = _ray()
    if precision not in PRECISIONS and precision != "auto":
        raise ValueError(f"precision: unknown {precision!r}; choose one of {', '.join(PRECISIONS)} or 'auto'")
    for name, value in (("actors", actors), ("threads_per_actor", threads_per_actor), ("batch_size", batch_size)):
        _positive_int(value, name)
    if instruction is not None and not isinstance(instruction, str):
        raise TypeError(f"instruction must be a str or None, got {type(instruction).__name__}")
    paths = [str(p) for p in (input if isinstance(input, (list, tuple)) else [input])]
    if not paths:
        raise ValueError("input: no paths given")
    for p in paths:
        if "://" not in p and not Path(p).exists():
            raise FileNotFoundError(f"input {p!r} does not exist")
    fmt = _input_format(paths, input_format)
    out_fmt = output_format or fmt
    if out_fmt not in FORMATS:
        raise ValueError(f"output_format: unknown {out_fmt!r}; choose one of {', '.join(FORMATS)}")
    output = str(output)
    _check_output(output, overwrite)
    artifact = str(artifact)
    if Path(artifact).exists():  # checked here when the driver sees it; actors check it again where they run
        manifest = read_manifest(artifact)
        if precision == "auto":
            precision = pick_auto_precision(manifest, "CPUExecutionProvider")
        elif precision not in manifest.get("precisions", {}):
            raise ArtifactError(f"{artifact}: precision {precision!r} was not exported; it has "
                                f"{', '.join(manifest.get('precisions', {}))}")

    _init_ray(ray, address, num_cpus)
    need, have = actors * threads_per_actor, ray.cluster_resources().get("CPU", 0)
    if need > have:
        msg = (f"{actors} actors x {threads_per_actor} threads need {need} CPUs; the Ray cluster has {have:g}. "
               "Lower actors / threads_per_actor")
        if address is None:
            raise ValueError(msg + " (or start Ray with more CPUs)")
        warnings.warn(msg + "; the job waits until the cluster grows to fit them", stacklevel=2)

    with _job_settings(ray, verbose):
        # Reading and writing reserve no CPU: the actors hold theirs, and an I/O task waiting for a CPU that an
        # actor keeps would wait forever (seen with actors x threads = the cluster's CPUs).
        read = getattr(ray.data, f"read_{_RAY_FORMAT[fmt]}")
        ds = read(paths if len(paths) > 1 else paths[0], num_cpus=0)
        columns = ds.schema().names
        missing = [c for c in (id_column, query_column, document_column) if c not in columns]
        if missing:
            raise ValueError(f"input has no column {', '.join(map(repr, missing))}; it has {', '.join(columns)}. "
                             "Name them with id_column= / query_column= / document_column= (--id-column ...)")
        kept = [c for c in columns if keep_text or c not in (query_column, document_column)]
        clash = [output_prefix + c for c in OUTPUT_COLUMNS if output_prefix + c in kept]
        if clash:
            raise ValueError(f"input already has column(s) {', '.join(clash)}; pass output_prefix= "
                             "(--output-prefix, e.g. 'new_') so the earlier values are not overwritten")

        t0 = time.perf_counter()
        scored = ds.map_batches(
            RerankActor, batch_format="pyarrow", batch_size=batch_size, zero_copy_batch=True,
            # one task in flight per actor: the first actor up (others still loading the model) would otherwise
            # queue several bundles and leave the rest idle on small and medium inputs
            compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1),
            num_cpus=threads_per_actor,
            fn_constructor_kwargs={"artifact": artifact, "precision": precision, "threads": threads_per_actor,
                                   "query_column": query_column, "document_column": document_column,
                                   "id_column": id_column, "keep_text": keep_text, "prefix": output_prefix,
                                   "batch_tokens": max_batch_tokens, "instruction": instruction})
        local = "://" not in output
        # Local output is written beside its destination and renamed into place when every row is in: a failed
        # or killed job leaves no partial directory that looks finished.
        target = str(Path(output).parent / f".{Path(output).name}.partial-{uuid.uuid4().hex[:8]}") if local \
            else output
        mode = {"mode": "overwrite"} if overwrite and not local else {}
        try:
            getattr(scored, f"write_{_RAY_FORMAT[out_fmt]}")(target, **mode, ray_remote_args={"num_cpus": 0})
            rows = getattr(ray.data, f"read_{_RAY_FORMAT[out_fmt]}")(target, num_cpus=0).count()
        except BaseException as exc:
            if local:
                shutil.rmtree(target, ignore_errors=True)
            if isinstance(exc, ray.exceptions.RayTaskError):
                raise RescoreError(f"rescore failed in a Reranker actor: {_root_cause(exc)}") from exc
            raise
    if local:
        if Path(output).exists():
            shutil.rmtree(output)  # empty, or overwrite=True (checked before the job)
        os.replace(target, output)
    seconds = time.perf_counter() - t0
    return RescoreReport(rows=rows, seconds=seconds, pairs_per_s=rows / seconds if seconds else 0.0, actors=actors,
                         threads_per_actor=threads_per_actor, precision=precision, output=output,
                         output_format=out_fmt)


def _init_ray(ray: Any, address: str | None, num_cpus: int | None) -> None:
    """Join the running Ray instance, or the cluster at ``address``, or start a local one (``num_cpus``)."""
    if not ray.is_initialized():
        ray.init(address=address, num_cpus=num_cpus if address is None else None, log_to_driver=False,
                 logging_level="warning", include_dashboard=False)


@contextlib.contextmanager
def _job_settings(ray: Any, verbose: bool) -> Iterator[None]:
    """Ray Data settings for one job, restored after: progress logging off unless verbose, and Parquet read by
    read tasks (the DataSourceV2 reader lists files in a task that needs a whole CPU, which never frees up while
    the actors hold every CPU of the cluster: a deadlock with actors x threads = the cluster's CPUs)."""
    ctx = ray.data.DataContext.get_current()
    logger = logging.getLogger("ray.data")
    saved = ctx.enable_progress_bars, logger.level, ctx.use_datasource_v2
    ctx.use_datasource_v2 = False
    if not verbose:
        ctx.enable_progress_bars = False
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        ctx.enable_progress_bars, ctx.use_datasource_v2 = saved[0], saved[2]
        logger.setLevel(saved[1])


def _root_cause(exc: BaseException) -> str:
    """The actor's own error under Ray's wrappers. Ray Data re-raises a UserCodeException that keeps the
    original only as traceback text, so the first ``SomeError: message`` line outside ray's own names is it."""
    for line in str(exc).splitlines():
        m = re.match(r"^([A-Za-z_][\w.]*(?:Error|Exception)): (.+)$", line.strip())
        if m and not m.group(1).startswith("ray."):
            return f"{m.group(1).rsplit('.', 1)[-1]}: {m.group(2)}"
    return str(getattr(exc, "cause", None) or exc).splitlines()[0]


# ---------------------------------------------------------------------------------------------- Ray Serve
def _deployment_class() -> Any:
    from ray import serve

    @serve.ingress()  # late-bound: the replica builds the FastAPI app (and loads the artifact) in its own process
    class MemrerankDeployment:
        def __init__(self, config: dict[str, Any]) -> None:
            self.config = config

        def __serve_build_asgi_app__(self) -> Any:
            from memrerank.serve import Limits, create_app

            cfg = dict(self.config)
            return create_app(cfg.pop("artifact"), cfg.pop("precision"), limits=Limits(**cfg.pop("limits")), **cfg)

    return MemrerankDeployment


def build_app(args: dict[str, Any]) -> Any:
    """A Ray Serve application serving one artifact with ``memrerank serve``'s JSON API.

    Ray Serve's application-builder form: one dict, as ``serve run memrerank.scale:build_app artifact=OUT
    precision=int8 num_replicas=2`` passes it (values may be strings). Keys: ``artifact`` (required), ``precision``
    (``"auto"``), ``num_replicas`` (1), ``threads`` (1, CPUs per replica), ``max_wait_ms`` (5),
    ``max_batch_pairs`` (256), ``max_documents`` / ``max_request_bytes`` / ``max_tokens_per_document`` (limits),
    ``model_name``.
    """
    _ray()
    try:
        from ray import serve
    except ImportError as exc:
        raise ValueError("Ray Serve is missing: pip install 'memrerank[ray]'") from exc
    from memrerank.serve import Limits

    if not isinstance(args, dict):
        raise TypeError(f"build_app takes one dict of options, got {type(args).__name__}")
    opts = dict(args)
    if "artifact" not in opts:
        raise ValueError("build_app needs artifact=<artifact directory>")
    known = {"artifact", "precision", "num_replicas", "threads", "max_wait_ms", "max_batch_pairs", "model_name",
             "max_documents", "max_request_bytes", "max_tokens_per_document"}
    unknown = sorted(set(opts) - known)
    if unknown:
        raise ValueError(f"build_app: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    ints = ("num_replicas", "threads", "max_batch_pairs", "max_documents", "max_request_bytes",
            "max_tokens_per_document")
    try:
        opts = {k: int(v) if k in ints else float(v) if k == "max_wait_ms" else v for k, v in opts.items()}
    except (TypeError, ValueError) as exc:
        raise ValueError(f"build_app: {exc}; {', '.join(ints)} take integers, max_wait_ms a number") from exc
    bad = [k for k in ints if k in opts and opts[k] < 1]
    if bad:
        raise ValueError(f"build_app: {', '.join(bad)} must be positive")
    artifact = str(Path(opts["artifact"]).resolve()) if Path(opts["artifact"]).exists() else str(opts["artifact"])
    if Path(artifact).exists():
        read_manifest(artifact)  # fail here, not in every replica
    threads = opts.get("threads", 1)
    limits = Limits(**{k: opts[k] for k in ("max_documents", "max_request_bytes", "max_tokens_per_document")
                       if k in opts})
    config = {"artifact": artifact, "precision": opts.get("precision", "auto"), "limits": asdict(limits),
              "max_wait_ms": opts.get("max_wait_ms", 5.0), "max_batch_pairs": opts.get("max_batch_pairs", 256),
              "threads": threads, "model_name": opts.get("model_name")}
    deployment = serve.deployment(_deployment_class(), name="memrerank", num_replicas=opts.get("num_replicas", 1),
                                  ray_actor_options={"num_cpus": threads})
    return deployment.bind(config)


def serve_on_ray(artifact: str | Path, *, host: str = "127.0.0.1", port: int = 8000, blocking: bool = True,
                 address: str | None = None, num_cpus: int | None = None, **options: Any) -> Any:
    """Start Ray Serve's HTTP proxy on ``host:port`` and deploy :func:`build_app` at ``/``.

    ``blocking=False`` returns the deployment handle (tests, notebooks); stop with ``ray.serve.shutdown()``.
    """
    ray = _ray()
    from ray import serve

    app = build_app({"artifact": str(artifact), **options})
    _init_ray(ray, address, num_cpus)
    serve.start(http_options={"host": host, "port": port})
    if not blocking:
        return serve.run(app, name="memrerank", route_prefix="/", blocking=False)
    try:
        serve.run(app, name="memrerank", route_prefix="/", blocking=False)
        print(f"memrerank on Ray Serve: http://{host}:{port} ({options.get('num_replicas', 1)} replica(s)); "
              "Ctrl-C stops it", file=sys.stderr)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return None
