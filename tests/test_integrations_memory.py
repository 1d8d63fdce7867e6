"""The memory systems, with the real packages at the versions tested (mem0ai 2.2.1, graphiti-core 0.31.2,
haystack-ai 3.4.1): each integration over an artifact in process and over a loopback ``memrerank serve``, sync and
async. Every order and score is checked against the in-process ``Reranker.rank`` (calibrated scores, 1e-5)."""

from __future__ import annotations

import asyncio
import copy
import importlib

import pytest
from models import minilm_dir
from servers import free_port
from texts import DOCS

from memrerank import LoadOptions, Reranker
from memrerank.errors import ArtifactError

try:  # the loopback uvicorn server of test_serve.py (bert_artifact, fp32, limits: 50 docs, 20 kB, 200 tokens)
    from test_serve import _serving, server
except pytest.skip.Exception as exc:  # no serve extra: the in-process tests below still run
    _why = str(exc)

    @pytest.fixture(scope="module")
    def server():
        pytest.skip(_why)

ATOL = 1e-5
QUERY = "What did Caroline paint?"
#: DOCS but the blank ones (mem0 stores none) and the last (longer than the server's 200 tokens a document)
MEMORIES = [d for d in DOCS[:-1] if d.strip()]


@pytest.fixture(scope="module")
def reference(bert_artifact):
    return Reranker.load(bert_artifact, precision="fp32")


@pytest.fixture(scope="module", params=["artifact", "url"])
def source(request, bert_artifact):
    """How an integration reaches the model: ``{"artifact", "precision"}`` in process, or ``{"url"}`` of the
    loopback server (the same artifact, fp32)."""
    if request.param == "url":
        return {"url": request.getfixturevalue("server")[0]}
    return {"artifact": str(bert_artifact), "precision": "fp32"}


def _check(got: list[tuple[str, float]], want) -> None:
    """``got`` = ``[(text, score), ...]`` in the order returned; ``want`` = ``Reranker.rank`` hits."""
    assert [t for t, _ in got] == [h.text for h in want]
    for (_, score), hit in zip(got, want):
        assert score == pytest.approx(hit.score, abs=ATOL)


# --- mem0: Memory / AsyncMemory with a local embedder and vector store, no LLM call --------------------------

@pytest.fixture(scope="module")
def mem0(tmp_path_factory):
    """mem0, kept off the network (no telemetry) and out of ``~/.mem0`` (both read when it is imported)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEM0_TELEMETRY", "False")
        mp.setenv("MEM0_DIR", str(tmp_path_factory.mktemp("mem0-home")))
        pytest.importorskip("mem0", reason="the test extra (mem0ai) is not installed")
        pytest.importorskip("sentence_transformers", reason="mem0's local embedder needs sentence-transformers "
                                                            "(the export extra)")
        yield importlib.import_module("memrerank.integrations.mem0")


def _mem0_config(tmp_path, reranker: dict) -> dict:
    """mem0's own local options: the real all-MiniLM-L6-v2 from a folder (huggingface embedder), qdrant on disk,
    an OpenAI LLM that is built but never called (``add(infer=False)``)."""
    return {
        "embedder": {"provider": "huggingface", "config": {"model": str(minilm_dir()), "embedding_dims": 384}},
        "vector_store": {"provider": "qdrant", "config": {"collection_name": "memories", "embedding_model_dims": 384,
                                                          "path": str(tmp_path / "qdrant"), "on_disk": True}},
        "llm": {"provider": "openai", "config": {"api_key": "unused"}},
        "history_db_path": str(tmp_path / "history.db"),
        "reranker": {"provider": "memrerank", "config": reranker},
    }


def _memory_texts(results: dict) -> list[str]:
    return [r["memory"] for r in results["results"]]


def test_mem0_memory_search_reranks_as_rank_does(mem0, source, tmp_path, reference):
    """``Memory.from_config`` with provider ``"memrerank"``: ``search(rerank=True)`` returns the vector search's
    candidates in ``Reranker.rank``'s order, each with its calibrated ``rerank_score``."""
    from mem0 import Memory

    memory = Memory.from_config(_mem0_config(tmp_path, source))
    assert isinstance(memory.reranker, mem0.MemrerankReranker)
    for text in MEMORIES:
        memory.add(text, user_id="u1", infer=False)
    args = {"top_k": 5, "filters": {"user_id": "u1"}, "threshold": 0.0}
    candidates = _memory_texts(memory.search(QUERY, **args))
    reranked = memory.search(QUERY, rerank=True, **args)["results"]
    want = reference.rank(QUERY, candidates)
    _check([(r["memory"], r["rerank_score"]) for r in reranked], want)
    assert [r["memory"] for r in reranked] != candidates  # the reranker, not the vector order, decided
    assert all(r["user_id"] == "u1" and "score" in r for r in reranked)  # the memories' own fields kept


def test_mem0_async_memory_search_reranks_as_rank_does(mem0, source, tmp_path, reference):
    from mem0 import AsyncMemory

    async def main():
        memory = AsyncMemory.from_config(_mem0_config(tmp_path, source))
        for text in MEMORIES:
            await memory.add(text, user_id="u1", infer=False)
        args = {"top_k": 6, "filters": {"user_id": "u1"}, "threshold": 0.0}
        return (_memory_texts(await memory.search(QUERY, **args)),
                (await memory.search(QUERY, rerank=True, **args))["results"])

    candidates, reranked = asyncio.run(main())
    _check([(r["memory"], r["rerank_score"]) for r in reranked], reference.rank(QUERY, candidates))


def test_mem0_reranker_top_k_threshold_and_copies(mem0, source, reference):
    """``rerank`` itself: ``top_k`` from the call (else the config's), ``threshold`` from the config, text from
    ``memory`` (else ``text`` / ``content``), the caller's dicts untouched."""
    docs = [{"id": i, "memory": t} if i % 3 else {"id": i, "text": t} for i, t in enumerate(DOCS[:9])]
    before = copy.deepcopy(docs)
    cut = reference.rank(QUERY, DOCS[:9])[4].score
    rr = mem0.MemrerankReranker({**source, "top_k": 6, "threshold": cut})
    got = rr.rerank(QUERY, docs)
    _check([(DOCS[r["id"]], r["rerank_score"]) for r in got], reference.rank(QUERY, DOCS[:9], top_k=6,
                                                                            threshold=cut))
    assert len(got) == 5 and docs == before
    got[0]["memory"] = "changed"
    assert docs == before  # copies, not the caller's dicts
    top2 = rr.rerank(QUERY, docs, top_k=2)
    _check([(DOCS[r["id"]], r["rerank_score"]) for r in top2], reference.rank(QUERY, DOCS[:9], top_k=2))
    assert rr.rerank(QUERY, []) == []


def test_mem0_bad_config_and_documents_say_what_to_do(mem0, bert_artifact):
    from pydantic import ValidationError

    with pytest.raises(ValueError, match=r"pass artifact=.* or url=.*not artifact and url"):
        mem0.MemrerankReranker({"artifact": str(bert_artifact), "url": "http://127.0.0.1:1"})
    with pytest.raises(ValueError, match="not none of them"):
        mem0.MemrerankReranker({})
    with pytest.raises(ValidationError, match="artifcat"):  # a typo is refused, not ignored
        mem0.MemrerankReranker({"artifcat": str(bert_artifact)})
    with pytest.raises(ValidationError, match="threshold must be a calibrated probability"):
        mem0.MemrerankReranker({"artifact": str(bert_artifact), "threshold": 2})
    with pytest.raises(ValueError, match="encoder cross-encoders take no instruction"):
        mem0.MemrerankReranker({"artifact": str(bert_artifact), "precision": "fp32", "instruction": "Rank"})
    rr = mem0.MemrerankReranker({"artifact": str(bert_artifact), "precision": "fp32"})
    with pytest.raises(TypeError, match=r"documents\[1\] must be a mem0 memory dict with a 'memory' string"):
        rr.rerank(QUERY, [{"memory": "a"}, {"id": 2}])


def test_mem0_provider_is_registered_on_import(mem0):
    from mem0.utils.factory import RerankerFactory

    assert RerankerFactory.provider_to_class["memrerank"] == (
        "memrerank.integrations.mem0.MemrerankReranker", mem0.MemrerankRerankerConfig)


# --- Graphiti: a CrossEncoderClient ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def graphiti(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRAPHITI_TELEMETRY_ENABLED", "false")
        pytest.importorskip("graphiti_core", reason="the test extra (graphiti-core) is not installed")
        yield importlib.import_module("memrerank.integrations.graphiti")


def test_graphiti_rank_is_rank(graphiti, source, reference):
    from graphiti_core.cross_encoder.client import CrossEncoderClient

    client = graphiti.MemrerankRerankerClient(**source)
    assert isinstance(client, CrossEncoderClient)
    got = asyncio.run(client.rank(QUERY, DOCS[:-1]))
    _check(got, reference.rank(QUERY, DOCS[:-1]))
    assert all(0.0 <= s <= 1.0 for _, s in got) and len(got) == len(DOCS) - 1
    assert asyncio.run(client.rank(QUERY, [])) == []


def test_graphiti_search_reranks_edges_with_the_client(graphiti, source, reference, monkeypatch):
    """``Graphiti(cross_encoder=...)`` (a Neo4j driver that never connects) and its real ``search_`` with the
    ``cross_encoder`` edge reranker: the facts a full-text search found come back in ``Reranker.rank``'s order
    with its scores."""
    from datetime import datetime, timezone

    from graphiti_core import Graphiti
    from graphiti_core.driver.neo4j_driver import Neo4jDriver
    from graphiti_core.edges import EntityEdge
    from graphiti_core.embedder.openai import OpenAIEmbedder, OpenAIEmbedderConfig
    from graphiti_core.llm_client import LLMConfig, OpenAIClient
    from graphiti_core.search import search as search_module
    from graphiti_core.search.search_config import (
        EdgeReranker,
        EdgeSearchConfig,
        EdgeSearchMethod,
        SearchConfig,
    )

    client = graphiti.MemrerankRerankerClient(**source)
    g = Graphiti(graph_driver=Neo4jDriver(f"bolt://127.0.0.1:{free_port()}", None, None),
                 llm_client=OpenAIClient(LLMConfig(api_key="unused")),
                 embedder=OpenAIEmbedder(OpenAIEmbedderConfig(api_key="unused")), cross_encoder=client)
    assert g.clients.cross_encoder is client
    facts = DOCS[:3] + DOCS[5:9]  # distinct facts (graphiti keys candidates by fact)
    now = datetime.now(timezone.utc)
    edges = [EntityEdge(group_id="g", source_node_uuid=f"s{i}", target_node_uuid=f"t{i}", created_at=now,
                        name="MENTIONS", fact=fact) for i, fact in enumerate(facts)]

    async def fulltext(*args, **kwargs):
        return edges

    monkeypatch.setattr(search_module, "edge_fulltext_search", fulltext)
    config = SearchConfig(edge_config=EdgeSearchConfig(search_methods=[EdgeSearchMethod.bm25],
                                                       reranker=EdgeReranker.cross_encoder), limit=5)
    results = asyncio.run(g.search_(QUERY, config=config))
    _check(list(zip([e.fact for e in results.edges], results.edge_reranker_scores)),
           reference.rank(QUERY, facts, top_k=5))


def test_graphiti_bad_arguments_say_what_to_do(graphiti, bert_artifact):
    with pytest.raises(ValueError, match="options= and precision= say how artifact= loads"):
        graphiti.MemrerankRerankerClient(url="http://127.0.0.1:1", precision="fp32")
    with pytest.raises(ValueError, match="api_key= and model= are sent to url="):
        graphiti.MemrerankRerankerClient(bert_artifact, api_key="k")
    with pytest.raises(ValueError, match=r"url must be the base URL of a running `memrerank serve`"):
        graphiti.MemrerankRerankerClient(url="127.0.0.1:8080")
    with pytest.raises(ArtifactError):
        graphiti.MemrerankRerankerClient(bert_artifact, precision="int8")
    client = graphiti.MemrerankRerankerClient(bert_artifact, options={"precision": "fp32", "threads": 1})
    assert client.ranking.reranker.precision == "fp32"
    with pytest.raises(TypeError, match=r"options: unknown field\(s\)"):
        graphiti.MemrerankRerankerClient(bert_artifact, options={"precison": "fp32"})
    with pytest.raises(TypeError, match=r"texts\[1\] must be str, got int"):
        asyncio.run(client.rank(QUERY, ["a", 3]))


# --- the service client: keys, errors ----------------------------------------------------------------------

def test_service_sends_the_api_key_and_reports_errors(graphiti, bert_artifact, server, reference):
    """``api_key`` goes as ``Authorization: Bearer``; a refusal and an unreachable service are one-line errors
    naming the status / what to do, never scores made up."""
    from memrerank.integrations._client import ServiceError
    from memrerank.serve import ServeConfig, create_app

    with _serving(create_app(ServeConfig(bert_artifact, LoadOptions("fp32"), api_key="sesame"))) as url:
        good = graphiti.MemrerankRerankerClient(url=url, api_key="sesame")
        _check(asyncio.run(good.rank(QUERY, DOCS[:4])), reference.rank(QUERY, DOCS[:4]))
        with pytest.raises(ServiceError, match=f"the rerank service at {url} answered 401"):
            asyncio.run(graphiti.MemrerankRerankerClient(url=url, api_key="wrong").rank(QUERY, DOCS[:4]))
    too_many = graphiti.MemrerankRerankerClient(url=server[0])
    with pytest.raises(ServiceError, match="answered 413: .*documents"):
        asyncio.run(too_many.rank(QUERY, ["memory"] * 51))  # the server's limit is 50
    gone = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServiceError, match=f"cannot reach the rerank service at {gone}.*memrerank serve"):
        asyncio.run(graphiti.MemrerankRerankerClient(url=gone).rank(QUERY, DOCS[:2]))


# --- Haystack: a component under haystack_integrations, loaded from a pipeline YAML --------------------------

@pytest.fixture(scope="module")
def haystack():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HAYSTACK_TELEMETRY_ENABLED", "False")
        pytest.importorskip("haystack", reason="the test extra (haystack-ai) is not installed")
        yield importlib.import_module("haystack_integrations.components.rankers.memrerank")


def _pipeline_yaml(source: dict) -> str:
    """A pipeline file as a user writes it: BM25 over a shared in-memory store, then the memrerank ranker."""
    init = "".join(f"\n      {k}: '{v}'" for k, v in source.items())
    return f"""\
components:
  retriever:
    type: haystack.components.retrievers.in_memory.bm25_retriever.InMemoryBM25Retriever
    init_parameters:
      document_store:
        type: haystack.document_stores.in_memory.document_store.InMemoryDocumentStore
        init_parameters: {{index: memrerank-test}}
      top_k: 6
  ranker:
    type: haystack_integrations.components.rankers.memrerank.ranker.MemrerankRanker
    init_parameters:{init}
      top_k: 4
      meta_fields_to_embed: [speaker]
connections:
- sender: retriever.documents
  receiver: ranker.documents
"""


def _documents(haystack_module):
    from haystack import Document

    return [Document(content=t, meta={"speaker": "Caroline" if i % 2 else "", "i": i})
            for i, t in enumerate(DOCS[:9])]


def _embedded(doc) -> str:
    """What ``meta_fields_to_embed=["speaker"]`` scores: the speaker (when set), a newline, the content."""
    return f"{doc.meta['speaker']}\n{doc.content}" if doc.meta["speaker"] else doc.content


def test_haystack_pipeline_yaml_loads_and_ranks(haystack, source, reference):
    """A pipeline file naming the component loads (no allowlist needed) and, after a retriever, sync and async
    runs return copies of the retrieved documents in ``Reranker.rank``'s order, ``score`` set, the
    ``meta_fields_to_embed`` scored in front of the content."""
    from haystack import Pipeline
    from haystack.document_stores.in_memory import InMemoryDocumentStore

    InMemoryDocumentStore(index="memrerank-test").write_documents(_documents(haystack), policy="overwrite")
    query = "Who painted the lake, and who ran the 5k?"
    data = {"retriever": {"query": query}, "ranker": {"query": query}}
    yaml = _pipeline_yaml(source)
    result = Pipeline.loads(yaml).run(data, include_outputs_from={"retriever"})
    retrieved, out = result["retriever"]["documents"], result["ranker"]["documents"]
    assert len(retrieved) > 4  # BM25 found more than the ranker keeps
    before = copy.deepcopy(retrieved)
    _check([(_embedded(d), d.score) for d in out], reference.rank(query, [_embedded(d) for d in retrieved],
                                                                  top_k=4))
    assert retrieved == before and {d.id for d in out} <= {d.id for d in retrieved}

    async def run_async():
        pipe = Pipeline.loads(yaml)  # haystack 3: one Pipeline, run or run_async
        return await pipe.run_async(data, include_outputs_from={"retriever"})
    result = asyncio.run(run_async())
    retrieved, out = result["retriever"]["documents"], result["ranker"]["documents"]
    _check([(_embedded(d), d.score) for d in out], reference.rank(query, [_embedded(d) for d in retrieved],
                                                                  top_k=4))


def test_haystack_run_top_k_threshold_and_empty(haystack, source, reference):
    ranker = haystack.MemrerankRanker(**source, top_k=None)
    ranker.warm_up()
    docs = _documents(haystack)
    cut = reference.rank(QUERY, DOCS[:9])[3].score
    out = ranker.run(QUERY, docs, score_threshold=cut)["documents"]
    _check([(d.content, d.score) for d in out], reference.rank(QUERY, DOCS[:9], threshold=cut))
    assert len(out) == 4
    out[0].meta["speaker"] = "changed"
    assert [d.meta for d in docs] == [d.meta for d in _documents(haystack)]  # copies, meta included
    out = asyncio.run(ranker.run_async(QUERY, docs, top_k=3))["documents"]
    _check([(d.content, d.score) for d in out], reference.rank(QUERY, DOCS[:9], top_k=3))
    assert ranker.run(QUERY, []) == {"documents": []}
    assert asyncio.run(ranker.run_async(QUERY, [])) == {"documents": []}


def test_haystack_to_dict_from_dict_round_trip(haystack, bert_artifact):
    ranker = haystack.MemrerankRanker(artifact=bert_artifact, options=LoadOptions("fp32", threads=1), top_k=3,
                                      score_threshold=0.25, meta_fields_to_embed=["title"], meta_data_separator=" | ")
    data = ranker.to_dict()
    assert data["type"] == "haystack_integrations.components.rankers.memrerank.ranker.MemrerankRanker"
    assert data["init_parameters"]["options"]["threads"] == 1
    assert data["init_parameters"]["api_key"] == {"type": "env_var", "env_vars": ["MEMRERANK_API_KEY"],
                                                  "strict": False}
    again = haystack.MemrerankRanker.from_dict(copy.deepcopy(data))
    assert again.to_dict() == data and again.options == LoadOptions("fp32", threads=1)
    served = haystack.MemrerankRanker(url="http://127.0.0.1:8080", model="m", timeout=5.0)
    assert haystack.MemrerankRanker.from_dict(served.to_dict()).to_dict() == served.to_dict()


def test_haystack_bad_arguments_say_what_to_do(haystack, bert_artifact):
    from haystack import Document

    with pytest.raises(ValueError, match="not none of them"):
        haystack.MemrerankRanker()
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        haystack.MemrerankRanker(artifact=bert_artifact, top_k=0)
    with pytest.raises(ValueError, match="LoadOptions.precision: unknown 'fp99'"):
        haystack.MemrerankRanker(artifact=bert_artifact, precision="fp99")
    ranker = haystack.MemrerankRanker(artifact=bert_artifact, precision="fp32")
    with pytest.raises(TypeError, match=r"documents\[1\] must be a haystack.Document, got str"):
        ranker.run(QUERY, [Document(content="a"), "b"])
    with pytest.raises(ValueError, match="score_threshold must be a calibrated probability"):
        ranker.run(QUERY, [Document(content="a")], score_threshold=1.5)


def test_instruction_reaches_a_decoder_reranker(haystack, graphiti, qwen_artifact):
    """A decoder artifact's task instruction is scored with (its scores move), in every integration's local
    mode; an instruction that leaves no room for a document is refused when the integration is built."""
    ref = Reranker.load(qwen_artifact, precision="fp32")
    task = "Given a question about hobbies, find the memory that answers it"
    want = ref.rank(QUERY, DOCS[:6], instruction=task)
    assert [h.score for h in want] != pytest.approx([h.score for h in ref.rank(QUERY, DOCS[:6])], abs=ATOL)
    from haystack import Document

    ranker = haystack.MemrerankRanker(artifact=qwen_artifact, precision="fp32", instruction=task, top_k=None)
    _check([(d.content, d.score) for d in ranker.run(QUERY, [Document(content=t) for t in DOCS[:6]])["documents"]],
           want)
    client = graphiti.MemrerankRerankerClient(reranker=ref, instruction=task)
    _check(asyncio.run(client.rank(QUERY, DOCS[:6])), want)
    with pytest.raises(ValueError, match="leaving no room for a document"):
        graphiti.MemrerankRerankerClient(reranker=ref, instruction="remember " * ref.encoder.max_length)
