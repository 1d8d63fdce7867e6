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
from memrerank.manifest import read_manifest
from memrerank.runtime.options import LoadOptions, check_optional_bool, check_positive_int
from memrerank.serve import Limits, ServeConfig

__all__ = ["RerankActor", "RescoreError", "RescoreJob", "RescoreReport", "build_app", "rescore", "serve_on_ray"]

FORMATS = ("jsonl", "parquet")
_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
OUTPUT_COLUMNS = ("score", "logit", "truncated")
_RAY_FORMAT = {"jsonl": "json", "parquet": "parquet"}  # Ray Data's read_*/write_* names
_log = logging.getLogger(__name__)
#: What a job's actors and a Ray Serve replica load unless told otherwise (ServeConfig's default too).
_DEFAULT_OPTIONS = LoadOptions(precision="auto")


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
        options: how every actor loads the artifact (:class:`memrerank.LoadOptions`). Default:
            ``precision="auto"`` (the fastest exported precision that met its fidelity budget on the first
            provider; CPU by default). ``options.threads`` are the CPUs each actor reserves and its onnxruntime
            intra-op threads (1 when ``None``; stored so); ``options.batch_size`` / ``max_batch_tokens`` bound
            each model call inside an actor.
        actors: size of the :class:`RerankActor` pool (each loads the artifact once).
        block_rows: rows per ``map_batches`` call (the reranker cuts them again by its own batch budget). With
            several actors it is capped at ``ceil(rows / actors)`` (the input's rows are counted first), so a
            small input still gives every actor a share instead of one block to one actor.
        id_column: input column written back with the scores.
        query_column: input column of the queries.
        document_column: input column of the documents.
        keep_text: also write the query and document columns (default: ids, other input columns and scores).
        input_format: ``"jsonl"`` or ``"parquet"``; default: from the file names.
        output_format: ``"jsonl"`` or ``"parquet"``; default: the input's.
        output_prefix: prepended to the ``score``, ``logit`` and ``truncated`` column names (when the input
            already has columns of those names, e.g. when re-scoring an earlier output).
        force: replace a non-empty output directory.
        address: Ray cluster address (``"auto"``, ``"ray://head:10001"``); ``None`` = the running Ray instance
            if any, else a local one.
        num_cpus: CPUs of a local Ray instance started here (``None`` = all).
        instruction: decoder artifacts: the task instruction (``None`` = the artifact's default).
        verbose: keep Ray Data's progress bars and INFO logs (default: warnings only).

    Raises:
        ValueError: a value out of range, naming the field.
        TypeError: a value of the wrong type, naming the field.
    """

    input: str | Path | Sequence[str | Path]
    output: str
    artifact: str
    options: LoadOptions = _DEFAULT_OPTIONS
    _: KW_ONLY
    actors: int = 1
    block_rows: int = 256
    id_column: str = "id"
    query_column: str = "query"
    document_column: str = "document"
    keep_text: bool = False
    input_format: str | None = None
    output_format: str | None = None
    output_prefix: str = ""
    force: bool = False
    address: str | None = None
    num_cpus: int | None = None
    instruction: str | None = None
    verbose: bool = False

    def __post_init__(self) -> None:
        paths = self.input if isinstance(self.input, (list, tuple)) else [self.input]
        object.__setattr__(self, "input", tuple(_path(p, "RescoreJob.input") for p in paths))
        if not self.input:
            raise ValueError("RescoreJob.input: no paths given")
        object.__setattr__(self, "output", _path(self.output, "RescoreJob.output"))
        object.__setattr__(self, "artifact", _path(self.artifact, "RescoreJob.artifact"))
        if not isinstance(self.options, LoadOptions):
            raise TypeError(f"RescoreJob.options must be a memrerank.LoadOptions, e.g. RescoreJob(input, output, "
                            f"artifact, LoadOptions(\"int8\", threads=2)), got {self.options!r}")
        if self.options.threads is None:  # an actor's onnxruntime threads are the CPUs Ray reserves for it
            object.__setattr__(self, "options", self.options.replace(threads=1))
        for name in ("actors", "block_rows"):
            check_positive_int(getattr(self, name), f"RescoreJob.{name}")
        check_positive_int(self.num_cpus, "RescoreJob.num_cpus", optional=True)
        for name in ("keep_text", "force", "verbose"):
            check_optional_bool(getattr(self, name), f"RescoreJob.{name}", optional=False)
        for name in ("input_format", "output_format"):
            if getattr(self, name) not in FORMATS + (None,):
                raise ValueError(f"RescoreJob.{name}: unknown {getattr(self, name)!r}; choose one of "
                                 f"{', '.join(FORMATS)}")
        for name in ("id_column", "query_column", "document_column"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise TypeError(f"RescoreJob.{name} must be a column name (str), got {getattr(self, name)!r}")
        if not isinstance(self.output_prefix, str):
            raise TypeError(f"RescoreJob.output_prefix must be a str, got {type(self.output_prefix).__name__}")
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
    threads: int  #: CPUs and onnxruntime threads per actor (:attr:`LoadOptions.threads`)
    precision: str
    output: str
    output_format: str
    block_rows: int = 0  #: rows per ``map_batches`` call, after the cap (see :attr:`RescoreJob.block_rows`)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class RerankActor:
    """The ``map_batches`` callable: loads one :class:`Reranker` per actor and scores pyarrow batches.

    Rows sharing a query inside a batch are tokenized together (and share the decoder prefix), so inputs sorted or
    grouped by query score fastest.

    Args:
        job: the job; the actor loads its artifact with its ``options`` and reads its instruction and column
            names.
    """

    def __init__(self, job: RescoreJob) -> None:
        from memrerank import Reranker

        self.reranker = Reranker.load(job.artifact, job.options)
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


def _check_output(output: str, force: bool) -> None:
    if "://" in output:  # remote filesystems: Ray Data's SaveMode decides
        return
    out = Path(output)
    recover(out, _log.warning)  # an output a killed job left aside comes back; stale siblings go
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise FileExistsError(f"output {output!r} exists and is not empty; choose a new directory or pass "
                              "force=True (--force) to overwrite its contents")


def _check_io(job: RescoreJob) -> tuple[str, str]:
    """The input and output formats, once the inputs exist and the output may be written."""
    for p in job.input:
        if "://" not in p and not Path(p).exists():
            raise FileNotFoundError(f"input {p!r} does not exist")
    fmt = _input_format(list(job.input), job.input_format)
    _check_output(job.output, job.force)
    return fmt, job.output_format or fmt


def _driver_precision(job: RescoreJob) -> str:
    """The precision every actor loads: ``"auto"`` resolved and an exported one checked, where the driver sees
    the artifact (actors check it again where they run)."""
    options = job.options
    if not Path(job.artifact).exists():
        return options.precision
    manifest = read_manifest(job.artifact)
    if options.precision == "auto":
        return manifest.pick_auto(options.first_provider)
    if not (options.precision in manifest.engines and options.wants_tensorrt):
        try:
            manifest.precision(options.precision)
        except ArtifactError as exc:
            raise ArtifactError(f"{job.artifact}: {exc}") from None
    return options.precision


def _check_cpus(ray: Any, job: RescoreJob) -> None:
    threads = job.options.threads
    need, have = job.actors * threads, ray.cluster_resources().get("CPU", 0)
    if need > have:
        msg = (f"{job.actors} actors x {threads} threads need {need} CPUs; the Ray cluster has "
               f"{have:g}. Lower actors or options.threads (--actors / --threads)")
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


def _write_output(ray: Any, scored: Any, output: str, out_fmt: str, force: bool) -> int:
    """Write the scored dataset (this runs the job) and return the rows written."""
    local = "://" not in output
    # Local output is written beside its destination and swapped into place when every row is in: a failed
    # or killed job leaves no partial directory that looks finished, and an overwritten output stays whole
    # until the new one is in (memrerank.atomic; the next job restores it if a kill hit the swap itself).
    target = str(staging_path(output)) if local else output
    mode = {"mode": "overwrite"} if force and not local else {}
    try:
        getattr(scored, f"write_{_RAY_FORMAT[out_fmt]}")(target, **mode, ray_remote_args={"num_cpus": 0})
        rows = getattr(ray.data, f"read_{_RAY_FORMAT[out_fmt]}")(target, num_cpus=0).count()
        if local:
            swap_into_place(target, output)  # an empty output, or any with force=True (checked before)
    except BaseException as exc:
        if local:
            shutil.rmtree(target, ignore_errors=True)
        if isinstance(exc, ray.exceptions.RayTaskError):
            raise RescoreError(f"rescore failed in a Reranker actor: {_root_cause(exc)}") from exc
        raise
    return rows


def rescore(job: RescoreJob | str | Path | Sequence[str | Path] | None = None,
            output: str | Path | None = None, artifact: str | Path | None = None, **fields: Any) -> RescoreReport:
    """Re-score every ``(query, document)`` row of a JSONL/Parquet table on Ray; writes a directory of files.

    ``rescore(RescoreJob(input, output, artifact, LoadOptions("int8"), actors=2))``, or the same as keywords:
    ``rescore(input, output, artifact, options=LoadOptions("int8"), actors=2)`` (which fills a
    :class:`RescoreJob`; see it for every field).

    Args:
        job: a :class:`RescoreJob`, or the input path(s) (``input=`` works too) with ``output``, ``artifact`` and
            the job's other fields as keywords.
        output: keyword form only: the output directory.
        artifact: keyword form only: the artifact directory.
        **fields: keyword form only: the other :class:`RescoreJob` fields (``options``, ``actors``,
            ``block_rows``, ``force``, ...).

    Returns:
        A :class:`RescoreReport` (rows written, wall seconds including actor start-up, pairs/s).

    Raises:
        ValueError: a bad field, missing columns, more CPUs asked for than a local Ray instance has.
        TypeError: a keyword that is no :class:`RescoreJob` field (a load option names ``options=``).
        FileNotFoundError / FileExistsError: a missing input, an output that exists (without ``force``).
        RescoreError: the job failed in an actor (names the row or the cause).
    """
    job = _as_job(job, output, artifact, fields)
    ray = _ray()
    fmt, out_fmt = _check_io(job)
    precision = _driver_precision(job)
    _init_ray(ray, job.address, job.num_cpus)
    _check_cpus(ray, job)
    with _job_settings(ray, job.verbose):
        ds = _read_input(ray, job, fmt)
        t0 = time.perf_counter()
        block_rows = job.block_rows
        if job.actors > 1:  # counting reads the input once more
            block_rows = shared_block_rows(ds.count(), job.actors, job.block_rows)
        actor_job = dataclasses.replace(job, options=job.options.replace(precision=precision))
        scored = ds.map_batches(
            RerankActor, batch_format="pyarrow", batch_size=block_rows, zero_copy_batch=True,
            # one task in flight per actor: the first actor up (others still loading the model) would otherwise
            # queue several bundles and leave the rest idle on small and medium inputs
            compute=ray.data.ActorPoolStrategy(size=job.actors, max_tasks_in_flight_per_actor=1),
            num_cpus=job.options.threads, fn_constructor_kwargs={"job": actor_job})
        rows = _write_output(ray, scored, job.output, out_fmt, job.force)
    seconds = time.perf_counter() - t0
    return RescoreReport(rows=rows, seconds=seconds, pairs_per_s=rows / seconds if seconds else 0.0,
                         actors=job.actors, threads=job.options.threads, precision=precision,
                         output=job.output, output_format=out_fmt, block_rows=block_rows)


def shared_block_rows(rows: int, actors: int, block_rows: int) -> int:
    """Rows per ``map_batches`` call so that ``rows`` reach every one of ``actors``: ``block_rows``, capped at
    ``ceil(rows / actors)`` (240 rows, 2 actors, 256 asked: 120 each instead of one block to one actor)."""
    return max(1, min(block_rows, -(-rows // actors)))


#: Keywords of the old RescoreJob, and LoadOptions fields passed beside the job: what to write instead.
_RENAMED = {"threads_per_actor": "options=LoadOptions(threads=...)", "overwrite": "force=",
            "batch_size": "block_rows= (rows per actor call; model rows per call are "
                          "options=LoadOptions(batch_size=...))"}


def _as_job(job: Any, output: Any, artifact: Any, fields: dict[str, Any]) -> RescoreJob:
    """``rescore``'s argument(s) as one RescoreJob (the keyword form fills one)."""
    if isinstance(job, RescoreJob):
        if output is not None or artifact is not None or fields:
            raise TypeError("rescore(job): set the fields on the RescoreJob (dataclasses.replace(job, ...)), "
                            "not beside it")
        return job
    if job is not None:
        if "input" in fields:
            raise TypeError("rescore: input given twice (positionally and as input=)")
        fields["input"] = job
    if output is None or artifact is None or "input" not in fields:
        raise TypeError("rescore takes a RescoreJob, or input, output and artifact (then the job's fields as "
                        "keywords)")
    load = {f.name for f in dataclasses.fields(LoadOptions)}
    for name in fields:
        if name in _RENAMED or name in load:
            hint = _RENAMED.get(name) or f"options=LoadOptions({name}=...)"
            raise TypeError(f"rescore: {name}= is no RescoreJob field; pass {hint}")
    return RescoreJob(output=output, artifact=artifact, **fields)


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


_LOAD_INTS = ("threads", "batch_size", "max_batch_tokens")
_LOAD_BOOLS = ("prefix_reuse", "allow_tf32", "io_binding")
_LIMIT_KEYS = ("max_documents", "max_request_bytes", "max_tokens_per_document")
_APP_INTS = ("num_replicas", "max_batch_pairs") + _LOAD_INTS + _LIMIT_KEYS
_LOAD_KEYS = ("precision", "providers") + _LOAD_INTS + _LOAD_BOOLS
_APP_KEYS = frozenset(_APP_INTS + _LOAD_KEYS + ("artifact", "max_wait_ms", "model_name"))
_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False, "none": None, "": None}


def _app_value(key: str, value: Any) -> Any:
    """One ``build_app`` value as its field's type: ``serve run`` passes strings; other values are the fields'
    to check (``threads=2.7`` is refused by LoadOptions, not rounded here)."""
    if not isinstance(value, str):
        return value
    try:
        if key in _APP_INTS:
            return int(value)
        if key == "max_wait_ms":
            return float(value)
    except ValueError:
        raise ValueError(f"build_app: {key}={value!r}; {', '.join(_APP_INTS)} take integers, max_wait_ms a "
                         "number") from None
    if key in _LOAD_BOOLS:
        if value.strip().lower() not in _BOOLS:
            raise ValueError(f"build_app: {key}={value!r}; pass true, false or none")
        return _BOOLS[value.strip().lower()]
    return value


def _parse_app_args(args: dict[str, Any]) -> tuple[ServeConfig, int]:
    """``build_app``'s dict (values may be strings) → the ServeConfig and the number of replicas."""
    if not isinstance(args, dict):
        raise TypeError(f"build_app takes one dict of options, got {type(args).__name__}")
    if "artifact" not in args:
        raise ValueError("build_app needs artifact=<artifact directory>")
    unknown = sorted(set(args) - _APP_KEYS)
    if unknown:
        raise ValueError(f"build_app: unknown option(s) {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(_APP_KEYS))}")
    values = {k: _app_value(k, v) for k, v in args.items()}
    try:
        replicas = check_positive_int(values.pop("num_replicas", 1), "num_replicas")
        limits = Limits(**{k: values.pop(k) for k in _LIMIT_KEYS if k in values})
        options = LoadOptions.merge(_DEFAULT_OPTIONS, **{k: values.pop(k) for k in _LOAD_KEYS if k in values})
        return ServeConfig(**values, options=options, limits=limits), replicas
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"build_app: {exc}") from exc


def _application(config: ServeConfig, replicas: int) -> Any:
    """The Ray Serve application: ``replicas`` replicas, each reserving ``config.options.threads`` CPUs (1 if
    unset)."""
    from ray import serve

    if not isinstance(config, ServeConfig):
        raise TypeError(f"expected a memrerank.serve.ServeConfig, got {type(config).__name__}")
    check_positive_int(replicas, "replicas")
    if Path(config.artifact).exists():
        config = dataclasses.replace(config, artifact=str(Path(config.artifact).resolve()))
        read_manifest(config.artifact)  # fail here, not in every replica
    if config.options.threads is None:  # a replica's onnxruntime threads match the CPUs Ray reserves for it
        config = dataclasses.replace(config, options=config.options.replace(threads=1))
    deployment = serve.deployment(_deployment_class(), name="memrerank", num_replicas=replicas,
                                  ray_actor_options={"num_cpus": config.options.threads})
    return deployment.bind(config)


def build_app(args: dict[str, Any]) -> Any:
    """A Ray Serve application serving one artifact with ``memrerank serve``'s JSON API.

    Ray Serve's application-builder form: one dict, as ``serve run memrerank.scale:build_app artifact=OUT
    precision=int8 num_replicas=2`` passes it (values may be strings). Keys: ``num_replicas`` (1); the
    :class:`memrerank.serve.ServeConfig` fields ``artifact`` (required), ``max_wait_ms`` (5), ``max_batch_pairs``
    (256), ``model_name``; the :class:`memrerank.LoadOptions` fields ``precision`` (``"auto"``), ``providers``
    (comma-separated), ``threads`` (1, CPUs per replica), ``batch_size``, ``max_batch_tokens``, ``prefix_reuse``,
    ``allow_tf32``, ``io_binding`` (the last three true/false/none); and the limits ``max_documents`` /
    ``max_request_bytes`` / ``max_tokens_per_document``. They become one ServeConfig, as ``memrerank serve``
    builds it.

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
        config: what each replica serves (its ``options.threads`` are the CPUs a replica reserves; 1 if unset).
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
