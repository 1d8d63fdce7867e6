"""LangChain: :class:`MemrerankRerank`, a document compressor that reranks retrieved documents.

Needs ``langchain-core`` (``pip install "memrerank[langchain]"``)::

    from memrerank.integrations.langchain import MemrerankRerank

    rerank = MemrerankRerank(artifact="qwen3-rr", precision="int8", top_n=3)
    top = rerank.compress_documents(docs, "When does my passport expire?")
    top[0].metadata["relevance_score"]  # the calibrated probability
"""

from __future__ import annotations

from collections.abc import Sequence
from copy import deepcopy

from memrerank.integrations._common import missing_extra

try:
    from langchain_core.callbacks import Callbacks
    from langchain_core.documents import BaseDocumentCompressor, Document
    from pydantic import ConfigDict

    from memrerank.integrations._fields import RerankFields
except ImportError as exc:
    raise ImportError(missing_extra("langchain", "langchain-core", "langchain")) from exc

__all__ = ["MemrerankRerank"]


class MemrerankRerank(RerankFields, BaseDocumentCompressor):
    """Reranks LangChain documents by their ``page_content`` with a memrerank artifact, best first.

    Use it wherever LangChain takes a document compressor, e.g.
    ``ContextualCompressionRetriever(base_compressor=MemrerankRerank(...), base_retriever=...)``.

    Args:
        artifact: an artifact directory written by ``memrerank export`` (loaded once, as ``options`` say); or
        reranker: an already loaded :class:`memrerank.Reranker` (shared with other code). Exactly one of the two.
        options: with ``artifact``: how to load it (:class:`memrerank.LoadOptions`: precision, providers,
            threads, ...; default: ``precision="auto"`` on the CPU).
        precision: with ``artifact``: an exported precision or ``"auto"``, in place of ``options``' precision
            (shorthand for ``options=LoadOptions(precision)``).
        top_n: keep at most this many documents (``None`` = all).
        threshold: keep documents whose calibrated probability is ``>= threshold`` (``None`` = no cut).

    Raises:
        ValueError: a bad argument (a pydantic ``ValidationError`` naming it); neither or both of
            ``artifact`` and ``reranker``; ``options`` or ``precision`` beside ``reranker``; an artifact that does
            not load (an ``ArtifactError`` saying what to do).
        TypeError: ``reranker`` is not a :class:`memrerank.Reranker`; ``options`` is not a
            :class:`memrerank.LoadOptions`.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    def compress_documents(self, documents: Sequence[Document], query: str,
                           callbacks: Callbacks | None = None) -> Sequence[Document]:
        """The best ``top_n`` documents for ``query``, best first, each with ``metadata["relevance_score"]``.

        Args:
            documents: the retrieved documents (not modified: the results are copies with their own metadata).
            query: the question.
            callbacks: accepted for LangChain's interface; scoring emits no callback events.

        Returns:
            Copies of the kept documents, best first; an empty list for no documents.

        Raises:
            TypeError: ``query`` is not a string or an item of ``documents`` is not a LangChain ``Document``.
        """
        docs = list(documents)
        bad = next((i for i, d in enumerate(docs) if not isinstance(d, Document)), None)
        if bad is not None:
            raise TypeError(f"documents[{bad}] must be a langchain_core.documents.Document, got "
                            f"{type(docs[bad]).__name__}")
        hits = self.reranker.rank(query, [d.page_content for d in docs], top_k=self.top_n,
                                  threshold=self.threshold)
        out = []
        for hit in hits:
            doc = docs[hit.index]
            metadata = {**deepcopy(doc.metadata), "relevance_score": hit.score}
            out.append(doc.model_copy(update={"metadata": metadata}))
        return out
