"""Reranker families, registered by architecture name with a decorator.

A family knows how to load a checkpoint, describe its prompt/pair template for the manifest, wrap the model
into the graph that gets exported (one logit per row), and compute the PyTorch reference scores used to
validate the export. The registry lives in :mod:`memrerank.export.families.registry`; importing this package
imports the builtin families, whose ``@register_family`` decorators fill it.
"""

from __future__ import annotations

from memrerank.export.families import decoder_yes_no, encoder_cross  # noqa: F401  (registers the builtins)
from memrerank.export.families.registry import (
    FAMILY_REGISTRY,
    family_for,
    register_family,
    supported_architectures,
)

__all__ = ["FAMILY_REGISTRY", "register_family", "family_for", "supported_architectures"]
