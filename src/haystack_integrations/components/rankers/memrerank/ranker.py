"""Haystack: :class:`MemrerankRanker`, documents reranked by a memrerank artifact or a running ``memrerank serve``.

Needs ``haystack-ai`` (``pip install "memrerank[haystack]"``)::

    from haystack_integrations.components.rankers.memrerank import MemrerankRanker

    ranker = MemrerankRanker(artifact="qwen3-rr", precision="int8", top_k=3)
    pipeline.add_component("ranker", ranker)  # after a retriever; or in a pipeline YAML, as its type:
    # haystack_integrations.components.rankers.memrerank.ranker.MemrerankRanker
"""

# No `from __future__ import annotations`: Haystack reads run()'s annotations at runtime for its sockets.
import asyncio
import os
from copy import deepcopy
from dataclasses import replace
from typing import Any

from memrerank.integrations._common import (
    check_instruction,
    check_mode,
    check_threshold,
    check_top_n,
    load_options,
    missing_extra,
    open_ranking,
    options_from,
)

try:
    from haystack import Document, component, default_from_dict, default_to_dict
    from haystack.utils import Secret, deserialize_secrets_inplace
except ImportError as exc:
    raise ImportError(missing_extra("haystack", "haystack-ai", "haystack", __name__)) from exc

__all__ = ["MemrerankRanker"]

#: The service key a ranker sends by default: ``$MEMRERANK_API_KEY`` when set (as ``memrerank serve`` reads it).
_API_KEY = Secret.from_env_var("MEMRERANK_API_KEY", strict=False)


@component
class MemrerankRanker:
    """Ranks Documents by their content (with ``meta_fields_to_embed`` in front), best first; each returned
    Document is a copy whose ``score`` is the calibrated probability.

    Args:
        artifact: an artifact directory written by ``memrerank export`` (loaded by :meth:`warm_up`); or
        url: the base URL of a running ``memrerank serve``. Exactly one of the two.
        precision: with ``artifact``: an exported precision or ``"auto"``, in place of ``options``' precision.
        options: with ``artifact``: how to load it (:class:`memrerank.LoadOptions` or a dict of its fields;
            default: ``precision="auto"`` on the CPU).
        api_key: with ``url``: the service's key (default: ``$MEMRERANK_API_KEY`` if set).
        model: with ``url``: the model name sent (``None``: left out).
        timeout: with ``url``: seconds a request may take.
        instruction: a decoder reranker's task instruction (``None``: the artifact's default).
        top_k: keep at most this many documents (``None`` = all).
        score_threshold: keep documents whose calibrated probability is ``>= score_threshold`` (``None``: no cut).
        meta_fields_to_embed: meta fields whose values are scored with the content, in front of it.
        meta_data_separator: what joins those values and the content.

    Raises:
        ValueError: none or both of ``artifact`` and ``url``; a setting of the other mode; a bad ``top_k``,
            ``score_threshold``, ``precision``, ``instruction``, URL or timeout.
        TypeError: bad ``options``, ``meta_fields_to_embed`` or ``meta_data_separator``.
    """

    def __init__(self, artifact: str | None = None, url: str | None = None, *, precision: str | None = None,
                 options: Any = None, api_key: Secret | None = _API_KEY, model: str | None = None,
                 timeout: float = 60.0, instruction: str | None = None,
                 top_k: int | None = 10, score_threshold: float | None = None,
                 meta_fields_to_embed: list[str] | None = None, meta_data_separator: str = "\n") -> None:
        self.artifact = os.fspath(artifact) if isinstance(artifact, os.PathLike) else artifact
        check_mode(artifact=self.artifact, url=url, options=options, precision=precision, model=model)
        self.options, self.precision = options_from(options), precision
        self._load = load_options(self.options, precision, None)  # checks options and precision now
        self.url, self.api_key, self.model, self.timeout = url, api_key, model, timeout
        self.instruction = check_instruction(instruction)
        self.top_k = check_top_n(top_k, "top_k")
        self.score_threshold = check_threshold(score_threshold, "score_threshold")
        fields = list(meta_fields_to_embed or [])
        if not all(isinstance(f, str) for f in fields) or not isinstance(meta_data_separator, str):
            raise TypeError("meta_fields_to_embed must be a list of meta keys (str) and meta_data_separator a str")
        self.meta_fields_to_embed, self.meta_data_separator = fields, meta_data_separator
        self._ranking = None
        if url is not None:  # a client is cheap: build it now, so a bad URL or timeout fails here
            self._ranking = open_ranking(url=url, api_key=api_key.resolve_value() if api_key else None,
                                         model=model, timeout=timeout, instruction=self.instruction)

    def warm_up(self) -> None:
        """Load the artifact (once; :meth:`run` calls it when the pipeline has not)."""
        if self._ranking is None:
            self._ranking = open_ranking(artifact=self.artifact, options=self._load, instruction=self.instruction)

    def to_dict(self) -> dict[str, Any]:
        """The component's init parameters, for a pipeline file."""
        return default_to_dict(
            self, artifact=self.artifact, url=self.url, precision=self.precision,
            options=self.options.as_dict() if self.options is not None else None,
            api_key=self.api_key.to_dict() if self.api_key else None, model=self.model, timeout=self.timeout,
            instruction=self.instruction, top_k=self.top_k, score_threshold=self.score_threshold,
            meta_fields_to_embed=self.meta_fields_to_embed, meta_data_separator=self.meta_data_separator)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MemrerankRanker":
        """A component from :meth:`to_dict`'s dictionary."""
        init = dict(data.get("init_parameters", {}))
        deserialize_secrets_inplace(init, keys=["api_key"])
        return default_from_dict(cls, {**data, "init_parameters": init})

    def _prepare(self, query: str, documents: list[Document], top_k: int | None,
                 score_threshold: float | None) -> tuple[list[str], int | None, float | None]:
        bad = next((i for i, d in enumerate(documents) if not isinstance(d, Document)), None)
        if bad is not None:
            raise TypeError(f"documents[{bad}] must be a haystack.Document, got {type(documents[bad]).__name__}")
        texts = [self.meta_data_separator.join(
            [*(str(d.meta[k]) for k in self.meta_fields_to_embed if d.meta.get(k)), d.content or ""])
            for d in documents]
        return (texts, self.top_k if top_k is None else check_top_n(top_k, "top_k"),
                self.score_threshold if score_threshold is None else check_threshold(score_threshold,
                                                                                     "score_threshold"))

    @staticmethod
    def _documents(documents: list[Document], hits: list[tuple[int, float]]) -> dict[str, list[Document]]:
        return {"documents": [replace(documents[i], score=score, meta=deepcopy(documents[i].meta))
                              for i, score in hits]}

    @component.output_types(documents=list[Document])
    def run(self, query: str, documents: list[Document], top_k: int | None = None,
            score_threshold: float | None = None) -> dict[str, list[Document]]:
        """The best ``top_k`` documents for ``query``, best first.

        Args:
            query: the question.
            documents: the retrieved documents (not modified: the results are copies).
            top_k: in place of the component's ``top_k`` for this call.
            score_threshold: in place of the component's ``score_threshold`` for this call.

        Returns:
            ``{"documents": [...]}``, each a copy with ``score`` set; an empty list for no documents.

        Raises:
            TypeError: ``query`` is not a string or an item of ``documents`` is not a Document.
            ServiceError: with ``url``: the service is unreachable or answered an error.
        """
        if not documents:
            return {"documents": []}
        texts, top_k, score_threshold = self._prepare(query, documents, top_k, score_threshold)
        self.warm_up()
        return self._documents(documents, self._ranking.rank(query, texts, top_k, score_threshold))

    @component.output_types(documents=list[Document])
    async def run_async(self, query: str, documents: list[Document], top_k: int | None = None,
                        score_threshold: float | None = None) -> dict[str, list[Document]]:
        """:meth:`run` without blocking the event loop (an async request, or scoring in a worker thread)."""
        if not documents:
            return {"documents": []}
        texts, top_k, score_threshold = self._prepare(query, documents, top_k, score_threshold)
        if self._ranking is None:
            await asyncio.to_thread(self.warm_up)
        return self._documents(documents, await self._ranking.arank(query, texts, top_k, score_threshold))
