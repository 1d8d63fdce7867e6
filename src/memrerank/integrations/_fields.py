"""The arguments both framework rerankers take, as one pydantic mixin (imported after the framework, which brings
pydantic)."""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, Field, field_validator

from memrerank.integrations._common import check_threshold, check_top_n, load_options, resolve_reranker
from memrerank.runtime.options import LoadOptions

__all__ = ["RerankFields"]


class RerankFields(BaseModel):
    """``artifact`` (with ``options`` / ``precision``) or ``reranker``, ``top_n``, ``threshold``; the Reranker
    loads after validation."""

    artifact: str | None = Field(default=None, description="Artifact directory written by memrerank export.")
    options: Any = Field(default=None, description="memrerank.LoadOptions for artifact= (None: precision 'auto').")
    precision: str | None = Field(default=None, description="Exported precision or 'auto', in place of options'.")
    top_n: int | None = Field(default=3, description="Most items to keep (None = all).")
    threshold: float | None = Field(default=None, description="Least calibrated probability to keep.")
    reranker: Any = Field(default=None, exclude=True, description="A loaded memrerank.Reranker.")

    @field_validator("artifact", mode="before")
    @classmethod
    def _artifact_path(cls, value: Any) -> Any:
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @field_validator("precision", mode="before")
    @classmethod
    def _precision(cls, value: Any) -> str | None:
        return value if value is None else LoadOptions(precision=value).precision  # raises naming the choices

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
        options = load_options(self.options, self.precision, self.reranker)
        self.reranker = resolve_reranker(self.artifact, options, self.reranker)
