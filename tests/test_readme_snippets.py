"""The README's "Integrations: use it from …" snippets, run as written (issue 28).

A snippet is a fenced code block whose previous line is ``<!-- snippet: NAME -->``. Every snippet runs in one
directory holding what the snippets name: the tests' tiny Qwen3 reranker exported (fp32, int8) as
``qwen3-rr``, and the real all-MiniLM-L6-v2 (a local copy) as ``sentence-transformers/all-MiniLM-L6-v2``,
mem0's embedder. The ``serve`` snippet is started as a subprocess; the one change made to any snippet is the
port, ``8080`` becoming a free one. Python snippets run with ``query`` (a string) and ``memories`` (a list of
strings) defined, offline, with a dummy ``OPENAI_API_KEY`` (mem0 and Graphiti build an OpenAI client they
never call here). Each test reads the variable its snippet ends with and checks it against ``Reranker.rank``
on the same artifact (order and calibrated scores, 1e-5; for the service, at the precision its ``/health``
reports, and the service must have scored the pairs). The curl command runs in bash and its JSON is checked
the same way.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from models import minilm_dir
from servers import free_port

from memrerank import Reranker

httpx = pytest.importorskip("httpx", reason="the serve extra is not installed")
pytest.importorskip("fastapi", reason="the serve extra is not installed")

README = Path(__file__).resolve().parent.parent / "README.md"
ATOL = 1e-5
#: The port the snippets name; the tests replace it with a free one.
PORT = "8080"
#: The precision the snippets that load ``qwen3-rr`` in process ask for.
LOCAL_PRECISION = "int8"
QUERY = "When does my passport expire?"
MEMORIES = ["My passport expires in March 2031.", "I renewed my library card last week.",
            "Caroline painted a lake at sunrise.", "My sister lives in Lisbon.",
            "The dentist appointment is on Friday at 10.", "I keep my passport in the blue folder.",
            "Mel ran a 5k in June.", "Passport photos are taken at the post office."]
#: Every snippet the README marks, each checked by the test of the same name below.
SNIPPETS = ("serve", "curl", "mem0", "graphiti", "haystack", "langchain", "llama-index", "cohere",
            "rerankers")
_MARKED = re.compile(r"^<!-- snippet: ([\w-]+) -->\n```(\w+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def read_snippets(text: str) -> dict[str, tuple[str, str]]:
    """``{name: (language, code)}`` of the marked fenced blocks of a Markdown text."""
    found: dict[str, tuple[str, str]] = {}
    for name, lang, code in _MARKED.findall(text):
        assert name not in found, f"two README snippets are named {name!r}"
        found[name] = (lang, code)
    return found


@pytest.fixture(scope="module")
def snippets() -> dict[str, tuple[str, str]]:
    return read_snippets(README.read_text(encoding="utf-8"))


def test_every_marked_snippet_is_checked(snippets):
    """A snippet added to the README without a test here, or a test whose snippet was removed, fails."""
    assert sorted(snippets) == sorted(SNIPPETS)
    markers = re.findall(r"^<!-- snippet:", README.read_text(encoding="utf-8"), re.MULTILINE)
    assert len(markers) == len(SNIPPETS), "a marker without a fenced block on its next line"


def _code(snippets, name: str, lang: str, port: int) -> str:
    got_lang, code = snippets[name]
    assert got_lang == lang, f"snippet {name}: a {got_lang} block, expected {lang}"
    code = code.replace(f"127.0.0.1:{PORT}", f"127.0.0.1:{port}").replace(f"--port {PORT}", f"--port {port}")
    assert PORT not in code, f"snippet {name} names port {PORT} in a form the test does not replace: {code}"
    return code


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, qwen_ckpt) -> Path:
    """The directory the snippets run in: ``qwen3-rr`` and mem0's embedder, as the snippets name them."""
    from memrerank.export import export_model

    root = tmp_path_factory.mktemp("readme")
    export_model(str(qwen_ckpt), root / "qwen3-rr", precisions=("fp32", "int8"), max_length=256,
                 log=lambda m: None)
    (root / "sentence-transformers").mkdir()
    (root / "sentence-transformers" / "all-MiniLM-L6-v2").symlink_to(minilm_dir(), target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def service(snippets, workdir, tmp_path_factory):
    """The ``serve`` snippet, started as a user starts it (``memrerank`` is this interpreter's ``-m
    memrerank.cli``): ``(url, the precision it serves)``."""
    port = free_port()
    argv = shlex.split(_code(snippets, "serve", "bash", port), comments=True)
    assert argv[:2] == ["memrerank", "serve"], argv
    log_path = tmp_path_factory.mktemp("serve-log") / "serve.log"
    with open(log_path, "wb") as log:  # a file, not an unread pipe: the access log never blocks the server
        proc = subprocess.Popen([sys.executable, "-m", "memrerank.cli", *argv[1:]], cwd=workdir, stdout=log,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, log_path.read_text(errors="replace")
            assert time.time() < deadline, "memrerank serve did not come up in 120 s"
            try:
                health = httpx.get(f"{url}/health", timeout=2)
                if health.status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield url, health.json()["precision"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def reference(workdir):
    """``reference(precision)``: the in-process Reranker on the snippets' artifact."""
    cache: dict[str, Reranker] = {}

    def get(precision: str) -> Reranker:
        if precision not in cache:
            cache[precision] = Reranker.load(workdir / "qwen3-rr", precision=precision)
        return cache[precision]

    return get


@pytest.fixture
def run(snippets, workdir, tmp_path, monkeypatch):
    """``run(name, port)``: execute a Python snippet in the work directory and return its namespace."""
    for key, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OPENAI_API_KEY": "unused",
                       "MEM0_TELEMETRY": "False", "MEM0_DIR": str(tmp_path / "mem0-home"),
                       "GRAPHITI_TELEMETRY_ENABLED": "false", "HAYSTACK_TELEMETRY_ENABLED": "False"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MEMRERANK_API_KEY", raising=False)
    monkeypatch.chdir(workdir)

    def execute(name: str, port: int = 0) -> dict:
        namespace = {"__name__": f"readme_{name.replace('-', '_')}", "query": QUERY,
                     "memories": list(MEMORIES)}
        code = compile(_code(snippets, name, "python", port), f"README.md <snippet: {name}>", "exec")
        exec(code, namespace)  # noqa: S102 - running the README's code is the test
        return namespace

    return execute


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _served_pairs(url: str) -> int:
    """The pairs the service has scored (``memrerank_pairs_total``): a URL snippet must reach it."""
    text = httpx.get(f"{url}/metrics").text
    return int(re.search(r"^memrerank_pairs_total (\d+)$", text, re.MULTILINE).group(1))


def _check(got: list[tuple], hits, key: str = "text") -> None:
    """``got`` = ``[(text or index, score), ...]`` as returned; ``hits`` = ``Reranker.rank``'s."""
    assert [g for g, _ in got] == [getattr(h, key) for h in hits]
    assert [s for _, s in got] == pytest.approx([h.score for h in hits], abs=ATOL)
    assert len(got) > 1


def test_serve(service):
    url, _ = service
    assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == "qwen3-rr"


def test_curl(snippets, service, workdir, reference):
    """The command's JSON is what ``rank`` gives for its body's query, documents, ``top_n`` and instruction,
    which the scores must show (they differ from the default instruction's)."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    url, precision = service
    code = _code(snippets, "curl", "bash", _port(url))
    before = _served_pairs(url)
    out = subprocess.run(["bash", "-c", code], check=False, cwd=workdir, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert "results" in got, got
    body = json.loads(re.search(r"-d '(.*)'", code, re.DOTALL).group(1))
    ref = reference(precision)
    want = ref.rank(body["query"], body["documents"], top_k=body["top_n"], instruction=body["instruction"])
    _check([(r["index"], r["relevance_score"]) for r in got["results"]], want, key="index")
    assert [r["document"]["text"] for r in got["results"]] == [h.text for h in want]
    assert got["model"] == "qwen3-rr" and got["query_truncated"] is False
    assert _served_pairs(url) - before == len(body["documents"])
    plain = ref.rank(body["query"], body["documents"], top_k=body["top_n"])
    assert [h.score for h in plain] != pytest.approx([h.score for h in want], abs=ATOL)


def test_mem0(service, run, reference):
    """``Memory.from_config`` with provider ``"memrerank"``: the vector search's candidates in ``rank``'s
    order, each with its calibrated ``rerank_score``."""
    pytest.importorskip("mem0", reason="the test extra (mem0ai) is not installed")
    pytest.importorskip("sentence_transformers", reason="mem0's local embedder needs sentence-transformers")
    url, precision = service
    before = _served_pairs(url)
    ns = run("mem0", _port(url))
    from memrerank.integrations.mem0 import MemrerankReranker

    assert isinstance(ns["memory"].reranker, MemrerankReranker)
    unranked = ns["memory"].search(QUERY, filters={"user_id": "alice"}, top_k=5)["results"]  # as the snippet
    candidates = [r["memory"] for r in unranked]
    hits = ns["hits"]
    assert _served_pairs(url) - before == len(candidates)
    assert sorted(h["memory"] for h in hits) == sorted(candidates)
    _check([(h["memory"], h["rerank_score"]) for h in hits], reference(precision).rank(QUERY, candidates))


def test_graphiti(run, reference):
    """``MemrerankRerankerClient`` as Graphiti's ``cross_encoder``; its ``rank`` is ``Reranker.rank``."""
    pytest.importorskip("graphiti_core", reason="the test extra (graphiti-core) is not installed")
    ns = run("graphiti")
    assert ns["graphiti"].clients.cross_encoder is ns["reranker"]
    _check(ns["ranked"], reference(LOCAL_PRECISION).rank(QUERY, MEMORIES))


def test_haystack(snippets, service, run, reference):
    """``MemrerankRanker`` over the service, and the type its comment names loaded from a pipeline YAML."""
    pytest.importorskip("haystack", reason="the test extra (haystack-ai) is not installed")
    url, precision = service
    before = _served_pairs(url)
    ns = run("haystack", _port(url))
    assert _served_pairs(url) - before == len(MEMORIES)
    want = reference(precision).rank(QUERY, MEMORIES, top_k=3)
    _check([(d.content, d.score) for d in ns["docs"]], want)
    from haystack import Document, Pipeline

    kind = re.search(r"type: ([\w.]+)", snippets["haystack"][1]).group(1)
    pipe = Pipeline.loads(f"components:\n  ranker:\n    type: {kind}\n"
                          f"    init_parameters: {{url: '{url}', top_k: 3}}\nconnections: []\n")
    out = pipe.run({"ranker": {"query": QUERY, "documents": [Document(content=m) for m in MEMORIES]}})
    _check([(d.content, d.score) for d in out["ranker"]["documents"]], want)


def test_langchain(run, reference):
    pytest.importorskip("langchain_core", reason="the test extra (langchain-core) is not installed")
    ns = run("langchain")
    _check([(d.page_content, d.metadata["relevance_score"]) for d in ns["top"]],
           reference(LOCAL_PRECISION).rank(QUERY, MEMORIES, top_k=3))


def test_llama_index(run, reference):
    pytest.importorskip("llama_index.core", reason="the test extra (llama-index-core) is not installed")
    ns = run("llama-index")
    _check([(n.node.get_content(), n.score) for n in ns["top"]],
           reference(LOCAL_PRECISION).rank(QUERY, MEMORIES, top_k=3))


def test_cohere(service, run, reference, capsys):
    """The Cohere SDK's v2 client with the service as its base URL; what the snippet prints is the same."""
    pytest.importorskip("cohere", reason="the test extra (cohere SDK) is not installed")
    url, precision = service
    before = _served_pairs(url)
    ns = run("cohere", _port(url))
    assert _served_pairs(url) - before == len(MEMORIES)
    want = reference(precision).rank(QUERY, MEMORIES, top_k=3)
    _check([(r.index, r.relevance_score) for r in ns["resp"].results], want, key="index")
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed == str([(r.index, r.relevance_score) for r in ns["resp"].results])


def test_rerankers(service, run, reference):
    """``rerankers``' API ranker pointed at the service's Cohere route."""
    pytest.importorskip("rerankers", reason="the test extra (rerankers) is not installed")
    url, precision = service
    before = _served_pairs(url)
    ns = run("rerankers", _port(url))
    assert _served_pairs(url) - before == len(MEMORIES)
    _check([(r.document.text, r.score) for r in ns["results"]], reference(precision).rank(QUERY, MEMORIES))

