"""Torch-free runtime: read an artifact directory and score query–document pairs."""

from memrerank.runtime.reranker import RankHit, Reranker

__all__ = ["Reranker", "RankHit"]
