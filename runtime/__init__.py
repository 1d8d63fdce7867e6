"""Torch-free runtime: read an artifact directory and score query–document pairs.

``LoadOptions`` is light; ``Reranker``, ``RankHit`` and ``Scorer`` load onnxruntime and tokenizers on first use,
so a module that only builds options (``memrerank.serve``'s config, the CLI's parser) starts fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from memrerank.runtime.options import LoadOptions

if TYPE_CHECKING:
    from memrerank.runtime.reranker import RankHit, Reranker
    from memrerank.runtime.scorer import Scorer

__all__ = ["Reranker", "RankHit", "LoadOptions", "Scorer"]


def __getattr__(name: str) -> Any:
    if name in ("Reranker", "RankHit"):
        from memrerank.runtime import reranker

        return getattr(reranker, name)
    if name == "Scorer":
        from memrerank.runtime.scorer import Scorer

        return Scorer
    raise AttributeError(f"module 'memrerank.runtime' has no attribute {name!r}")
