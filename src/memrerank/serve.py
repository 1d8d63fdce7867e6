"""``memrerank serve``: a local rerank service over one artifact (FastAPI + uvicorn, the ``serve`` extra).

APIs clients already speak:

* Cohere / vLLM style ``POST /v1/rerank`` ``{"model", "query", "documents", "top_n", "return_documents"}`` →
  ``{"id", "model", "results": [{"index", "relevance_score", "document"?}], "usage": {...}}``;
* Cohere v2 ``POST /v2/rerank`` ``{"model", "query", "documents" (strings), "top_n", "max_tokens_per_doc"}``
  → ``{"id", "results": [{"index", "relevance_score"}], "meta": {"api_version": {"version": "2"},
  "billed_units": {"search_units": 1}}}`` (what ``cohere.ClientV2.rerank`` parses);
* Hugging Face TEI ``POST /rerank`` ``{"query", "texts", "raw_scores", "return_text", "truncate"}`` →
  ``[{"index", "score", "text"?}]``;
* ``GET /health``, ``GET /v1/models``, ``GET /metrics`` (Prometheus text: requests, pairs, latency histogram).

Each request is checked and tokenized once, in a worker thread, before it joins a batch: a wrong type or a query
that leaves no room for a document answers 422, a limit (documents per request, request bytes, tokens per
document) 413 with a JSON error naming it. Concurrent requests are then merged by a :class:`DynamicBatcher` (one
scoring thread; it waits at most ``max_wait_ms`` for more requests, up to ``max_batch_pairs`` pairs) and split
again per request; a merged call that fails is retried request by request, so one bad request never fails its
neighbours. Binds to 127.0.0.1 unless told.

Every setting travels as one :class:`ServeConfig`: the CLI builds it, :func:`create_app` and :func:`serve` take it,
``serve(config, workers=N)`` hands it to each worker process, and ``memrerank.scale`` gives it to each Ray Serve
replica.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request) at runtime.

import asyncio
import functools
import json
import math
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from memrerank.runtime.options import LoadOptions, check_positive_int

__all__ = ["DynamicBatcher", "Limits", "Metrics", "ServeConfig", "create_app", "serve"]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SERVE_EXTRA = "memrerank serve needs the serve extra: pip install 'memrerank[serve]'"
#: A service loads the fastest exported precision that met its fidelity budget unless told otherwise.
_DEFAULT_OPTIONS = LoadOptions(precision="auto")


@dataclass(frozen=True)
class Limits:
    """Per-request limits; exceeding one is an HTTP 413 naming it.

    Raises:
        ValueError: a limit that is not a positive integer (naming it).
    """

    max_documents: int = 1000
    max_request_bytes: int = 4 * 2**20
    max_tokens_per_document: int = 8192

    def __post_init__(self) -> None:
        for f in fields(self):
            check_positive_int(getattr(self, f.name), f"Limits.{f.name}")


@dataclass(frozen=True)
class ServeConfig:
    """Everything one rerank service needs: the artifact, how to load it, batching and request limits.

    Args:
        artifact: an artifact directory written by ``memrerank export`` (a ``Path`` is stored as ``str``).
        options: how each worker or replica loads the artifact (:class:`memrerank.LoadOptions`: precision,
            providers, threads, batch and token budgets, prefix reuse, ...). Default: ``precision="auto"``, the
            fastest exported precision that met its fidelity budget on the first provider (the CPU unless told).
        limits: per-request :class:`Limits`.
        max_wait_ms: dynamic batching: the longest a request waits for company (0 = each request alone).
        max_batch_pairs: dynamic batching: the most pairs merged into one model call.
        model_name: the name ``/v1/models`` and responses report (``None`` = the artifact directory's name).

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

    def __post_init__(self) -> None:
        if not isinstance(self.artifact, (str, os.PathLike)) or not os.fspath(self.artifact):
            raise TypeError(f"ServeConfig.artifact must be an artifact directory (str or Path), got "
                            f"{self.artifact!r}")
        object.__setattr__(self, "artifact", os.fspath(self.artifact))
        if not isinstance(self.options, LoadOptions):
            raise TypeError(f"ServeConfig.options must be a memrerank.LoadOptions, e.g. "
                            f"ServeConfig(artifact, LoadOptions(\"fp32\")), got {self.options!r}")
        check_positive_int(self.max_batch_pairs, "ServeConfig.max_batch_pairs")
        if not isinstance(self.limits, Limits):
            raise TypeError(f"ServeConfig.limits must be a memrerank.serve.Limits, got "
                            f"{type(self.limits).__name__}")
        wait = self.max_wait_ms
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not math.isfinite(wait) or wait < 0:
            raise ValueError(f"ServeConfig.max_wait_ms must be a number >= 0, got {wait!r}")
        if self.model_name is not None and (not isinstance(self.model_name, str) or not self.model_name):
            raise ValueError(f"ServeConfig.model_name must be a non-empty string or None, got {self.model_name!r}")

    def load_reranker(self) -> Any:
        """Load the artifact as ``options`` say (one :class:`memrerank.Reranker` per worker or replica)."""
        from memrerank import Reranker

        return Reranker.load(self.artifact, self.options)

    @property
    def name(self) -> str:
        """The model name the service reports."""
        return self.model_name or Path(self.artifact).resolve().name


class Metrics:
    """Counters and a latency histogram, rendered in Prometheus' text format."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.pairs = 0
        self.batches = 0
        self.retried = 0
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0

    def observe(self, endpoint: str, status: int, seconds: float, pairs: int) -> None:
        with self.lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1
            self.pairs += pairs
            self.latency_sum += seconds
            i = next((k for k, b in enumerate(LATENCY_BUCKETS) if seconds <= b), len(LATENCY_BUCKETS))
            self.buckets[i] += 1

    def render(self) -> str:
        with self.lock:
            lines = ["# TYPE memrerank_requests_total counter"]
            lines += [f'memrerank_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                      for (e, s), n in sorted(self.requests.items())]
            lines += ["# TYPE memrerank_pairs_total counter", f"memrerank_pairs_total {self.pairs}",
                      "# TYPE memrerank_batches_total counter", f"memrerank_batches_total {self.batches}",
                      "# TYPE memrerank_batches_retried_total counter",
                      f"memrerank_batches_retried_total {self.retried}",
                      "# TYPE memrerank_request_seconds histogram"]
            cum = 0
            for b, n in zip(LATENCY_BUCKETS, self.buckets):
                cum += n
                lines.append(f'memrerank_request_seconds_bucket{{le="{b}"}} {cum}')
            cum += self.buckets[-1]
            lines += [f'memrerank_request_seconds_bucket{{le="+Inf"}} {cum}',
                      f"memrerank_request_seconds_sum {self.latency_sum:.6f}",
                      f"memrerank_request_seconds_count {cum}"]
        return "\n".join(lines) + "\n"


class DynamicBatcher:
    """Merges concurrent scoring requests into one model call and splits the results again.

    Requests arrive tokenized (a :class:`~memrerank.runtime.encoding.SplitPairs` each, from
    ``reranker.encoder.split``), so nothing is tokenized twice and nothing here tokenizes on the event loop. One
    background thread owns the model calls; requests wait at most ``max_wait_ms`` for company, and a merged
    batch holds at most ``max_batch_pairs`` pairs (the reranker then cuts it by its own token budget).
    ``max_wait_ms=0`` scores each request alone (for comparison).

    A merged call that fails is retried one request at a time, so a request that breaks the model gets its own
    error and the requests that shared its batch get their results (``metrics.retried`` counts such batches).
    """

    def __init__(self, reranker: Any, max_batch_pairs: int = 256, max_wait_ms: float = 5.0,
                 metrics: Metrics | None = None) -> None:
        self.reranker = reranker
        self.max_batch_pairs = max_batch_pairs
        self.max_wait = max_wait_ms / 1e3
        self.metrics = metrics
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="memrerank-batcher", daemon=True)
        self._thread.start()

    async def score(self, split: Any) -> tuple[np.ndarray, np.ndarray]:
        """Raw logits and truncation flags for one request's documents.

        Args:
            split: the request tokenized by ``reranker.encoder.split(query, documents)``.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        self._queue.put((split, future, loop))
        return await future

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            items = [first]
            n = len(first[0].docs)
            deadline = time.perf_counter() + self.max_wait
            while self.max_wait > 0 and n < self.max_batch_pairs:  # max_wait_ms=0: strictly one request per call
                remaining = deadline - time.perf_counter()
                try:
                    item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                items.append(item)
                n += len(item[0].docs)
            results = self._score([split for split, _, _ in items])
            if self.metrics is not None:
                with self.metrics.lock:
                    self.metrics.batches += 1
            for (_, future, loop), result in zip(items, results):
                loop.call_soon_threadsafe(_deliver, future, result)

    def _score(self, splits: list[Any]) -> list[Any]:
        """Each request's ``(logits, truncated)``, or the exception scoring it alone raised."""
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
    if future.cancelled():
        return
    if isinstance(result, Exception):
        future.set_exception(result)
    else:
        future.set_result(result)



def _error(status: int, kind: str, message: str) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status)


class _Service:
    """The request side of one service: body reading under the limits, validation, and the rerank APIs.

    Each handler takes the Starlette request and returns ``(response, pairs scored)``; a response is a JSON-able
    value or a JSONResponse carrying an error.
    """

    def __init__(self, config: ServeConfig, reranker: Any) -> None:
        self.config, self.limits, self.reranker = config, config.limits, reranker
        self.name = config.name
        self.metrics = Metrics()
        self.batcher = DynamicBatcher(reranker, max_batch_pairs=config.max_batch_pairs,
                                      max_wait_ms=config.max_wait_ms, metrics=self.metrics)

    async def read_body(self, request: Any) -> tuple[dict[str, Any] | None, Any]:
        """The JSON object of the body, or an error response (413 over ``max_request_bytes``, 400, 422)."""
        cap = self.limits.max_request_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > cap:
            return None, _error(413, "max_request_bytes",
                                f"request body of {declared} bytes exceeds the limit of {cap} bytes")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > cap:
                return None, _error(413, "max_request_bytes", f"request body exceeds the limit of {cap} bytes")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return None, _error(400, "invalid_json", f"request body is not JSON: {exc}")
        if not isinstance(data, dict):
            return None, _error(422, "invalid_request", "request body must be a JSON object")
        return data, None

    async def prepare(self, query: Any, docs: Any, field: str, max_tokens: int | None = None) -> tuple[Any, Any]:
        """The request tokenized once, off the event loop, and checked before it joins a batch.

        Returns ``(split, None)`` — a :class:`~memrerank.runtime.encoding.SplitPairs` ready for the batcher — or
        ``(None, error response)``: 422 for a value of the wrong type or a query that leaves no room for a
        document in the model's input, 413 for a limit (naming it). ``max_tokens`` (v2's
        ``max_tokens_per_doc``) keeps each document's first ``max_tokens`` tokens, and the per-document token
        limit applies to what is kept. Tokens are the artifact tokenizer's ids of the document as the model reads
        it (for decoder templates, with the template's leading space).
        """
        limits = self.limits
        if not isinstance(query, str):
            return None, _error(422, "invalid_request", "'query' must be a string")
        if not isinstance(docs, list) or not docs:
            return None, _error(422, "invalid_request", f"'{field}' must be a non-empty list of strings")
        if len(docs) > limits.max_documents:
            return None, _error(413, "max_documents", f"{len(docs)} documents exceed the limit of "
                                                      f"{limits.max_documents} per request; split the request")
        bad = next((i for i, d in enumerate(docs) if not isinstance(d, str)), None)
        if bad is not None:
            return None, _error(422, "invalid_request", f"'{field}[{bad}]' must be a string")
        try:  # tokenizers releases the GIL: other requests and the batcher carry on meanwhile
            split = await asyncio.to_thread(self.reranker.encoder.split, query, docs)
        except ValueError as exc:  # the query cannot fit the model with the template
            return None, _error(422, "invalid_request", str(exc))
        if max_tokens is not None:
            split.docs = [d[:max_tokens] for d in split.docs]
        lengths = [len(d) for d in split.docs]
        worst = int(np.argmax(lengths))
        if lengths[worst] > limits.max_tokens_per_document:
            return None, _error(413, "max_tokens_per_document",
                                f"'{field}[{worst}]' has {lengths[worst]} tokens, over the limit of "
                                f"{limits.max_tokens_per_document}")
        return split, None

    async def score(self, split: Any) -> tuple[Any, Any, Any]:
        """``(logits, truncated, None)`` for one prepared request, or ``(None, None, error response)``.

        A ``TypeError``/``ValueError`` from scoring this request (alone, if its merged batch failed) is a 422;
        anything else propagates (a 500).
        """
        try:
            logits, truncated = await self.batcher.score(split)
        except (TypeError, ValueError) as exc:
            return None, None, _error(422, "invalid_request", str(exc))
        return logits, truncated, None

    async def timed(self, endpoint: str, handler: Any, request: Any) -> Any:
        """Run one handler and record its status, latency and pairs in the metrics."""
        t = time.perf_counter()
        response, pairs = await handler(request)
        status = getattr(response, "status_code", 200)
        self.metrics.observe(endpoint, status, time.perf_counter() - t, pairs)
        return response

    async def cohere(self, request: Any) -> tuple[Any, int]:
        """``POST /v1/rerank``: calibrated relevance scores, best first, ``top_n`` of them."""
        data, err = await self.read_body(request)
        if err:
            return err, 0
        query, docs = data.get("query"), data.get("documents")
        if isinstance(docs, list):  # Cohere also accepts {"text": ...} objects
            docs = [d.get("text") if isinstance(d, dict) else d for d in docs]
        top_n = data.get("top_n")
        if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1):
            return _error(422, "invalid_request", "'top_n' must be a positive integer"), 0
        split, err = await self.prepare(query, docs, "documents")
        if err:
            return err, 0
        logits, _, err = await self.score(split)
        if err:
            return err, 0
        probs = self.reranker.calibrator(logits)
        results = []
        for i in np.argsort(-logits, kind="stable")[: top_n or len(docs)]:
            item: dict[str, Any] = {"index": int(i), "relevance_score": float(probs[i])}
            if data.get("return_documents"):
                item["document"] = {"text": docs[i]}
            results.append(item)
        return {"id": str(uuid.uuid4()), "model": data.get("model") or self.name, "results": results,
                "usage": {"search_units": 1, "documents": len(docs)}}, len(docs)

    async def cohere_v2(self, request: Any) -> tuple[Any, int]:
        """``POST /v2/rerank`` (Cohere v2): calibrated relevance scores, best first, ``top_n`` of them.

        ``max_tokens_per_doc`` keeps each document's first that many tokens (see :meth:`prepare`); without it a
        document is scored as v1 scores it (the model's own max length applies either way).
        """
        data, err = await self.read_body(request)
        if err:
            return err, 0
        query, docs = data.get("query"), data.get("documents")
        for key in ("top_n", "max_tokens_per_doc"):
            value = data.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                return _error(422, "invalid_request", f"'{key}' must be a positive integer"), 0
        split, err = await self.prepare(query, docs, "documents", max_tokens=data.get("max_tokens_per_doc"))
        if err:
            return err, 0
        logits, _, err = await self.score(split)
        if err:
            return err, 0
        probs = self.reranker.calibrator(logits)
        order = np.argsort(-logits, kind="stable")[: data.get("top_n") or len(docs)]
        results = [{"index": int(i), "relevance_score": float(probs[i])} for i in order]
        return {"id": str(uuid.uuid4()), "results": results,
                "meta": {"api_version": {"version": "2"}, "billed_units": {"search_units": 1}}}, len(docs)

    async def tei(self, request: Any) -> tuple[Any, int]:
        """``POST /rerank`` (Hugging Face TEI): every text's score, best first; 413 if truncate is false and a
        text does not fit the model."""
        data, err = await self.read_body(request)
        if err:
            return err, 0
        query, docs = data.get("query"), data.get("texts")
        split, err = await self.prepare(query, docs, "texts")
        if err:
            return err, 0
        if data.get("truncate") is False and (truncated := split.truncated).any():
            i = int(np.argmax(truncated))
            return _error(413, "max_tokens_per_document", f"'texts[{i}]' does not fit the model's max length "
                                                          "and truncate is false"), 0
        logits, _, err = await self.score(split)
        if err:
            return err, 0
        scores = logits if data.get("raw_scores") else self.reranker.calibrator(logits)
        out = []
        for i in np.argsort(-logits, kind="stable"):
            item = {"index": int(i), "score": float(scores[i])}
            if data.get("return_text"):
                item["text"] = docs[i]
            out.append(item)
        return out, len(docs)


def _add_routes(app: Any, service: _Service) -> None:
    from fastapi import Request
    from fastapi.responses import PlainTextResponse

    reranker = service.reranker

    @app.post("/v1/rerank")
    async def v1_rerank(request: Request) -> Any:
        return await service.timed("/v1/rerank", service.cohere, request)

    @app.post("/v2/rerank")
    async def v2_rerank(request: Request) -> Any:
        return await service.timed("/v2/rerank", service.cohere_v2, request)

    @app.post("/rerank")
    async def tei_rerank(request: Request) -> Any:
        return await service.timed("/rerank", service.tei, request)

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


def create_app(config: ServeConfig) -> Any:
    """The FastAPI application: loads the artifact once (see the module docstring for the API).

    ``app.state`` holds ``config``, ``reranker``, ``batcher``, ``metrics`` and ``limits``.

    Raises:
        TypeError: ``config`` is not a :class:`ServeConfig`.
        ValueError: the serve extra (FastAPI) is not installed.
    """
    if not isinstance(config, ServeConfig):
        raise TypeError(f"create_app takes a memrerank.serve.ServeConfig (ServeConfig(artifact, LoadOptions(...))), "
                        f"got {type(config).__name__}")
    try:
        from fastapi import FastAPI
    except ImportError as exc:
        raise ValueError(_SERVE_EXTRA) from exc

    service = _Service(config, config.load_reranker())
    app = FastAPI(title="memrerank", version=__import__("memrerank").__version__)
    app.state.config, app.state.reranker, app.state.batcher = config, service.reranker, service.batcher
    app.state.metrics, app.state.limits = service.metrics, config.limits
    _add_routes(app, service)
    return app


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 8080, workers: int = 1) -> None:
    """Run the service on ``host:port`` until interrupted (blocking).

    Args:
        config: what to serve and how.
        host: bind address (loopback unless told).
        port: TCP port.
        workers: server processes sharing the port; each loads the artifact once. With more than one, uvicorn
            spawns them and each builds its app from ``config`` (pickled with the app factory).
    """
    if not isinstance(config, ServeConfig):
        raise TypeError(f"serve takes a memrerank.serve.ServeConfig, got {type(config).__name__}")
    check_positive_int(workers, "workers")
    try:
        import uvicorn
        from uvicorn.supervisors import Multiprocess
    except ImportError as exc:
        raise ValueError(_SERVE_EXTRA) from exc
    if workers == 1:
        uvicorn.run(create_app(config), host=host, port=port, log_level="warning")
        return
    # What uvicorn.run does for an import string and workers > 1, with the factory and its config as one
    # picklable partial instead: the supervisor binds the socket and loads nothing itself.
    uv_config = uvicorn.Config(functools.partial(create_app, config), factory=True, host=host, port=port,
                               workers=workers, log_level="warning")
    sock = uv_config.bind_socket()
    try:
        Multiprocess(uv_config, sockets=[sock]).run()
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
