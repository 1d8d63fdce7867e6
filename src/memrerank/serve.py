"""``memrerank serve``: a local rerank service over one artifact (FastAPI + uvicorn, the ``serve`` extra).

APIs clients already speak:

* Cohere / vLLM style ``POST /v1/rerank`` ``{"model", "query", "documents", "top_n", "return_documents"}`` →
  ``{"id", "model", "results": [{"index", "relevance_score", "document"?}], "usage": {...}}``;
* Hugging Face TEI ``POST /rerank`` ``{"query", "texts", "raw_scores", "return_text", "truncate"}`` →
  ``[{"index", "score", "text"?}]``;
* ``GET /health``, ``GET /v1/models``, ``GET /metrics`` (Prometheus text: requests, pairs, latency histogram).

Concurrent requests are merged by a :class:`DynamicBatcher` (one scoring thread; it waits at most ``max_wait_ms``
for more requests, up to ``max_batch_pairs`` pairs) and split again per request. Limits (documents per request,
request bytes, tokens per document) answer 413 with a JSON error naming the limit. Binds to 127.0.0.1 unless told.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request) at runtime.

import asyncio
import json
import os
import queue
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Limits", "DynamicBatcher", "Metrics", "create_app", "serve"]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class Limits:
    """Per-request limits; exceeding one is an HTTP 413 naming it."""

    max_documents: int = 1000
    max_request_bytes: int = 4 * 2**20
    max_tokens_per_document: int = 8192


class Metrics:
    """Counters and a latency histogram, rendered in Prometheus' text format."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.pairs = 0
        self.batches = 0
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

    One background thread owns the model calls; requests wait at most ``max_wait_ms`` for company, and a merged
    batch holds at most ``max_batch_pairs`` pairs (the reranker then cuts it by its own token budget).
    ``max_wait_ms=0`` scores each request alone (for comparison).
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

    async def score(self, query: str, documents: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Raw logits and truncation flags for one request's documents."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        self._queue.put((query, documents, future, loop))
        return await future

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            items = [first]
            n = len(first[1])
            deadline = time.perf_counter() + self.max_wait
            while self.max_wait > 0 and n < self.max_batch_pairs:  # max_wait_ms=0: strictly one request per call
                remaining = deadline - time.perf_counter()
                try:
                    item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                items.append(item)
                n += len(item[1])
            pairs = [(q, d) for q, docs, _, _ in items for d in docs]
            try:
                logits, truncated = self.reranker.predict(pairs, raw=True, return_truncated=True)
                results: list[Any] = []
                start = 0
                for _, docs, _, _ in items:
                    results.append((logits[start:start + len(docs)], truncated[start:start + len(docs)]))
                    start += len(docs)
            except Exception as exc:  # noqa: BLE001 - delivered to every waiting request
                results = [exc] * len(items)
            if self.metrics is not None:
                with self.metrics.lock:
                    self.metrics.batches += 1
            for (_, _, future, loop), result in zip(items, results):
                loop.call_soon_threadsafe(_deliver, future, result)


def _deliver(future: asyncio.Future, result: Any) -> None:
    if future.cancelled():
        return
    if isinstance(result, Exception):
        future.set_exception(result)
    else:
        future.set_result(result)


def create_app(artifact: str | Path, precision: str = "auto", *, limits: Limits = Limits(),
               max_wait_ms: float = 5.0, max_batch_pairs: int = 256, threads: int | None = None,
               model_name: str | None = None) -> Any:
    """The FastAPI application (load the artifact once; see the module docstring for the API)."""
    try:
        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse, PlainTextResponse
    except ImportError as exc:
        raise ValueError("memrerank serve needs the serve extra: pip install 'memrerank[serve]'") from exc
    from memrerank import Reranker
    from memrerank.runtime.encoding import utf8_safe

    reranker = Reranker.load(artifact, precision=precision, threads=threads)
    name = model_name or Path(artifact).resolve().name
    metrics = Metrics()
    batcher = DynamicBatcher(reranker, max_batch_pairs=max_batch_pairs, max_wait_ms=max_wait_ms, metrics=metrics)
    app = FastAPI(title="memrerank", version=__import__("memrerank").__version__)
    app.state.reranker, app.state.batcher, app.state.metrics, app.state.limits = reranker, batcher, metrics, limits

    def error(status: int, kind: str, message: str) -> JSONResponse:
        return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status)

    async def read_body(request: Request) -> tuple[dict[str, Any] | None, JSONResponse | None]:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limits.max_request_bytes:
            return None, error(413, "max_request_bytes", f"request body of {declared} bytes exceeds the limit of "
                                                         f"{limits.max_request_bytes} bytes")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_request_bytes:
                return None, error(413, "max_request_bytes",
                                   f"request body exceeds the limit of {limits.max_request_bytes} bytes")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return None, error(400, "invalid_json", f"request body is not JSON: {exc}")
        if not isinstance(data, dict):
            return None, error(422, "invalid_request", "request body must be a JSON object")
        return data, None

    def check_docs(query: Any, docs: Any, field: str, truncate: bool = True) -> JSONResponse | None:
        if not isinstance(query, str):
            return error(422, "invalid_request", "'query' must be a string")
        if not isinstance(docs, list) or not docs:
            return error(422, "invalid_request", f"'{field}' must be a non-empty list of strings")
        if len(docs) > limits.max_documents:
            return error(413, "max_documents", f"{len(docs)} documents exceed the limit of {limits.max_documents} "
                                               "per request; split the request")
        bad = next((i for i, d in enumerate(docs) if not isinstance(d, str)), None)
        if bad is not None:
            return error(422, "invalid_request", f"'{field}[{bad}]' must be a string")
        lengths = [len(e.ids) for e in reranker.tokenizer.encode_batch(
            [utf8_safe(d) for d in docs], add_special_tokens=False)]
        worst = int(np.argmax(lengths))
        if lengths[worst] > limits.max_tokens_per_document:
            return error(413, "max_tokens_per_document", f"'{field}[{worst}]' has {lengths[worst]} tokens, over the "
                                                         f"limit of {limits.max_tokens_per_document}")
        return None

    async def timed(endpoint: str, handler: Any, request: Request) -> Any:
        t = time.perf_counter()
        response, pairs = await handler(request)
        status = getattr(response, "status_code", 200)
        metrics.observe(endpoint, status, time.perf_counter() - t, pairs)
        return response

    async def cohere(request: Request) -> tuple[Any, int]:
        data, err = await read_body(request)
        if err:
            return err, 0
        query, docs = data.get("query"), data.get("documents")
        if isinstance(docs, list):  # Cohere also accepts {"text": ...} objects
            docs = [d.get("text") if isinstance(d, dict) else d for d in docs]
        if (err := check_docs(query, docs, "documents")) is not None:
            return err, 0
        top_n = data.get("top_n")
        if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1):
            return error(422, "invalid_request", "'top_n' must be a positive integer"), 0
        try:
            logits, _ = await batcher.score(query, docs)
        except (TypeError, ValueError) as exc:
            return error(422, "invalid_request", str(exc)), 0
        probs = reranker.calibrator(logits)
        order = np.argsort(-logits, kind="stable")[: top_n or len(docs)]
        results = []
        for i in order:
            item: dict[str, Any] = {"index": int(i), "relevance_score": float(probs[i])}
            if data.get("return_documents"):
                item["document"] = {"text": docs[i]}
            results.append(item)
        return {"id": str(uuid.uuid4()), "model": data.get("model") or name, "results": results,
                "usage": {"search_units": 1, "documents": len(docs)}}, len(docs)

    async def tei(request: Request) -> tuple[Any, int]:
        data, err = await read_body(request)
        if err:
            return err, 0
        query, docs = data.get("query"), data.get("texts")
        if (err := check_docs(query, docs, "texts")) is not None:
            return err, 0
        try:
            logits, truncated = await batcher.score(query, docs)
        except (TypeError, ValueError) as exc:
            return error(422, "invalid_request", str(exc)), 0
        if data.get("truncate") is False and truncated.any():
            i = int(np.argmax(truncated))
            return error(413, "max_tokens_per_document", f"'texts[{i}]' does not fit the model's max length "
                                                         "and truncate is false"), 0
        scores = logits if data.get("raw_scores") else reranker.calibrator(logits)
        order = np.argsort(-logits, kind="stable")
        out = []
        for i in order:
            item = {"index": int(i), "score": float(scores[i])}
            if data.get("return_text"):
                item["text"] = docs[i]
            out.append(item)
        return out, len(docs)

    @app.post("/v1/rerank")
    async def v1_rerank(request: Request) -> Any:
        return await timed("/v1/rerank", cohere, request)

    @app.post("/rerank")
    async def tei_rerank(request: Request) -> Any:
        return await timed("/rerank", tei, request)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": name, "precision": reranker.precision, "pid": os.getpid()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "memrerank",
                                            "family": reranker.family, "precision": reranker.precision}]}

    @app.get("/metrics")
    async def prometheus() -> Any:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    return app


def app_from_env() -> Any:
    """uvicorn factory for ``--workers N`` (each worker process loads the artifact once)."""
    cfg = json.loads(os.environ["MEMRERANK_SERVE_CONFIG"])
    return create_app(cfg["artifact"], cfg["precision"], limits=Limits(**cfg["limits"]),
                      max_wait_ms=cfg["max_wait_ms"], max_batch_pairs=cfg["max_batch_pairs"], threads=cfg["threads"])


def serve(artifact: str | Path, host: str = "127.0.0.1", port: int = 8080, precision: str = "auto",
          workers: int = 1, limits: Limits = Limits(), max_wait_ms: float = 5.0, max_batch_pairs: int = 256,
          threads: int | None = None) -> None:
    """Run the service (blocking)."""
    try:
        import uvicorn
    except ImportError as exc:
        raise ValueError("memrerank serve needs the serve extra: pip install 'memrerank[serve]'") from exc
    if workers > 1:
        os.environ["MEMRERANK_SERVE_CONFIG"] = json.dumps({
            "artifact": str(artifact), "precision": precision, "limits": asdict(limits), "max_wait_ms": max_wait_ms,
            "max_batch_pairs": max_batch_pairs, "threads": threads})
        uvicorn.run("memrerank.serve:app_from_env", factory=True, host=host, port=port, workers=workers,
                    log_level="warning")
    else:
        uvicorn.run(create_app(artifact, precision, limits=limits, max_wait_ms=max_wait_ms,
                               max_batch_pairs=max_batch_pairs, threads=threads), host=host, port=port,
                    log_level="warning")
