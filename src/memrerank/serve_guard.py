"""The HTTP edge of ``memrerank serve``: who may call it, how much may be in flight, and how every error looks.

Three pieces, used by :mod:`memrerank.serve`:

* :func:`error_body` — every error the service answers (a limit, a malformed body, a refused caller, an
  overload, a timeout, a bug) in the shape of the API its path speaks (:data:`PATH_API`): Cohere's
  ``{"message"}``, TEI's ``{"error", "error_type"}``, Jina's and vLLM's (and FastAPI's) ``{"detail"}``.
* :class:`Guard` — an ASGI middleware in front of the routes. In order: the ``Host`` header must name an allowed
  host (loopback names unless told: a web page that rebinds its DNS name to 127.0.0.1 is refused) and an
  ``Origin`` header, when present, too; an API key, when configured, must come as ``Authorization: Bearer <key>``
  (compared in constant time; ``/health`` stays open); a ``POST`` must say ``Content-Type: application/json``
  (a browser can send ``text/plain`` cross-site without asking; 415 otherwise). It counts every answer in the
  metrics — its own refusals, the service's 503s and 408s, 404s, 500s — and turns an exception that escaped a
  route into a JSON 500.
* :func:`guarded_protocol` — uvicorn's HTTP protocol with a header timeout (a connection that does not finish its
  request line and headers in ``header_timeout_s`` gets a JSON 408 and is closed), a header size cap (431) and a
  connection cap (connections beyond ``max_connections`` get a JSON 503 and are closed). uvicorn has none of the
  three; its ``limit_concurrency`` answers plain text.

Nothing here imports FastAPI or uvicorn at module level: ``memrerank.serve`` imports without the serve extra.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import json
import logging
import math
import time
from collections.abc import Iterable
from typing import Any

__all__ = ["ANY_HOST", "LOOPBACK_HOSTS", "METRICS_STATE_KEY", "OVER_CONNECTION_LIMIT", "PATH_API",
           "SCORING_ENDPOINTS", "Guard", "api_of", "endpoint_label", "error_body", "guarded_protocol",
           "host_name", "is_loopback", "send_json"]

#: The ``Host`` names a loopback-bound service answers (any port).
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
#: An allowed-hosts entry that allows every host (a service bound beyond loopback).
ANY_HOST = "*"
#: The API each scoring path speaks, which names its error shape: ``/v1/rerank`` is Cohere v1's, Jina's and
#: vLLM's at once, ``/rerank`` TEI's (vLLM's when the body has ``documents``, not ``texts``:
#: :mod:`memrerank.serve`).
PATH_API = {"/v1/rerank": "cohere_v1", "/v2/rerank": "cohere", "/rerank": "tei", "/score": "vllm_score",
            "/v1/score": "vllm_score"}
#: The POST endpoints that score.
SCORING_ENDPOINTS = tuple(PATH_API)
_OPEN_PATHS = ("/health",)
_KNOWN = frozenset(SCORING_ENDPOINTS + _OPEN_PATHS + ("/v1/models", "/metrics"))
#: A scope key the protocol sets on a connection over ``max_connections``; the guard answers it 503.
OVER_CONNECTION_LIMIT = "memrerank.over_connection_limit"
#: The lifespan-state key under which the app leaves its metrics for the protocol (header timeouts count too).
METRICS_STATE_KEY = "memrerank_metrics"
_log = logging.getLogger(__name__)


#: TEI's ``error_type`` of memrerank's error kinds (any other kind is a ``Validation`` error).
_TEI_TYPES = {"overloaded": "Overloaded", "queue_full": "Overloaded", "internal_error": "Backend",
              "model_error": "Backend"}


def error_body(api: str | None, kind: str, message: str) -> dict[str, Any]:
    """An error in the shape of ``api`` (a value of :data:`PATH_API`; ``None``: a path no API owns).

    Cohere v2 answers ``{"message"}``; ``/v1/rerank``, which Cohere v1, Jina and vLLM clients all call,
    ``{"message", "detail"}`` (the Cohere SDK reads the first, Jina clients the second); TEI ``{"error",
    "error_type"}`` (``Validation``, ``Overloaded``, ``Backend``); vLLM's forms and every other path FastAPI's
    ``{"detail"}``. ``kind`` (memrerank's name of the error) picks TEI's type.
    """
    if api == "cohere":
        return {"message": message}
    if api == "cohere_v1":
        return {"message": message, "detail": message}
    if api == "tei":
        return {"error": message, "error_type": _TEI_TYPES.get(kind, "Validation")}
    return {"detail": message}


def api_of(path: str) -> str | None:
    """The API a request path speaks (its error shape), ``None`` for a path no rerank API owns."""
    return PATH_API.get(path)


def _error_bytes(kind: str, message: str) -> bytes:
    return json.dumps(error_body(None, kind, message)).encode()


def endpoint_label(path: str) -> str:
    """The metrics label of a request path: a known endpoint, else ``other`` (a client cannot grow the label set)."""
    return path if path in _KNOWN else "other"


def host_name(value: str | None) -> str:
    """The host of a ``Host`` header or of an ``Origin``'s authority, lowercased, without the port
    (``[::1]:8080`` → ``[::1]``; ``http://localhost:3000`` → ``localhost``)."""
    if not value:
        return ""
    value = value.strip().lower()
    if "://" in value:
        value = value.split("://", 1)[1].split("/", 1)[0]
    if value.startswith("["):
        return value[: value.find("]") + 1] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def is_loopback(host: str) -> bool:
    """Whether a bind address reaches only this machine (``127.0.0.0/8``, ``::1``, ``localhost``)."""
    host = host.strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _headers(scope: dict[str, Any]) -> dict[bytes, bytes]:
    return {k.lower(): v for k, v in scope.get("headers", ())}


class Guard:
    """ASGI middleware: Host / Origin allowlist, API key, JSON content type, and the metrics of every answer.

    Args:
        app: the ASGI app it guards.
        allowed_hosts: ``Host`` names (any port) to answer; ``("*",)`` answers every host.
        api_key: the key ``Authorization: Bearer`` must carry (``None``: no authentication).
        metrics: where every answer is counted (``metrics.observe(endpoint, status, seconds)``).
    """

    def __init__(self, app: Any, *, allowed_hosts: Iterable[str], api_key: str | None, metrics: Any) -> None:
        self.app = app
        hosts = tuple(h.lower() for h in allowed_hosts)
        self.any_host = ANY_HOST in hosts
        self.allowed = frozenset(hosts)
        self.api_key = None if api_key is None else api_key.encode()
        self.record = metrics.observe

    def _refusal(self, scope: dict[str, Any], headers: dict[bytes, bytes]) -> tuple[int, str, str, dict] | None:
        """``(status, type, message, extra headers)`` when the request is refused before the routes, else None."""
        if scope.get(OVER_CONNECTION_LIMIT):
            return 503, "overloaded", "too many open connections; retry shortly", {"retry-after": "1",
                                                                                  "connection": "close"}
        if not self.any_host:
            host = host_name(headers.get(b"host", b"").decode("latin-1"))
            if host not in self.allowed:
                return 403, "host_not_allowed", (f"Host {host or '(none)'!r} is not served here (allowed: "
                                                 f"{', '.join(sorted(self.allowed))})"), {}
            origin = headers.get(b"origin")
            if origin is not None and host_name(origin.decode("latin-1")) not in self.allowed:
                return 403, "origin_not_allowed", "cross-origin requests are not served", {}
        path, method = scope.get("path", ""), scope.get("method", "GET")
        if self.api_key is not None and path not in _OPEN_PATHS:
            given = headers.get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key):
                return 401, "unauthorized", "missing or wrong API key (Authorization: Bearer <key>)", {
                    "www-authenticate": "Bearer"}
        if method == "POST":
            ctype = headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
            if ctype != b"application/json":
                return 415, "unsupported_media_type", (f"Content-Type must be application/json, got "
                                                       f"{ctype.decode('latin-1') or '(none)'!r}"), {}
        return None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        endpoint = endpoint_label(scope.get("path", ""))
        status = [0]

        async def send_counted(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        headers = _headers(scope)
        refused = self._refusal(scope, headers)
        api = api_of(scope.get("path", ""))
        if refused is not None:
            code, kind, message, extra = refused
            await send_json(send_counted, code, error_body(api, kind, message), extra)
            self.record(endpoint, status[0], time.perf_counter() - start)
            return
        try:
            await self.app(scope, receive, send_counted)
        except Exception as exc:  # noqa: BLE001 - a bug in a route: still a JSON 500, still counted
            _log.exception("memrerank serve: %s %s failed", scope.get("method"), scope.get("path"))
            if not status[0]:
                await send_json(send_counted, 500, error_body(api, "internal_error",
                                                              f"{type(exc).__name__} while serving the request"))
        finally:
            self.record(endpoint, status[0] or 500, time.perf_counter() - start)


async def send_json(send: Any, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
    """Send one JSON response through an ASGI ``send``."""
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


def _raw_response(status: int, reason: str, kind: str, message: str, extra: str = "") -> bytes:
    """A whole HTTP/1.1 error response with the JSON error body, for the protocol (no ASGI app involved)."""
    body = _error_bytes(kind, message)
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n{extra}\r\n").encode() + body


async def _flag_over_limit(app: Any, scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "http":
        scope[OVER_CONNECTION_LIMIT] = True
    await app(scope, receive, send)


@functools.cache
def _protocol_class() -> type:
    """uvicorn's own HTTP protocol (httptools when installed, else h11) with the header timeout and the caps."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class GuardedProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, header_timeout_s: float, max_connections: int, max_header_bytes: int,
                     **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._header_timeout_s = header_timeout_s
            self._max_connections = max_connections
            self._max_header_bytes = max_header_bytes
            self._header_timer: Any = None
            self._header_bytes = 0  # bytes of the request whose headers are still awaited

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            if len(self.connections) > self._max_connections:
                self.app = functools.partial(_flag_over_limit, self.app)  # this connection's requests: 503
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _awaiting_headers(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(self._header_timeout_s, self._header_timeout)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def data_received(self, data: bytes) -> None:
            if self._awaiting_headers():
                if self._header_bytes == 0:  # the first bytes of a request: its headers' clock starts
                    self._arm()
                self._header_bytes += len(data)
            super().data_received(data)
            if not self._awaiting_headers():  # the headers are in (this chunk may hold body bytes too)
                self._header_bytes = 0
                self._disarm()
            elif self._header_bytes > self._max_header_bytes:
                self._answer(431, "Request Header Fields Too Large", "header_too_large",
                             f"request line and headers exceed {self._max_header_bytes} bytes")

        def on_response_complete(self) -> None:
            self._header_bytes = 0
            super().on_response_complete()

        def _header_timeout(self) -> None:
            self._header_timer = None
            if not self._awaiting_headers() or self.transport.is_closing():
                return
            if self._header_bytes:  # a request started and did not finish its headers in time
                self._answer(408, "Request Timeout", "header_timeout",
                             f"request headers not received within {self._header_timeout_s:g} s")
            else:  # an idle connection that never sent a request
                self.transport.close()

        def _answer(self, status: int, reason: str, kind: str, message: str) -> None:
            self._disarm()
            if not self.transport.is_closing():
                self.transport.write(_raw_response(status, reason, kind, message))
                self.transport.close()
            metrics = self.app_state.get(METRICS_STATE_KEY)
            if metrics is not None:
                metrics.observe("other", status, 0.0)

    return GuardedProtocol


def guarded_protocol(*args: Any, header_timeout_s: float, max_connections: int, max_header_bytes: int = 64 * 1024,
                     **kwargs: Any) -> Any:
    """A uvicorn HTTP protocol instance with the header timeout and the caps (pass it, as a ``functools.partial``
    with these keywords, as ``uvicorn.Config(http=...)``; a partial of this module-level function pickles into
    ``--workers`` processes)."""
    if not (math.isfinite(header_timeout_s) and header_timeout_s > 0):
        raise ValueError(f"header_timeout_s must be a positive number of seconds, got {header_timeout_s!r}")
    return _protocol_class()(*args, header_timeout_s=header_timeout_s, max_connections=max_connections,
                             max_header_bytes=max_header_bytes, **kwargs)
