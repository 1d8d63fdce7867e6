"""Haystack: :class:`MemrerankRanker`, a ranker over a memrerank artifact or a running ``memrerank serve``
(``pip install "memrerank[haystack]"``). ``haystack_integrations`` is a namespace package shared with Haystack's
other integrations, so a pipeline file may name this component without an allowlist."""

from haystack_integrations.components.rankers.memrerank.ranker import MemrerankRanker

__all__ = ["MemrerankRanker"]
