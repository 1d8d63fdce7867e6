"""Scale-out on Ray (the ``ray`` extra): batch re-scoring with Ray Data and the rerank service on Ray Serve.

* :func:`rescore` runs a :class:`RescoreJob`: it re-scores a large JSONL or Parquet table of
  ``(id, query, document)`` rows with a pool of :class:`RerankActor` (``map_batches``, one artifact loaded per
  actor) and writes ``id`` (and every other input column but the texts) with ``score``, ``logit`` and
  ``truncated``. Works on a local Ray instance (started for you) or any cluster ``ray.init(address=...)`` reaches;
  every node must see the artifact at the same path.
* :func:`build_app` / :func:`serve_on_ray` wrap the same FastAPI service as ``memrerank serve`` (Cohere
  ``/v1/rerank``, TEI ``/rerank``, ``/health``, ``/v1/models``, ``/metrics``) in a Ray Serve deployment with
  ``num_replicas`` replicas, each building its app from one :class:`memrerank.serve.ServeConfig`;
  ``serve run memrerank.scale:build_app artifact=OUT`` works too.

``import memrerank.scale`` needs no Ray; the functions import it when called.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import shutil
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import KW_ONLY, asdict, dataclass
from pathlib import Path
from typing import Any

from memrerank.atomic import recover, staging_path, swap_into_place
from memrerank.errors import ArtifactError, MemrerankError
from memrerank.manifest import PRECISIONS, read_manifest
from memrerank.serve import Limits, ServeConfig, _check_positive, _provider_tuple

__all__ = ["RerankActor", "RescoreError", "RescoreJob", "RescoreReport", "build_app", "rescore", "serve_on_ray"]

FORMATS = ("jsonl", "parquet")
_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
OUTPUT_COLUMNS = ("score", "logit", "truncated")
_RAY_FORMAT = {"jsonl": "json", "parquet": "parquet"}  # Ray Data's read_*/write_* names
_log = logging.getLogger(__name__)


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
class RescoreJob:
    """One re-scoring job: what to read, which artifact scores it and how, where to write, on which Ray.

    Args:
        input: a file, a directory of files, or a list of them (local paths or any URI Ray Data reads); stored
            as a tuple of strings.
        output: the output directory (JSONL ``*.json`` files or Parquet, see ``output_format``).
        artifact: an artifact directory written by ``memrerank export``, at the same path on every node.
        precision: an exported precision, or ``"auto"`` (the fastest one that met its fidelity budget on the
            first provider; CPU by default).
        providers: onnxruntime providers or aliases for every actor (``("cuda",)``); ``None`` = CPU.
        actors: size of the :class:`RerankActor` pool (each loads the artifact once).
        threads_per_actor: CPUs each actor reserves and its onnxruntime intra-op threads.
        batch_size: rows per ``map_batches`` call (the reranker cuts them again by its token budget). With
            several actors it is capped at ``ceil(rows / actors)`` (the input's rows are counted first), so a
            small input still gives every actor a share instead of one batch to one actor.
        id_column: input column written back with the scores.
        query_column: input column of the queries.
        document_column: input column of the documents.
        keep_text: also write the query and document columns (default: ids, other input columns and scores).
        input_format: ``"jsonl"`` or ``"parquet"``; default: from the file names.
        output_format: ``"jsonl"`` or ``"parquet"``; default: the input's.
        output_prefix: prepended to the ``score``, ``logit`` and ``truncated`` column names (when the input
            already has columns of those names, e.g. when re-scoring an earlier output).
        overwrite: replace a non-empty output directory.
        address: Ray cluster address (``"auto"``, ``"ray://head:10001"``); ``None`` = the running Ray instance
            if any, else a local one.
        num_cpus: CPUs of a local Ray instance started here (``None`` = all).
        max_batch_tokens: the reranker's token budget per model call (``None`` = its default).
        prefix_reuse: decoder artifacts: score documents against each query's cached prefix (``None`` = where
            the artifact supports it).
        instruction: decoder artifacts: the task instruction (``None`` = the artifact's default).
        verbose: keep Ray Data's progress bars and INFO logs (default: warnings only).

    Raises:
        ValueError: a value out of range, naming the field.
        TypeError: a value of the wrong type, naming the field.
    """

    input: str | Path | Sequence[str | Path]
    output: str
    artifact: str
    _: KW_ONLY
    precision: str = "auto"
    providers: tuple[str, ...] | None = None
    actors: int = 1
    threads_per_actor: int = 1
    batch_size: int = 256
    id_column: str = "id"
    query_column: str = "query"
    document_column: str = "document"
    keep_text: bool = False
    input_format: str | None = None
    output_format: str | None = None
    output_prefix: str = ""
    overwrite: bool = False
    address: str | None = None
    num_cpus: int | None = None
    max_batch_tokens: int | None = None
    prefix_reuse: bool | None = None
    instruction: str | None = None
    verbose: bool = False

    def __post_init__(self) -> None:
        paths = self.input if isinstance(self.input, (list, tuple)) else [self.input]
        object.__setattr__(self, "input", tuple(_path(p, "RescoreJob.input") for p in paths))
        if not self.input:
            raise ValueError("RescoreJob.input: no paths given")
        object.__setattr__(self, "output", _path(self.output, "RescoreJob.output"))
        object.__setattr__(self, "artifact", _path(self.artifact, "RescoreJob.artifact"))
        if self.precision not in PRECISIONS + ("auto",):
            raise ValueError(f"RescoreJob.precision: unknown {self.precision!r}; choose one of "
                             f"{', '.join(PRECISIONS)} or 'auto'")
        object.__setattr__(self, "providers", _provider_tuple(self.providers, "RescoreJob.providers"))
        for name in ("actors", "threads_per_actor", "batch_size"):
            _check_positive(getattr(self, name), f"RescoreJob.{name}")
        for name in ("num_cpus", "max_batch_tokens"):
            _check_positive(getattr(self, name), f"RescoreJob.{name}", optional=True)
        for name in ("input_format", "output_format"):
            if getattr(self, name) not in FORMATS + (None,):
                raise ValueError(f"RescoreJob.{name}: unknown {getattr(self, name)!r}; choose one of "
                                 f"{', '.join(FORMATS)}")
        for name in ("id_column", "query_column", "document_column"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise TypeError(f"RescoreJob.{name} must be a column name (str), got {getattr(self, name)!r}")
        if not isinstance(self.output_prefix, str):
            raise TypeError(f"RescoreJob.output_prefix must be a str, got {type(self.output_prefix).__name__}")
        if self.prefix_reuse not in (None, True, False):
            raise ValueError(f"RescoreJob.prefix_reuse must be True, False or None, got {self.prefix_reuse!r}")
        if self.instruction is not None and not isinstance(self.instruction, str):
            raise TypeError(f"RescoreJob.instruction must be a str or None, got {type(self.instruction).__name__}")


def _path(value: Any, name: str) -> str:
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise TypeError(f"{name} must be a path or URI (str or Path), got {value!r}")
    return os.fspath(value)


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
    batch_size: int = 0  #: rows per ``map_batches`` call, after the cap (see :attr:`RescoreJob.batch_size`)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class RerankActor:
    """The ``map_batches`` callable: loads one :class:`Reranker` per actor and scores pyarrow batches.

    Rows sharing a query inside a batch are tokenized together (and share the decoder prefix), so inputs sorted or
    grouped by query score fastest.

    Args:
        job: the job; the actor reads its artifact, precision, providers, threads, token budget, prefix reuse,
            instruction and column options.
    """

    def __init__(self, job: RescoreJob) -> None:
        from memrerank import Reranker

        n = job.max_batch_tokens
        self.reranker = Reranker.load(job.artifact, precision=job.precision, providers=job.providers,
                                      threads=job.threads_per_actor, prefix_reuse=job.prefix_reuse,
                                      **({"max_batch_tokens": n} if n else {}))
        self.job = job

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        job = self.job
        queries = batch.column(job.query_column).to_pylist()
        docs = batch.column(job.document_column).to_pylist()
        for name, values in ((job.query_column, queries), (job.document_column, docs)):
            bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
            if bad is not None:
                row_id = batch.column(job.id_column)[bad].as_py()
                raise ValueError(
                    f"row {job.id_column}={row_id!r}: column {name!r} is {type(values[bad]).__name__}, not a "
                    "string; every row needs a text query and document (drop or fill such rows before rescoring)")
        logits, truncated = self.reranker.predict_with_truncation(list(zip(queries, docs)), raw=True,
                                                                  instruction=job.instruction)
        scores = self.reranker.calibrator(logits)
        out = batch
        if not job.keep_text:
            out = out.drop_columns([job.query_column, job.document_column])
        for name, values in zip(OUTPUT_COLUMNS, (scores, logits, truncated)):
            out = out.append_column(job.output_prefix + name, pa.array(values))
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
    recover(out, _log.warning)  # an output a killed job left aside comes back; stale siblings go
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"output {output!r} exists and is not empty; choose a new directory or pass "
                              "overwrite=True (--overwrite) to replace its contents")


def _check_io(job: RescoreJob) -> tuple[str, str]:
    """The input and output formats, once the inputs exist and the output may be written."""
    for p in job.input:
        if "://" not in p and not Path(p).exists():
            raise FileNotFoundError(f"input {p!r} does not exist")
    fmt = _input_format(list(job.input), job.input_format)
    _check_output(job.output, job.overwrite)
    return fmt, job.output_format or fmt


def _driver_precision(job: RescoreJob) -> str:
    """The precision every actor loads: ``"auto"`` resolved and an exported one checked, where the driver sees
    the artifact (actors check it again where they run)."""
    if not Path(job.artifact).exists():
        return job.precision
    manifest = read_manifest(job.artifact)
    provider = "CPUExecutionProvider"
    if job.providers:
        from memrerank.runtime.backends.onnxruntime import provider_name

        provider = provider_name(job.providers[0])
    if job.precision == "auto":
        return manifest.pick_auto(provider)
    if not (job.precision in manifest.engines and provider == "TensorrtExecutionProvider"):
        try:
            manifest.precision(job.precision)
        except ArtifactError as exc:
            raise ArtifactError(f"{job.artifact}: {exc}") from None
    return job.precision


def _check_cpus(ray: Any, job: RescoreJob) -> None:
    need, have = job.actors * job.threads_per_actor, ray.cluster_resources().get("CPU", 0)
    if need > have:
        msg = (f"{job.actors} actors x {job.threads_per_actor} threads need {need} CPUs; the Ray cluster has "
               f"{have:g}. Lower actors / threads_per_actor")
        if job.address is None:
            raise ValueError(msg + " (or start Ray with more CPUs)")
        warnings.warn(msg + "; the job waits until the cluster grows to fit them", stacklevel=3)


def _read_input(ray: Any, job: RescoreJob, fmt: str) -> Any:
    """The input dataset, its columns checked against the job's names and output columns."""
    # Reading and writing reserve no CPU: the actors hold theirs, and an I/O task waiting for a CPU that an
    # actor keeps would wait forever (seen with actors x threads = the cluster's CPUs).
    read = getattr(ray.data, f"read_{_RAY_FORMAT[fmt]}")
    ds = read(list(job.input) if len(job.input) > 1 else job.input[0], num_cpus=0)
    columns = ds.schema().names
    missing = [c for c in (job.id_column, job.query_column, job.document_column) if c not in columns]
    if missing:
        raise ValueError(f"input has no column {', '.join(map(repr, missing))}; it has {', '.join(columns)}. "
                         "Name them with id_column= / query_column= / document_column= (--id-column ...)")
    texts = (job.query_column, job.document_column)
    kept = [c for c in columns if job.keep_text or c not in texts]
    clash = [job.output_prefix + c for c in OUTPUT_COLUMNS if job.output_prefix + c in kept]
    if clash:
        raise ValueError(f"input already has column(s) {', '.join(clash)}; pass output_prefix= "
                         "(--output-prefix, e.g. 'new_') so the earlier values are not overwritten")
    return ds


def _write_output(ray: Any, scored: Any, output: str, out_fmt: str, overwrite: bool) -> int:
    """Write the scored dataset (this runs the job) and return the rows written."""
    local = "://" not in output
    # Local output is written beside its destination and swapped into place when every row is in: a failed
    # or killed job leaves no partial directory that looks finished, and an overwritten output stays whole
    # until the new one is in (memrerank.atomic; the next job restores it if a kill hit the swap itself).
    target = str(staging_path(output)) if local else output
    mode = {"mode": "overwrite"} if overwrite and not local else {}
    try:
        getattr(scored, f"write_{_RAY_FORMAT[out_fmt]}")(target, **mode, ray_remote_args={"num_cpus": 0})
        rows = getattr(ray.data, f"read_{_RAY_FORMAT[out_fmt]}")(target, num_cpus=0).count()
        if local:
            swap_into_place(target, output)  # an empty output, or any with overwrite=True (checked before)
    except BaseException as exc:
        if local:
            shutil.rmtree(target, ignore_errors=True)
        if isinstance(exc, ray.exceptions.RayTaskError):
            raise RescoreError(f"rescore failed in a Reranker actor: {_root_cause(exc)}") from exc
        raise
    return rows


def rescore(job: RescoreJob | str | Path | Sequence[str | Path] | None = None,
            output: str | Path | None = None, artifact: str | Path | None = None, **options: Any) -> RescoreReport:
    """Re-score every ``(query, document)`` row of a JSONL/Parquet table on Ray; writes a directory of files.

    ``rescore(RescoreJob(input, output, artifact, actors=2))``, or the same as keywords:
    ``rescore(input, output, artifact, actors=2)`` (which fills a :class:`RescoreJob`; see it for every option).

    Args:
        job: a :class:`RescoreJob`, or the input path(s) (``input=`` works too) with ``output``, ``artifact`` and
            the job's options as keywords.
        output: keyword form only: the output directory.
        artifact: keyword form only: the artifact directory.
        **options: keyword form only: the other :class:`RescoreJob` fields.

    Returns:
        A :class:`RescoreReport` (rows written, wall seconds including actor start-up, pairs/s).

    Raises:
        ValueError: a bad option, missing columns, more CPUs asked for than a local Ray instance has.
        FileNotFoundError / FileExistsError: a missing input, an output that exists (without ``overwrite``).
        RescoreError: the job failed in an actor (names the row or the cause).
    """
    job = _as_job(job, output, artifact, options)
    ray = _ray()
    fmt, out_fmt = _check_io(job)
    precision = _driver_precision(job)
    _init_ray(ray, job.address, job.num_cpus)
    _check_cpus(ray, job)
    with _job_settings(ray, job.verbose):
        ds = _read_input(ray, job, fmt)
        t0 = time.perf_counter()
        batch_size = job.batch_size
        if job.actors > 1:  # counting reads the input once more
            batch_size = shared_batch_size(ds.count(), job.actors, job.batch_size)
        scored = ds.map_batches(
            RerankActor, batch_format="pyarrow", batch_size=batch_size, zero_copy_batch=True,
            # one task in flight per actor: the first actor up (others still loading the model) would otherwise
            # queue several bundles and leave the rest idle on small and medium inputs
            compute=ray.data.ActorPoolStrategy(size=job.actors, max_tasks_in_flight_per_actor=1),
            num_cpus=job.threads_per_actor,
            fn_constructor_kwargs={"job": dataclasses.replace(job, precision=precision)})
        rows = _write_output(ray, scored, job.output, out_fmt, job.overwrite)
    seconds = time.perf_counter() - t0
    return RescoreReport(rows=rows, seconds=seconds, pairs_per_s=rows / seconds if seconds else 0.0,
                         actors=job.actors, threads_per_actor=job.threads_per_actor, precision=precision,
                         output=job.output, output_format=out_fmt, batch_size=batch_size)


def shared_batch_size(rows: int, actors: int, batch_size: int) -> int:
    """Rows per ``map_batches`` call so that ``rows`` reach every one of ``actors``: ``batch_size``, capped at
    ``ceil(rows / actors)`` (240 rows, 2 actors, 256 asked: 120 each instead of one batch to one actor)."""
    return max(1, min(batch_size, -(-rows // actors)))


def _as_job(job: Any, output: Any, artifact: Any, options: dict[str, Any]) -> RescoreJob:
    """``rescore``'s argument(s) as one RescoreJob (the keyword form fills one)."""
    if isinstance(job, RescoreJob):
        if output is not None or artifact is not None or options:
            raise TypeError("rescore(job): set the options on the RescoreJob (dataclasses.replace(job, ...)), "
                            "not beside it")
        return job
    if job is not None:
        if "input" in options:
            raise TypeError("rescore: input given twice (positionally and as input=)")
        options["input"] = job
    if output is None or artifact is None or "input" not in options:
        raise TypeError("rescore takes a RescoreJob, or input, output and artifact (then the job's options as "
                        "keywords)")
    return RescoreJob(output=output, artifact=artifact, **options)


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
        def __init__(self, config: ServeConfig) -> None:
            self.config = config

        def __serve_build_asgi_app__(self) -> Any:
            from memrerank.serve import create_app

            return create_app(self.config)

    return MemrerankDeployment


_APP_INTS = ("num_replicas", "threads", "max_batch_tokens", "max_batch_pairs", "max_documents",
             "max_request_bytes", "max_tokens_per_document")
_APP_KEYS = frozenset(_APP_INTS + ("artifact", "precision", "providers", "prefix_reuse", "max_wait_ms",
                                   "model_name"))
_LIMIT_KEYS = ("max_documents", "max_request_bytes", "max_tokens_per_document")
_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False, "none": None, "": None}


def _parse_app_args(args: dict[str, Any]) -> tuple[ServeConfig, int]:
    """``build_app``'s dict (values may be strings) → the ServeConfig and the number of replicas."""
    if not isinstance(args, dict):
        raise TypeError(f"build_app takes one dict of options, got {type(args).__name__}")
    opts = dict(args)
    if "artifact" not in opts:
        raise ValueError("build_app needs artifact=<artifact directory>")
    unknown = sorted(set(opts) - _APP_KEYS)
    if unknown:
        raise ValueError(f"build_app: unknown option(s) {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(_APP_KEYS))}")
    try:
        opts = {k: int(v) if k in _APP_INTS else float(v) if k == "max_wait_ms" else v for k, v in opts.items()}
    except (TypeError, ValueError) as exc:
        raise ValueError(f"build_app: {exc}; {', '.join(_APP_INTS)} take integers, max_wait_ms a number") from exc
    reuse = opts.get("prefix_reuse")
    if isinstance(reuse, str):
        if reuse.strip().lower() not in _BOOLS:
            raise ValueError(f"build_app: prefix_reuse={reuse!r}; pass true, false or none")
        opts["prefix_reuse"] = _BOOLS[reuse.strip().lower()]
    replicas = opts.pop("num_replicas", 1)
    try:
        _check_positive(replicas, "num_replicas")
        limits = Limits(**{k: opts.pop(k) for k in _LIMIT_KEYS if k in opts})
        return ServeConfig(**opts, limits=limits), replicas
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"build_app: {exc}") from exc


def _application(config: ServeConfig, replicas: int) -> Any:
    """The Ray Serve application: ``replicas`` replicas, each reserving ``config.threads`` CPUs (1 if unset)."""
    from ray import serve

    if not isinstance(config, ServeConfig):
        raise TypeError(f"expected a memrerank.serve.ServeConfig, got {type(config).__name__}")
    _check_positive(replicas, "replicas")
    if Path(config.artifact).exists():
        config = dataclasses.replace(config, artifact=str(Path(config.artifact).resolve()))
        read_manifest(config.artifact)  # fail here, not in every replica
    if config.threads is None:  # a replica's onnxruntime threads match the CPUs Ray reserves for it
        config = dataclasses.replace(config, threads=1)
    deployment = serve.deployment(_deployment_class(), name="memrerank", num_replicas=replicas,
                                  ray_actor_options={"num_cpus": config.threads})
    return deployment.bind(config)


def build_app(args: dict[str, Any]) -> Any:
    """A Ray Serve application serving one artifact with ``memrerank serve``'s JSON API.

    Ray Serve's application-builder form: one dict, as ``serve run memrerank.scale:build_app artifact=OUT
    precision=int8 num_replicas=2`` passes it (values may be strings). Keys: ``num_replicas`` (1) and the
    :class:`memrerank.serve.ServeConfig` fields ``artifact`` (required), ``precision`` (``"auto"``),
    ``providers`` (comma-separated), ``threads`` (1, CPUs per replica), ``max_batch_tokens``, ``prefix_reuse``
    (true/false/none), ``max_wait_ms`` (5), ``max_batch_pairs`` (256), ``model_name``, and the limits
    ``max_documents`` / ``max_request_bytes`` / ``max_tokens_per_document``.

    Raises:
        ValueError: a missing artifact, an unknown option, a value that is not a number or out of range.
    """
    _ray()
    try:
        from ray import serve  # noqa: F401
    except ImportError as exc:
        raise ValueError("Ray Serve is missing: pip install 'memrerank[ray]'") from exc
    config, replicas = _parse_app_args(args)
    return _application(config, replicas)


def serve_on_ray(config: ServeConfig, *, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1,
                 address: str | None = None, num_cpus: int | None = None, blocking: bool = True) -> Any:
    """Start Ray Serve's HTTP proxy on ``host:port`` and deploy ``config``'s service at ``/``.

    Args:
        config: what each replica serves (its ``threads`` are the CPUs a replica reserves; 1 if unset).
        host: the proxy's bind address.
        port: the proxy's port.
        replicas: replicas, each its own process loading the artifact once.
        address: Ray cluster address; ``None`` = the running Ray instance if any, else a local one.
        num_cpus: CPUs of a local Ray instance started here (``None`` = all).
        blocking: serve until Ctrl-C; ``False`` returns the deployment handle (tests, notebooks; stop with
            ``ray.serve.shutdown()``).
    """
    ray = _ray()
    from ray import serve

    app = _application(config, replicas)
    _init_ray(ray, address, num_cpus)
    serve.start(http_options={"host": host, "port": port})
    if not blocking:
        return serve.run(app, name="memrerank", route_prefix="/", blocking=False)
    try:
        serve.run(app, name="memrerank", route_prefix="/", blocking=False)
        print(f"memrerank on Ray Serve: http://{host}:{port} ({replicas} replica(s)); Ctrl-C stops it",
              file=sys.stderr)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return None
