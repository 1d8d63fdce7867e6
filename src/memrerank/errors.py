"""Typed errors shared by export and runtime.

Every error subclasses ``ValueError`` (so callers that already catch bad-input errors keep working) and its
message says what to do next.
"""

from __future__ import annotations

__all__ = ["MemrerankError", "ArtifactError", "UnsupportedModelError", "UnsafeCheckpointError", "ParityError",
           "ProviderError", "MissingExtraError"]


class MemrerankError(ValueError):
    """Base class of memrerank's errors."""


class ArtifactError(MemrerankError):
    """An artifact directory is missing, incomplete, corrupted or of an unknown schema."""


class UnsupportedModelError(MemrerankError):
    """The checkpoint's architecture has no registered reranker family."""


class UnsafeCheckpointError(MemrerankError):
    """The checkpoint's weights are a pickle (``pytorch_model.bin``) and loading pickles was not allowed."""


class ParityError(MemrerankError):
    """The exported graph does not reproduce the reference model within tolerance."""


class ProviderError(MemrerankError):
    """An execution provider was asked for that this onnxruntime build does not have."""


class MissingExtraError(MemrerankError, ImportError):
    """A feature needs an optional extra that is not installed; the message is the ``pip install`` line.

    Also an ``ImportError``, so code that guards an optional import keeps catching it.
    """
