"""What the framework rerankers share: argument checks, loading the :class:`~memrerank.Reranker`, and
:class:`Ranking`, one way to rank texts in process or through a running ``memrerank serve``."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

from memrerank.runtime.options import LoadOptions

#: What ``artifact=`` loads with when neither ``options`` nor ``precision`` is given.
_DEFAULT_OPTIONS = LoadOptions(precision="auto")


def missing_extra(framework: str, package: str, extra: str, module: str | None = None) -> str:
    """The one-line install hint an integration raises when its framework is not installed (``module``: where
    the integration lives, when not ``memrerank.integrations.<framework>``)."""
    return (f"{module or f'memrerank.integrations.{framework}'} needs {package}: pip install "
            f"\"memrerank[{extra}]\" (or pip install {package})")


def check_top_n(value: Any, name: str = "top_n") -> int | None:
    """``top_n`` (or the framework's ``name`` for it) as given: a positive int or None (keep all)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive int or None (keep all), got {value!r}")
    return value


def check_threshold(value: Any, name: str = "threshold") -> float | None:
    """``threshold`` (or the framework's ``name`` for it) as given: a calibrated probability in [0, 1] or None
    (no cut)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a calibrated probability in [0, 1] or None, got {value!r}")
    return float(value)


def load_options(options: Any, precision: Any, reranker: Any) -> LoadOptions:
    """The :class:`~memrerank.LoadOptions` an ``artifact`` loads with: ``options`` (default: ``precision="auto"``)
    with ``precision``, when given, in place of its precision.

    Raises:
        TypeError: ``options`` is not a :class:`memrerank.LoadOptions`.
        ValueError: an unknown precision (naming it); ``options`` or ``precision`` beside ``reranker`` (it is
            already loaded, so they would be ignored).
    """
    if options is not None and not isinstance(options, LoadOptions):
        raise TypeError(f"options must be a memrerank.LoadOptions (LoadOptions(\"int8\", threads=2)), got "
                        f"{options!r}")
    if reranker is not None and (options is not None or precision is not None):
        raise ValueError("options= and precision= say how artifact= loads; reranker= is already loaded, so "
                         "pass one or the other")
    return LoadOptions.merge(options if options is not None else _DEFAULT_OPTIONS, precision=precision)


def resolve_reranker(artifact: Any, options: LoadOptions, reranker: Any) -> Any:
    """The :class:`~memrerank.Reranker` passed, or one loaded from ``artifact`` with ``options``.

    Raises:
        ValueError: neither or both of ``artifact`` and ``reranker`` were given.
        TypeError: ``reranker`` is not a :class:`memrerank.Reranker`, or ``artifact`` is not a path.
        ArtifactError: the artifact cannot be loaded (from :meth:`memrerank.Reranker.load`).
    """
    from memrerank.runtime import Reranker

    if (artifact is None) == (reranker is None):
        given = "both" if reranker is not None else "neither"
        raise ValueError("pass artifact=<directory written by `memrerank export`> or "
                         f"reranker=<memrerank.Reranker>, not {given}")
    if reranker is not None:
        if not isinstance(reranker, Reranker):
            raise TypeError(f"reranker must be a memrerank.Reranker (Reranker.load(OUT, ...)), got "
                            f"{type(reranker).__name__}")
        return reranker
    if not isinstance(artifact, (str, os.PathLike)) or not os.fspath(artifact):
        raise TypeError(f"artifact must be an artifact directory (str or Path), got {artifact!r}")
    return Reranker.load(artifact, options)


def check_instruction(value: Any) -> str | None:
    """``instruction`` as given: a non-empty string (decoder rerankers' task instruction) or None (the default)."""
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ValueError(f"instruction must be a non-empty string or None (the artifact's default), got {value!r}")
    return value


def options_from(value: Any) -> Any:
    """``options`` as a config file gives them: a dict of :class:`~memrerank.LoadOptions` fields becomes one
    (anything else is left for :func:`load_options` to judge)."""
    if not isinstance(value, Mapping):
        return value
    known = [f.name for f in dataclasses.fields(LoadOptions)]
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise TypeError(f"options: unknown field(s) {unknown}; LoadOptions takes {', '.join(known)}")
    return LoadOptions(**value)


def _check_texts(query: Any, texts: list[Any]) -> None:
    for name, value in (("query", query), *((f"texts[{i}]", t) for i, t in enumerate(texts))):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be str, got {type(value).__name__}")


class Ranking:
    """Ranks texts with a loaded :class:`~memrerank.Reranker` (in process) or a
    :class:`~memrerank.integrations._client.RerankService` (a running ``memrerank serve``): either way
    ``[(index into texts, calibrated score)]``, best first.

    Build it with :func:`open_ranking`.
    """

    def __init__(self, reranker: Any = None, service: Any = None, instruction: str | None = None) -> None:
        self.reranker, self.service, self.instruction = reranker, service, instruction

    def rank(self, query: str, texts: list[str], top_n: int | None = None,
             threshold: float | None = None) -> list[tuple[int, float]]:
        """The ``top_n`` best texts whose calibrated probability is ``>= threshold``, best first.

        Raises:
            TypeError: ``query`` or a text is not a string (checked here in both modes).
        """
        _check_texts(query, texts)
        if self.service is not None:
            return self.service.rank(query, texts, top_n, threshold, self.instruction)
        hits = self.reranker.rank(query, texts, top_k=top_n, threshold=threshold, instruction=self.instruction)
        return [(hit.index, hit.score) for hit in hits]

    async def arank(self, query: str, texts: list[str], top_n: int | None = None,
                    threshold: float | None = None) -> list[tuple[int, float]]:
        """:meth:`rank` without blocking the event loop: an async request, or scoring in a worker thread."""
        _check_texts(query, texts)
        if self.service is not None:
            return await self.service.arank(query, texts, top_n, threshold, self.instruction)
        return await asyncio.to_thread(self.rank, query, texts, top_n, threshold)


def check_mode(*, artifact: Any = None, reranker: Any = None, url: Any = None, options: Any = None,
               precision: Any = None, api_key: Any = None, model: Any = None) -> None:
    """Exactly one of ``artifact``, ``reranker``, ``url``, and only the settings of that mode.

    Raises:
        ValueError: none or several of the three; ``options`` / ``precision`` beside ``url``; ``api_key`` /
            ``model`` without it.
    """
    given = [name for name, value in (("artifact", artifact), ("reranker", reranker), ("url", url))
             if value is not None]
    if len(given) != 1:
        raise ValueError("pass artifact=<directory written by `memrerank export`>, reranker=<memrerank.Reranker> "
                         "or url=<base URL of a running `memrerank serve`>, not "
                         f"{' and '.join(given) or 'none of them'}")
    if url is not None and (options is not None or precision is not None):
        raise ValueError("options= and precision= say how artifact= loads; url= is a running service (it loaded "
                         "its artifact itself), so pass one or the other")
    if url is None and (api_key is not None or model is not None):
        raise ValueError("api_key= and model= are sent to url=; with artifact= or reranker= nothing is sent, so "
                         "drop them")


def open_ranking(*, artifact: Any = None, reranker: Any = None, options: Any = None, precision: Any = None,
                 url: Any = None, api_key: Any = None, model: Any = None, timeout: Any = 60.0,
                 instruction: Any = None) -> Ranking:
    """A :class:`Ranking` over exactly one of ``artifact`` (loaded with ``options`` / ``precision``; a dict of
    LoadOptions fields is accepted), ``reranker`` or ``url`` (with ``api_key``, ``model``, ``timeout``).

    Raises:
        ValueError: see :func:`check_mode`; an ``instruction`` the artifact refuses (an encoder's) or that leaves
            no room for a document; a bad URL or timeout.
        TypeError: see :func:`load_options` and :func:`resolve_reranker`.
        ArtifactError: the artifact cannot be loaded.
    """
    from memrerank.integrations._client import RerankService

    instruction = check_instruction(instruction)
    check_mode(artifact=artifact, reranker=reranker, url=url, options=options, precision=precision,
               api_key=api_key, model=model)
    if url is not None:
        return Ranking(service=RerankService(url, api_key, model, timeout), instruction=instruction)
    loaded = resolve_reranker(artifact, load_options(options_from(options), precision, reranker), reranker)
    if instruction is not None:  # an encoder refuses any instruction: say so now, not on every call
        loaded.encoder.split("", [], instruction)
    return Ranking(reranker=loaded, instruction=instruction)
