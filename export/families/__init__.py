"""Reranker families, registered by architecture name with a decorator.

A family knows how to load a checkpoint, describe its prompt/pair template for the manifest, wrap the model
into the graph that gets exported (one logit per row), and compute the PyTorch reference scores used to
validate the export.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from memrerank.errors import UnsupportedModelError

__all__ = ["FAMILY_REGISTRY", "register_family", "family_for", "supported_architectures"]

FAMILY_REGISTRY: dict[str, type] = {}


def register_family(*architectures: str) -> Callable[[type], type]:
    """Class decorator: the family handles checkpoints whose ``config.architectures[0]`` is one of these."""

    def wrap(cls: type) -> type:
        for arch in architectures:
            FAMILY_REGISTRY[arch] = cls
        return cls

    return wrap


def supported_architectures() -> list[str]:
    """Architectures some registered family can export."""
    _load_builtin_families()
    return sorted(FAMILY_REGISTRY)


def family_for(config: Any) -> type:
    """Return the family class for a transformers config, or raise listing what is supported."""
    _load_builtin_families()
    archs = list(getattr(config, "architectures", None) or [])
    for arch in archs:
        if arch in FAMILY_REGISTRY:
            return FAMILY_REGISTRY[arch]
    raise UnsupportedModelError(
        f"unsupported checkpoint: architectures={archs or 'unset'} (model_type={getattr(config, 'model_type', '?')}); "
        f"memrerank can export: {', '.join(supported_architectures())}"
    )


def _load_builtin_families() -> None:
    # Importing the modules runs their @register_family decorators.
    from memrerank.export.families import decoder_yes_no, encoder_cross  # noqa: F401
