"""Shared-prefix reuse, token-budget batching and dialogue context."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import PARITY_ATOL
from memrerank import Reranker
from memrerank.errors import ArtifactError
from memrerank.manifest import read_manifest
from memrerank.runtime.encoding import MIN_DOCUMENT_TOKENS
from texts import DOCS, QUERIES

CONTEXT = ["I have two sisters, Caroline and Melanie.", "Caroline lives in Lisbon; Melanie in Oslo.",
           "Melanie just started painting."]


def test_artifact_has_one_graph_with_past_inputs(qwen_artifact):
    """Prefix/suffix passes use the same graph (weights stored once): past_* inputs, present_* outputs."""
    m = read_manifest(qwen_artifact)
    layout = m.prefix_reuse
    assert layout.past_batch == 1 and layout.layers == 2
    fp32 = m.precisions["fp32"]
    assert [f for f in fp32.files if f.endswith(".onnx")] == ["fp32/model.onnx"]
    assert "past_key.0" in fp32.inputs and "present_value.1" in fp32.outputs
    r = Reranker.load(qwen_artifact)
    assert r.prefix_reuse is True and r.backend.has_past


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_prefix_reuse_equals_full_graph_row_by_row(qwen_short_artifact, padding_side):
    """Every row, padding and truncation included (the short artifact truncates the long document)."""
    pairs = [(q, d) for q in QUERIES for d in DOCS]
    full = Reranker.load(qwen_short_artifact, prefix_reuse=False, batch_size=4)
    reuse = Reranker.load(qwen_short_artifact, prefix_reuse=True, batch_size=4)
    full.padding_side = reuse.padding_side = padding_side
    a, ta = full.predict_with_truncation(pairs, raw=True)
    b, tb = reuse.predict_with_truncation(pairs, raw=True)
    assert ta.any() and np.array_equal(ta, tb)
    np.testing.assert_allclose(b, a, atol=PARITY_ATOL["fp32"], rtol=0)


def test_prefix_reuse_past_is_not_copied_per_row(qwen_artifact):
    """The prefix pass returns batch-1 keys/values, and in the graph every data path from a past input reaches the
    attention MatMul through views only (Unsqueeze/Transpose/Reshape): nothing expands or tiles the cache to the
    batch — MatMul broadcasts the one batch-1 cache over the rows."""
    import onnx

    r = Reranker.load(qwen_artifact)
    head = r.encoder.head_ids(QUERIES[0])
    past = r.backend.prefix(np.asarray(head))
    assert all(v.shape[0] == 1 and v.shape[2] == len(head) for v in past.values())
    graph = onnx.load(str(qwen_artifact / "fp32" / "model.onnx")).graph
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    views = {"Unsqueeze", "Squeeze", "Transpose", "Reshape"}
    for name in (i.name for i in graph.input if i.name.startswith("past_")):
        on_path, frontier, reached_matmul = [], [name], 0
        while frontier:
            for node in consumers.get(frontier.pop(), []):
                if node.op_type in ("Shape", "Size"):  # reads the shape, not the data
                    continue
                if node.op_type == "MatMul":
                    reached_matmul += 1
                    continue
                on_path.append(node.op_type)
                frontier.extend(node.output)
        assert reached_matmul >= 1 and set(on_path) <= views, f"{name}: {on_path} before the attention MatMul"
    # and the cache really is shared: one batch-1 past scores a batch of many rows
    docs = [d for d in DOCS for _ in range(4)]
    with_reuse = r.predict([(QUERIES[0], d) for d in docs], raw=True)
    r.prefix_reuse = False
    np.testing.assert_allclose(with_reuse, r.predict([(QUERIES[0], d) for d in docs], raw=True),
                               atol=PARITY_ATOL["fp32"], rtol=0)


def test_prefix_reuse_refused_where_unsupported(bert_artifact):
    with pytest.raises(ArtifactError, match="prefix_reuse=False"):
        Reranker.load(bert_artifact, prefix_reuse=True)
    assert Reranker.load(bert_artifact).prefix_reuse is False


@pytest.mark.parametrize("max_batch_tokens", [1, 64, 300, 100_000])
def test_token_budget_changes_batches_not_scores(qwen_artifact, max_batch_tokens):
    pairs = [(QUERIES[0], d) for d in DOCS] + [(QUERIES[1], d) for d in DOCS[:3]]
    ref = Reranker.load(qwen_artifact, prefix_reuse=False, batch_size=1).predict(pairs, raw=True)
    for reuse in (True, False):
        r = Reranker.load(qwen_artifact, prefix_reuse=reuse, max_batch_tokens=max_batch_tokens)
        stats: dict = {}
        got = r.predict(pairs, raw=True, stats=stats)
        np.testing.assert_allclose(got, ref, atol=PARITY_ATOL["fp32"], rtol=0)
        assert stats["padded_tokens"] >= stats["tokens"] > 0


class _Spy:
    """Records the shape of every model call."""

    def __init__(self, inner):
        self.inner, self.shapes = inner, []

    def score(self, ids, mask, types=None, past=None):
        self.shapes.append(ids.shape)
        return self.inner.score(ids, mask, types, past)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.parametrize("reuse", [True, False])
def test_token_budget_bounds_each_model_call(qwen_artifact, reuse):
    from memrerank.runtime import Scorer

    loaded = Reranker.load(qwen_artifact, prefix_reuse=reuse, max_batch_tokens=200, batch_size=32)
    spy = _Spy(loaded.backend)
    r = loaded.with_scorer(Scorer(spy, pad_id=loaded.pad_id, padding_side=loaded.padding_side, prefix_reuse=reuse,
                                  batch_size=32, max_batch_tokens=200))
    r.predict([(QUERIES[0], d) for d in DOCS[:9]], raw=True)
    assert len(spy.shapes) > 1
    assert all(rows == 1 or rows * width <= 200 for rows, width in spy.shapes)


@pytest.mark.parametrize("fixture", ["qwen_artifact", "minilm_artifact"])
def test_context_changes_scores_and_is_shared(request, fixture):
    art = request.getfixturevalue(fixture)
    r = Reranker.load(art)
    docs = DOCS[:6]
    plain = [h.logit for h in sorted(r.rank("What does she paint?", docs), key=lambda h: h.index)]
    with_ctx = [h.logit for h in sorted(r.rank("What does she paint?", docs, context=CONTEXT),
                                        key=lambda h: h.index)]
    assert np.max(np.abs(np.subtract(plain, with_ctx))) > 1e-3
    # the context is on the query side: identical to passing the rendered query by hand
    by_hand = r.predict([("\n".join(CONTEXT + ["What does she paint?"]), d) for d in docs], raw=True)
    np.testing.assert_allclose(with_ctx, by_hand, atol=PARITY_ATOL["fp32"], rtol=0)


def test_context_with_reuse_equals_full(qwen_artifact):
    pairs_docs = DOCS[:6]
    a = Reranker.load(qwen_artifact, prefix_reuse=False).predict(
        [("Where does she live?", d) for d in pairs_docs], raw=True, context=CONTEXT)
    b = Reranker.load(qwen_artifact, prefix_reuse=True).predict(
        [("Where does she live?", d) for d in pairs_docs], raw=True, context=CONTEXT)
    np.testing.assert_allclose(a, b, atol=PARITY_ATOL["fp32"], rtol=0)


@pytest.mark.parametrize("fixture", ["qwen_short_artifact", "bert_artifact"])
def test_long_context_is_cut_oldest_first_never_the_query(request, fixture):
    art = request.getfixturevalue(fixture)
    r = Reranker.load(art)
    query = "Which café did Melanie recommend in Oslo?"
    old = [f"turn {i}: " + "we talked about many unrelated things and places. " * 6 for i in range(30)]
    newest = "Melanie said the best coffee is at Tim Wendelboe."
    split = r.encoder.split(query, ["a document"], None, old + [newest])
    text = r.tokenizer.decode(split.head.tolist())

    def seen(s):  # the text as this tokenizer round-trips it (BERT lower-cases and strips accents)
        return r.tokenizer.decode(r.tokenizer.encode(s, add_special_tokens=False).ids)

    assert seen(query) in text and seen(newest) in text and "turn 0:" not in text
    assert 0 < split.context_kept < len(old) + 1
    assert split.budget >= min(MIN_DOCUMENT_TOKENS, r.encoder.max_length // 4)
    hits = r.rank(query, ["a document", "another"], context=old + [newest])
    assert len(hits) == 2


def test_context_argument_errors(qwen_artifact):
    r = Reranker.load(qwen_artifact)
    with pytest.raises(TypeError, match="context"):
        r.rank("q", ["d"], context="a single string")
    with pytest.raises(TypeError, match=r"context\[1\]"):
        r.rank("q", ["d"], context=["ok", None])
    assert len(r.rank("q", ["d"], context=[])) == 1


@pytest.mark.parametrize("reuse", [True, False])
def test_io_binding_backend_scores_the_same_and_keeps_the_cache_bound(qwen_short_artifact, reuse):
    """The GPU path's IO binding, run on the CPU device: same scores; the prefix cache is never turned into numpy
    (on CUDA it stays in device memory and is bound to every batch of the query)."""
    import onnxruntime as ort

    from memrerank.runtime.backends.iobinding import BoundOrtBackend

    pairs = [(q, d) for q in QUERIES for d in DOCS]
    plain = Reranker.load(qwen_short_artifact, prefix_reuse=reuse, batch_size=3)
    bound = Reranker.load(qwen_short_artifact, prefix_reuse=reuse, batch_size=3, io_binding=True)
    assert isinstance(bound.backend, BoundOrtBackend) and not isinstance(plain.backend, BoundOrtBackend)
    a, ta = plain.predict_with_truncation(pairs, raw=True)
    b, tb = bound.predict_with_truncation(pairs, raw=True)
    np.testing.assert_array_equal(ta, tb)
    np.testing.assert_allclose(b, a, atol=1e-6, rtol=0)
    past = bound.backend.prefix(np.asarray(bound.encoder.head_ids(QUERIES[0])))
    assert past and all(isinstance(v, ort.OrtValue) for v in past.values())
    with pytest.raises(ArtifactError, match="same backend"):
        bound.backend.score(np.ones((1, 3), np.int64), np.ones((1, 3), np.int64), None,
                            plain.backend.prefix(np.arange(3)))
