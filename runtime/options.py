"""How an artifact is loaded and run: one validated :class:`LoadOptions`, the same on every surface.

``Reranker.load``, the CLI, :class:`memrerank.serve.ServeConfig`, :class:`memrerank.scale.RescoreJob`,
``run_bench``, ``evaluate_artifact``, ``calibrate_artifact``, the integrations and the bench scripts all take one
of these and pass it on; it is checked once, when it is made, and every error names the field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from memrerank.manifest import PRECISIONS

__all__ = ["LoadOptions", "check_positive_int", "check_optional_bool", "provider_tuple"]


def check_positive_int(value: Any, name: str, *, optional: bool = False) -> int | None:
    """``value`` if it is a positive ``int`` (``None`` too when ``optional``); else ``ValueError`` naming ``name``.

    ``True``, ``2.0`` and ``"2"`` are refused: a flag or a string that looks like a number is a caller's mistake.
    """
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer{' or None' if optional else ''}, got {value!r}")
    return value


def check_optional_bool(value: Any, name: str, *, optional: bool = True) -> bool | None:
    """``value`` if it is ``True`` / ``False`` (or ``None`` when ``optional``); a string such as ``"false"`` is
    refused (it would be truthy)."""
    if value is None and optional:
        return None
    if not isinstance(value, bool):
        allowed = "True, False or None" if optional else "True or False"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value


def provider_tuple(providers: Any, name: str = "LoadOptions.providers") -> tuple[str, ...] | None:
    """Provider names or aliases as a tuple; a comma-separated string or any sequence of strings is accepted,
    ``None`` stays ``None`` (the CPU)."""
    if providers is None:
        return None
    if isinstance(providers, str):
        items: Sequence[Any] = providers.split(",")
    elif isinstance(providers, Sequence) or isinstance(providers, (set, frozenset)):
        items = list(providers)
    else:
        raise TypeError(f"{name} must be provider names (e.g. ('cuda', 'cpu') or 'cuda,cpu') or None, got "
                        f"{providers!r}")
    bad = [p for p in items if not isinstance(p, str)]
    if bad:
        raise TypeError(f"{name} must be provider names (str), got {bad[0]!r}")
    names = tuple(p.strip() for p in items if p.strip())
    if not names:
        raise ValueError(f"{name} is empty; pass None for the CPU or e.g. ('cuda',)")
    return names


@dataclass(frozen=True)
class LoadOptions:
    """How an artifact is loaded and run (everything but where it is).

    Args:
        precision: one of the exported precisions (``memrerank info``), or ``"auto"``: the fastest exported
            precision that met its fidelity budget on the first provider.
        providers: onnxruntime providers or aliases, best first (``("cuda", "cpu")``); ``None`` = the CPU. A list
            or a comma-separated string is stored as a tuple.
        threads: onnxruntime intra-op threads (``None`` = onnxruntime's default).
        batch_size: most rows per model call (``None`` = the backend's budget: 32 on the CPU, 64 on a GPU).
        max_batch_tokens: most padded tokens (rows × width) per model call; bounds peak memory (``None`` = the
            backend's budget: 2,048 on the CPU, 32,768 on a GPU).
        prefix_reuse: decoder artifacts: run the part every pair of a query shares once and score the documents
            against its cache. ``None`` = on where the artifact supports it; same scores either way (1e-4, fp32).
        allow_tf32: CUDA: let fp32 products use TF32 (faster; logits move by ~1e-3). Off by default.
        io_binding: bind inputs and outputs on the provider's device, the prefix cache staying there between
            batches (``None`` = on for GPU providers, off on the CPU; same scores either way).

    Raises:
        ValueError: a value out of range or of the wrong kind, naming the field.
        TypeError: providers that are not names.
    """

    precision: str = "fp32"
    providers: tuple[str, ...] | None = None
    threads: int | None = None
    batch_size: int | None = None
    max_batch_tokens: int | None = None
    prefix_reuse: bool | None = None
    allow_tf32: bool = False
    io_binding: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.precision, str) or self.precision not in PRECISIONS + ("auto",):
            raise ValueError(f"LoadOptions.precision: unknown {self.precision!r}; choose one of "
                             f"{', '.join(PRECISIONS)} or 'auto'")
        object.__setattr__(self, "providers", provider_tuple(self.providers))
        for name in ("threads", "batch_size", "max_batch_tokens"):
            check_positive_int(getattr(self, name), f"LoadOptions.{name}", optional=True)
        check_optional_bool(self.prefix_reuse, "LoadOptions.prefix_reuse")
        check_optional_bool(self.io_binding, "LoadOptions.io_binding")
        check_optional_bool(self.allow_tf32, "LoadOptions.allow_tf32", optional=False)

    def replace(self, **changes: Any) -> LoadOptions:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def merge(cls, options: LoadOptions | None = None, **overrides: Any) -> LoadOptions:
        """``options`` (default: all defaults) with every override that is not ``None`` applied.

        This is how ``Reranker.load(path, options, threads=2)`` and the CLI combine an options object with
        keywords: a keyword left at ``None`` keeps the options' value.

        Raises:
            TypeError: ``options`` is not a :class:`LoadOptions`, or an override names no field.
        """
        if options is None:
            options = cls()
        elif not isinstance(options, LoadOptions):
            raise TypeError(f"options must be a memrerank.LoadOptions, got {type(options).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown load option(s) {unknown}; LoadOptions has {', '.join(sorted(known))}")
        given = {k: v for k, v in overrides.items() if v is not None}
        return dataclasses.replace(options, **given) if given else options

    @property
    def first_provider(self) -> str:
        """The onnxruntime name of the provider asked for first (``CPUExecutionProvider`` when none)."""
        from memrerank.runtime.backends.onnxruntime import provider_name

        return provider_name(self.providers[0]) if self.providers else "CPUExecutionProvider"

    @property
    def wants_tensorrt(self) -> bool:
        """Whether the first provider asked for is TensorRT (alias or onnxruntime name)."""
        return self.first_provider == "TensorrtExecutionProvider"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: what a report records about how it loaded the artifact."""
        out = dataclasses.asdict(self)
        out["providers"] = list(self.providers) if self.providers else None
        return out

