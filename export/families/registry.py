"""The family registry: architecture name → family class, filled by the :func:`register_family` decorator.

This module imports no family module (the family modules import it), so the package has no import cycle:
``memrerank.export.families`` imports the builtin families, whose decorators register them here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from memrerank.errors import UnsupportedModelError
from memrerank.manifest import FAMILIES

__all__ = ["FAMILY_REGISTRY", "register_family", "family_for", "supported_architectures"]

#: ``config.architectures[0]`` → the family class that exports it.
FAMILY_REGISTRY: dict[str, type] = {}


def register_family(*architectures: str) -> Callable[[type], type]:
    """Class decorator: the family handles checkpoints whose ``config.architectures[0]`` is one of these.

    The class's ``name`` must be one of :data:`memrerank.manifest.FAMILIES` (the one list of family names,
    which the runtime's pair encoders register against too).

    Raises:
        ValueError: the class's ``name`` is not a known family.
    """

    def wrap(cls: type) -> type:
        name = getattr(cls, "name", "")
        if name not in FAMILIES:
            raise ValueError(f"{cls.__name__}.name: unknown family {name!r}; add it to "
                             f"memrerank.manifest.FAMILIES (known: {', '.join(FAMILIES)})")
        for arch in architectures:
            FAMILY_REGISTRY[arch] = cls
        return cls

    return wrap


def supported_architectures() -> list[str]:
    """Architectures some registered family can export."""
    return sorted(FAMILY_REGISTRY)


def family_for(config: Any) -> type:
    """Return the family class for a transformers config.

    Raises:
        UnsupportedModelError: no registered family handles the config's architectures (the message lists
            those that are supported).
    """
    archs = list(getattr(config, "architectures", None) or [])
    for arch in archs:
        if arch in FAMILY_REGISTRY:
            return FAMILY_REGISTRY[arch]
    raise UnsupportedModelError(
        f"unsupported checkpoint: architectures={archs or 'unset'} "
        f"(model_type={getattr(config, 'model_type', '?')}); "
        f"memrerank can export: {', '.join(supported_architectures())}"
    )
