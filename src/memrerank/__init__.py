"""memrerank: the edge runtime for reasoning-aware memory rerankers.

``import memrerank`` stays light: the runtime (onnxruntime, tokenizers) loads on first use of
:class:`Reranker`, and export's heavy dependencies (torch, transformers, optimum) only inside ``memrerank.export``.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Reranker", "RankHit", "LoadOptions", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("Reranker", "RankHit", "LoadOptions"):
        from memrerank import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'memrerank' has no attribute {name!r}")
