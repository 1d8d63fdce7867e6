"""Graphiti: :class:`MemrerankRerankerClient`, a ``CrossEncoderClient`` over a memrerank artifact or service.

Needs ``graphiti-core`` (``pip install "memrerank[graphiti]"``)::

    from graphiti_core import Graphiti
    from memrerank.integrations.graphiti import MemrerankRerankerClient

    graphiti = Graphiti(uri, user, password, cross_encoder=MemrerankRerankerClient("qwen3-rr", precision="int8"))

Its scores are calibrated probabilities, so a search config's ``reranker_min_score`` (say 0.5) keeps the facts the
reranker judges more likely relevant than not.
"""

from __future__ import annotations

from typing import Any

from memrerank.integrations._common import missing_extra, open_ranking

try:
    from graphiti_core.cross_encoder.client import CrossEncoderClient
except ImportError as exc:
    raise ImportError(missing_extra("graphiti", "graphiti-core", "graphiti")) from exc

__all__ = ["MemrerankRerankerClient"]


class MemrerankRerankerClient(CrossEncoderClient):
    """Ranks passages for Graphiti's ``cross_encoder`` search rerankers, best first, scores in [0, 1].

    Args:
        artifact: an artifact directory written by ``memrerank export`` (loaded once, as ``options`` say); or
        reranker: an already loaded :class:`memrerank.Reranker`; or
        url: the base URL of a running ``memrerank serve``. Exactly one of the three.
        options: with ``artifact``: how to load it (:class:`memrerank.LoadOptions` or a dict of its fields;
            default: ``precision="auto"`` on the CPU).
        precision: with ``artifact``: an exported precision or ``"auto"``, in place of ``options``' precision.
        api_key: with ``url``: the service's key (``memrerank serve --api-key``).
        model: with ``url``: the model name sent (``None``: left out).
        timeout: with ``url``: seconds a request may take.
        instruction: a decoder reranker's task instruction (``None``: the artifact's default).

    Raises:
        ValueError: none or several of ``artifact``, ``reranker``, ``url``; a setting of the other mode; an
            artifact that does not load (an ``ArtifactError`` saying what to do); an instruction an encoder refuses.
        TypeError: ``reranker`` is not a :class:`memrerank.Reranker`; bad ``options``.
    """

    def __init__(self, artifact: Any = None, *, reranker: Any = None, options: Any = None, precision: Any = None,
                 url: str | None = None, api_key: str | None = None, model: str | None = None,
                 timeout: float = 60.0, instruction: str | None = None) -> None:
        self.ranking = open_ranking(artifact=artifact, reranker=reranker, options=options, precision=precision,
                                    url=url, api_key=api_key, model=model, timeout=timeout, instruction=instruction)

    async def rank(self, query: str, passages: list[str]) -> list[tuple[str, float]]:
        """``[(passage, calibrated score)]`` for every passage, best first; scoring runs off the event loop.

        Raises:
            TypeError: ``query`` or a passage is not a string.
            ServiceError: with ``url``: the service is unreachable or answered an error.
        """
        passages = list(passages)
        hits = await self.ranking.arank(query, passages)
        return [(passages[i], score) for i, score in hits]
