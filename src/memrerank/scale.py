"""Scale-out on Ray (the ``ray`` extra): batch re-scoring with Ray Data and the rerank service on Ray Serve.

* :func:`rescore` runs a :class:`RescoreJob`: it re-scores a large JSONL or Parquet table of
  ``(id, query, document)`` rows with a pool of :class:`RerankActor` (``map_batches``, one artifact loaded per
  actor) and writes ``id`` (and every other input column but the texts) with ``score``, ``logit`` and
  ``truncated``. Works on a local Ray instance (started for you) or any cluster ``ray.init(address=...)`` reaches;
  every node must see the artifact at the same path. Each id is written exactly once: ids are checked (present,
  unique), each scored block is committed as its own file in a staging directory beside the output, rows in and
  out are compared before the directory is swapped into place, and a failed or killed job resumes
  (``resume=True``) by scoring only the ids its committed blocks lack.
* :func:`build_app` / :func:`serve_on_ray` wrap the same FastAPI service as ``memrerank serve`` (Cohere
  ``/v1/rerank`` and ``/v2/rerank``, TEI and vLLM ``/rerank``, vLLM ``/score`` and ``/v1/score``,
  ``/health``, ``/v1/models``, ``/metrics``) in a Ray Serve deployment with ``num_replicas`` replicas, each
  building its app from one :class:`memrerank.serve.ServeConfig`; ``serve run memrerank.scale:build_app
  artifact=OUT`` works too.

``import memrerank.scale`` needs no Ray; the functions import it when called.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import sys
import time
import uuid
import warnings
from array import array
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import KW_ONLY, asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memrerank import atomic
from memrerank.atomic import recover
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
#: Test-only fault hook of :func:`rescore`'s driver: called as ``_FAULT("block")`` after each committed block is
#: reported and ``_FAULT("verify")`` before the output is checked against the input; ``None`` otherwise.
_FAULT: Callable[[str], None] | None = None
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
        force: replace a non-empty output directory; without ``resume``, also discard what an interrupted job
            of the same output left for ``resume``.
        resume: finish the interrupted job of the same output (local output): its committed blocks are kept and
            only the rows whose ids they lack are scored. Refused when the input files (paths, sizes, mtimes),
            the artifact or a setting that changes what is written differ from the interrupted job's. With no
            interrupted job beside the output, the job starts from scratch.
        allow_duplicate_ids: score inputs whose ids repeat or are null. By default every id must be present
            and unique: each is written exactly once and ``resume`` finds finished rows by id. With this set
            the output still has exactly the input's rows (counted) but the job cannot ``resume``.
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
    resume: bool = False
    allow_duplicate_ids: bool = False
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
        for name in ("keep_text", "force", "resume", "allow_duplicate_ids", "verbose"):
            check_optional_bool(getattr(self, name), f"RescoreJob.{name}", optional=False)
        if self.resume and self.allow_duplicate_ids:
            raise ValueError("RescoreJob.resume finds an interrupted job's finished rows by their ids; it needs "
                             "unique ids (drop allow_duplicate_ids / --allow-duplicate-ids)")
        if self.resume and "://" in self.output:
            raise ValueError("RescoreJob.resume needs a local output directory (remote output is written by Ray "
                             "Data's own writers, without committed blocks)")
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
    pairs_per_s: float  #: rows scored by this run (``rows - resumed``) per second
    actors: int
    threads: int  #: CPUs and onnxruntime threads per actor (:attr:`LoadOptions.threads`)
    precision: str
    output: str
    output_format: str
    block_rows: int = 0  #: rows per ``map_batches`` call, after the cap (see :attr:`RescoreJob.block_rows`)
    resumed: int = 0  #: rows an interrupted job had committed, kept as they were (``rows`` counts them too)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class RerankActor:
    """The ``map_batches`` callable: loads one :class:`Reranker` per actor and scores pyarrow batches.

    Rows sharing a query inside a batch are tokenized together (and share the decoder prefix), so inputs sorted or
    grouped by query score fastest.

    With ``staging`` (local output) each batch is committed where it is scored: written to a hidden temporary
    file in the job's staging directory, fsynced and renamed to ``part-<digest of its ids>.<json|parquet>``.
    The rename is the journal entry: a part exists whole or not at all, and a batch Ray retries writes the same
    name again instead of a second copy. The call then returns one summary row ``{part, rows}``.

    Args:
        job: the job; the actor loads its artifact with its ``options`` and reads its instruction, column
            names and output format.
        staging: the staging directory the parts go to (``None``: return the scored rows instead).
        done: id keys (``str(id)``) an interrupted job already committed; their rows are skipped.
    """

    def __init__(self, job: RescoreJob, staging: str | None = None, done: frozenset[str] | None = None) -> None:
        from memrerank import Reranker

        self.reranker = Reranker.load(job.artifact, job.options)
        self.job = job
        self.staging = None if staging is None else Path(staging)
        self.done = done or frozenset()

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        job = self.job
        if self.done:
            keep = [_key(v) not in self.done for v in batch.column(job.id_column).to_pylist()]
            if not all(keep):
                batch = batch.filter(pa.array(keep, pa.bool_()))
        if self.staging is None:
            return self.score(batch)
        names, rows = [], []
        if batch.num_rows:
            scored = self.score(batch)
            names.append(_commit_part(self.staging, scored, job))
            rows.append(scored.num_rows)
        return pa.table({"part": pa.array(names, pa.string()), "rows": pa.array(rows, pa.int64())})

    def score(self, batch: Any) -> Any:
        """The batch's output rows: ids and other columns (texts only with ``keep_text``) and the scores."""
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


# ------------------------------------------------------------------------------- ids: unique, counted, compared
_MASK = 2**64 - 1


def _key(value: Any) -> str | None:
    """An id as the job compares it: its text (one column has one type, so this is one-to-one), ``None`` for null."""
    return None if value is None else str(value)


@dataclass(frozen=True)
class _Ids:
    """The ids of a table: how many rows, and a digest of the multiset of ids (the sum of their 64-bit hashes
    mod 2**64) that is the same for the same ids in any order and any split into files."""

    rows: int
    digest: int


def _id_batches(ds: Any, column: str) -> Iterator[list[Any]]:
    for batch in ds.select_columns([column]).iter_batches(batch_format="pyarrow", batch_size=65536):
        yield batch.column(0).to_pylist()


def _scan_ids(ds: Any, job: RescoreJob) -> _Ids:
    """Count the input's rows and check its ids (one pass over the id column): unless ``allow_duplicate_ids``,
    a null or repeated id is a ValueError naming them (a second pass only when two hashes collide)."""
    hashes: array[int] = array("Q")
    nulls = 0
    for values in _id_batches(ds, job.id_column):
        nulls += values.count(None)
        hashes.extend(hash(_key(v)) & _MASK for v in values)
    h = np.frombuffer(hashes, dtype=np.uint64) if len(hashes) else np.zeros(0, np.uint64)
    ids = _Ids(len(h), int(h.sum(dtype=np.uint64)))  # numpy wraps the sum mod 2**64
    if job.allow_duplicate_ids:
        return ids
    how = ("every row needs its own id: each id is written exactly once and --resume finds finished rows by id; "
           "pass allow_duplicate_ids=True (--allow-duplicate-ids) to score them anyway, without resume")
    if nulls:
        raise ValueError(f"input has {nulls} row(s) with a null or missing {job.id_column!r}; {how}")
    s = np.sort(h)
    same = s[1:] == s[:-1]
    if same.any():
        candidates = set(s[1:][same].tolist())
        counts = Counter(k for values in _id_batches(ds, job.id_column) for k in map(_key, values)
                         if hash(k) & _MASK in candidates)
        dups = [(k, n) for k, n in counts.most_common() if n > 1]
        if dups:
            shown = ", ".join(f"{k!r} ({n} rows)" for k, n in dups[:5]) + (", ..." if len(dups) > 5 else "")
            raise ValueError(f"input has {len(dups)} duplicate {job.id_column!r} value(s): {shown}; {how}")
    return ids


def _part_files(staging: Path) -> list[Path]:
    """The committed parts of a staging directory (temporary files are hidden: ``.part-…``)."""
    return sorted(p for p in staging.iterdir() if p.name.startswith("part-"))


def _part_keys(path: Path, column: str) -> list[str | None]:
    """The id keys of one committed part, in its order."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        values = pq.read_table(path, columns=[column]).column(0).to_pylist()
    else:
        with open(path, encoding="utf-8") as f:
            values = [json.loads(line).get(column) for line in f if line.strip()]
    return [_key(v) for v in values]


def _written_ids(staging: Path, column: str) -> tuple[_Ids, set[str | None]]:
    """What the committed parts hold: their :class:`_Ids` and the set of id keys."""
    digest, rows, keys = 0, 0, set()
    for part in _part_files(staging):
        try:
            part_keys = _part_keys(part, column)
        except (OSError, ValueError) as exc:
            raise RescoreError(f"committed part {part} is unreadable ({exc}); rerun without --resume and with "
                               "--force to start over") from None
        rows += len(part_keys)
        digest = (digest + sum(hash(k) & _MASK for k in part_keys)) & _MASK
        keys.update(part_keys)
    return _Ids(rows, digest), keys


def _commit_part(staging: Path, table: Any, job: RescoreJob) -> str:
    """Write one scored batch as a part of ``staging``: hidden temporary file, fsync, rename (see RerankActor)."""
    ext = "parquet" if job.output_format == "parquet" else "json"
    if job.allow_duplicate_ids:
        tag = uuid.uuid4().hex[:20]  # ids do not name a batch; a retried batch would be written twice (counted)
    else:
        digest = hashlib.blake2b(digest_size=10)
        for value in table.column(job.id_column).to_pylist():
            digest.update(str(value).encode() + b"\0")
        tag = digest.hexdigest()
    name = f"part-{tag}.{ext}"
    tmp = staging / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:  # FileNotFoundError once a resuming job took the directory over: fenced
        if ext == "parquet":
            import pyarrow.parquet as pq

            pq.write_table(table, f)
        else:
            f.write("".join(json.dumps(row, ensure_ascii=False, default=str) + "\n"
                            for row in table.to_pylist()).encode())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, staging / name)
    return name


# ------------------------------------------------------------------------------------- staging, resume, swap
def _fingerprint(job: RescoreJob, precision: str, fmt: str, out_fmt: str) -> dict[str, Any]:
    """What a resumed job must share with the interrupted one: the input files (path, size, mtime; a remote
    input by its path only), the artifact (its manifest's sha256) and every setting that changes what is
    written. Parallelism (actors, threads, block and batch sizes) may change between the two."""
    files: list[dict[str, Any]] = []
    for p in job.input:
        if "://" in p:
            files.append({"path": p})
            continue
        path = Path(p).resolve()
        for f in [path] if path.is_file() else sorted(q for q in path.rglob("*") if q.is_file()):
            st = f.stat()
            files.append({"path": str(f), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
    artifact: dict[str, Any] = {"path": job.artifact}
    manifest = Path(job.artifact) / "manifest.json"
    if manifest.is_file():
        artifact = {"path": str(Path(job.artifact).resolve()),
                    "manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest()}
    o = job.options
    settings = {"precision": precision, "providers": o.providers, "allow_tf32": o.allow_tf32,
                "instruction": job.instruction, "id_column": job.id_column, "query_column": job.query_column,
                "document_column": job.document_column, "keep_text": job.keep_text, "input_format": fmt,
                "output_format": out_fmt, "output_prefix": job.output_prefix,
                "allow_duplicate_ids": job.allow_duplicate_ids}
    return json.loads(json.dumps({"input": files, "artifact": artifact, "settings": settings}))  # as stored


def _fingerprint_changes(old: Any, new: dict[str, Any]) -> str:
    """What differs between an interrupted job's fingerprint and this job's, for people."""
    if not isinstance(old, dict):
        return "the interrupted job recorded no fingerprint"
    changes = []
    if old.get("input") != new["input"]:
        before = {f["path"]: f for f in old.get("input") or []}
        after = {f["path"]: f for f in new["input"]}
        named = [f"{p} {'is new' if p not in before else 'is gone' if p not in after else 'changed'}"
                 for p in sorted(set(before) | set(after)) if before.get(p) != after.get(p)]
        changes.append("input " + "; ".join(named[:3]))
    if old.get("artifact") != new["artifact"]:
        changes.append(f"artifact {new['artifact']['path']} (another artifact or re-exported)")
    was, now = old.get("settings") or {}, new["settings"]
    changes += [f"{k} {was.get(k)!r} -> {now[k]!r}" for k in now if was.get(k) != now[k]]
    return "; ".join(changes) or "unknown"


def _open_staging(job: RescoreJob, fingerprint: dict[str, Any]) -> tuple[Path, bool]:
    """This job's staging directory beside the output and whether it resumes an interrupted job's.

    A ``resume`` sibling of a running job, or of a job on another host, is never taken; an interrupted one (its
    job gone) is taken over with ``resume`` when the fingerprints match, discarded with ``force``, and refused
    otherwise, naming both ways.
    """
    out = Path(job.output)
    left = [s for s in atomic.siblings(out) if s.kind == "resume"]
    states = {s.path: s.state for s in left}
    for s in left:
        if states[s.path] == "running":
            raise FileExistsError(f"another rescore ({s.owner.describe()}) is writing {out} (in {s.path.name}); "
                                  "wait for it, or stop it and rerun with --resume")
        if states[s.path] == "other-host":
            raise FileExistsError(f"{s.path.name} beside {out} belongs to a rescore on another host "
                                  f"({s.owner.describe()}); resume it there, or, once that job is gone, delete "
                                  f"{s.lock} and rerun with --resume")
    info = {"rescore": fingerprint}
    kind = "partial" if job.allow_duplicate_ids else "resume"
    if not left:
        if job.resume:
            _log.info("rescore --resume: no interrupted job beside %s; scoring every row", out)
        return atomic.create_staging(out, kind, info), False
    if not job.resume:
        if not job.force:
            blocks = sum(len(_part_files(s.path)) for s in left)
            raise FileExistsError(f"an interrupted rescore of {out} left {blocks} committed block(s) in "
                                  f"{', '.join(s.path.name for s in left)}; pass --resume (resume=True) to score "
                                  "only the rest, or --force (force=True) to discard them and start over")
        for s in left:
            atomic.discard(s.path)
        return atomic.create_staging(out, kind, info), False
    if len(left) > 1:
        raise FileExistsError(f"several interrupted rescores left staging beside {out} "
                              f"({', '.join(s.path.name for s in left)}); keep one (delete the others and their "
                              ".lock files) and rerun with --resume")
    (s,) = left
    if s.info.get("rescore") != fingerprint:
        raise ValueError(f"--resume: {s.path.name} was started with other input or settings "
                         f"({_fingerprint_changes(s.info.get('rescore'), fingerprint)}); rerun with the same ones, "
                         "or without --resume and with --force to discard it and start over")
    return atomic.adopt(s.path, info), True


def _score_local(ray: Any, ds: Any, job: RescoreJob, actor_job: RescoreJob, ids: _Ids, fingerprint: dict[str, Any],
                 map_args: dict[str, Any]) -> tuple[int, int]:
    """Score into committed parts of a staging directory beside the output, check rows in = rows out, swap the
    directory into place. Returns (rows written, rows an interrupted job had committed)."""
    staging, resuming = _open_staging(job, fingerprint)
    resumable = not job.allow_duplicate_ids
    try:
        for tmp in staging.glob(".part-*"):  # a killed job's unfinished writes
            tmp.unlink()
        done: set[str | None] = set()
        if resuming:
            resumed_ids, done = _written_ids(staging, job.id_column)
            _log.info("rescore --resume: %d of %d rows already committed in %s", resumed_ids.rows, ids.rows,
                      staging.name)
        scored = ds.map_batches(RerankActor, fn_constructor_kwargs={
            "job": actor_job, "staging": str(staging), "done": frozenset(done)}, **map_args)
        batches = iter(scored.iter_batches(batch_format="pyarrow", batch_size=None))  # each: a block committed
        try:
            for _ in batches:
                if _FAULT is not None:
                    _FAULT("block")
        finally:  # interrupted: stop the pipeline now rather than when the iterator is collected
            close = getattr(batches, "close", None)
            if close is not None:
                close()
        if _FAULT is not None:
            _FAULT("verify")
        written, _ = _written_ids(staging, job.id_column)
        if written != ids:
            what = "" if written.rows != ids.rows else " but not the same ids"
            atomic.discard(staging)
            raise RescoreError(f"rows in {ids.rows:,}, rows out {written.rows:,}{what}: the output does not "
                               "hold every input row exactly once; nothing was written")
        try:
            atomic.swap_into_place(staging, job.output, replace=job.force)
        except FileExistsError as exc:
            raise FileExistsError(f"{exc}; the complete scores are kept in {staging.name}: rerun with --resume "
                                  "and --force to replace it") from None
    except BaseException as exc:
        blocks = len(_part_files(staging)) if staging.exists() else 0
        if staging.exists() and not (resumable and blocks):  # nothing a resumed job could use
            atomic.discard(staging)
        atomic.release(staging)  # kept or not, no job of this process holds it now
        if isinstance(exc, ray.exceptions.RayTaskError):
            kept = (f"; its {blocks} committed block(s) are kept in {staging.name}: rerun with --resume to "
                    "score only the rest" if resumable and blocks else "")
            raise RescoreError(f"rescore failed in a Reranker actor: {_root_cause(exc)}{kept}") from exc
        raise
    return written.rows, len(done)


def _score_remote(ray: Any, ds: Any, job: RescoreJob, actor_job: RescoreJob, ids: _Ids, out_fmt: str,
                  map_args: dict[str, Any]) -> int:
    """Remote output: Ray Data's writer (its SaveMode), then the rows written counted against the input's."""
    scored = ds.map_batches(RerankActor, fn_constructor_kwargs={"job": actor_job}, **map_args)
    mode = {"mode": "overwrite"} if job.force else {}
    try:
        getattr(scored, f"write_{_RAY_FORMAT[out_fmt]}")(job.output, **mode, ray_remote_args={"num_cpus": 0})
    except ray.exceptions.RayTaskError as exc:
        raise RescoreError(f"rescore failed in a Reranker actor: {_root_cause(exc)}") from exc
    rows = getattr(ray.data, f"read_{_RAY_FORMAT[out_fmt]}")(job.output, num_cpus=0).count()
    if rows != ids.rows:
        raise RescoreError(f"rows in {ids.rows:,}, rows out {rows:,} in {job.output}: the output does not hold "
                           "every input row exactly once")
    return rows


def rescore(job: RescoreJob | str | Path | Sequence[str | Path] | None = None,
            output: str | Path | None = None, artifact: str | Path | None = None, **fields: Any) -> RescoreReport:
    """Re-score every ``(query, document)`` row of a JSONL/Parquet table on Ray; writes a directory of files.

    ``rescore(RescoreJob(input, output, artifact, LoadOptions("int8"), actors=2))``, or the same as keywords:
    ``rescore(input, output, artifact, options=LoadOptions("int8"), actors=2)`` (which fills a
    :class:`RescoreJob`; see it for every field).

    Exactly once, resumably (local output): the input's ids are checked first (present and unique, unless
    ``allow_duplicate_ids``); each scored batch is committed as its own file in a staging directory beside the
    output (``.OUT.resume-…``, with a lock naming this host and process and the job's fingerprint); at the end
    the rows written are compared with the rows read (count and ids) and the directory is fsynced and renamed
    into place. A job that fails or is killed keeps its committed blocks: ``resume=True`` (``--resume``)
    scores only the rows they lack.

    Args:
        job: a :class:`RescoreJob`, or the input path(s) (``input=`` works too) with ``output``, ``artifact`` and
            the job's other fields as keywords.
        output: keyword form only: the output directory.
        artifact: keyword form only: the artifact directory.
        **fields: keyword form only: the other :class:`RescoreJob` fields (``options``, ``actors``,
            ``block_rows``, ``force``, ``resume``, ...).

    Returns:
        A :class:`RescoreReport` (rows written, wall seconds including actor start-up, pairs/s).

    Raises:
        ValueError: a bad field, missing columns, null or duplicate ids, more CPUs asked for than a local Ray
            instance has, a resume against other input or settings.
        TypeError: a keyword that is no :class:`RescoreJob` field (a load option names ``options=``).
        FileNotFoundError / FileExistsError: a missing input, an output that exists (without ``force``), an
            interrupted job's staging (without ``resume`` or ``force``), a job running on the same output.
        RescoreError: the job failed in an actor (names the row or the cause), or rows in and out differ.
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
        ids = _scan_ids(ds, job)  # one pass over the id column: rows in, and ids present and unique
        block_rows = job.block_rows
        if job.actors > 1:
            block_rows = shared_block_rows(ids.rows, job.actors, job.block_rows)
        actor_job = dataclasses.replace(job, options=job.options.replace(precision=precision),
                                        output_format=out_fmt)
        map_args = {
            "batch_format": "pyarrow", "batch_size": block_rows, "zero_copy_batch": True,
            # one task in flight per actor: the first actor up (others still loading the model) would otherwise
            # queue several bundles and leave the rest idle on small and medium inputs
            "compute": ray.data.ActorPoolStrategy(size=job.actors, max_tasks_in_flight_per_actor=1),
            "num_cpus": job.options.threads}
        resumed = 0
        if "://" in job.output:
            rows = _score_remote(ray, ds, job, actor_job, ids, out_fmt, map_args)
        else:
            rows, resumed = _score_local(ray, ds, job, actor_job, ids, _fingerprint(job, precision, fmt, out_fmt),
                                         map_args)
    seconds = time.perf_counter() - t0
    return RescoreReport(rows=rows, seconds=seconds, pairs_per_s=(rows - resumed) / seconds if seconds else 0.0,
                         actors=job.actors, threads=job.options.threads, precision=precision,
                         output=job.output, output_format=out_fmt, block_rows=block_rows, resumed=resumed)


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
_LIMIT_KEYS = tuple(f.name for f in dataclasses.fields(Limits))
_SERVE_INTS = ("max_batch_pairs", "max_concurrency", "max_connections", "max_queued_tokens")
_SERVE_FLOATS = ("max_wait_ms", "header_timeout_s", "body_timeout_s")
_SERVE_BOOLS = ("allow_unauthenticated",)
_APP_INTS = ("num_replicas",) + _SERVE_INTS + _LOAD_INTS + _LIMIT_KEYS
_LOAD_KEYS = ("precision", "providers") + _LOAD_INTS + _LOAD_BOOLS
_APP_KEYS = frozenset(_APP_INTS + _LOAD_KEYS + _SERVE_FLOATS + _SERVE_BOOLS
                      + ("artifact", "model_name", "api_key", "allowed_hosts", "instruction"))
_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False, "none": None, "": None}


def _app_value(key: str, value: Any) -> Any:
    """One ``build_app`` value as its field's type: ``serve run`` passes strings; other values are the fields'
    to check (``threads=2.7`` is refused by LoadOptions, not rounded here)."""
    if not isinstance(value, str):
        return value
    try:
        if key in _APP_INTS:
            return int(value)
        if key in _SERVE_FLOATS:
            return float(value)
    except ValueError:
        raise ValueError(f"build_app: {key}={value!r}; {', '.join(_APP_INTS)} take integers, "
                         f"{', '.join(_SERVE_FLOATS)} numbers") from None
    if key in _LOAD_BOOLS + _SERVE_BOOLS:
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
    if values.get("api_key") is None and os.environ.get("MEMRERANK_API_KEY"):  # as `memrerank serve` reads it
        values["api_key"] = os.environ["MEMRERANK_API_KEY"]
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
    :class:`memrerank.serve.ServeConfig` fields ``artifact`` (required), ``max_wait_ms`` (5),
    ``max_batch_pairs`` (256), ``model_name``, ``instruction`` (a decoder's default task instruction); the
    :class:`memrerank.LoadOptions` fields ``precision`` (``"auto"``), ``providers`` (comma-separated),
    ``threads`` (1, CPUs per replica), ``batch_size``, ``max_batch_tokens``, ``prefix_reuse``, ``allow_tf32``,
    ``io_binding`` (the last three true/false/none); the limits ``max_documents`` / ``max_request_bytes`` /
    ``max_tokens_per_document`` / ``max_request_tokens``; and admission and access: ``api_key`` (default: the
    ``MEMRERANK_API_KEY`` environment variable), ``allow_unauthenticated`` (true/false), ``allowed_hosts``
    (comma-separated; ``*`` any), ``max_concurrency``, ``max_queued_tokens``, ``body_timeout_s``
    (``max_connections`` and ``header_timeout_s`` are uvicorn's: Ray Serve's proxy has its own). They become
    one ServeConfig, as ``memrerank serve`` builds it.

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

    Raises:
        ValueError: a non-loopback ``host`` without ``config.api_key`` or ``config.allow_unauthenticated``, or a
            port outside 1..65535 (as :func:`memrerank.serve.serve`).
    """
    from memrerank.serve import check_port

    if not isinstance(config, ServeConfig):
        raise TypeError(f"expected a memrerank.serve.ServeConfig, got {type(config).__name__}")
    check_port(port)
    config = config.bound_to(host)  # the same rule as `memrerank serve`: beyond loopback, a key or an explicit no
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
