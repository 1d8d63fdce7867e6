"""What both framework rerankers share: argument checks and loading the :class:`~memrerank.Reranker`."""

from __future__ import annotations

import math
import os
from typing import Any

from memrerank.runtime.options import LoadOptions

#: What ``artifact=`` loads with when neither ``options`` nor ``precision`` is given.
_DEFAULT_OPTIONS = LoadOptions(precision="auto")


def missing_extra(framework: str, package: str, extra: str) -> str:
    """The one-line install hint an integration raises when its framework is not installed."""
    return (f"memrerank.integrations.{framework} needs {package}: pip install \"memrerank[{extra}]\" "
            f"(or pip install {package})")


def check_top_n(value: Any) -> int | None:
    """``top_n`` as given: a positive int or None (keep all)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"top_n must be a positive int or None (keep all), got {value!r}")
    return value


def check_threshold(value: Any) -> float | None:
    """``threshold`` as given: a calibrated probability in [0, 1] or None (no cut)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"threshold must be a calibrated probability in [0, 1] or None, got {value!r}")
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
