"""memrerank serve, for real: a uvicorn server on a loopback port, HTTP requests with httpx."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from memrerank import Reranker  # noqa: E402
from memrerank.serve import Limits, ServeConfig, create_app  # noqa: E402
from texts import DOCS  # noqa: E402


@pytest.fixture(scope="module")
def server(bert_artifact):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(ServeConfig(bert_artifact, "fp32", limits=Limits(max_documents=50, max_request_bytes=20_000,
                                                                       max_tokens_per_document=200), max_wait_ms=20))
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started
    yield f"http://127.0.0.1:{port}", app
    srv.should_exit = True
    thread.join(10)


def test_cohere_api(server, bert_artifact):
    url, _ = server
    docs = DOCS[:6]
    r = httpx.post(f"{url}/v1/rerank", json={"model": "m", "query": "Who painted?", "documents": docs, "top_n": 3,
                                             "return_documents": True})
    assert r.status_code == 200
    body = r.json()
    want = Reranker.load(bert_artifact).rank("Who painted?", docs, top_k=3)
    assert [x["index"] for x in body["results"]] == [h.index for h in want]
    for x, h in zip(body["results"], want):
        assert x["relevance_score"] == pytest.approx(h.score, abs=1e-5) and x["document"]["text"] == h.text
    assert body["usage"]["documents"] == 6 and body["model"] == "m"


def test_tei_api(server, bert_artifact):
    url, _ = server
    docs = DOCS[:5]
    r = httpx.post(f"{url}/rerank", json={"query": "dentist?", "texts": docs, "raw_scores": True,
                                          "return_text": True})
    assert r.status_code == 200
    out = r.json()
    logits = Reranker.load(bert_artifact).predict([("dentist?", d) for d in docs], raw=True)
    assert sorted(x["index"] for x in out) == list(range(5))
    for x in out:
        assert x["score"] == pytest.approx(float(logits[x["index"]]), abs=1e-5) and x["text"] == docs[x["index"]]
    assert [x["score"] for x in out] == sorted((x["score"] for x in out), reverse=True)
    r = httpx.post(f"{url}/rerank", json={"query": "q", "texts": [DOCS[-1]], "truncate": False})
    assert r.status_code == 413 and r.json()["error"]["type"] == "max_tokens_per_document"


def test_health_models_metrics(server):
    url, _ = server
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    assert httpx.get(f"{url}/v1/models").json()["data"][0]["object"] == "model"
    httpx.post(f"{url}/rerank", json={"query": "q", "texts": ["a", "b"]})
    text = httpx.get(f"{url}/metrics").text
    assert 'memrerank_requests_total{endpoint="/rerank",status="200"}' in text
    assert "memrerank_request_seconds_bucket" in text and "memrerank_pairs_total" in text


@pytest.mark.parametrize("payload,status,kind", [
    ({"query": "q", "documents": ["d"] * 51}, 413, "max_documents"),
    ({"query": "q", "documents": ["word " * 300]}, 413, "max_tokens_per_document"),
    ({"query": "q", "documents": ["x" * 30_000]}, 413, "max_request_bytes"),
    ({"query": "q", "documents": []}, 422, "invalid_request"),
    ({"query": 3, "documents": ["d"]}, 422, "invalid_request"),
    ({"query": "q", "documents": ["d", None]}, 422, "invalid_request"),
    ({"query": "q", "documents": ["d"], "top_n": 0}, 422, "invalid_request"),
])
def test_limits_and_bad_requests_are_json_4xx(server, payload, status, kind):
    url, _ = server
    r = httpx.post(f"{url}/v1/rerank", json=payload)
    assert r.status_code == status and r.json()["error"]["type"] == kind
    assert httpx.get(f"{url}/health").status_code == 200  # still serving
    r = httpx.post(f"{url}/v1/rerank", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_json"


def test_concurrent_clients_are_batched_and_split_back(server, bert_artifact):
    url, app = server
    ref = Reranker.load(bert_artifact)
    queries = [f"question {i}: {DOCS[i % 9][:25]}" for i in range(24)]
    docs = DOCS[:7]
    before = app.state.metrics.batches

    def call(q):
        with httpx.Client() as c:
            return q, c.post(f"{url}/rerank", json={"query": q, "texts": docs, "raw_scores": True}).json()

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(call, queries))
    for q, out in results:
        want = ref.predict([(q, d) for d in docs], raw=True)
        got = np.array([x["score"] for x in sorted(out, key=lambda x: x["index"])])
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    merged = app.state.metrics.batches - before
    assert merged < len(queries), "concurrent requests should share model calls"


@pytest.mark.parametrize("field,value,kind", [
    ("precision", "int4", ValueError),
    ("threads", 0, ValueError),
    ("max_batch_tokens", -1, ValueError),
    ("max_batch_pairs", 0, ValueError),
    ("max_wait_ms", -0.5, ValueError),
    ("prefix_reuse", "yes", ValueError),
    ("providers", [], ValueError),
    ("limits", {"max_documents": 5}, TypeError),
    ("artifact", None, TypeError),
])
def test_serve_config_rejects_bad_values_naming_the_field(field, value, kind):
    kwargs = {"artifact": "some/artifact", field: value}
    with pytest.raises(kind, match=rf"ServeConfig\.{field}\b"):
        ServeConfig(**kwargs)
    with pytest.raises(ValueError, match=r"Limits\.max_documents must be a positive integer"):
        Limits(max_documents=0)


def test_serve_config_normalizes_and_travels_to_worker_processes(tmp_path):
    """``serve(config, workers=N)`` pickles ``partial(create_app, config)`` into each spawned worker."""
    import functools
    import pickle

    cfg = ServeConfig(tmp_path, providers="cuda, cpu", limits=Limits(max_documents=5), max_wait_ms=0)
    assert cfg.artifact == str(tmp_path) and cfg.providers == ("cuda", "cpu")
    back = pickle.loads(pickle.dumps(functools.partial(create_app, cfg)))
    assert back.func is create_app and back.args == (cfg,)
    with pytest.raises(TypeError, match="ServeConfig"):
        create_app(str(tmp_path))


def _two_workers_serve_the_same_answers(bert_artifact, command):
    """Start ``command`` (its ``{port}`` filled in), check two worker processes answer like the in-process
    reranker, then stop it with SIGINT."""
    import os
    import signal
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([c.format(port=port) for c in command],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ})
    try:
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read().decode(errors="replace")
            assert time.time() < deadline, "server did not come up in 90 s"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        ref = Reranker.load(bert_artifact)
        docs = DOCS[:5]

        def call(i):
            with httpx.Client(timeout=30) as c:  # a fresh connection each: the kernel picks the worker
                pid = c.get(f"{url}/health").json()["pid"]
                q = f"question {i}"
                out = c.post(f"{url}/rerank", json={"query": q, "texts": docs, "raw_scores": True}).json()
                return pid, q, out

        pids = set()
        with ThreadPoolExecutor(8) as pool:
            for _ in range(10):  # until both workers have answered (they share one listening socket)
                for pid, q, out in pool.map(call, range(16)):
                    pids.add(pid)
                    got = np.array([x["score"] for x in sorted(out, key=lambda x: x["index"])])
                    np.testing.assert_allclose(got, ref.predict([(q, d) for d in docs], raw=True), atol=1e-4)
                if len(pids) >= 2:
                    break
        assert len(pids) == 2 and proc.pid not in pids
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise


def test_workers_2_processes_serve_the_same_answers(bert_artifact):
    """``memrerank serve --workers 2`` as a user runs it: two server processes behind one port."""
    import sys

    _two_workers_serve_the_same_answers(bert_artifact, [
        sys.executable, "-m", "memrerank.cli", "serve", str(bert_artifact), "--precision", "fp32", "--workers", "2",
        "--port", "{port}", "--threads", "1"])


def test_serve_api_with_workers_2(bert_artifact):
    """``serve(ServeConfig(...), workers=2)`` from Python: each worker builds its app from the config itself."""
    import sys

    code = ("import sys; from memrerank.serve import ServeConfig, serve; "
            "serve(ServeConfig(sys.argv[1], 'fp32', threads=1), port=int(sys.argv[2]), workers=2)")
    _two_workers_serve_the_same_answers(bert_artifact, [sys.executable, "-c", code, str(bert_artifact), "{port}"])
