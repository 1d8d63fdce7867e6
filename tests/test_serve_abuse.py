"""``memrerank serve`` against a hostile client and a careless operator (issue 27), for real: uvicorn with
memrerank's protocol on a loopback port, requests over HTTP (httpx) and raw sockets.

Each test is one observation of the audit, turned into the promise that answers it:

* a small request is not starved by a big one (the batcher splits requests into interleaved steps);
* slow uploaders and connection floods are cut off (header and body timeouts, connection and in-flight caps, a
  bounded queue answering 503 with ``Retry-After``);
* a request holds its ids cut to the model's length, and a request's work is bounded (``max_request_tokens``);
* callers are authenticated when a key is set; browsers cannot drive the service (JSON content type, Host and
  Origin allowlists); a non-loopback bind needs a key or an explicit flag;
* every error is JSON in its API's shape and counted in ``/metrics`` (deep JSON, huge integers, a bug, a
  disconnect);
* ``serve --port`` outside 1..65535 is a one-line error.
"""

from __future__ import annotations

import contextlib
import json
import re
import select
import socket
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from servers import free_port, running
from texts import DOCS

from memrerank import LoadOptions, Reranker
from memrerank.serve import Limits, ServeConfig, create_app, serve, uvicorn_config


# ------------------------------------------------------------------------------------------------------ helpers
@contextlib.contextmanager
def _serving(config: ServeConfig):
    """``config``'s app on a free loopback port, run as :func:`memrerank.serve.serve` runs it (memrerank's uvicorn
    protocol: header timeout, connection cap); yields ``(url, port, app)``."""
    app = create_app(config)
    port = free_port()
    with running(uvicorn.Server(uvicorn_config(config, app, "127.0.0.1", port))):
        yield f"http://127.0.0.1:{port}", port, app


def _config(artifact, **kw) -> ServeConfig:
    return ServeConfig(artifact, LoadOptions("fp32"), **kw)


class SlowModel:
    """Wraps ``reranker.backend.score``: each call sleeps ``delay`` s (and waits for ``gate`` when set) and keeps
    its ``input_ids``."""

    def __init__(self, monkeypatch, reranker, delay: float = 0.0, gate: threading.Event | None = None):
        self.inputs: list[np.ndarray] = []
        self.entered = threading.Event()
        score = reranker.backend.score

        def slow(input_ids, *args, **kwargs):
            self.inputs.append(input_ids.copy())
            self.entered.set()
            if gate is not None:
                assert gate.wait(60), "the test never opened the gate"
            time.sleep(delay)
            return score(input_ids, *args, **kwargs)

        monkeypatch.setattr(reranker.backend, "score", slow)

    def rows_with(self, head: np.ndarray) -> list[bool]:
        """Per call so far: whether it holds a row starting with ``head`` (right padding: BERT)."""
        n = len(head)
        return [bool(x.shape[1] >= n and np.all(x[:, :n] == head, axis=1).any()) for x in self.inputs]


def _head(reranker, query: str) -> np.ndarray:
    return reranker.encoder.split(query, []).head


def _metric(url: str, endpoint: str, status: int, headers=None) -> int:
    text = httpx.get(f"{url}/metrics", headers=headers).text
    m = re.search(rf'memrerank_requests_total{{endpoint="{re.escape(endpoint)}",status="{status}"}} (\d+)', text)
    return int(m.group(1)) if m else 0


def _gauge(url: str, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", httpx.get(f"{url}/metrics").text, re.MULTILINE)
    return float(m.group(1)) if m else float("nan")


def _until(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _raw(port: int, data: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    if data:
        s.sendall(data)
    return s


def _read_all(s: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (or ``timeout`` passes: what came so far)."""
    s.settimeout(timeout)
    out = b""
    deadline = time.time() + timeout
    with contextlib.suppress(OSError):
        while time.time() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
    return out


def _message(body: dict) -> str:
    """The message of an error body, asserting the body is one of the APIs' shapes: Cohere's
    ``{"message"}``, ``/v1/rerank``'s ``{"message", "detail"}``, TEI's ``{"error", "error_type"}``, FastAPI's
    ``{"detail"}``."""
    if "error_type" in body:
        assert set(body) == {"error", "error_type"}, body
        return body["error"]
    assert set(body) in ({"message"}, {"detail"}, {"message", "detail"}), body
    return body.get("message") or body["detail"]


def _json_error(raw: bytes) -> tuple[int, str, dict]:
    """``(status, message, headers)`` of one raw HTTP response; asserts the body is an API's error shape."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    assert headers.get("content-type", "").startswith("application/json"), raw[:300]
    return status, _message(json.loads(body)), headers


def _post_head(port: int, length: int, path: str = "/v1/rerank") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def _assert_error_shape(r, status: int, says: str) -> str:
    """Asserts a JSON error of ``status`` in its API's shape whose message holds ``says``; returns the
    message."""
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json"), r.text[:300]
    message = _message(r.json())
    assert says in message, message
    return message


# ------------------------------------------------------------------------------ fairness: no starvation by size
def test_a_small_request_is_not_starved_by_a_big_one(bert_artifact, monkeypatch):
    """Observed: after a 1,000-document request, a 1-document request waited for all of it (8.5 s). Now the
    batcher scores the big request in steps of about one model call, taking a fair share of every waiting
    request in turn: the small request is scored in a model call before the big one's last and answered while the
    big one is still being scored; both get the scores ``Reranker`` gives."""
    with _serving(_config(bert_artifact)) as (url, _, app):
        reranker = app.state.reranker
        model = SlowModel(monkeypatch, reranker, delay=0.05)
        big_docs = [f"{DOCS[i % len(DOCS)]} ({i})" for i in range(1000)]
        big: dict = {}

        def send_big():
            with httpx.Client(timeout=300) as c:
                big["r"] = c.post(f"{url}/rerank", json={"query": "big query", "texts": big_docs,
                                                         "raw_scores": True})
            big["done"] = time.perf_counter()

        thread = threading.Thread(target=send_big)
        thread.start()
        _until(lambda: len(model.inputs) >= 2, what="the big request's first model calls")
        small = httpx.post(f"{url}/rerank", json={"query": "small query", "texts": [DOCS[3]], "raw_scores": True},
                           timeout=300)
        small_done = time.perf_counter()
        assert thread.is_alive(), "the big request finished before the small one was answered"
        thread.join(300)
        assert small.status_code == 200 and big["r"].status_code == 200
        assert small_done < big["done"]
        ref = Reranker.load(bert_artifact, LoadOptions("fp32"))
        assert small.json()[0]["score"] == pytest.approx(float(ref.predict([("small query", DOCS[3])], raw=True)[0]),
                                                         abs=1e-4)
        got = {x["index"]: x["score"] for x in big["r"].json()}
        picks = [0, 1, 499, 998, 999]
        want = ref.predict([("big query", big_docs[i]) for i in picks], raw=True)
        np.testing.assert_allclose([got[i] for i in picks], want, atol=1e-4)
        small_calls = model.rows_with(_head(reranker, "small query"))
        big_calls = model.rows_with(_head(reranker, "big query"))
        first_small = small_calls.index(True)
        last_big = len(big_calls) - 1 - big_calls[::-1].index(True)
        assert first_small < last_big, "the small request was scored only after the whole big one"
        assert sum(big_calls) >= 10, "the big request was split over many model calls"


# ------------------------------------------------------------------- slow clients, floods and a bounded queue
def test_slow_uploaders_get_a_json_408_and_are_closed(bert_artifact):
    """Observed: 50 connections each sending half a body (or half its headers) were all still open after 70 s.
    Now a request's headers must arrive within ``header_timeout_s`` and its body within ``body_timeout_s``: each
    gets a JSON 408 and its connection is closed, while a normal client is served."""
    config = _config(bert_artifact, header_timeout_s=1.0, body_timeout_s=1.0)
    with _serving(config) as (url, port, _):
        body = json.dumps({"query": "q", "documents": DOCS[:3]}).encode()
        half_body = [_raw(port, _post_head(port, len(body)) + body[: len(body) // 2]) for _ in range(25)]
        half_head = [_raw(port, _post_head(port, len(body))[:40]) for _ in range(25)]
        assert httpx.post(f"{url}/v1/rerank", json={"query": "q", "documents": DOCS[:3]}).status_code == 200
        deadline = time.time() + 30
        for socks, says in ((half_body, "request body not received"),
                            (half_head, "request headers not received")):
            for s in socks:
                raw = _read_all(s, max(0.1, deadline - time.time()))
                assert raw, f"{says}: the connection got no answer"
                status, message, headers = _json_error(raw)
                assert status == 408 and says in message and headers.get("connection") == "close"
                s.close()
        assert _metric(url, "/v1/rerank", 408) == 25 and _metric(url, "other", 408) == 25
        big_head = _raw(port, b"GET /health HTTP/1.1\r\nX-Filler: " + b"a" * 70_000)
        status, message, _ = _json_error(_read_all(big_head, 10))
        assert status == 431 and "request line and headers exceed" in message
        big_head.close()


def test_connections_beyond_the_cap_get_a_json_503(bert_artifact):
    """Connections beyond ``max_connections`` get a JSON 503 with ``Retry-After`` (uvicorn's own
    ``limit_concurrency`` answers plain text); once they close, the service answers again."""
    with _serving(_config(bert_artifact, max_connections=3, header_timeout_s=30)) as (url, port, _):
        idle = [_raw(port, b"") for _ in range(3)]
        time.sleep(0.3)
        r = httpx.post(f"{url}/v1/rerank", json={"query": "q", "documents": ["d"]})
        _assert_error_shape(r, 503, "too many open connections")
        assert r.headers["retry-after"] == "1"
        for s in idle:
            s.close()
        _until(lambda: httpx.get(f"{url}/health").status_code == 200, what="the idle connections to close")
        assert httpx.post(f"{url}/v1/rerank", json={"query": "q", "documents": ["d"]}).status_code == 200


def test_requests_beyond_max_concurrency_get_a_json_503_with_retry_after(bert_artifact, monkeypatch):
    """Requests being scored are capped: with 2 requests held in the model a third gets 503 at once, with
    ``Retry-After``; ``/health`` still answers; once the two are done the service answers again."""
    gate = threading.Event()
    with _serving(_config(bert_artifact, max_concurrency=2)) as (url, _, app):
        SlowModel(monkeypatch, app.state.reranker, gate=gate)
        held: list = []
        threads = [threading.Thread(target=lambda: held.append(httpx.post(
            f"{url}/v1/rerank", json={"query": "q", "documents": DOCS[:2]}, timeout=120))) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            _until(lambda: _gauge(url, "memrerank_requests_in_flight") == 2, what="two requests in flight")
            t0 = time.perf_counter()
            r = httpx.post(f"{url}/v1/rerank", json={"query": "q", "documents": ["d"]}, timeout=30)
            assert time.perf_counter() - t0 < 10  # answered at once, not after the held ones
            _assert_error_shape(r, 503, "requests being scored, the limit is 2")
            assert int(r.headers["retry-after"]) >= 1
            assert httpx.get(f"{url}/health").status_code == 200
        finally:
            gate.set()
            for t in threads:
                t.join(60)
        assert [x.status_code for x in held] == [200, 200]
        assert httpx.post(f"{url}/v1/rerank", json={"query": "q", "documents": ["d"]}).status_code == 200
        assert _metric(url, "/v1/rerank", 503) == 1


def test_slow_uploads_hold_no_scoring_slot_and_bodies_share_a_byte_budget(bert_artifact):
    """A slow upload holds a connection, not a scoring slot: with 3 slow uploads open and ``max_concurrency=2``
    a normal request is served. Bodies being received share ``max_concurrency`` × ``max_request_bytes`` bytes:
    uploads beyond it get a JSON 503; a client that goes away mid-body is counted as 499 and frees its bytes."""
    limits = Limits(max_request_bytes=1000)
    with _serving(_config(bert_artifact, max_concurrency=2, limits=limits, body_timeout_s=30)) as (url, port, _):
        head = _post_head(port, 1000)
        slow = [_raw(port, head + b"x" * 100) for _ in range(3)]
        _until(lambda: _gauge(url, "memrerank_buffered_body_bytes") == 300, what="three slow uploads")
        assert httpx.post(f"{url}/v1/rerank", json={"query": "q", "documents": ["d"]}).status_code == 200
        for s in slow:  # 3 × 900 bytes (each within its 1,000) is past the shared 2 × 1,000
            s.sendall(b"x" * 800)
        select.select(slow, [], [], 10)
        time.sleep(0.5)
        over = select.select(slow, [], [], 0)[0]
        assert len(over) == 1, "the upload past the byte budget was not refused"
        for s in over:
            status, message, headers = _json_error(_read_all(s, 10))
            assert status == 503 and "request bodies being received" in message
            assert headers["retry-after"] == "1"
        for s in slow:
            s.close()
        _until(lambda: _gauge(url, "memrerank_buffered_body_bytes") == 0, what="the bytes to be freed")
        assert _metric(url, "/v1/rerank", 499) == 3 - len(over)
        assert httpx.post(f"{url}/v1/rerank", json={"query": "q", "documents": ["d"]}).status_code == 200


def test_the_queue_is_bounded_and_answers_503_with_retry_after(bert_artifact, monkeypatch):
    """Observed: the queue was unbounded. Now a request that would take the queued work past
    ``max_queued_tokens`` gets 503 ``queue_full`` with ``Retry-After`` at once; once the queue drains, the same
    request is served. The bound holds two largest requests (checked when the config is made)."""
    with pytest.raises(ValueError, match=r"ServeConfig\.max_queued_tokens .* twice limits\.max_request_tokens"):
        _config(bert_artifact, max_queued_tokens=1000)
    gate = threading.Event()
    config = _config(bert_artifact, max_queued_tokens=150, limits=Limits(max_request_tokens=75), max_wait_ms=0)
    one = {"query": "q", "documents": [DOCS[-1]]}  # one document past the model's length: 64 tokens
    with _serving(config) as (url, _, app):
        model = SlowModel(monkeypatch, app.state.reranker, gate=gate)
        answers: list = []

        def send():
            answers.append(httpx.post(f"{url}/v1/rerank", json=one, timeout=120))

        threads = [threading.Thread(target=send) for _ in range(2)]
        try:
            threads[0].start()
            assert model.entered.wait(30)
            threads[1].start()
            _until(lambda: app.state.batcher.queued_tokens == 128, what="two requests queued")
            r = httpx.post(f"{url}/v1/rerank", json=one, timeout=30)
            _assert_error_shape(r, 503, "the limit is 150")
            assert int(r.headers["retry-after"]) >= 1
        finally:
            gate.set()
            for t in threads:
                t.join(60)
        assert [a.status_code for a in answers] == [200, 200]
        assert httpx.post(f"{url}/v1/rerank", json=one).status_code == 200
        assert app.state.batcher.queued_tokens == 0 and _metric(url, "/v1/rerank", 503) == 1


def test_a_client_that_disconnects_leaves_the_queue(bert_artifact, monkeypatch):
    """A big request whose client goes away while it is being scored stops being scored: its remaining steps
    leave the queue (queued tokens back to 0) and it is counted as 499."""
    gate = threading.Event()
    with _serving(_config(bert_artifact, max_wait_ms=0)) as (url, port, app):
        model = SlowModel(monkeypatch, app.state.reranker, gate=gate)
        body = json.dumps({"query": "q", "texts": [f"{DOCS[i % 9]} {i}" for i in range(600)]}).encode()
        s = _raw(port, _post_head(port, len(body), "/rerank") + body)
        try:
            assert model.entered.wait(60)
            s.close()
            _until(lambda: _metric(url, "/rerank", 499) == 1, what="the disconnect to be seen")
        finally:
            gate.set()
        _until(lambda: app.state.batcher.queued_tokens == 0, what="the queue to drain")
        rows = sum(len(x) for x in model.inputs)
        assert rows <= app.state.config.max_batch_pairs < 600, "the gone client's request kept being scored"


# ------------------------------------------------------------------------------------ memory per request bounded
def test_a_request_holds_its_ids_cut_to_the_model_length(bert_artifact, monkeypatch):
    """Observed: one valid 4 MB request held +266 MiB as untruncated token lists. Now each document's ids are
    cut to the model's length (its truncation flag kept beside them) before the request is queued, so
    what a queued request holds is bounded by ``max_documents`` × the model's length; its scores are unchanged."""
    with _serving(_config(bert_artifact)) as (url, _, app):
        reranker = app.state.reranker
        seen: list[int] = []
        score_split = reranker.score_split

        def recording(splits, *args, **kwargs):
            for sp in splits:
                seen.append(max(len(d) for d in sp.docs) - sp.budget)
            return score_split(splits, *args, **kwargs)

        monkeypatch.setattr(reranker, "score_split", recording)
        docs = [(f"{i} " + DOCS[i % len(DOCS)] + " ") * 400 for i in range(1000)]
        docs = [d[:4000] for d in docs]
        assert 3.9e6 < len(json.dumps({"query": "q", "texts": docs})) < 4 * 2**20
        r = httpx.post(f"{url}/rerank", json={"query": "q", "texts": docs, "raw_scores": True}, timeout=300)
        assert r.status_code == 200
        assert seen and max(seen) <= 0, "a queued request held more ids than the model reads"
        got = {x["index"]: x["score"] for x in r.json()}
        ref = Reranker.load(bert_artifact, LoadOptions("fp32"))
        picks = [0, 7, 999]
        np.testing.assert_allclose([got[i] for i in picks], ref.predict([("q", docs[i]) for i in picks], raw=True),
                                   atol=1e-4)


def test_a_request_over_the_token_budget_is_a_413(bert_artifact):
    """``max_request_tokens`` bounds a request's work (tokens the model reads, documents cut to its length)."""
    with _serving(_config(bert_artifact, limits=Limits(max_request_tokens=500))) as (url, _, _app):
        r = httpx.post(f"{url}/v1/rerank", json={"query": "q", "documents": [DOCS[-1]] * 40})
        _assert_error_shape(r, 413, "over the limit of 500")
        assert httpx.post(f"{url}/v1/rerank", json={"query": "q", "documents": DOCS[:2]}).status_code == 200


# ------------------------------------------------------------------------------- authentication and browsers
def test_an_api_key_is_required_when_set_and_health_stays_open(bert_artifact):
    """Observed: no authentication option. With ``api_key`` every request but ``GET /health`` needs
    ``Authorization: Bearer <key>`` (401 JSON otherwise, counted)."""
    key = "s3cret-key"
    with _serving(_config(bert_artifact, api_key=key)) as (url, _, _app):
        payload = {"query": "q", "documents": ["d"]}
        _assert_error_shape(httpx.post(f"{url}/v1/rerank", json=payload), 401, "API key")
        r = httpx.post(f"{url}/v1/rerank", json=payload, headers={"Authorization": "Bearer wrong"})
        _assert_error_shape(r, 401, "API key")
        assert r.headers["www-authenticate"] == "Bearer"
        _assert_error_shape(httpx.post(f"{url}/v1/rerank", json=payload, headers={"Authorization": key}), 401,
                            "API key")
        ok = {"Authorization": f"Bearer {key}"}
        assert httpx.post(f"{url}/v1/rerank", json=payload, headers=ok).status_code == 200
        assert httpx.get(f"{url}/health").status_code == 200
        _assert_error_shape(httpx.get(f"{url}/metrics"), 401, "API key")
        assert _metric(url, "/v1/rerank", 401, headers=ok) == 3
    assert key not in repr(ServeConfig("a", api_key=key))


def test_a_browser_cannot_drive_the_service(bert_artifact):
    """Observed: a text/plain POST with ``Origin: evil.example`` was answered (a web page could drive it), and so
    was ``Host: attacker.example`` (DNS rebinding). Now a POST must be ``application/json`` (415: a browser cannot
    send that cross-site without a preflight, which is never granted), a foreign ``Origin`` is 403 and, on a
    loopback bind, only loopback ``Host`` names are answered (403)."""
    with _serving(_config(bert_artifact)) as (url, port, _app):
        body = json.dumps({"query": "q", "documents": ["d"]})
        r = httpx.post(f"{url}/v1/rerank", content=body, headers={"Content-Type": "text/plain"})
        _assert_error_shape(r, 415, "Content-Type must be application/json")
        _assert_error_shape(httpx.post(f"{url}/v1/rerank", content=body), 415,
                            "Content-Type must be application/json")
        r = httpx.post(f"{url}/v1/rerank", content=body,
                       headers={"Content-Type": "text/plain", "Origin": "http://evil.example"})
        _assert_error_shape(r, 403, "cross-origin requests are not served")
        r = httpx.post(f"{url}/v1/rerank", json={"query": "q", "documents": ["d"]},
                       headers={"Origin": "http://evil.example"})
        _assert_error_shape(r, 403, "cross-origin requests are not served")
        for host in ("attacker.example", f"attacker.example:{port}", "localhost.attacker.example"):
            r = httpx.post(f"{url}/v1/rerank", json={"query": "q", "documents": ["d"]}, headers={"Host": host})
            _assert_error_shape(r, 403, "is not served here")
            _assert_error_shape(httpx.get(f"{url}/health", headers={"Host": host}), 403, "is not served here")
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "localhost"):
            r = httpx.post(f"{url}/v1/rerank", json={"query": "q", "documents": ["d"]},
                           headers={"Host": host, "Origin": f"http://{host}"})
            assert r.status_code == 200, (host, r.text)
        r = httpx.request("OPTIONS", f"{url}/v1/rerank", headers={
            "Origin": f"http://localhost:{port + 1}", "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in r.headers
    with _serving(_config(bert_artifact, allowed_hosts="reranker.internal")) as (url, _, _app):
        r = httpx.post(f"{url}/v1/rerank", json={"query": "q", "documents": ["d"]},
                       headers={"Host": "reranker.internal:8080"})
        assert r.status_code == 200
        _assert_error_shape(httpx.get(f"{url}/health"), 403, "is not served here")


def test_a_non_loopback_bind_needs_a_key_or_an_explicit_flag(tmp_path, monkeypatch):
    """Binding beyond loopback without a key is refused (serve, Ray Serve, the CLI) unless
    ``allow_unauthenticated``; such a bind answers any ``Host`` unless ``allowed_hosts`` says otherwise."""
    config = ServeConfig(tmp_path)
    for host in ("0.0.0.0", "", "::", "192.168.1.20"):
        with pytest.raises(ValueError, match="API key"):
            config.bound_to(host)
        with pytest.raises(ValueError, match="API key"):
            serve(config, host=host, port=8080)
    from memrerank.scale import serve_on_ray

    with pytest.raises(ValueError, match="API key"):
        serve_on_ray(config, host="0.0.0.0", port=8000)
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert config.bound_to(host) is config
    assert ServeConfig(tmp_path, api_key="k").bound_to("0.0.0.0").allowed_hosts == ("*",)
    assert ServeConfig(tmp_path, allow_unauthenticated=True).bound_to("0.0.0.0").allowed_hosts == ("*",)
    assert ServeConfig(tmp_path, api_key="k", allowed_hosts=["a.example", "B.example:80"]).bound_to(
        "0.0.0.0").allowed_hosts == ("a.example", "b.example")


def test_the_ray_serve_app_takes_the_same_access_settings(tmp_path, monkeypatch):
    """``build_app``'s strings become the same ServeConfig fields (key, hosts, caps, timeouts); the key defaults
    to ``MEMRERANK_API_KEY``."""
    from memrerank.scale import _parse_app_args

    monkeypatch.delenv("MEMRERANK_API_KEY", raising=False)
    config, replicas = _parse_app_args({
        "artifact": str(tmp_path), "num_replicas": "2", "api_key": "k1", "allowed_hosts": "a.example,b.example",
        "allow_unauthenticated": "true", "max_concurrency": "4", "max_queued_tokens": "5000",
        "body_timeout_s": "2.5", "max_request_tokens": "999"})
    assert replicas == 2 and config.api_key == "k1" and config.allowed_hosts == ("a.example", "b.example")
    assert config.allow_unauthenticated and config.max_concurrency == 4 and config.max_queued_tokens == 5000
    assert config.body_timeout_s == 2.5 and config.limits.max_request_tokens == 999
    monkeypatch.setenv("MEMRERANK_API_KEY", "from-env")
    assert _parse_app_args({"artifact": str(tmp_path)})[0].api_key == "from-env"
    with pytest.raises(ValueError, match="max_concurrency"):
        _parse_app_args({"artifact": str(tmp_path), "max_concurrency": "0"})


# --------------------------------------------------------------------------- every error JSON, every one counted
def test_malformed_bodies_are_json_400s_and_counted(bert_artifact):
    """Observed: a 200k-deep JSON array and a 5,000-digit ``top_n`` were plain-text 500s, not counted. Now they,
    a non-string ``model``, unknown paths and methods are JSON in the path's API's error shape
    (``/v1/rerank``: ``{"message", "detail"}``, ``/v2/rerank``: Cohere's ``{"message"}``, elsewhere FastAPI's
    ``{"detail"}``), counted in /metrics."""
    with _serving(_config(bert_artifact)) as (url, _, _app):
        deep = "[" * 200_000 + "]" * 200_000
        r = httpx.post(f"{url}/v1/rerank", content=deep, headers={"Content-Type": "application/json"})
        _assert_error_shape(r, 400, "nested too deeply")
        assert set(r.json()) == {"message", "detail"}
        huge = '{"query": "q", "documents": ["d"], "top_n": 1' + "0" * 5000 + "}"
        r = httpx.post(f"{url}/v1/rerank", content=huge, headers={"Content-Type": "application/json"})
        message = _assert_error_shape(r, 400, "not JSON")
        assert "set_int_max_str_digits" not in message
        deep_model = {"query": "q", "documents": ["d"], "model": json.loads("[" * 500 + "]" * 500)}
        _assert_error_shape(httpx.post(f"{url}/v1/rerank", json=deep_model), 400, "'model' must be a string")
        r = httpx.post(f"{url}/v2/rerank", content=b"\xff\xfe", headers={"Content-Type": "application/json"})
        _assert_error_shape(r, 400, "not JSON")
        assert set(r.json()) == {"message"}
        assert httpx.get(f"{url}/nowhere").json() == {"detail": "Not Found"}
        _assert_error_shape(httpx.get(f"{url}/nowhere"), 404, "Not Found")
        _assert_error_shape(httpx.get(f"{url}/v1/rerank"), 405, "Method Not Allowed")
        assert _metric(url, "/v1/rerank", 400) == 3
        assert _metric(url, "/v2/rerank", 400) == 1 and _metric(url, "other", 404) == 2
        assert _metric(url, "/v1/rerank", 405) == 1
        assert httpx.post(f"{url}/v1/rerank", json={"query": "q", "documents": ["d"]}).status_code == 200


def test_a_bug_in_a_route_is_a_counted_json_500(bert_artifact, monkeypatch):
    with _serving(_config(bert_artifact)) as (url, _, app):
        def broken(_logits):
            raise RuntimeError("injected")

        monkeypatch.setattr(app.state.reranker, "calibrator", broken)
        _assert_error_shape(httpx.post(f"{url}/v1/rerank", json={"query": "q", "documents": ["d"]}), 500,
                            "RuntimeError while serving the request")
        assert _metric(url, "/v1/rerank", 500) == 1
        monkeypatch.undo()
        assert httpx.post(f"{url}/v1/rerank", json={"query": "q", "documents": ["d"]}).status_code == 200


# --------------------------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("port", ["70000", "0", "-1", "65536", "http"])
def test_serve_port_outside_the_range_is_a_one_line_error(bert_artifact, port, monkeypatch, capsys):
    """Observed: ``serve --port 70000`` listened on 4464. Now a port outside 1..65535 is a one-line error."""
    import memrerank.serve
    from memrerank.cli import main

    monkeypatch.setattr(memrerank.serve, "serve", lambda *a: pytest.fail("serve must not start"))
    with pytest.raises(SystemExit) as exc:
        main(["serve", str(bert_artifact), "--port", port])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "1..65535" in err
    with pytest.raises(ValueError, match=r"1\.\.65535"):
        serve(ServeConfig(bert_artifact), port=70000)


def test_serve_cli_access_flags(bert_artifact, monkeypatch, capsys):
    """``--host 0.0.0.0`` without a key is a one-line error; ``--allow-unauthenticated`` or a key
    (``--api-key`` / ``MEMRERANK_API_KEY``) lets it start; the startup line never prints the key."""
    import memrerank.serve
    from memrerank.cli import main

    calls = []
    monkeypatch.setattr(memrerank.serve, "serve", lambda config, *a: calls.append((config, a)))
    monkeypatch.delenv("MEMRERANK_API_KEY", raising=False)
    assert main(["serve", str(bert_artifact), "--host", "0.0.0.0", "-q"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--allow-unauthenticated" in err and not calls
    assert main(["serve", str(bert_artifact), "--host", "0.0.0.0", "--allow-unauthenticated", "-q"]) == 0
    assert calls[-1][0].allow_unauthenticated and calls[-1][0].api_key is None
    monkeypatch.setenv("MEMRERANK_API_KEY", "env-key-123")
    assert main(["serve", str(bert_artifact), "--host", "0.0.0.0", "--json", "--max-concurrency", "7",
                 "--body-timeout", "3", "--allowed-host", "rr.example", "--max-request-tokens", "4096"]) == 0
    out = capsys.readouterr().out
    config = calls[-1][0]
    assert config.api_key == "env-key-123" and "env-key-123" not in out
    startup = json.loads(out)
    assert startup["auth"] == "api-key" and startup["max_concurrency"] == 7 and startup["body_timeout_s"] == 3
    assert startup["allowed_hosts"] == ["rr.example"] and startup["limits"]["max_request_tokens"] == 4096
    assert main(["serve", str(bert_artifact), "--api-key", "flag-key", "-q"]) == 0
    assert calls[-1][0].api_key == "flag-key"
