"""LlamaIndex: :class:`MemrerankRerank`, a node postprocessor that reranks retrieved nodes with an artifact.

Needs ``llama-index-core`` (``pip install "memrerank[llama-index]"``)::

    from memrerank.integrations.llama_index import MemrerankRerank

    rerank = MemrerankRerank(artifact="qwen3-rr", precision="int8", top_n=3)
    engine = index.as_query_engine(similarity_top_k=20, node_postprocessors=[rerank])
"""

from __future__ import annotations

from pathlib import Path

from memrerank.integrations._common import missing_extra

try:
    from llama_index.core.callbacks import CBEventType, EventPayload
    from llama_index.core.instrumentation import get_dispatcher
    from llama_index.core.instrumentation.events.rerank import ReRankEndEvent, ReRankStartEvent
    from llama_index.core.postprocessor.types import BaseNodePostprocessor
    from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle

    from memrerank.integrations._fields import RerankFields
except ImportError as exc:
    raise ImportError(missing_extra("llama_index", "llama-index-core", "llama-index")) from exc

__all__ = ["MemrerankRerank"]

dispatcher = get_dispatcher(__name__)


class MemrerankRerank(RerankFields, BaseNodePostprocessor):
    """Reranks LlamaIndex nodes with a memrerank artifact; a kept node's score is the calibrated probability.

    A node is scored by ``node.get_content(metadata_mode=MetadataMode.EMBED)`` (its text with the metadata it
    embeds with), as LlamaIndex's own rerankers do. Reranking emits LlamaIndex's ``RERANKING`` callback event
    and its ``ReRankStartEvent`` / ``ReRankEndEvent`` instrumentation events.

    Args:
        artifact: an artifact directory written by ``memrerank export`` (loaded once, as ``options`` say); or
        reranker: an already loaded :class:`memrerank.Reranker` (shared with other code). Exactly one of the two.
        options: with ``artifact``: how to load it (:class:`memrerank.LoadOptions`: precision, providers,
            threads, ...; default: ``precision="auto"`` on the CPU).
        precision: with ``artifact``: an exported precision or ``"auto"``, in place of ``options``' precision
            (shorthand for ``options=LoadOptions(precision)``).
        top_n: keep at most this many nodes (``None`` = all).
        threshold: keep nodes whose calibrated probability is ``>= threshold`` (``None`` = no cut).

    Raises:
        ValueError: a bad argument (a pydantic ``ValidationError`` naming it); neither or both of
            ``artifact`` and ``reranker``; ``options`` or ``precision`` beside ``reranker``; an artifact that does
            not load (an ``ArtifactError`` saying what to do).
        TypeError: ``reranker`` is not a :class:`memrerank.Reranker`; ``options`` is not a
            :class:`memrerank.LoadOptions`.
    """

    @classmethod
    def class_name(cls) -> str:
        return "MemrerankRerank"

    def _postprocess_nodes(self, nodes: list[NodeWithScore],
                           query_bundle: QueryBundle | None = None) -> list[NodeWithScore]:
        """The best ``top_n`` nodes for the query, best first, as new ``NodeWithScore`` objects.

        The input ``NodeWithScore`` objects are not modified; the kept ones' nodes are shared, not copied.

        Raises:
            ValueError: no query (pass ``query_bundle=QueryBundle(...)`` or ``query_str=...``).
            TypeError: an item of ``nodes`` is not a ``NodeWithScore``.
        """
        if query_bundle is None:
            raise ValueError("MemrerankRerank needs the query: postprocess_nodes(nodes, "
                             "query_bundle=QueryBundle(q)) or postprocess_nodes(nodes, query_str=q)")
        nodes = list(nodes)
        bad = next((i for i, n in enumerate(nodes) if not isinstance(n, NodeWithScore)), None)
        if bad is not None:
            raise TypeError(f"nodes[{bad}] must be a llama_index.core.schema.NodeWithScore, got "
                            f"{type(nodes[bad]).__name__}")
        name = Path(self.reranker.root).name
        dispatcher.event(ReRankStartEvent(query=query_bundle, nodes=nodes, top_n=self.top_n or len(nodes),
                                          model_name=name))
        with self.callback_manager.event(CBEventType.RERANKING, payload={
                EventPayload.NODES: nodes, EventPayload.MODEL_NAME: name,
                EventPayload.QUERY_STR: query_bundle.query_str, EventPayload.TOP_K: self.top_n}) as event:
            texts = [n.node.get_content(metadata_mode=MetadataMode.EMBED) for n in nodes]
            hits = self.reranker.rank(query_bundle.query_str, texts, top_k=self.top_n,
                                      threshold=self.threshold)
            out = [NodeWithScore(node=nodes[hit.index].node, score=hit.score) for hit in hits]
            event.on_end(payload={EventPayload.NODES: out})
        dispatcher.event(ReRankEndEvent(nodes=out))
        return out
