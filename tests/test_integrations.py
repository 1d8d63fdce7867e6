"""Clients nobody here wrote: the real cohere SDK (v1 and v2) against a loopback server, and the LangChain
and LlamaIndex rerankers with the real langchain-core / llama-index-core packages. Every order and score is
checked against the in-process ``Reranker.rank`` (calibrated scores, 1e-5)."""

from __future__ import annotations

import copy
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from texts import DOCS

from memrerank import LoadOptions, Reranker
from memrerank.errors import ArtifactError

try:  # the loopback uvicorn server of test_serve.py (bert_artifact, fp32, limits: 50 docs, 20 kB, 200 tokens)
    from test_serve import server
except pytest.skip.Exception as exc:  # no serve extra: the framework tests below still run
    _why = str(exc)

    @pytest.fixture(scope="module")
    def server():
        pytest.skip(_why)

ATOL = 1e-5
QUERY = "What did Caroline paint?"


@pytest.fixture(scope="module")
def reference(bert_artifact):
    return Reranker.load(bert_artifact, precision="fp32")


def _check_hits(got: list[tuple[int, float]], want) -> None:
    """``got`` = ``[(index, score), ...]`` in the order returned; ``want`` = ``Reranker.rank`` hits."""
    assert [i for i, _ in got] == [h.index for h in want]
    for (_, score), hit in zip(got, want):
        assert score == pytest.approx(hit.score, abs=ATOL)


def _sdk(resp) -> list[tuple[int, float]]:
    return [(r.index, r.relevance_score) for r in resp.results]


# --- the cohere SDK against `memrerank serve` ---------------------------------------------------------------

class TestCohereSDK:
    """``cohere.Client`` (v1) and ``cohere.ClientV2`` (v2), ``base_url`` pointing at the loopback server."""

    @pytest.fixture(scope="class")
    def url(self, server):
        return server[0]

    @pytest.fixture(scope="class")
    def cohere(self):
        return pytest.importorskip("cohere", reason="the test extra (cohere SDK) is not installed")

    def test_v1_client(self, cohere, url, reference):
        co = cohere.Client(api_key="unused", base_url=url)
        docs = DOCS[:6]
        resp = co.rerank(model="m", query=QUERY, documents=docs, top_n=3, return_documents=True)
        _check_hits(_sdk(resp), reference.rank(QUERY, docs, top_k=3))
        assert [r.document.text for r in resp.results] == [docs[r.index] for r in resp.results]

    def test_v2_client(self, cohere, url, reference):
        co = cohere.ClientV2(api_key="unused", base_url=url)
        docs = DOCS[:9]
        resp = co.rerank(model="m", query=QUERY, documents=docs, top_n=4)
        _check_hits(_sdk(resp), reference.rank(QUERY, docs, top_k=4))
        assert isinstance(resp.id, str) and resp.id
        assert resp.meta.api_version.version == "2" and resp.meta.billed_units.search_units == 1
        everything = co.rerank(model="m", query=QUERY, documents=docs)  # no top_n: all, best first
        _check_hits(_sdk(everything), reference.rank(QUERY, docs))

    def test_v2_max_tokens_per_doc_cuts_documents_before_scoring(self, cohere, url, reference):
        co = cohere.ClientV2(api_key="unused", base_url=url)
        docs = [DOCS[-1], DOCS[0], DOCS[1]]
        # their first 12 BERT-uncased tokens: "a long memory . the assistant recorded many details about
        # the trip"; all 10 of "caroline painted a sunrise over the lake in july ."; "the dentist appointment
        # is on tuesday at 9 : 30 , dr"
        cut = ["A long memory. The assistant recorded many details about the trip", DOCS[0],
               "The dentist appointment is on Tuesday at 9:30, Dr"]
        resp = co.rerank(model="m", query=QUERY, documents=docs, max_tokens_per_doc=12)
        _check_hits(_sdk(resp), reference.rank(QUERY, cut))
        # 10 and 15 tokens: nothing to cut
        whole = co.rerank(model="m", query=QUERY, documents=docs[1:], max_tokens_per_doc=15)
        _check_hits(_sdk(whole), reference.rank(QUERY, docs[1:]))

    def test_v2_errors_reach_the_sdk_as_api_errors(self, cohere, url):
        """A limit is an ``ApiError`` (413); a bad request the ``BadRequestError`` (400) Cohere answers, with
        Cohere's ``{"message"}`` body."""
        from cohere.core.api_error import ApiError
        from cohere.errors import BadRequestError

        co = cohere.ClientV2(api_key="unused", base_url=url)
        with pytest.raises(ApiError) as err:
            co.rerank(model="m", query="q", documents=["d"] * 51)  # the fixture's max_documents is 50
        assert err.value.status_code == 413
        assert "51 documents exceed the limit of 50" in err.value.body["message"]
        with pytest.raises(BadRequestError) as err:
            co.rerank(model="m", query="q", documents=["d"], top_n=0)
        assert err.value.body == {"message": "'top_n' must be a positive integer"}

    def test_v2_concurrent_clients_are_batched_and_split_back(self, cohere, server, reference, monkeypatch):
        from test_serve import ModelCalls

        url, app = server
        co = cohere.ClientV2(api_key="unused", base_url=url)
        queries = [f"question {i}: {DOCS[i % 9][:25]}" for i in range(16)]
        docs = DOCS[:7]
        calls = ModelCalls(monkeypatch, app.state.reranker)  # counts model runs, not batcher rounds
        for q in queries[:3]:  # alone, one request costs this many model calls
            co.rerank(model="m", query=q, documents=docs)
        per_request = calls.count / 3
        calls.inputs.clear()
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda q: (q, co.rerank(model="m", query=q, documents=docs)), queries))
        for q, resp in results:
            _check_hits(_sdk(resp), reference.rank(q, docs))
        assert 0 < calls.count < per_request * len(queries), "concurrent requests share model calls"


# --- /v2/rerank over plain HTTP: limits and bad requests ----------------------------------------------------

@pytest.mark.parametrize("payload,status,says", [
    ({"query": "q", "documents": ["d"] * 51}, 413, "51 documents exceed the limit of 50"),
    ({"query": "q", "documents": ["word " * 300]}, 413, "'documents[0]' has 300 tokens, over the limit"),
    ({"query": "q", "documents": ["word " * 300], "max_tokens_per_doc": 250}, 413, "has 250 tokens"),
    ({"query": "q", "documents": ["x" * 30_000]}, 413, "exceeds the limit of 20000 bytes"),
    ({"query": 3, "documents": ["d"]}, 400, "'query' must be a string"),
    ({"query": "q", "documents": ["d", None]}, 400, "'documents[1]' must be a string"),
    ({"query": "q", "documents": [{"text": "d"}]}, 400, "'documents[0]' must be a string"),  # v2: strings
    ({"query": "q", "documents": ["d"], "top_n": 0}, 400, "'top_n' must be a positive integer"),
    ({"query": "q", "documents": ["d"], "max_tokens_per_doc": 0}, 400, "'max_tokens_per_doc' must be a"),
    ({"query": "q", "documents": ["d"], "max_tokens_per_doc": True}, 400, "'max_tokens_per_doc' must be a"),
    ({"query": "q", "documents": ["d"], "max_tokens_per_doc": "12"}, 400, "'max_tokens_per_doc' must be a"),
])
def test_v2_limits_and_bad_requests_are_json_4xx(server, payload, status, says):
    """In Cohere's error shape, ``{"message"}``: 400 for a bad request (as Cohere answers), 413 for a
    limit."""
    httpx = pytest.importorskip("httpx")
    url, _ = server
    r = httpx.post(f"{url}/v2/rerank", json={"model": "m", **payload})
    assert r.status_code == status and set(r.json()) == {"message"} and says in r.json()["message"]
    assert httpx.get(f"{url}/health").status_code == 200  # still serving


def test_v2_max_tokens_per_doc_brings_a_long_document_under_the_token_limit(server, reference):
    """300 tokens is over the fixture's 200-token limit; cut to 100 it is scored (as its first 100 words)."""
    httpx = pytest.importorskip("httpx")
    url, _ = server
    r = httpx.post(f"{url}/v2/rerank", json={"model": "m", "query": "q", "max_tokens_per_doc": 100,
                                            "documents": ["word " * 300, "a cat"]})
    assert r.status_code == 200
    _check_hits([(x["index"], x["relevance_score"]) for x in r.json()["results"]],
                reference.rank("q", [" ".join(["word"] * 100), "a cat"]))
    text = httpx.get(f"{url}/metrics").text
    assert 'memrerank_requests_total{endpoint="/v2/rerank",status="200"}' in text


# --- LangChain and LlamaIndex -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lc():
    pytest.importorskip("langchain_core", reason="the langchain extra is not installed")
    from memrerank.integrations import langchain

    return langchain


@pytest.fixture(scope="module")
def li():
    pytest.importorskip("llama_index.core", reason="the llama-index extra is not installed")
    from memrerank.integrations import llama_index

    return llama_index


def _lc_docs():
    from langchain_core.documents import Document

    return [Document(page_content=d, metadata={"source": f"m{i}", "tags": ["memory"]}, id=f"id{i}")
            for i, d in enumerate(DOCS[:8])]


def _li_nodes():
    from llama_index.core.schema import NodeWithScore, TextNode

    return [NodeWithScore(node=TextNode(text=d, id_=f"n{i}"), score=0.1 * i) for i, d in enumerate(DOCS[:8])]


def test_langchain_order_scores_and_copies(lc, bert_artifact, reference):
    docs = _lc_docs()
    before = copy.deepcopy(docs)
    rerank = lc.MemrerankRerank(artifact=bert_artifact, precision="fp32", top_n=3)
    out = rerank.compress_documents(docs, QUERY)
    want = reference.rank(QUERY, [d.page_content for d in docs], top_k=3)
    _check_hits([(int(d.id[2:]), d.metadata["relevance_score"]) for d in out], want)
    for d, hit in zip(out, want):
        assert d.page_content == hit.text and d.metadata["source"] == f"m{hit.index}"
    assert docs == before and all("relevance_score" not in d.metadata for d in docs)  # the caller's: as given
    out[0].metadata["tags"].append("changed")
    assert docs[want[0].index].metadata["tags"] == ["memory"]  # metadata is copied, not shared
    assert rerank.compress_documents([], QUERY) == []


def test_langchain_top_n_threshold_and_shared_reranker(lc, reference):
    docs = _lc_docs()
    texts = [d.page_content for d in docs]
    scores = sorted((h.score for h in reference.rank(QUERY, texts)), reverse=True)
    threshold = (scores[2] + scores[3]) / 2  # keeps exactly three
    rerank = lc.MemrerankRerank(reranker=reference, top_n=None, threshold=threshold)
    out = rerank.compress_documents(docs, QUERY)
    _check_hits([(int(d.id[2:]), d.metadata["relevance_score"]) for d in out],
                reference.rank(QUERY, texts, threshold=threshold))
    assert len(out) == 3
    everything = lc.MemrerankRerank(reranker=reference, top_n=None).compress_documents(docs, QUERY)
    assert len(everything) == len(docs)
    assert len(lc.MemrerankRerank(reranker=reference, top_n=1).compress_documents(docs, QUERY)) == 1


def test_langchain_as_a_retriever_compressor(lc, reference):
    """LangChain's own async path: ``acompress_documents`` runs ``compress_documents`` in an executor."""
    import asyncio

    docs = _lc_docs()
    out = asyncio.run(lc.MemrerankRerank(reranker=reference).acompress_documents(docs, QUERY))
    _check_hits([(int(d.id[2:]), d.metadata["relevance_score"]) for d in out],
                reference.rank(QUERY, [d.page_content for d in docs], top_k=3))


def test_llama_index_order_scores_and_inputs_untouched(li, bert_artifact, reference):
    from llama_index.core.schema import QueryBundle

    nodes = _li_nodes()
    before = [(n.node.node_id, n.node.text, n.score) for n in nodes]
    rerank = li.MemrerankRerank(artifact=bert_artifact, precision="fp32", top_n=3)
    out = rerank.postprocess_nodes(nodes, query_bundle=QueryBundle(QUERY))
    want = reference.rank(QUERY, [n.node.text for n in nodes], top_k=3)
    _check_hits([(int(n.node.node_id[1:]), n.score) for n in out], want)
    assert [(n.node.node_id, n.node.text, n.score) for n in nodes] == before
    assert all(o is not n for o in out for n in nodes)  # new NodeWithScore objects
    by_str = rerank.postprocess_nodes(nodes, query_str=QUERY)
    assert [(n.node.node_id, n.score) for n in by_str] == [(n.node.node_id, n.score) for n in out]
    assert rerank.postprocess_nodes([], query_str=QUERY) == []


def test_llama_index_top_n_threshold_and_metadata_mode(li, reference):
    from llama_index.core.schema import MetadataMode, NodeWithScore, TextNode

    nodes = _li_nodes()
    texts = [n.node.text for n in nodes]
    scores = sorted((h.score for h in reference.rank(QUERY, texts)), reverse=True)
    threshold = (scores[1] + scores[2]) / 2  # keeps exactly two
    out = li.MemrerankRerank(reranker=reference, top_n=None, threshold=threshold).postprocess_nodes(
        nodes, query_str=QUERY)
    assert len(out) == 2
    _check_hits([(int(n.node.node_id[1:]), n.score) for n in out],
                reference.rank(QUERY, texts, threshold=threshold))
    everything = li.MemrerankRerank(reranker=reference, top_n=None).postprocess_nodes(nodes, query_str=QUERY)
    assert len(everything) == 8
    # a node is scored with the metadata it embeds with, as LlamaIndex's own rerankers do
    tagged = [NodeWithScore(node=TextNode(text=d, metadata={"speaker": "Caroline"}, id_=f"n{i}"))
              for i, d in enumerate(DOCS[:4])]
    embedded = [n.node.get_content(metadata_mode=MetadataMode.EMBED) for n in tagged]
    assert embedded[0] != DOCS[0] and "Caroline" in embedded[0]
    out = li.MemrerankRerank(reranker=reference, top_n=2).postprocess_nodes(tagged, query_str=QUERY)
    _check_hits([(int(n.node.node_id[1:]), n.score) for n in out], reference.rank(QUERY, embedded, top_k=2))


def test_llama_index_emits_its_reranking_events(li, reference):
    from llama_index.core.callbacks import CallbackManager, CBEventType, LlamaDebugHandler

    debug = LlamaDebugHandler()
    rerank = li.MemrerankRerank(reranker=reference, top_n=2, callback_manager=CallbackManager([debug]))
    rerank.postprocess_nodes(_li_nodes(), query_str=QUERY)
    assert len(debug.get_event_pairs(CBEventType.RERANKING)) == 1


@pytest.mark.parametrize("framework", ["lc", "li"])
@pytest.mark.parametrize("kwargs,error,match", [
    ({}, ValueError, "pass artifact=.* or reranker=.*not neither"),
    ({"artifact": "ART", "reranker": "REF"}, ValueError, "not both"),
    ({"reranker": "not a reranker"}, TypeError, "reranker must be a memrerank.Reranker"),
    ({"reranker": "REF", "top_n": 0}, ValueError, "top_n must be a positive int or None"),
    ({"reranker": "REF", "top_n": True}, ValueError, "top_n must be a positive int or None"),
    ({"reranker": "REF", "threshold": 1.5}, ValueError, r"threshold must be a calibrated probability in \["),
    ({"artifact": "ART", "precision": "int3"}, ValueError, "precision: unknown 'int3'"),
    ({"artifact": "ART", "precision": "int8"}, ArtifactError, "int8"),  # not exported: names what exists
    ({"artifact": "ART", "options": LoadOptions("int8")}, ArtifactError, "int8"),
    ({"artifact": "ART", "options": "fp32"}, TypeError, r"options must be a memrerank\.LoadOptions"),
    ({"artifact": "ART", "options": {"precision": "fp32"}}, TypeError, r"options must be a memrerank\.LoadOptions"),
    ({"reranker": "REF", "precision": "fp32"}, ValueError, "reranker= is already loaded"),  # would be ignored
    ({"reranker": "REF", "options": LoadOptions("fp32")}, ValueError, "reranker= is already loaded"),
    ({"artifact": "/no/such/artifact"}, ArtifactError, "memrerank export"),
])
def test_bad_arguments_are_clear_errors(request, framework, kwargs, error, match, bert_artifact, reference):
    module = request.getfixturevalue(framework)
    swap = {"ART": bert_artifact, "REF": reference}
    kwargs = {k: swap.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises(error, match=match):
        module.MemrerankRerank(**kwargs)


@pytest.mark.parametrize("framework", ["lc", "li"])
def test_artifact_loads_with_the_load_options_given(request, framework, bert_artifact, reference):
    """``options`` reach ``Reranker.load`` whole (threads, batch budget, ...); ``precision`` is shorthand for its
    precision and wins over the options' one; neither given is ``precision="auto"``."""
    module = request.getfixturevalue(framework)
    opts = LoadOptions("int8", threads=1, batch_size=2)  # int8 is not exported: only precision= makes it load
    rerank = module.MemrerankRerank(artifact=bert_artifact, options=opts, precision="fp32", top_n=None)
    assert rerank.options == opts and rerank.precision == "fp32"
    loaded = rerank.reranker
    assert (loaded.precision, loaded.batch_size) == ("fp32", 2)
    assert loaded.backend.session.get_session_options().intra_op_num_threads == 1
    texts = DOCS[:8]
    want = reference.rank(QUERY, texts)
    if framework == "lc":
        from langchain_core.documents import Document

        out = rerank.compress_documents([Document(page_content=t, id=str(i)) for i, t in enumerate(texts)], QUERY)
        _check_hits([(int(d.id), d.metadata["relevance_score"]) for d in out], want)
    else:
        out = rerank.postprocess_nodes(_li_nodes(), query_str=QUERY)
        _check_hits([(int(n.node.node_id[1:]), n.score) for n in out], want)
    assert module.MemrerankRerank(artifact=bert_artifact).reranker.precision == "fp32"  # auto: the only export


def test_bad_call_arguments_are_clear_errors(lc, li, reference):
    from langchain_core.documents import Document

    with pytest.raises(TypeError, match=r"documents\[1\] must be a langchain_core.documents.Document"):
        lc.MemrerankRerank(reranker=reference).compress_documents([Document(page_content="a"), "b"], QUERY)
    with pytest.raises(TypeError, match="query must be str"):
        lc.MemrerankRerank(reranker=reference).compress_documents([Document(page_content="a")], None)
    with pytest.raises(ValueError, match="needs the query"):
        li.MemrerankRerank(reranker=reference).postprocess_nodes(_li_nodes())
    with pytest.raises(TypeError, match=r"nodes\[0\] must be a llama_index.core.schema.NodeWithScore"):
        li.MemrerankRerank(reranker=reference).postprocess_nodes(["text"], query_str=QUERY)


@pytest.mark.parametrize("module,hidden,extra", [
    ("memrerank.integrations.langchain", "langchain_core", "langchain"),
    ("memrerank.integrations.llama_index", "llama_index", "llama-index"),
])
def test_missing_framework_names_the_extra(module, hidden, extra):
    """Without the framework, importing the integration fails naming the pip command; the package imports."""
    code = (f"import sys; sys.modules[{hidden!r}] = None\n"
            "import memrerank.integrations\n"
            f"import {module}")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         check=False)
    assert run.returncode != 0
    assert f'ImportError: memrerank.integrations.{module.rsplit(".", 1)[1]} needs' in run.stderr
    assert f'pip install "memrerank[{extra}]"' in run.stderr
