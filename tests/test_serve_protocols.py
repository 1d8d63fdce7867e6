"""The rerank routes tell the truth (issue 28), against a loopback server and the real clients where one
exists (the cohere SDK 7.3.1, ``rerankers`` 0.10.0's Jina and TEI rankers):

* a request's ``instruction`` is scored as ``Reranker.rank(..., instruction=...)`` scores it on every route,
  and ``serve --instruction`` is the default; an encoder artifact answers a 400 for one; it counts in the
  tokens;
* each result says whether its document was cut (``truncated``) and the response whether the query was
  (``query_truncated``): a query too long for the model is cut, the template kept; TEI's ``truncate`` and
  ``truncation_direction`` are honoured;
* errors come in each API's own shape and status (Cohere ``{"message"}`` 400, TEI ``{"error", "error_type"}``,
  Jina and vLLM ``{"detail"}``);
* vLLM's ``/score``, ``/v1/score`` and ``/rerank`` (``documents``) forms; Jina's ``usage.total_tokens``;
* empty ``documents`` is a 200 with no results; responses name the served model.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")
httpx = pytest.importorskip("httpx")

# test_serve's bert server (fp32, 64 tokens; limits: 50 documents, 20 kB, 200 tokens per document)
from test_serve import _serving, server  # noqa: F401
from texts import DOCS

from memrerank import LoadOptions, Reranker
from memrerank.serve import Limits, ServeConfig, create_app, pair_tokens

ATOL = 1e-5
INSTRUCTION = "Given a question about a user's life, find the memory that answers it"
Q = "What did Caroline paint?"
#: Every scoring route, as ``(path, body of (query, documents))``.
ROUTES = {
    "cohere-v1": ("/v1/rerank", lambda q, d: {"query": q, "documents": d}),
    "cohere-v2": ("/v2/rerank", lambda q, d: {"query": q, "documents": d}),
    "tei": ("/rerank", lambda q, d: {"query": q, "texts": d}),
    "vllm-rerank": ("/rerank", lambda q, d: {"query": q, "documents": d}),
    "vllm-score": ("/score", lambda q, d: {"text_1": q, "text_2": d}),
    "vllm-v1-score": ("/v1/score", lambda q, d: {"text_1": q, "text_2": d}),
}


def _post(url: str, route: str, query, docs, **extra) -> httpx.Response:
    path, body = ROUTES[route]
    return httpx.post(f"{url}{path}", json={**body(query, docs), **extra}, timeout=60)


def _items(route: str, body) -> list[dict]:
    """The per-document items of a 200 answer: results, TEI's list, vLLM score's data."""
    return body if route == "tei" else body["data"] if "score" in route else body["results"]


def _scores(route: str, body) -> dict[int, float]:
    key = "score" if route == "tei" or "score" in route else "relevance_score"
    return {x["index"]: x[key] for x in _items(route, body)}


def _query_truncated(route: str, body) -> bool:
    """TEI's list and vLLM score's data flag the query on each item; the others at the top level."""
    flags = {x["query_truncated"] for x in _items(route, body)} if route == "tei" or "score" in route else \
        {body["query_truncated"]}
    assert len(flags) == 1, flags
    return flags.pop()


def _work(reranker, split) -> int:
    """The tokens the model reads for a split: each pair's, a decoder's shared query prefix once."""
    shared = bool(reranker.prefix_reuse)
    return int(pair_tokens(split, shared).sum()) + (len(split.head) if shared else 0)


def _want(hits) -> dict[int, float]:
    return {h.index: h.score for h in hits}


@pytest.fixture(scope="module")
def bert(server, bert_artifact):  # noqa: F811 - test_serve's fixture
    url, app = server
    return url, app, Reranker.load(bert_artifact, "fp32")


@pytest.fixture(scope="module")
def decoder(qwen_short_artifact):
    """The tiny Qwen3 reranker (decoder, max_length 128) served with no default instruction."""
    app = create_app(ServeConfig(qwen_short_artifact, LoadOptions("fp32"), max_wait_ms=1))
    with _serving(app) as url:
        yield url, app, Reranker.load(qwen_short_artifact, "fp32")


# -------------------------------------------------------------------------------------------- instruction
@pytest.mark.parametrize("route", ROUTES)
def test_an_instruction_is_honoured_on_every_route(decoder, route):
    """Observed: ``instruction`` was silently ignored (200, the default instruction's scores). Now each route
    scores it as ``Reranker.rank(..., instruction=...)`` does, which differs from the default's."""
    url, _, ref = decoder
    docs = DOCS[:5]
    r = _post(url, route, Q, docs, instruction=INSTRUCTION)
    assert r.status_code == 200, r.text
    want, plain = _want(ref.rank(Q, docs, instruction=INSTRUCTION)), _want(ref.rank(Q, docs))
    assert _scores(route, r.json()) == pytest.approx(want, abs=ATOL)
    assert max(abs(want[i] - plain[i]) for i in want) > 100 * ATOL, "the instruction must change the scores"
    assert _scores(route, _post(url, route, Q, docs).json()) == pytest.approx(plain, abs=ATOL)


def test_serve_instruction_is_the_default(qwen_short_artifact, bert_artifact, monkeypatch, capsys):
    """``ServeConfig.instruction`` (``serve --instruction``, ``build_app(instruction=...)``) is what a request
    without one is scored with; a request's own wins. An encoder artifact refuses it before serving."""
    config = ServeConfig(qwen_short_artifact, LoadOptions("fp32"), instruction=INSTRUCTION)
    ref = Reranker.load(qwen_short_artifact, "fp32")
    other = "Find the memory about painting"
    with _serving(create_app(config)) as url:
        got = _scores("cohere-v2", _post(url, "cohere-v2", Q, DOCS[:4]).json())
        assert got == pytest.approx(_want(ref.rank(Q, DOCS[:4], instruction=INSTRUCTION)), abs=ATOL)
        got = _scores("tei", _post(url, "tei", Q, DOCS[:4], instruction=other).json())
        assert got == pytest.approx(_want(ref.rank(Q, DOCS[:4], instruction=other)), abs=ATOL)
    with pytest.raises(ValueError, match=r"ServeConfig\.instruction: .* encoder-cross artifact, whose "
                                         r"template has no instruction; leave it None"):
        create_app(ServeConfig(bert_artifact, LoadOptions("fp32"), instruction=INSTRUCTION))

    import memrerank.serve
    from memrerank.cli import main
    from memrerank.scale import _parse_app_args

    calls = []
    monkeypatch.setattr(memrerank.serve, "serve", lambda config, *a: calls.append(config))
    assert main(["serve", str(qwen_short_artifact), "--instruction", INSTRUCTION, "--json"]) == 0
    assert calls[-1].instruction == INSTRUCTION
    assert json.loads(capsys.readouterr().out)["instruction"] == INSTRUCTION
    assert main(["serve", str(bert_artifact), "--instruction", INSTRUCTION]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has no instruction; leave --instruction out" in err, err
    assert len(calls) == 1
    config, _ = _parse_app_args({"artifact": str(qwen_short_artifact), "instruction": other})
    assert config.instruction == other


@pytest.mark.parametrize("route", ROUTES)
def test_an_encoder_artifact_answers_400_for_an_instruction(bert, route):
    """An encoder cross-encoder's template has no instruction: a request with one is a clear 400 (TEI: 422),
    in the route's error shape, never a silent ignore."""
    url, _, _ = bert
    r = _post(url, route, Q, DOCS[:3], instruction=INSTRUCTION)
    assert r.status_code == (422 if route == "tei" else 400), r.text
    body = r.json()
    message = body.get("message") or body.get("detail") or body["error"]
    assert message == ("'instruction': this encoder-cross model has no instruction in its template; send the "
                       "request without one")


def test_the_cohere_sdk_sends_an_instruction(decoder, bert):
    """The cohere SDK's ``additional_body_parameters`` carry ``instruction``: scored on a decoder, a
    ``BadRequestError`` from an encoder."""
    cohere = pytest.importorskip("cohere", reason="the test extra (cohere SDK) is not installed")
    from cohere.errors import BadRequestError

    extra = {"additional_body_parameters": {"instruction": INSTRUCTION}}
    url, _, ref = decoder
    resp = cohere.ClientV2(api_key="unused", base_url=url).rerank(model="m", query=Q, documents=DOCS[:4],
                                                                   request_options=extra)
    assert {r.index: r.relevance_score for r in resp.results} == pytest.approx(
        _want(ref.rank(Q, DOCS[:4], instruction=INSTRUCTION)), abs=ATOL)
    for client in (cohere.Client, cohere.ClientV2):
        with pytest.raises(BadRequestError, match="has no instruction"):
            client(api_key="unused", base_url=bert[0]).rerank(model="m", query=Q, documents=DOCS[:2],
                                                              request_options=extra)


def test_an_instruction_counts_in_the_token_budget(qwen_short_artifact):
    """The instruction is part of every pair the model reads: ``usage.total_tokens`` counts it, and a request
    that fits ``max_request_tokens`` without it is a 413 with it."""
    ref = Reranker.load(qwen_short_artifact, "fp32")
    docs = DOCS[:3]
    plain = _work(ref, ref.encoder.split(Q, docs))
    instructed = _work(ref, ref.encoder.split(Q, docs, INSTRUCTION))
    assert instructed > plain
    with _serving(create_app(ServeConfig(qwen_short_artifact, LoadOptions("fp32"),
                                         limits=Limits(max_request_tokens=plain)))) as url:
        r = _post(url, "cohere-v1", Q, docs)
        assert r.status_code == 200 and r.json()["usage"]["total_tokens"] == plain
        r = _post(url, "cohere-v1", Q, docs, instruction=INSTRUCTION)
        assert r.status_code == 413 and f"the request is {instructed} tokens of work" in r.json()["message"]


# --------------------------------------------------------------------------------------------- truncation
@pytest.mark.parametrize("route", ROUTES)
def test_each_result_says_whether_its_document_was_cut(bert, route):
    """Observed: no response said a document was cut (``RankHit.truncated`` was dropped). Now each result's
    ``truncated`` is ``Reranker.rank``'s, and the query's flag is false for a query that fits."""
    url, _, ref = bert
    docs = DOCS[:3] + ["word " * 100, "memory " * 150]  # the last two are past the model's 64 tokens
    r = _post(url, route, Q, docs)
    assert r.status_code == 200, r.text
    want = {h.index: h.truncated for h in ref.rank(Q, docs)}
    assert {x["index"]: x["truncated"] for x in _items(route, r.json())} == want
    assert sorted(i for i, cut in want.items() if cut) == [3, 4]
    assert _query_truncated(route, r.json()) is False


def test_a_document_cut_by_max_tokens_per_doc_is_flagged(bert):
    url, _, _ = bert
    r = _post(url, "cohere-v2", Q, ["a cat", "one two three four five six seven"], max_tokens_per_doc=5)
    assert {x["index"]: x["truncated"] for x in r.json()["results"]} == {0: False, 1: True}


@pytest.mark.parametrize("route", ROUTES)
def test_a_query_too_long_is_cut_and_flagged(bert, route):
    """Observed: a query too long for the model was a 422 (mem0 turned it into every score 0.0). Now it is cut
    to leave a document 16 tokens of the model's 64 ([CLS] query [SEP] document [SEP]: 45 query tokens), the
    template kept, and flagged; the scores are ``Reranker.rank``'s for the cut query."""
    url, _, ref = bert
    docs = DOCS[:4]
    r = _post(url, route, "why " * 100, docs)
    assert r.status_code == 200, r.text
    assert _query_truncated(route, r.json()) is True
    assert _scores(route, r.json()) == pytest.approx(_want(ref.rank(" ".join(["why"] * 45), docs)), abs=ATOL)


def test_the_cohere_sdk_parses_the_extra_fields(bert):
    """``truncated`` and ``query_truncated`` are extra fields the cohere SDK (v1 and v2) parses past."""
    cohere = pytest.importorskip("cohere", reason="the test extra (cohere SDK) is not installed")
    url, _, ref = bert
    docs = [DOCS[0], "word " * 100]
    for client in (cohere.Client, cohere.ClientV2):
        resp = client(api_key="unused", base_url=url).rerank(model="m", query="why " * 100, documents=docs)
        assert {r.index: r.relevance_score for r in resp.results} == pytest.approx(
            _want(ref.rank(" ".join(["why"] * 45), docs)), abs=ATOL)


def test_tei_truncation_direction_and_truncate(bert):
    """TEI's ``truncation_direction: "Left"`` keeps a document's (and a query's) last tokens, ``"Right"`` (the
    default) its first; ``truncate: false`` refuses a query too long (413, TEI's ``Validation``)."""
    url, _, ref = bert
    assert all(len(ref.tokenizer.encode(w, add_special_tokens=False).ids) == 1 for w in ("alpha", "omega"))
    doc = "alpha " * 100 + "omega " * 100

    def raw(query, direction=None):
        extra = {"truncation_direction": direction} if direction else {}
        r = _post(url, "tei", query, [doc, DOCS[0]], raw_scores=True, **extra)
        assert r.status_code == 200, r.text
        return {x["index"]: x["score"] for x in r.json()}, any(x["truncated"] for x in r.json())

    left, flagged = raw("q", "Left")  # [CLS] q [SEP] + 60 document tokens + [SEP]
    assert flagged and left[0] == pytest.approx(ref.predict([("q", "omega " * 60)], raw=True)[0], abs=ATOL)
    for direction in (None, "Right"):
        assert raw("q", direction)[0][0] == pytest.approx(ref.predict([("q", doc)], raw=True)[0], abs=ATOL)
    left, _ = raw("alpha " * 60 + "omega " * 60, "Left")  # the query's last 45 tokens
    assert left[1] == pytest.approx(ref.predict([("omega " * 45, DOCS[0])], raw=True)[0], abs=ATOL)
    r = _post(url, "tei", "why " * 100, DOCS[:2], truncate=False)
    assert r.status_code == 413 and r.json() == {
        "error": "'query' does not fit the model's max length and truncate is false; shorten it or send "
                 "truncate true", "error_type": "Validation"}
    r = _post(url, "tei", "q", DOCS[:2], truncation_direction="up")
    assert r.status_code == 422 and r.json()["error_type"] == "Validation"


# ------------------------------------------------------------------------------------------- error shapes
def test_errors_come_in_each_apis_shape(bert):
    """Observed: ``{"error": {"type", "message"}}`` everywhere: Jina clients crashed on ``KeyError: 'detail'``
    and Cohere SDK users catching ``BadRequestError`` missed memrerank's 422s. Now each API's own shape and
    status, counted in /metrics."""
    url, _, _ = bert
    cohere = pytest.importorskip("cohere", reason="the test extra (cohere SDK) is not installed")
    from cohere.errors import BadRequestError

    with pytest.raises(BadRequestError) as err:  # Cohere v1 answers 400
        cohere.Client(api_key="unused", base_url=url).rerank(model="m", query="q", documents=["d"], top_n=0)
    assert err.value.body["message"] == "'top_n' must be a positive integer"
    # what haystack's JinaRanker does with an answer: results, or raise resp["detail"]
    resp = httpx.post(f"{url}/v1/rerank", json={"model": "jina-reranker-v2-base-multilingual", "query": "q",
                                                "documents": "not a list"}).json()
    assert "results" not in resp and resp["detail"] == "'documents' must be a list of strings"
    r = _post(url, "tei", 3, ["d"])
    assert r.status_code == 422
    assert r.json() == {"error": "'query' must be a string", "error_type": "Validation"}
    r = _post(url, "vllm-rerank", 3, ["d"])
    assert r.status_code == 400 and r.json() == {"detail": "'query' must be a string"}
    r = httpx.post(f"{url}/score", json={"text_1": ["a", "b"], "text_2": ["x", "y", "z"]})
    assert r.status_code == 400 and r.json() == {
        "detail": "'text_1' has 2 texts and 'text_2' 3: send one text_1, or one per text_2"}
    r = httpx.post(f"{url}/v1/score", json={"text_1": "q", "text_2": ["d"] * 51})
    assert r.status_code == 413 and "51 pairs exceed the limit of 50" in r.json()["detail"]
    text = httpx.get(f"{url}/metrics").text
    assert 'memrerank_requests_total{endpoint="/score",status="400"}' in text
    assert 'memrerank_requests_total{endpoint="/v1/score",status="413"}' in text


# ------------------------------------------------------------------------------------------------ vLLM, Jina
def test_vllm_score_shapes(bert):
    """``/score`` and ``/v1/score``: one ``text_1`` against every ``text_2`` (a string, or a list of one), or
    ``text_1[i]`` against ``text_2[i]``; data in the order given; vLLM's response fields."""
    url, app, ref = bert
    docs = DOCS[:4]
    want = _want(ref.rank(Q, docs))
    for path, text_1 in (("/score", Q), ("/v1/score", [Q])):
        body = httpx.post(f"{url}{path}", json={"model": app.state.config.name, "text_1": text_1,
                                                "text_2": docs}).json()
        assert set(body) == {"id", "object", "created", "model", "data", "usage"} and body["object"] == "list"
        assert body["model"] == app.state.config.name and isinstance(body["created"], int)
        assert [x["index"] for x in body["data"]] == [0, 1, 2, 3]
        assert {x["object"] for x in body["data"]} == {"score"}
        assert _scores("vllm-score", body) == pytest.approx(want, abs=ATOL)
        assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] > 0
    pairs = [("Who painted?", DOCS[0]), ("When is the dentist?", DOCS[1]), ("Who painted?", DOCS[2])]
    text_1, text_2 = zip(*pairs)
    body = httpx.post(f"{url}/score", json={"text_1": text_1, "text_2": text_2}).json()
    np.testing.assert_allclose([x["score"] for x in body["data"]], ref.predict(pairs), atol=ATOL)


def test_vllm_and_jina_rerank_shapes(bert):
    """vLLM's ``/rerank`` (``documents``, dispatched from TEI's ``texts`` by the body) and Jina's
    ``/v1/rerank`` answer ``{"id", "model", "usage": {"total_tokens"}, "results": [{"index", "document":
    {"text"}, "relevance_score"}]}``; the ``rerankers`` Jina and TEI rankers read them."""
    url, app, ref = bert
    docs = DOCS[:5]
    want = ref.rank(Q, docs, top_k=2)
    tokens = _work(ref, ref.encoder.split(Q, docs))
    for path in ("/rerank", "/v1/rerank"):
        body = httpx.post(f"{url}{path}", json={"query": Q, "documents": docs, "top_n": 2}).json()
        assert body["model"] == app.state.config.name and body["usage"]["total_tokens"] == tokens
        results = body["results"]
        assert [(x["index"], x["document"]["text"]) for x in results] == [(h.index, h.text) for h in want]
        assert [x["relevance_score"] for x in results] == pytest.approx([h.score for h in want], abs=ATOL)
    everything = httpx.post(f"{url}/rerank", json={"query": Q, "documents": docs, "top_n": 0}).json()
    assert len(everything["results"]) == 5  # vLLM's top_n 0: all
    rerankers = pytest.importorskip("rerankers", reason="rerankers (the test extra) is not installed")
    for provider, path in (("jina", "/v1/rerank"), ("text-embeddings-inference", "/rerank")):
        ranker = rerankers.Reranker("memrerank", model_type=provider, api_key="unused", url=f"{url}{path}",
                                    verbose=0)
        got = ranker.rank(Q, docs)
        assert [(r.document.text, r.score) for r in got.results] == [
            (h.text, pytest.approx(h.score, abs=ATOL)) for h in ref.rank(Q, docs)]


# --------------------------------------------------------------------------------- empty, the model's name
@pytest.mark.parametrize("route", ROUTES)
def test_empty_documents_are_a_200_with_no_results(bert, route):
    """Observed: 422, while ``rank(q, [])`` is ``[]`` (haystack sends ``[]`` when its retriever finds
    nothing)."""
    url, _, ref = bert
    r = _post(url, route, Q, [])
    assert r.status_code == 200, r.text
    assert _items(route, r.json()) == [] == ref.rank(Q, [])


def test_responses_name_the_served_model(bert):
    """Observed: any model name was accepted and echoed back. Cohere's and Jina's clients send their own
    default names, so ``/v1/rerank`` and ``/v2/rerank`` take any and answer with the served name; vLLM's
    routes refuse another model's name with vLLM's 404."""
    url, app, _ = bert
    name = app.state.config.name
    for route in ("cohere-v1", "cohere-v2"):
        r = _post(url, route, Q, DOCS[:2], model="rerank-english-v3.0")
        assert r.status_code == 200 and r.json()["model"] == name
    for route in ("vllm-rerank", "vllm-score", "vllm-v1-score"):
        r = _post(url, route, Q, DOCS[:2], model="BAAI/bge-reranker-base")
        assert r.status_code == 404 and r.json() == {
            "detail": f"The model `BAAI/bge-reranker-base` does not exist; this service serves `{name}`"}
        r = _post(url, route, Q, DOCS[:2], model=name)
        assert r.status_code == 200 and r.json()["model"] == name
