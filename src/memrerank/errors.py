"""Typed errors shared by export and runtime.

Every error subclasses ``ValueError`` (so callers that already catch bad-input errors keep working) and its
message says what to do next.
"""

from __future__ import annotations

__all__ = ["MemrerankError", "ArtifactError", "UnsupportedModelError", "ParityError", "ProviderError"]


class MemrerankError(ValueError):
    """Base class of memrerank's errors."""


class ArtifactError(MemrerankError):
    """An artifact directory is missing, incomplete, corrupted or of an unknown schema."""


class UnsupportedModelError(MemrerankError):
    """The checkpoint's architecture has no registered reranker family."""


class ParityError(MemrerankError):
    """The exported graph does not reproduce the reference model within tolerance."""


class ProviderError(MemrerankError):
    """An execution provider was asked for that this onnxruntime build does not have."""
