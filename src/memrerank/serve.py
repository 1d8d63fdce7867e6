"""``memrerank serve``: a local rerank service over one artifact (FastAPI + uvicorn, the ``serve`` extra).

APIs clients already speak (every scoring route takes ``instruction``, see below):

* ``POST /v1/rerank``, Cohere v1's, Jina's and vLLM's at once: ``{"model", "query", "documents" (strings or
  ``{"text"}``), "top_n", "return_documents"}`` → ``{"id", "model", "results": [{"index", "relevance_score",
  "document"?}], "usage": {"total_tokens", ...}}``;
* Cohere v2 ``POST /v2/rerank`` ``{"model", "query", "documents" (strings), "top_n", "max_tokens_per_doc"}``
  → ``{"id", "results": [{"index", "relevance_score"}], "meta": {"api_version": {"version": "2"},
  "billed_units": {"search_units": 1}}}`` (what ``cohere.ClientV2.rerank`` parses);
* Hugging Face TEI ``POST /rerank`` ``{"query", "texts", "raw_scores", "return_text", "truncate",
  "truncation_direction"}`` → ``[{"index", "score", "text"?}]``;
* vLLM ``POST /rerank`` with ``documents`` instead of ``texts`` (vLLM's, also on ``/v1/rerank``) →
  ``{"id", "model", "usage", "results": [{"index", "document": {"text"}, "relevance_score"}]}``, and vLLM
  ``POST /score``, ``/v1/score`` ``{"model", "text_1", "text_2"}`` → ``{"id", "object": "list", "created",
  "model", "data": [{"index", "object": "score", "score"}], "usage"}``;
* ``GET /health``, ``GET /v1/models``, ``GET /metrics`` (Prometheus text: requests, pairs, latency histogram).

What every scoring route says beyond its API, as extra fields clients ignore: each result's ``truncated``
(its document was cut to fit the model, or to v2's ``max_tokens_per_doc``) and ``query_truncated`` (at the top
level; on each item of TEI's list and vLLM's score data). A query too long for the model is cut, the template
kept, leaving the document room (:data:`memrerank.runtime.encoding.MIN_DOCUMENT_TOKENS`, a quarter of the
model's length at most), and flagged; TEI's ``truncate: false`` refuses it instead (413), as TEI refuses any
input too long. ``truncation_direction: "Left"`` (TEI) keeps the last tokens instead of the first. A request's
``instruction`` (decoder rerankers' task instruction; default :attr:`ServeConfig.instruction`, else the
artifact's) is scored as ``Reranker.rank(..., instruction=...)`` scores it and counts in its tokens; an
encoder artifact, whose template has no instruction, answers 400 for one. Empty ``documents`` is a 200 with
no results. Responses name the served model (:attr:`ServeConfig.name`).

Errors come in the shape of the API the route speaks (:func:`memrerank.serve_guard.error_body`): a bad request
is a 400 (TEI: 422, its ``Validation`` type), a limit a 413, an overload a 503 with ``Retry-After``.

A request's way in, each step bounded:

1. the edge (:mod:`memrerank.serve_guard`): ``Host``/``Origin`` allowlist (loopback names on a loopback bind), the
   API key, ``Content-Type: application/json``; under uvicorn, a header timeout and a connection cap;
2. the body, read within ``body_timeout_s`` (408) and ``max_request_bytes`` (413), all bodies being read together
   within ``max_concurrency`` × ``max_request_bytes`` (503), parsed off the event loop (a malformed, too deeply
   nested or huge-integer body is a 400); a slow upload holds a connection, never a scoring slot;
3. one of ``max_concurrency`` scoring slots (503 with ``Retry-After`` when all are taken), then checked and
   tokenized once, off the event loop, a slice of documents at a time, each document's ids cut to the
   model's length right away (so a request holds at most ``max_documents`` × the model's length in ids): a wrong
   type answers 400, a limit (documents, tokens per document, tokens per request) 413;
4. admitted to the :class:`DynamicBatcher` while its queue holds less than ``max_queued_tokens`` (503 with
   ``Retry-After`` otherwise), which scores every admitted request in steps of about one model call, taking a
   fair share of each waiting request round-robin: a 1-document request never waits behind a whole 1,000-document
   one; a merged step that fails is retried request by request, so one bad request never fails its neighbours;
5. a client that disconnects while its request waits takes its remaining work out of the queue.

Every error is JSON in its API's shape and counted in ``/metrics``. Binds to 127.0.0.1 unless told; a
non-loopback bind needs an API key or ``allow_unauthenticated``.

Every setting travels as one :class:`ServeConfig`: the CLI builds it, :func:`create_app` and :func:`serve` take it,
``serve(config, workers=N)`` hands it to each worker process, and ``memrerank.scale`` gives it to each Ray Serve
replica.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request) at runtime.

import asyncio
import collections
import dataclasses
import functools
import json
import math
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from memrerank.runtime.encoding import MIN_DOCUMENT_TOKENS, utf8_safe
from memrerank.runtime.options import LoadOptions, check_positive_int
from memrerank.serve_guard import (
    ANY_HOST,
    LOOPBACK_HOSTS,
    METRICS_STATE_KEY,
    PATH_API,
    Guard,
    api_of,
    error_body,
    guarded_protocol,
    host_name,
    is_loopback,
)

__all__ = ["DynamicBatcher", "Limits", "Metrics", "QueueFull", "ServeConfig", "check_port", "create_app",
           "pair_tokens", "serve", "takes_instruction", "uvicorn_config"]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SERVE_EXTRA = "memrerank serve needs the serve extra: pip install 'memrerank[serve]'"
#: A service loads the fastest exported precision that met its fidelity budget unless told otherwise.
_DEFAULT_OPTIONS = LoadOptions(precision="auto")
#: Documents tokenized per ``encode_batch`` call at most (by count and characters): the tokenizer's transient
#: memory is that of one slice, whose ids are cut to the model's length before the next slice is read.
_SLICE_DOCS, _SLICE_CHARS = 64, 1 << 16
#: Bodies up to this many bytes (documents up to this many characters) are parsed and tokenized by their own
#: thread, so a small request never waits behind a large one's tokenizing; larger ones share another thread.
#: Each thread holds one slice's transient memory at a time.
_SMALL_REQUEST = 1 << 16


@dataclass(frozen=True)
class Limits:
    """Per-request limits; exceeding one is an HTTP 413 naming it.

    Attributes:
        max_documents: documents per request.
        max_request_bytes: request body bytes.
        max_tokens_per_document: a document's tokens (before the model's own truncation).
        max_request_tokens: the request's work: the tokens the model reads for all its pairs (each document cut
            to the model's length, the template's tail, and the query side — template, instruction, query — per
            pair, or once when the reranker reuses a decoder's query prefix), summed.

    Raises:
        ValueError: a limit that is not a positive integer (naming it).
    """

    max_documents: int = 1000
    max_request_bytes: int = 4 * 2**20
    max_tokens_per_document: int = 8192
    max_request_tokens: int = 2**18

    def __post_init__(self) -> None:
        for f in fields(self):
            check_positive_int(getattr(self, f.name), f"Limits.{f.name}")


def _check_seconds(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


def _host_tuple(value: Any) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(h, str) for h in items):
        items = []
    hosts = tuple(dict.fromkeys(ANY_HOST if h.strip() == ANY_HOST else host_name(h) for h in items if h.strip()))
    if not hosts:
        raise ValueError(f"ServeConfig.allowed_hosts must be host names (a comma-separated string or a sequence; "
                         f"'*' allows any), got {value!r}")
    return hosts


def check_port(port: Any) -> int:
    """``port`` if it is a TCP port in 1..65535, else ``ValueError`` (a wrapped or random port is never used)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"port must be an integer in 1..65535, got {port!r}")
    return port


@dataclass(frozen=True)
class ServeConfig:
    """Everything one rerank service needs: the artifact, how to load it, batching, limits, admission and access.

    Args:
        artifact: an artifact directory written by ``memrerank export`` (a ``Path`` is stored as ``str``).
        options: how each worker or replica loads the artifact (:class:`memrerank.LoadOptions`: precision,
            providers, threads, batch and token budgets, prefix reuse, ...). Default: ``precision="auto"``, the
            fastest exported precision that met its fidelity budget on the first provider (the CPU unless told).
        limits: per-request :class:`Limits`.
        max_wait_ms: dynamic batching: the longest an idle batcher waits for company (0 = each request alone).
        max_batch_pairs: dynamic batching: the most pairs merged into one step (a step also holds at most the
            reranker's ``max_batch_tokens``: about one model call).
        model_name: the name ``/v1/models`` and responses report (``None`` = the artifact directory's name).
        api_key: when set, every request but ``GET /health`` needs ``Authorization: Bearer <api_key>`` (401
            otherwise). Never printed (``repr`` leaves it out).
        allow_unauthenticated: allow binding a non-loopback address without ``api_key`` (refused otherwise).
        allowed_hosts: ``Host`` names answered (any port; a comma-separated string is accepted); ``"*"`` answers
            any. The default, the loopback names, applies to a loopback bind; :meth:`bound_to` a non-loopback
            address turns the default into ``("*",)``.
        max_concurrency: requests being scored (body read: tokenizing, queued, scoring); beyond, 503 with
            ``Retry-After``. Bodies being received hold at most ``max_concurrency`` × ``max_request_bytes`` bytes
            together (503 beyond).
        max_connections: open connections (uvicorn only); beyond, a new connection's request gets 503.
        max_queued_tokens: the batcher's queue, in tokens of admitted, unscored work; a request that would overfill
            it gets 503 with ``Retry-After``. At least twice ``limits.max_request_tokens``: a largest request
            leaves room for others.
        header_timeout_s: seconds to receive a request's line and headers (uvicorn only; 408 and close).
        body_timeout_s: seconds to receive a request's body once its headers are in (408 and close).
        instruction: decoder rerankers: the task instruction of a request that names none (``None``: the
            artifact's default). An encoder artifact takes none (:func:`create_app` refuses it).

    Raises:
        ValueError: a value out of range, naming the field.
        TypeError: a value of the wrong type, naming the field.
    """

    artifact: str
    options: LoadOptions = _DEFAULT_OPTIONS
    limits: Limits = Limits()
    max_wait_ms: float = 5.0
    max_batch_pairs: int = 256
    model_name: str | None = None
    api_key: str | None = field(default=None, repr=False)
    allow_unauthenticated: bool = False
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS
    max_concurrency: int = 32
    max_connections: int = 128
    max_queued_tokens: int = 2**20
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    instruction: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.artifact, (str, os.PathLike)) or not os.fspath(self.artifact):
            raise TypeError(f"ServeConfig.artifact must be an artifact directory (str or Path), got "
                            f"{self.artifact!r}")
        object.__setattr__(self, "artifact", os.fspath(self.artifact))
        if not isinstance(self.options, LoadOptions):
            raise TypeError(f"ServeConfig.options must be a memrerank.LoadOptions, e.g. "
                            f"ServeConfig(artifact, LoadOptions(\"fp32\")), got {self.options!r}")
        for name in ("max_batch_pairs", "max_concurrency", "max_connections", "max_queued_tokens"):
            check_positive_int(getattr(self, name), f"ServeConfig.{name}")
        if not isinstance(self.limits, Limits):
            raise TypeError(f"ServeConfig.limits must be a memrerank.serve.Limits, got "
                            f"{type(self.limits).__name__}")
        wait = self.max_wait_ms
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not math.isfinite(wait) or wait < 0:
            raise ValueError(f"ServeConfig.max_wait_ms must be a number >= 0, got {wait!r}")
        if self.model_name is not None and (not isinstance(self.model_name, str) or not self.model_name):
            raise ValueError(f"ServeConfig.model_name must be a non-empty string or None, got {self.model_name!r}")
        if self.instruction is not None and not isinstance(self.instruction, str):
            raise TypeError(f"ServeConfig.instruction must be a string or None, got {self.instruction!r}")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key.strip()):
            raise ValueError("ServeConfig.api_key must be a non-empty string or None")
        if not isinstance(self.allow_unauthenticated, bool):
            raise TypeError(f"ServeConfig.allow_unauthenticated must be True or False, got "
                             f"{self.allow_unauthenticated!r}")
        if self.max_queued_tokens < 2 * self.limits.max_request_tokens:
            raise ValueError(f"ServeConfig.max_queued_tokens ({self.max_queued_tokens}) must be at least twice "
                             f"limits.max_request_tokens ({self.limits.max_request_tokens}), so that a largest "
                             "request leaves room in the queue for others")
        object.__setattr__(self, "allowed_hosts", _host_tuple(self.allowed_hosts))
        for name in ("header_timeout_s", "body_timeout_s"):
            object.__setattr__(self, name, _check_seconds(getattr(self, name), f"ServeConfig.{name}"))

    def load_reranker(self) -> Any:
        """Load the artifact as ``options`` say (one :class:`memrerank.Reranker` per worker or replica)."""
        from memrerank import Reranker

        return Reranker.load(self.artifact, self.options)

    @property
    def name(self) -> str:
        """The model name the service reports."""
        return self.model_name or Path(self.artifact).resolve().name

    def bound_to(self, host: str) -> "ServeConfig":
        """This config as a server bound to ``host`` runs it.

        A loopback bind keeps it as it is. A non-loopback bind needs ``api_key`` or ``allow_unauthenticated``
        (``ValueError`` otherwise) and, with the default loopback ``allowed_hosts``, answers any ``Host``.
        """
        if is_loopback(host):
            return self
        if self.api_key is None and not self.allow_unauthenticated:
            raise ValueError(f"binding {host or 'every interface'!r} makes the service reachable beyond this machine "
                             "without an API key: set one (--api-key or MEMRERANK_API_KEY; ServeConfig.api_key) or "
                             "allow it explicitly (--allow-unauthenticated; allow_unauthenticated=True)")
        if self.allowed_hosts == LOOPBACK_HOSTS:
            return dataclasses.replace(self, allowed_hosts=(ANY_HOST,))
        return self


class Metrics:
    """Counters, gauges and a latency histogram, rendered in Prometheus' text format."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.pairs = 0
        self.batches = 0
        self.retried = 0
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        #: name -> a callable read at render time (queue depth, requests in flight).
        self.gauges: dict[str, Any] = {}

    def observe(self, endpoint: str, status: int, seconds: float, pairs: int = 0) -> None:
        with self.lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1
            self.pairs += pairs
            self.latency_sum += seconds
            i = next((k for k, b in enumerate(LATENCY_BUCKETS) if seconds <= b), len(LATENCY_BUCKETS))
            self.buckets[i] += 1

    def add_pairs(self, pairs: int) -> None:
        with self.lock:
            self.pairs += pairs

    def render(self) -> str:
        with self.lock:
            lines = ["# TYPE memrerank_requests_total counter"]
            lines += [f'memrerank_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                      for (e, s), n in sorted(self.requests.items())]
            lines += ["# TYPE memrerank_pairs_total counter", f"memrerank_pairs_total {self.pairs}",
                      "# TYPE memrerank_batches_total counter", f"memrerank_batches_total {self.batches}",
                      "# TYPE memrerank_batches_retried_total counter",
                      f"memrerank_batches_retried_total {self.retried}"]
            for name, read in sorted(self.gauges.items()):
                lines += [f"# TYPE {name} gauge", f"{name} {read()}"]
            lines.append("# TYPE memrerank_request_seconds histogram")
            cum = 0
            for b, n in zip(LATENCY_BUCKETS, self.buckets):
                cum += n
                lines.append(f'memrerank_request_seconds_bucket{{le="{b}"}} {cum}')
            cum += self.buckets[-1]
            lines += [f'memrerank_request_seconds_bucket{{le="+Inf"}} {cum}',
                      f"memrerank_request_seconds_sum {self.latency_sum:.6f}",
                      f"memrerank_request_seconds_count {cum}"]
        return "\n".join(lines) + "\n"


def pair_tokens(split: Any, shared_head: bool = False) -> np.ndarray:
    """Tokens the model reads for each pair of a split (int64, one per document): the document cut to the model's
    length and the template's tail, plus the query side unless ``shared_head`` (a decoder scoring on its cached
    query prefix reads that once per request, not once per pair: ``reranker.prefix_reuse``)."""
    extra = len(split.tail) + (0 if shared_head else len(split.head))
    return np.fromiter((min(len(d), split.budget) + extra for d in split.docs), dtype=np.int64,
                       count=len(split.docs))


class QueueFull(Exception):
    """The batcher's queue cannot take a request now (HTTP 503); ``retry_after`` is whole seconds to wait."""

    def __init__(self, queued: int, limit: int, retry_after: int) -> None:
        super().__init__(f"the queue holds {queued} tokens of work, the limit is {limit}; retry in {retry_after} s")
        self.queued, self.limit, self.retry_after = queued, limit, retry_after


class _Job:
    """One admitted request in the batcher: its split, what is scheduled and scored, and where results go."""

    def __init__(self, split: Any, tokens: np.ndarray, future: asyncio.Future, loop: Any) -> None:
        self.split, self.future, self.loop = split, future, loop
        self.cum = np.concatenate([[0], np.cumsum(tokens)]).astype(np.int64)
        self.n = len(split.docs)
        self.logits = np.full(self.n, np.nan, dtype=np.float32)
        self.truncated = np.zeros(self.n, dtype=bool)
        self.cursor = 0  # next document to schedule
        self.scored = 0  # documents scored
        self.cancelled = False

    @property
    def unscored_tokens(self) -> int:
        return int(self.cum[-1] - self.cum[self.scored])

    def take(self, allowance: int, rows: int, force: bool) -> tuple[int, int]:
        """Schedule the next documents worth at most ``allowance`` tokens and ``rows`` rows (one at least when
        ``force``); returns the scheduled range."""
        start = self.cursor
        end = int(np.searchsorted(self.cum, self.cum[start] + allowance, side="right")) - 1
        end = min(max(end, start), start + rows, self.n)
        if end == start and force and rows > 0:
            end = start + 1
        self.cursor = end
        return start, end


class DynamicBatcher:
    """Scores admitted requests in fair, bounded steps, merging concurrent requests into one model call.

    Requests arrive tokenized (a :class:`~memrerank.runtime.encoding.SplitPairs` each, from
    ``reranker.encoder.split``), so nothing is tokenized twice and nothing here tokenizes on the event loop. One
    background thread owns the model calls. Each step holds at most ``max_batch_pairs`` pairs and the reranker's
    ``max_batch_tokens`` tokens (about one model call); it takes a fair share of tokens from every waiting request
    in turn (round-robin, the first request served moving to the back), then fills what is left. A large request is
    thus scored across many steps, interleaved with everyone else's: a small request waits for at most the step in
    progress. An idle batcher waits at most ``max_wait_ms`` for company; ``max_wait_ms=0`` puts one request in
    each step (for comparison).

    Admission: a request is queued while the unscored tokens of all queued requests stay within
    ``max_queued_tokens`` (an empty queue takes any request); otherwise :meth:`score` raises :class:`QueueFull`
    with a ``retry_after`` from the measured throughput. A request whose caller stops waiting (cancelled) leaves
    the queue at the next step.

    A merged step that fails is retried one request at a time, so a request that breaks the model gets its own
    error and the requests that shared its step get their results (``metrics.retried`` counts such steps).
    """

    def __init__(self, reranker: Any, max_batch_pairs: int = 256, max_wait_ms: float = 5.0,
                 metrics: Metrics | None = None, max_queued_tokens: int | None = None) -> None:
        self.reranker = reranker
        self.max_batch_pairs = max_batch_pairs
        self.max_wait = max_wait_ms / 1e3
        self.metrics = metrics
        self.max_queued_tokens = max_queued_tokens
        self._jobs: collections.deque[_Job] = collections.deque()
        self._cond = threading.Condition()
        self._queued = 0  # unscored tokens of the admitted jobs
        self._rate = 0.0  # tokens per second, smoothed over steps (for Retry-After)
        if metrics is not None:
            metrics.gauges["memrerank_queued_tokens"] = lambda: self._queued
        self._thread = threading.Thread(target=self._run, name="memrerank-batcher", daemon=True)
        self._thread.start()

    @property
    def step_tokens(self) -> int:
        """Most tokens one step holds: the reranker's per-call token budget."""
        return int(getattr(self.reranker, "max_batch_tokens", None) or 2048)

    @property
    def shared_head(self) -> bool:
        """Whether the reranker reads each request's query side once (prefix reuse), not once per pair."""
        return bool(getattr(self.reranker, "prefix_reuse", False))

    @property
    def queued_tokens(self) -> int:
        return self._queued

    def retry_after(self) -> int:
        """Whole seconds until the queue has drained at the measured rate (1 to 60)."""
        if self._rate <= 0:
            return 1
        return int(min(60, max(1, math.ceil(self._queued / self._rate))))

    async def score(self, split: Any, tokens: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Raw logits and truncation flags for one request's documents.

        Args:
            split: the request tokenized by ``reranker.encoder.split(query, documents)``.
            tokens: :func:`pair_tokens` of ``split`` as this batcher counts them (computed when not given).

        Raises:
            QueueFull: the queue cannot take the request now.
        """
        tokens = pair_tokens(split, self.shared_head) if tokens is None else tokens
        loop = asyncio.get_running_loop()
        job = _Job(split, tokens, loop.create_future(), loop)
        if job.n == 0:
            return job.logits, job.truncated
        total = int(job.cum[-1])
        with self._cond:
            limit = self.max_queued_tokens
            if limit is not None and self._queued and self._queued + total > limit:
                raise QueueFull(self._queued, limit, self.retry_after())
            self._jobs.append(job)
            self._queued += total
            self._cond.notify()
        try:
            return await job.future
        except asyncio.CancelledError:
            job.cancelled = True
            with self._cond:
                self._cond.notify()
            raise

    # ---------------------------------------------------------------------------------------- the scoring thread
    def _drop(self, job: _Job) -> None:
        """Take a finished, failed or cancelled job out of the queue (lock held)."""
        self._queued -= job.unscored_tokens
        job.scored = job.n
        try:
            self._jobs.remove(job)
        except ValueError:
            pass

    def _waiting(self) -> tuple[int, int]:
        """Unscheduled (rows, tokens) of the live jobs (lock held)."""
        rows = sum(j.n - j.cursor for j in self._jobs if not j.cancelled)
        tokens = sum(int(j.cum[-1] - j.cum[j.cursor]) for j in self._jobs if not j.cancelled)
        return rows, tokens

    def _compose(self) -> list[tuple[_Job, int, int]]:
        """The next step: ``(job, start, end)`` ranges, a fair share of each live job first (lock held)."""
        for job in [j for j in self._jobs if j.cancelled]:
            self._drop(job)
        live = [j for j in self._jobs if j.cursor < j.n]
        if self.max_wait == 0:
            live = live[:1]
        if not live:
            return []
        cap_tokens, cap_rows = self.step_tokens, self.max_batch_pairs
        share = max(1, cap_tokens // len(live))
        picks: dict[_Job, list[int]] = {}
        used_tokens = used_rows = 0
        for fair in (True, False):
            for job in live:
                room = cap_tokens - used_tokens
                if used_rows >= cap_rows or (room <= 0 and picks) or job.cursor >= job.n:
                    continue
                start, end = job.take(min(room, share) if fair else room, cap_rows - used_rows, force=not picks)
                if end > start:
                    picks.setdefault(job, [start, end])[1] = end
                    used_tokens += int(job.cum[end] - job.cum[start])
                    used_rows += end - start
        self._jobs.rotate(-1)  # the next step starts with the next request
        return [(job, a, b) for job, (a, b) in picks.items()]

    def _run(self) -> None:
        busy = False
        while True:
            with self._cond:
                while not any(not j.cancelled for j in self._jobs):
                    for job in list(self._jobs):
                        self._drop(job)
                    busy = False
                    self._cond.wait()
                if not busy and self.max_wait > 0:  # idle until now: wait a moment for company
                    deadline = time.perf_counter() + self.max_wait
                    while True:
                        rows, tokens = self._waiting()
                        remaining = deadline - time.perf_counter()
                        if rows >= self.max_batch_pairs or tokens >= self.step_tokens or remaining <= 0:
                            break
                        self._cond.wait(remaining)
                picks = self._compose()
            if not picks:
                busy = False
                continue
            busy = True
            splits = [dataclasses.replace(job.split, docs=job.split.docs[a:b]) for job, a, b in picks]
            t = time.perf_counter()
            results = self._score(splits)
            elapsed = time.perf_counter() - t
            done_tokens = sum(int(job.cum[b] - job.cum[a]) for job, a, b in picks)
            if elapsed > 0:
                rate = done_tokens / elapsed
                self._rate = rate if self._rate <= 0 else 0.8 * self._rate + 0.2 * rate
            if self.metrics is not None:
                with self.metrics.lock:
                    self.metrics.batches += 1
            with self._cond:
                for (job, a, b), result in zip(picks, results):
                    if job.scored >= job.n:  # dropped meanwhile (cancelled)
                        continue
                    if isinstance(result, Exception):
                        self._drop(job)
                        job.loop.call_soon_threadsafe(_deliver, job.future, result)
                        continue
                    job.logits[a:b], job.truncated[a:b] = result
                    self._queued -= int(job.cum[b] - job.cum[a])
                    job.scored = b
                    if job.scored == job.n:
                        self._drop(job)
                        job.loop.call_soon_threadsafe(_deliver, job.future, (job.logits, job.truncated))

    def _score(self, splits: list[Any]) -> list[Any]:
        """Each split's ``(logits, truncated)``, or the exception scoring it alone raised."""
        try:
            logits, truncated = self.reranker.score_split(splits, raw=True)
        except Exception as exc:  # noqa: BLE001 - delivered to the request(s) it belongs to
            if len(splits) == 1:
                return [exc]
            if self.metrics is not None:
                with self.metrics.lock:
                    self.metrics.retried += 1
            return [self._score([split])[0] for split in splits]  # one by one: only the bad request fails
        results: list[Any] = []
        start = 0
        for split in splits:
            end = start + len(split.docs)
            results.append((logits[start:end], truncated[start:end]))
            start = end
        return results


def _deliver(future: asyncio.Future, result: Any) -> None:
    if future.done():
        return
    if isinstance(result, Exception):
        future.set_exception(result)
    else:
        future.set_result(result)


#: Statuses one API answers differently: a malformed field is TEI's 422 (axum's) where the others answer
#: 400, a request the model fails TEI's 424 (its ``Backend`` error) where the others answer 422.
_API_STATUS = {("tei", "invalid_request"): 422, ("tei", "model_error"): 424}


@dataclass(frozen=True)
class _Err:
    """An error answer, rendered in the shape and status of the API asked (see :data:`_API_STATUS`)."""

    status: int
    kind: str
    message: str
    headers: dict[str, str] | None = None

    def response(self, api: str | None) -> Any:
        from fastapi.responses import JSONResponse

        return JSONResponse(error_body(api, self.kind, self.message), headers=self.headers,
                            status_code=_API_STATUS.get((api, self.kind), self.status))


def _error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> _Err:
    return _Err(status, kind, message, headers)


def _bad(message: str) -> _Err:
    """A malformed request: 400 (TEI: 422)."""
    return _Err(400, "invalid_request", message)


def takes_instruction(manifest: Any) -> bool:
    """Whether an artifact's template has a task instruction (decoder rerankers' do, encoder cross-encoders'
    not)."""
    return getattr(manifest.template, "instruction_piece", None) is not None


def _texts(docs: Any) -> Any:
    """Documents as strings: Cohere v1, Jina and vLLM also take ``{"text": ...}`` objects."""
    return [d.get("text") if isinstance(d, dict) else d for d in docs] if isinstance(docs, list) else docs


def _top_n(data: dict[str, Any], zero: bool = False) -> tuple[int | None, _Err | None]:
    """``top_n``: a positive integer or absent (``zero``: vLLM's 0, all, too)."""
    value = data.get("top_n")
    least = 0 if zero else 1
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
        return None, _bad(f"'top_n' must be a {'non-negative' if zero else 'positive'} integer")
    return value or None, None


def _order(logits: np.ndarray, top_n: int | None = None) -> np.ndarray:
    """Indices best first, ``top_n`` of them (all when ``None``)."""
    return np.argsort(-logits, kind="stable")[:top_n]


@dataclass
class _Prepared:
    """One query's documents tokenized for the batcher.

    Attributes:
        split: the ids, each document's cut to what the model reads.
        truncated: per document, whether it was cut (to the model's length or to ``max_tokens``).
        query_truncated: whether the query was cut to leave the documents room.
        tokens: the tokens the model reads for them (:func:`pair_tokens`, a shared head once).
    """

    split: Any
    truncated: np.ndarray
    query_truncated: bool
    tokens: int


def _slices(docs: list[str]) -> list[tuple[int, int]]:
    """``(start, end)`` slices of ``docs`` of at most ``_SLICE_DOCS`` documents and ``_SLICE_CHARS`` characters
    (a longer document alone)."""
    out, start, size = [], 0, 0
    for i, d in enumerate(docs):
        if i > start and (i - start >= _SLICE_DOCS or size + len(d) > _SLICE_CHARS):
            out.append((start, i))
            start, size = i, 0
        size += len(d)
    out.append((start, len(docs)))
    return out


def _parse_json(body: bytes) -> Any:
    """The body's JSON value; ``ValueError`` with a client-facing message for anything else."""
    try:
        return json.loads(body)
    except RecursionError:
        raise ValueError("request body is nested too deeply") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"request body is not UTF-8 JSON: {exc}") from None
    except ValueError as exc:  # JSONDecodeError, and an integer past Python's int-str limit
        message = str(exc).split("; use sys.set_int_max_str_digits", 1)[0]
        raise ValueError(f"request body is not JSON: {message}") from None


class _Service:
    """The request side of one service: body reading under the limits, validation, and the rerank APIs.

    :meth:`run` reads a request's body and hands it to the handler of the route's API, which takes the
    Starlette request and the body's JSON object and returns ``(response, pairs scored)``; a response is a
    JSON-able value or an error, which :meth:`run` renders in the API's shape.
    """

    def __init__(self, config: ServeConfig, reranker: Any) -> None:
        self.config, self.limits, self.reranker = config, config.limits, reranker
        self.name = config.name
        self.metrics = Metrics()
        self.batcher = DynamicBatcher(reranker, max_batch_pairs=config.max_batch_pairs,
                                      max_wait_ms=config.max_wait_ms, metrics=self.metrics,
                                      max_queued_tokens=config.max_queued_tokens)
        self.pools = (ThreadPoolExecutor(1, thread_name_prefix="memrerank-tokenize-small"),
                      ThreadPoolExecutor(1, thread_name_prefix="memrerank-tokenize-large"))
        self.active = 0  # requests holding a scoring slot
        self.buffered = 0  # body bytes held by requests being read or parsed
        self.body_budget = config.max_concurrency * config.limits.max_request_bytes
        self.metrics.gauges["memrerank_requests_in_flight"] = lambda: self.active
        self.metrics.gauges["memrerank_buffered_body_bytes"] = lambda: self.buffered
        self.handlers = {"cohere_v1": self.cohere, "cohere": self.cohere_v2, "tei": self.tei,
                         "vllm": self.vllm_rerank, "vllm_score": self.vllm_score}

    async def read_body(self, request: Any) -> tuple[dict[str, Any] | None, Any]:
        """The JSON object of the body, or an error response (413 over ``max_request_bytes``, 408 past
        ``body_timeout_s``, 503 when all bodies being read would pass their budget, 400 not JSON or not an
        object, 499 the client went away)."""
        from starlette.requests import ClientDisconnect

        cap = self.limits.max_request_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > cap:
            return None, _error(413, "max_request_bytes",
                                f"request body of {declared} bytes exceeds the limit of {cap} bytes")
        held = [0]

        async def receive() -> bytes | str:
            body = bytearray()
            async for chunk in request.stream():
                if len(body) + len(chunk) > cap:
                    return "max_request_bytes"
                if self.buffered + len(chunk) > self.body_budget:
                    return "overloaded"
                self.buffered += len(chunk)
                held[0] += len(chunk)
                body += chunk
            return bytes(body)

        timeout = self.config.body_timeout_s
        try:
            try:
                body = await asyncio.wait_for(receive(), timeout)
            except asyncio.TimeoutError:
                return None, _error(408, "body_timeout", f"request body not received within {timeout:g} s",
                                    {"connection": "close"})
            except ClientDisconnect:
                return None, _error(499, "client_closed_request", "the client closed the connection")
            if body == "max_request_bytes":
                return None, _error(413, "max_request_bytes", f"request body exceeds the limit of {cap} bytes",
                                    {"connection": "close"})
            if body == "overloaded":
                return None, _error(503, "overloaded", f"request bodies being received hold {self.buffered} bytes, "
                                                       f"the limit is {self.body_budget}; retry shortly",
                                    {"retry-after": "1", "connection": "close"})
            try:
                data = await asyncio.get_running_loop().run_in_executor(self._pool(len(body)), _parse_json, body)
            except ValueError as exc:
                return None, _error(400, "invalid_json", str(exc))
        finally:
            self.buffered -= held[0]
        if not isinstance(data, dict):
            return None, _bad("request body must be a JSON object")
        return data, None

    def _fit_query(self, query: str, instruction: str | None, left: bool) -> tuple[str, bool]:
        """``(the query as scored, whether it was cut)``: whole when it leaves a document room, else its first
        (``left``: last) tokens that leave a document :data:`MIN_DOCUMENT_TOKENS` (a quarter of the model's
        length at most), the template kept. ``ValueError`` when the instruction and template alone leave no
        room."""
        encoder = self.reranker.encoder
        try:
            encoder.split(query, [], instruction)
            return query, False
        except ValueError:
            pass
        room = encoder.split("", [], instruction).budget - min(MIN_DOCUMENT_TOKENS, encoder.max_length // 4)
        starts = [a for a, _ in encoder.tokenizer.encode(utf8_safe(query), add_special_tokens=False).offsets]
        keep = min(room, len(starts) - 1)
        while True:
            cut = "" if keep <= 0 else query[starts[-keep]:] if left else query[:starts[keep]]
            try:
                encoder.split(cut, [], instruction)
                return cut, True
            except ValueError:  # in the template the cut text tokenizes a little longer: keep fewer tokens
                keep -= max(1, keep // 8)

    def _tokenize(self, query: str, docs: list[str], field: str, instruction: str | None,
                  max_tokens: int | None, truncate: bool, left: bool) -> tuple[Any, Any]:
        """Worker-thread side of :meth:`prepare`: the request as a :class:`_Prepared`, or an error."""
        limits, encoder = self.limits, self.reranker.encoder
        query, query_cut = self._fit_query(query, instruction, left)
        if query_cut and not truncate:
            return None, _error(413, "input_too_long", "'query' does not fit the model's max length and "
                                                       "truncate is false; shorten it or send truncate true")
        first, kept, flags, worst, worst_at = None, [], [], -1, -1
        for a, b in _slices(docs):
            split = encoder.split(query, docs[a:b], instruction)
            first = first or split
            budget = first.budget
            for i, d in enumerate(split.docs, a):
                whole = len(d)
                if max_tokens is not None:
                    d = d[:max_tokens]
                if len(d) > worst:
                    worst, worst_at = len(d), i
                flags.append(len(d) < whole or len(d) > budget)
                kept.append(d if len(d) <= budget else d[-budget:] if left else d[:budget])
            if worst > limits.max_tokens_per_document:
                return None, _error(413, "max_tokens_per_document",
                                    f"'{field}[{worst_at}]' has {worst} tokens, over the limit of "
                                    f"{limits.max_tokens_per_document}")
        if not truncate and any(flags):
            at = flags.index(True)
            return None, _error(413, "input_too_long", f"'{field}[{at}]' does not fit the model's max "
                                                       "length and truncate is false; shorten it or send "
                                                       "truncate true")
        first.docs = kept
        shared = self.batcher.shared_head
        total = int(pair_tokens(first, shared).sum()) + (len(first.head) if shared and kept else 0)
        if total > limits.max_request_tokens:
            return None, _error(413, "max_request_tokens",
                                f"the request is {total} tokens of work (each document cut to the model's "
                                f"length), over the limit of {limits.max_request_tokens}; split the request")
        return _Prepared(first, np.array(flags, dtype=bool), query_cut, total), None

    async def prepare(self, query: Any, docs: Any, field: str, *, instruction: Any = None,
                      max_tokens: int | None = None, truncate: bool = True,
                      left: bool = False) -> tuple[Any, Any]:
        """The request tokenized once, off the event loop, and checked before it joins a batch.

        Returns ``(prepared, None)`` — a :class:`_Prepared` for the batcher — or ``(None, error)``: 400 for a
        value of the wrong type, an instruction for an artifact without one, or an instruction that leaves no
        room for a document; 413 for a limit (naming it) or, with ``truncate`` false, for a query or document
        too long for the model. A query too long for the model is cut (see :meth:`_fit_query`).
        ``instruction`` ``None`` is :attr:`ServeConfig.instruction`. ``max_tokens`` (v2's
        ``max_tokens_per_doc``) keeps each document's first ``max_tokens`` tokens, and the per-document token
        limit applies to what is kept. ``left`` keeps the last tokens of what is cut. Tokens are the artifact
        tokenizer's ids of the document as the model reads it (for decoder templates, with the template's
        leading space).
        """
        limits = self.limits
        if not isinstance(query, str):
            return None, _bad("'query' must be a string")
        if not isinstance(docs, list):
            return None, _bad(f"'{field}' must be a list of strings")
        if instruction is None:
            instruction = self.config.instruction
        elif not isinstance(instruction, str):
            return None, _bad("'instruction' must be a string")
        elif not takes_instruction(self.reranker.manifest):
            return None, _bad(f"'instruction': this {self.reranker.family} model has no instruction in its "
                              "template; send the request without one")
        if len(docs) > limits.max_documents:
            return None, _error(413, "max_documents", f"{len(docs)} documents exceed the limit of "
                                                      f"{limits.max_documents} per request; split the request")
        bad = next((i for i, d in enumerate(docs) if not isinstance(d, str)), None)
        if bad is not None:
            return None, _bad(f"'{field}[{bad}]' must be a string")
        queued, limit = self.batcher.queued_tokens, self.config.max_queued_tokens
        if queued >= limit:  # full already: refuse before tokenizing
            return None, self._queue_full(QueueFull(queued, limit, self.batcher.retry_after()))
        pool = self._pool(sum(len(d) for d in docs))
        work = functools.partial(self._tokenize, query, docs, field, instruction, max_tokens, truncate, left)
        try:  # tokenizers releases the GIL: other requests and the batcher carry on meanwhile
            return await asyncio.get_running_loop().run_in_executor(pool, work)
        except ValueError as exc:  # the instruction and template leave no room for a document
            return None, _bad(str(exc))

    async def score(self, request: Any, splits: list[Any]) -> tuple[Any, Any]:
        """``(raw logits of each split, None)`` for prepared requests, or ``(None, error)``.

        A full queue is a 503 with ``Retry-After``; a ``TypeError``/``ValueError`` from scoring this request
        (alone, if its merged step failed) is a 422 (TEI: 424); a client that disconnects meanwhile takes its
        work out of the queue (499, which it never reads); anything else propagates (a JSON 500).
        """
        scoring = asyncio.ensure_future(asyncio.gather(*(self.batcher.score(split) for split in splits)))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({scoring, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (scoring, gone):
                if not task.done():
                    task.cancel()
        if not scoring.done() or scoring.cancelled():
            return None, _error(499, "client_closed_request", "the client closed the connection")
        try:
            return [logits for logits, _ in scoring.result()], None
        except QueueFull as exc:
            return None, self._queue_full(exc)
        except (TypeError, ValueError) as exc:
            return None, _error(422, "model_error", str(exc))

    async def _rank(self, request: Any, data: dict[str, Any], docs: Any, field: str,
                    **cut: Any) -> tuple[Any, Any]:
        """One query's documents prepared and scored: ``((prepared, raw logits), None)`` or
        ``(None, error)``."""
        prepared, err = await self.prepare(data.get("query"), docs, field,
                                           instruction=data.get("instruction"), **cut)
        if err:
            return None, err
        logits, err = await self.score(request, [prepared.split])
        return (None, err) if err else ((prepared, logits[0]), None)

    def _pool(self, size: int) -> ThreadPoolExecutor:
        return self.pools[size > _SMALL_REQUEST]

    @staticmethod
    def _queue_full(exc: QueueFull) -> _Err:
        return _error(503, "queue_full", str(exc), {"retry-after": str(exc.retry_after)})

    def _model(self, data: dict[str, Any], served_only: bool = False) -> _Err | None:
        """``model``: a string or absent; with ``served_only`` (vLLM's routes) the served model's name or a
        404, as vLLM answers."""
        model = data.get("model")
        if model is not None and not isinstance(model, str):
            return _bad("'model' must be a string")
        if served_only and model not in (None, self.name):
            return _error(404, "model_not_found", f"The model `{model}` does not exist; this service serves "
                                                  f"`{self.name}`")
        return None

    async def run(self, request: Any, api: str) -> Any:
        """Read the body, take a scoring slot (503 with ``Retry-After`` when all ``max_concurrency`` are taken),
        run the handler of ``api`` (``/rerank`` with ``documents`` and no ``texts``: vLLM's) on the body and
        count the pairs it scored (the guard counts the request, its status and time). Errors take ``api``'s
        shape."""
        data, err = await self.read_body(request)
        if api == "tei" and isinstance(data, dict) and "documents" in data and "texts" not in data:
            api = "vllm"
        if err:
            return err.response(api)
        limit = self.config.max_concurrency
        if self.active >= limit:
            return _error(503, "overloaded", f"{self.active} requests being scored, the limit is {limit}; retry "
                                             "shortly", {"retry-after": "1"}).response(api)
        self.active += 1
        try:
            response, pairs = await self.handlers[api](request, data)
        finally:
            self.active -= 1
        if pairs:
            self.metrics.add_pairs(pairs)
        return response.response(api) if isinstance(response, _Err) else response

    async def cohere(self, request: Any, data: dict[str, Any]) -> tuple[Any, int]:
        """``POST /v1/rerank`` (Cohere v1, Jina, vLLM): calibrated relevance scores, best first, ``top_n``.

        Each result carries its document unless ``return_documents`` is false (Jina's and vLLM's default;
        Cohere v1 clients parse it too). ``model`` may name any model — Cohere and Jina clients send their own
        default names — and the response names the served one; ``usage.total_tokens`` is Jina's (and
        vLLM's).
        """
        docs = _texts(data.get("documents"))
        top_n, err = _top_n(data)
        err = err or self._model(data)
        ranked, err = (None, err) if err else await self._rank(request, data, docs, "documents")
        if err:
            return err, 0
        prepared, logits = ranked
        probs = self.reranker.calibrator(logits)
        results = []
        for i in _order(logits, top_n):
            item: dict[str, Any] = {"index": int(i), "relevance_score": float(probs[i]),
                                    "truncated": bool(prepared.truncated[i])}
            if data.get("return_documents") is not False:
                item["document"] = {"text": docs[i]}
            results.append(item)
        tokens = prepared.tokens
        return {"id": str(uuid.uuid4()), "model": self.name, "results": results,
                "query_truncated": prepared.query_truncated,
                "usage": {"search_units": 1, "documents": len(docs), "prompt_tokens": tokens,
                          "total_tokens": tokens}}, len(docs)

    async def cohere_v2(self, request: Any, data: dict[str, Any]) -> tuple[Any, int]:
        """``POST /v2/rerank`` (Cohere v2): calibrated relevance scores, best first, ``top_n`` of them.

        ``max_tokens_per_doc`` keeps each document's first that many tokens (see :meth:`prepare`; such a
        document is ``truncated``); without it a document is scored as v1 scores it (the model's own max
        length applies either way). ``model`` may name any model (Cohere clients send their own); the
        response names the served one.
        """
        for key in ("top_n", "max_tokens_per_doc"):
            value = data.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                return _bad(f"'{key}' must be a positive integer"), 0
        docs = data.get("documents")
        err = self._model(data)
        ranked, err = (None, err) if err else await self._rank(request, data, docs, "documents",
                                                               max_tokens=data.get("max_tokens_per_doc"))
        if err:
            return err, 0
        prepared, logits = ranked
        probs = self.reranker.calibrator(logits)
        results = [{"index": int(i), "relevance_score": float(probs[i]),
                    "truncated": bool(prepared.truncated[i])} for i in _order(logits, data.get("top_n"))]
        return {"id": str(uuid.uuid4()), "model": self.name, "results": results,
                "query_truncated": prepared.query_truncated,
                "meta": {"api_version": {"version": "2"}, "billed_units": {"search_units": 1}}}, len(docs)

    async def tei(self, request: Any, data: dict[str, Any]) -> tuple[Any, int]:
        """``POST /rerank`` (Hugging Face TEI): every text's score, best first.

        ``truncate: false`` refuses a query or text too long for the model (413, TEI's ``Validation`` error);
        ``truncation_direction: "Left"`` keeps the end of what is cut. TEI's request has no ``model``: one
        sent is ignored.
        """
        truncate, direction = data.get("truncate"), data.get("truncation_direction") or "Right"
        if truncate is not None and not isinstance(truncate, bool):
            return _bad("'truncate' must be true or false"), 0
        if not isinstance(direction, str) or direction.lower() not in ("left", "right"):
            return _bad("'truncation_direction' must be \"Left\" or \"Right\""), 0
        texts = data.get("texts")
        ranked, err = await self._rank(request, data, texts, "texts", truncate=truncate is not False,
                                       left=direction.lower() == "left")
        if err:
            return err, 0
        prepared, logits = ranked
        scores = logits if data.get("raw_scores") else self.reranker.calibrator(logits)
        out = []
        for i in _order(logits):
            item = {"index": int(i), "score": float(scores[i]), "truncated": bool(prepared.truncated[i]),
                    "query_truncated": prepared.query_truncated}
            if data.get("return_text"):
                item["text"] = texts[i]
            out.append(item)
        return out, len(texts)

    async def vllm_rerank(self, request: Any, data: dict[str, Any]) -> tuple[Any, int]:
        """``POST /rerank`` with ``documents`` (vLLM's form): calibrated relevance scores, best first,
        ``top_n`` of them (0 or absent: all), each with its document. A ``model`` other than the served one is
        a 404, as vLLM answers it."""
        docs = _texts(data.get("documents"))
        top_n, err = _top_n(data, zero=True)
        err = err or self._model(data, served_only=True)
        ranked, err = (None, err) if err else await self._rank(request, data, docs, "documents")
        if err:
            return err, 0
        prepared, logits = ranked
        probs = self.reranker.calibrator(logits)
        results = [{"index": int(i), "document": {"text": docs[i]}, "relevance_score": float(probs[i]),
                    "truncated": bool(prepared.truncated[i])} for i in _order(logits, top_n)]
        tokens = prepared.tokens
        return {"id": f"rerank-{uuid.uuid4().hex}", "model": self.name, "results": results,
                "query_truncated": prepared.query_truncated,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}, len(docs)

    async def vllm_score(self, request: Any, data: dict[str, Any]) -> tuple[Any, int]:
        """``POST /score``, ``/v1/score`` (vLLM): each pair's calibrated score, in the order given: one
        ``text_1`` (a string or a list of one) against every ``text_2``, or ``text_1[i]`` against
        ``text_2[i]``. A ``model`` other than the served one is a 404, as vLLM answers it."""
        text_1, text_2 = ([t] if isinstance(t, str) else t for t in (data.get("text_1"), data.get("text_2")))
        if not isinstance(text_1, list) or not text_1 or not all(isinstance(t, str) for t in text_1):
            return _bad("'text_1' must be a string or a non-empty list of strings"), 0
        if not isinstance(text_2, list):
            return _bad("'text_2' must be a string or a list of strings"), 0
        if len(text_1) not in (1, len(text_2)):
            return _bad(f"'text_1' has {len(text_1)} texts and 'text_2' {len(text_2)}: send one text_1, or "
                        "one per text_2"), 0
        err = self._model(data, served_only=True)
        if err:
            return err, 0
        limits = self.limits
        if len(text_2) > limits.max_documents:
            return _error(413, "max_documents", f"{len(text_2)} pairs exceed the limit of "
                                                f"{limits.max_documents} per request; split the request"), 0
        groups: dict[str, list[int]] = {text_1[0]: []} if len(text_1) == 1 else {}
        for i in range(len(text_2)):
            groups.setdefault(text_1[i if len(text_1) > 1 else 0], []).append(i)
        prepared = []
        for query, where in groups.items():
            p, err = await self.prepare(query, [text_2[i] for i in where], "text_2",
                                        instruction=data.get("instruction"))
            if err:
                return err, 0
            prepared.append(p)
        tokens = sum(p.tokens for p in prepared)
        if tokens > limits.max_request_tokens:
            return _error(413, "max_request_tokens", f"the request is {tokens} tokens of work, over the "
                                                     f"limit of {limits.max_request_tokens}; split the "
                                                     "request"), 0
        logits, err = await self.score(request, [p.split for p in prepared])
        if err:
            return err, 0
        out: list[dict[str, Any]] = [{} for _ in text_2]
        for p, where, raw in zip(prepared, groups.values(), logits):
            for i, score, cut in zip(where, self.reranker.calibrator(raw), p.truncated):
                out[i] = {"index": i, "object": "score", "score": float(score), "truncated": bool(cut),
                          "query_truncated": p.query_truncated}
        return {"id": f"score-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                "model": self.name, "data": out,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}
                }, len(text_2)


async def _disconnected(request: Any) -> None:
    """Returns when the client has gone (after the body was read, the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _add_routes(app: Any, service: _Service) -> None:
    from fastapi import Request
    from fastapi.responses import PlainTextResponse
    from starlette.exceptions import HTTPException

    reranker = service.reranker

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Any:  # 404, 405: the path's API's shape
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, kind, str(exc.detail), dict(exc.headers or {})).response(
            api_of(request.url.path))

    def endpoint(api: str) -> Any:
        async def rerank(request: Request) -> Any:
            return await service.run(request, api)

        return rerank

    for path, api in PATH_API.items():  # /v1/rerank, /v2/rerank, /rerank (TEI and vLLM), /score, /v1/score
        app.add_api_route(path, endpoint(api), methods=["POST"], name=f"{api}:{path}")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": service.name, "precision": reranker.precision, "pid": os.getpid()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": service.name, "object": "model", "owned_by": "memrerank",
                                            "family": reranker.family, "precision": reranker.precision}]}

    @app.get("/metrics")
    async def prometheus() -> Any:
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")


class _Published:
    """ASGI wrapper that leaves the metrics in the lifespan state, where the uvicorn protocol finds them."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan" and isinstance(scope.get("state"), dict):
            scope["state"][METRICS_STATE_KEY] = self.metrics
        await self.app(scope, receive, send)


def create_app(config: ServeConfig) -> Any:
    """The FastAPI application: loads the artifact once (see the module docstring for the API).

    ``app.state`` holds ``config``, ``reranker``, ``batcher``, ``metrics`` and ``limits``. The guard (Host
    allowlist, API key, content type) uses ``config`` as it is: a service bound beyond loopback
    takes ``config.bound_to(host)`` (:func:`serve` does).

    Raises:
        TypeError: ``config`` is not a :class:`ServeConfig`.
        ValueError: the serve extra (FastAPI) is not installed, or ``config.instruction`` is set for an
            artifact whose template has none.
    """
    if not isinstance(config, ServeConfig):
        raise TypeError(f"create_app takes a memrerank.serve.ServeConfig (ServeConfig(artifact, LoadOptions(...))), "
                        f"got {type(config).__name__}")
    try:
        from fastapi import FastAPI
    except ImportError as exc:
        raise ValueError(_SERVE_EXTRA) from exc

    reranker = config.load_reranker()
    if config.instruction is not None and not takes_instruction(reranker.manifest):
        raise ValueError(f"ServeConfig.instruction: {config.artifact} is a {reranker.family} artifact, whose "
                         "template has no instruction; leave it None")
    service = _Service(config, reranker)
    app = FastAPI(title="memrerank", version=__import__("memrerank").__version__)
    app.state.config, app.state.reranker, app.state.batcher = config, service.reranker, service.batcher
    app.state.metrics, app.state.limits = service.metrics, config.limits
    app.add_middleware(Guard, allowed_hosts=config.allowed_hosts, api_key=config.api_key, metrics=service.metrics)
    app.add_middleware(_Published, metrics=service.metrics)
    _add_routes(app, service)
    return app


def uvicorn_config(config: ServeConfig, app: Any, host: str = "127.0.0.1", port: int = 8080, **kwargs: Any) -> Any:
    """The ``uvicorn.Config`` that :func:`serve` runs: ``config``'s header timeout and connection cap in the HTTP
    protocol (:func:`memrerank.serve_guard.guarded_protocol`), keep-alive 5 s, warnings only. ``kwargs`` go to
    ``uvicorn.Config`` (``workers``, ``factory``)."""
    import uvicorn

    http = functools.partial(guarded_protocol, header_timeout_s=config.header_timeout_s,
                             max_connections=config.max_connections)
    return uvicorn.Config(app, host=host, port=check_port(port), http=http, timeout_keep_alive=5,
                          log_level="warning", **kwargs)


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 8080, workers: int = 1) -> None:
    """Run the service on ``host:port`` until interrupted (blocking).

    Args:
        config: what to serve and how (bound to ``host`` by :meth:`ServeConfig.bound_to`).
        host: bind address (loopback unless told; beyond loopback an API key or ``allow_unauthenticated`` is
            needed).
        port: TCP port, 1..65535.
        workers: server processes sharing the port; each loads the artifact once. With more than one, uvicorn
            spawns them and each builds its app from ``config`` (pickled with the app factory).

    Raises:
        ValueError: a port out of range, a non-loopback bind without a key, the serve extra missing.
    """
    if not isinstance(config, ServeConfig):
        raise TypeError(f"serve takes a memrerank.serve.ServeConfig, got {type(config).__name__}")
    check_positive_int(workers, "workers")
    check_port(port)
    config = config.bound_to(host)
    try:
        import uvicorn
        from uvicorn.supervisors import Multiprocess
    except ImportError as exc:
        raise ValueError(_SERVE_EXTRA) from exc
    if workers == 1:
        uvicorn.Server(uvicorn_config(config, create_app(config), host, port)).run()
        return
    # What uvicorn.run does for an import string and workers > 1, with the factory and its config as one
    # picklable partial instead: the supervisor binds the socket and loads nothing itself.
    uv_config = uvicorn_config(config, functools.partial(create_app, config), host, port, factory=True,
                               workers=workers)
    sock = uv_config.bind_socket()
    try:
        Multiprocess(uv_config, sockets=[sock]).run()
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
