"""The arguments both framework rerankers take, as one pydantic mixin (imported after the framework, which brings
pydantic)."""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, Field, field_validator

from memrerank.integrations._common import check_precision, check_threshold, check_top_n, resolve_reranker

__all__ = ["RerankFields"]


class RerankFields(BaseModel):
    """``artifact`` or ``reranker``, ``precision``, ``top_n``, ``threshold``; the Reranker loads after validation."""

    artifact: str | None = Field(default=None, description="Artifact directory written by memrerank export.")
    precision: str = Field(default="auto", description="Exported precision, or 'auto'.")
    top_n: int | None = Field(default=3, description="Most items to keep (None = all).")
    threshold: float | None = Field(default=None, description="Least calibrated probability to keep.")
    reranker: Any = Field(default=None, exclude=True, description="A loaded memrerank.Reranker.")

    @field_validator("artifact", mode="before")
    @classmethod
    def _artifact_path(cls, value: Any) -> Any:
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @field_validator("precision", mode="before")
    @classmethod
    def _precision(cls, value: Any) -> str:
        return check_precision(value)

    @field_validator("top_n", mode="before")
    @classmethod
    def _top_n(cls, value: Any) -> int | None:
        return check_top_n(value)

    @field_validator("threshold", mode="before")
    @classmethod
    def _threshold(cls, value: Any) -> float | None:
        return check_threshold(value)

    def __init__(self, **data: Any) -> None:
        super().__init__(**data)
        # after pydantic's validation, so an ArtifactError reaches the caller as itself, not wrapped
        self.reranker = resolve_reranker(self.artifact, self.precision, self.reranker)
