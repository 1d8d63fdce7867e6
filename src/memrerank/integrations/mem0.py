"""mem0: :class:`MemrerankReranker`, mem0's reranker provider ``"memrerank"`` (registered on import).

Needs ``mem0ai`` (``pip install "memrerank[mem0]"``)::

    import memrerank.integrations.mem0  # registers the provider
    from mem0 import Memory

    memory = Memory.from_config({..., "reranker": {"provider": "memrerank",
                                                   "config": {"artifact": "qwen3-rr", "precision": "int8"}}})
    memory.search("When does my passport expire?", filters={"user_id": "u1"}, rerank=True)

Against a running ``memrerank serve``: ``"config": {"url": "http://127.0.0.1:8080"}`` (its key, if any, in
``api_key`` or ``$MEMRERANK_API_KEY``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from memrerank.integrations._common import (
    check_instruction,
    check_threshold,
    check_top_n,
    missing_extra,
    open_ranking,
)

try:
    from mem0.configs.rerankers.base import BaseRerankerConfig
    from mem0.reranker.base import BaseReranker
    from mem0.utils.factory import RerankerFactory
    from pydantic import ConfigDict, Field, field_validator
except ImportError as exc:
    raise ImportError(missing_extra("mem0", "mem0ai", "mem0")) from exc

from memrerank.runtime.options import LoadOptions

__all__ = ["PROVIDER", "MemrerankReranker", "MemrerankRerankerConfig", "register"]

#: The provider name under which :func:`register` puts :class:`MemrerankReranker` in mem0's RerankerFactory.
PROVIDER = "memrerank"


class MemrerankRerankerConfig(BaseRerankerConfig):
    """The ``"config"`` of mem0's ``{"provider": "memrerank", "config": {...}}``: one of ``artifact`` (with
    ``options`` / ``precision``), ``reranker`` or ``url`` (with ``api_key`` and ``model``); unknown keys are refused.

    ``top_k`` (keep at most this many when mem0's call gives none; ``None`` = all) and ``threshold`` (keep
    memories whose calibrated probability is ``>= threshold``) apply in both modes; ``instruction`` is a decoder
    reranker's task instruction (``None``: the artifact's default).
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    provider: str | None = Field(default=PROVIDER, description="The reranker provider.")
    artifact: str | None = Field(default=None, description="Artifact directory written by memrerank export.")
    options: Any = Field(default=None, description="memrerank.LoadOptions (or a dict of its fields) for artifact.")
    precision: str | None = Field(default=None, description="Exported precision or 'auto', in place of options'.")
    reranker: Any = Field(default=None, exclude=True, description="A loaded memrerank.Reranker.")
    url: str | None = Field(default=None, description="Base URL of a running memrerank serve.")
    timeout: float = Field(default=60.0, description="Seconds a request to url may take.")
    instruction: str | None = Field(default=None, description="Decoder rerankers' task instruction.")
    threshold: float | None = Field(default=None, description="Least calibrated probability to keep.")

    @field_validator("artifact", mode="before")
    @classmethod
    def _artifact_path(cls, value: Any) -> Any:
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @field_validator("precision", mode="before")
    @classmethod
    def _precision(cls, value: Any) -> str | None:
        return value if value is None else LoadOptions(precision=value).precision  # raises naming the choices

    @field_validator("top_k", mode="before")
    @classmethod
    def _top_k(cls, value: Any) -> int | None:
        return check_top_n(value, "top_k")

    @field_validator("threshold", mode="before")
    @classmethod
    def _threshold(cls, value: Any) -> float | None:
        return check_threshold(value)

    @field_validator("instruction", mode="before")
    @classmethod
    def _instruction(cls, value: Any) -> str | None:
        return check_instruction(value)


def _text(doc: Any, i: int) -> str:
    """The text a memory is scored by: ``memory`` (mem0's key), else ``text`` or ``content``."""
    if isinstance(doc, Mapping):
        for key in ("memory", "text", "content"):
            if isinstance(doc.get(key), str):
                return doc[key]
    raise TypeError(f"documents[{i}] must be a mem0 memory dict with a 'memory' string (or 'text' / 'content'), "
                    f"got {str(doc)[:80]!r}")


class MemrerankReranker(BaseReranker):
    """Reranks mem0 memories with a memrerank artifact or service; ``rerank_score`` is the calibrated probability.

    Unlike mem0's own providers it never falls back to the vector order with made-up scores: a failure raises
    (mem0's ``search`` then logs it and returns the memories unreranked, without ``rerank_score``).

    Args:
        config: a :class:`MemrerankRerankerConfig`, or a dict of its fields (what ``RerankerFactory`` passes).

    Raises:
        ValueError: a bad setting (a pydantic ``ValidationError`` naming it); none or several of ``artifact``,
            ``reranker``, ``url``; an artifact that does not load (an ``ArtifactError`` saying what to do).
        TypeError: ``reranker`` is not a :class:`memrerank.Reranker`; ``options`` is not a LoadOptions or a dict
            of its fields.
    """

    def __init__(self, config: MemrerankRerankerConfig | BaseRerankerConfig | Mapping[str, Any] | None = None
                 ) -> None:
        if isinstance(config, BaseRerankerConfig) and not isinstance(config, MemrerankRerankerConfig):
            config = config.model_dump(exclude_none=True)
        if config is None or isinstance(config, Mapping):
            config = MemrerankRerankerConfig(**(config or {}))
        if not isinstance(config, MemrerankRerankerConfig):
            raise TypeError(f"config must be a MemrerankRerankerConfig or a dict, got {type(config).__name__}")
        self.config = config
        api_key = config.api_key or (os.environ.get("MEMRERANK_API_KEY") if config.url is not None else None)
        self.ranking = open_ranking(artifact=config.artifact, reranker=config.reranker, options=config.options,
                                    precision=config.precision, url=config.url, api_key=api_key,
                                    model=config.model, timeout=config.timeout, instruction=config.instruction)

    def rerank(self, query: str, documents: list[dict[str, Any]], top_k: int | None = None
               ) -> list[dict[str, Any]]:
        """The best ``top_k`` memories for ``query``, best first, each a copy with ``rerank_score``.

        Args:
            query: the question.
            documents: mem0's memory dicts (not modified), scored by their ``memory`` text.
            top_k: keep at most this many (``None``: the config's ``top_k``; ``None`` there = all).

        Raises:
            TypeError: a document has no text to score.
            ServiceError: with ``url``: the service is unreachable or answered an error.
        """
        docs = list(documents)
        texts = [_text(doc, i) for i, doc in enumerate(docs)]
        top_n = self.config.top_k if top_k is None else check_top_n(top_k, "top_k")
        hits = self.ranking.rank(query, texts, top_n, self.config.threshold)
        return [{**docs[i], "rerank_score": score} for i, score in hits]


def register() -> None:
    """Make ``"memrerank"`` a provider of mem0's ``RerankerFactory`` (done on import; harmless to repeat)."""
    RerankerFactory.provider_to_class[PROVIDER] = (f"{__name__}.MemrerankReranker", MemrerankRerankerConfig)


register()
