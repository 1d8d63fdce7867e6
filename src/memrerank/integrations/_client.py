"""The one client of a running ``memrerank serve`` the integrations share: Cohere v2 ``POST {url}/v2/rerank``
over httpx (the ``serve`` extra, or the framework's own dependency)."""

from __future__ import annotations

import math
from typing import Any

from memrerank.errors import MemrerankError

__all__ = ["RerankService", "ServiceError"]


class ServiceError(MemrerankError):
    """The rerank service could not be reached, refused the request, or answered in a shape it never sends."""


def _check_url(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith(("http://", "https://")) or "?" in value:
        raise ValueError(f"url must be the base URL of a running `memrerank serve` (http://127.0.0.1:8080), got "
                         f"{value!r}")
    return value.rstrip("/")


def _message(response: Any) -> str:
    """The error message of an error body in any of the shapes rerank services answer, else its text."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200] or response.reason_phrase
    if isinstance(body, dict):
        error = body.get("error")
        for text in (body.get("message"), error.get("message") if isinstance(error, dict) else error,
                     body.get("detail")):
            if isinstance(text, str):
                return text
    return str(body)[:200]


class RerankService:
    """Ranks through ``POST {url}/v2/rerank`` of a running ``memrerank serve`` (calibrated scores, best first).

    Args:
        url: the service's base URL (``http://127.0.0.1:8080``).
        api_key: sent as ``Authorization: Bearer <api_key>`` (``memrerank serve --api-key``); ``None`` = none.
        model: the ``model`` name sent (``None``: left out; the service scores with the one model it serves).
        timeout: seconds a request may take.

    Raises:
        ValueError: a URL that is not ``http(s)://host[:port][/path]``, a timeout that is not a positive number,
            an empty api key.
    """

    def __init__(self, url: str, api_key: str | None = None, model: str | None = None,
                 timeout: float = 60.0) -> None:
        import httpx

        self.url = _check_url(url)
        if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
            raise ValueError("api_key must be the service's key (memrerank serve --api-key) or None")
        if model is not None and (not isinstance(model, str) or not model):
            raise ValueError(f"model must be a non-empty string or None, got {model!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (
                math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.model, self.timeout = model, float(timeout)
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(timeout=self.timeout, headers=self._headers)

    def _body(self, query: str, texts: list[str], top_n: int | None, instruction: str | None) -> dict[str, Any]:
        body = {"model": self.model, "query": query, "documents": texts, "top_n": top_n, "instruction": instruction}
        return {k: v for k, v in body.items() if v is not None}

    def _hits(self, response: Any, n: int, threshold: float | None) -> list[tuple[int, float]]:
        where = f"the rerank service at {self.url}"
        if response.status_code >= 400:
            raise ServiceError(f"{where} answered {response.status_code}: {_message(response)}")
        try:
            hits = [(r["index"], r["relevance_score"]) for r in response.json()["results"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise ServiceError(f"{where} answered no Cohere v2 results ({exc!r}); is {self.url} a memrerank "
                               "serve?") from None
        if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n or isinstance(s, bool)
               or not isinstance(s, (int, float)) for i, s in hits) or len({i for i, _ in hits}) != len(hits):
            raise ServiceError(f"{where} answered results that are not one score per document index: {hits[:5]}")
        return [(i, float(s)) for i, s in hits if threshold is None or s >= threshold]

    def rank(self, query: str, texts: list[str], top_n: int | None = None, threshold: float | None = None,
             instruction: str | None = None) -> list[tuple[int, float]]:
        """``[(index into texts, calibrated score)]``, best first: the ``top_n`` best, those ``>= threshold``.

        Raises:
            ServiceError: the service is unreachable or answered an error (its status and message).
        """
        import httpx

        if not texts:
            return []
        try:
            response = self._client.post(f"{self.url}/v2/rerank",
                                         json=self._body(query, texts, top_n, instruction))
        except httpx.HTTPError as exc:
            raise ServiceError(f"cannot reach the rerank service at {self.url} ({exc}); start it with "
                               "`memrerank serve ARTIFACT` or fix url=") from exc
        return self._hits(response, len(texts), threshold)

    async def arank(self, query: str, texts: list[str], top_n: int | None = None, threshold: float | None = None,
                    instruction: str | None = None) -> list[tuple[int, float]]:
        """:meth:`rank` without blocking the event loop (a client per call: it may run on any loop)."""
        import httpx

        if not texts:
            return []
        try:
            async with httpx.AsyncClient(timeout=self.timeout, headers=self._headers) as client:
                response = await client.post(f"{self.url}/v2/rerank",
                                             json=self._body(query, texts, top_n, instruction))
        except httpx.HTTPError as exc:
            raise ServiceError(f"cannot reach the rerank service at {self.url} ({exc}); start it with "
                               "`memrerank serve ARTIFACT` or fix url=") from exc
        return self._hits(response, len(texts), threshold)
