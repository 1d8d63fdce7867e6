"""Fused pair tokenization.

Template pieces are tokenized once per artifact, the query (and instruction) once per call, and all documents
in one ``encode_batch`` call; pair ids are assembled from these pieces without re-tokenizing anything.

Why this is exact for the decoder template: the body ``<Instruct>: {instruction}\\n<Query>: {query}\\n<Document>:
{doc}`` is cut right after each ``>:``. The Qwen pre-tokenizer always ends a token there (``>:`` is a run of
punctuation that stops at the following space), the user text piece always begins with that literal space, and
a space neither composes under NFC nor belongs to any added token of the template. So tokenizing
``"...<Query>:"`` , ``" {query}\\n<Document>:"`` and ``" {doc}"`` separately yields exactly the ids of the whole
body string; ``tests/test_encoding.py`` checks this over arbitrary unicode and whitespace with hypothesis.
No whitespace normalisation is applied to user text.

Truncation only ever shortens the document, keeping its first tokens (as the official recipe's end-truncation
of the body does); a query that cannot fit with the template raises ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["EncodedPairs", "PairEncoder", "register_encoder", "make_encoder", "ENCODERS"]

ENCODERS: dict[str, type[PairEncoder]] = {}


def register_encoder(family: str) -> Callable[[type[PairEncoder]], type[PairEncoder]]:
    """Class decorator registering the pair encoder of one artifact family."""

    def wrap(cls: type[PairEncoder]) -> type[PairEncoder]:
        ENCODERS[family] = cls
        return cls

    return wrap


def make_encoder(manifest: dict[str, Any], tokenizer: Any) -> PairEncoder:
    """Build the pair encoder named by ``manifest["family"]``."""
    family = manifest["family"]
    if family not in ENCODERS:
        raise ValueError(f"no pair encoder for family {family!r}; known: {', '.join(sorted(ENCODERS))}")
    return ENCODERS[family](manifest, tokenizer)


@dataclass
class EncodedPairs:
    """Token ids of a list of pairs, unpadded.

    Attributes:
        ids: one int64 array per pair.
        type_ids: one int64 array per pair, or ``None`` when the model has no segment embeddings.
        truncated: per pair, whether the document was shortened to fit ``max_length``.
    """

    ids: list[np.ndarray]
    type_ids: list[np.ndarray] | None
    truncated: np.ndarray


class PairEncoder:
    """Turns (query, documents) into token ids following an artifact's template."""

    def __init__(self, manifest: dict[str, Any], tokenizer: Any) -> None:
        self.manifest = manifest
        self.tokenizer = tokenizer
        self.max_length = int(manifest["tokens"]["max_length"])

    def encode(self, query: str, documents: Sequence[str], instruction: str | None = None) -> EncodedPairs:
        """Encode one query against many documents."""
        raise NotImplementedError

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def _doc_ids(self, documents: Sequence[str], prefix: str = "") -> list[list[int]]:
        texts = [prefix + d for d in documents] if prefix else list(documents)
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]


@register_encoder("decoder-yes-no")
class DecoderPairEncoder(PairEncoder):
    """Qwen3-Reranker style prompt: prefix + instruction/query body + document + suffix."""

    def __init__(self, manifest: dict[str, Any], tokenizer: Any) -> None:
        super().__init__(manifest, tokenizer)
        tpl = manifest["template"]
        self.instruction_piece: str = tpl["instruction_piece"]
        self.query_piece: str = tpl["query_piece"]
        self.document_piece: str = tpl["document_piece"]
        self.default_instruction: str = tpl["default_instruction"]
        self.prefix_ids = list(tpl["prefix_ids"])
        self.suffix_ids = list(tpl["suffix_ids"])
        # document_piece is " {document}": what precedes the placeholder is prepended to every document.
        self.doc_lead = self.document_piece.split("{document}")[0]
        self._instruction_cache: dict[str, list[int]] = {}

    def _instruction_ids(self, instruction: str) -> list[int]:
        ids = self._instruction_cache.get(instruction)
        if ids is None:
            if len(self._instruction_cache) > 64:
                self._instruction_cache.clear()
            ids = self._ids(self.instruction_piece.format(instruction=instruction))
            self._instruction_cache[instruction] = ids
        return ids

    def head_ids(self, query: str, instruction: str | None = None) -> list[int]:
        """Ids shared by every pair of one query: template prefix + instruction + query."""
        instruction = self.default_instruction if instruction is None else instruction
        return (
            self.prefix_ids
            + self._instruction_ids(instruction)
            + self._ids(self.query_piece.format(query=query))
        )

    def encode(self, query: str, documents: Sequence[str], instruction: str | None = None) -> EncodedPairs:
        head = self.head_ids(query, instruction)
        budget = self.max_length - len(head) - len(self.suffix_ids)
        if budget < 1:
            raise ValueError(
                f"query: the query, instruction and template take {len(head) + len(self.suffix_ids)} tokens, "
                f"leaving no room for a document within max_length={self.max_length}; shorten the query or "
                "instruction, or export with a larger --max-length"
            )
        head_arr = np.asarray(head, dtype=np.int64)
        tail_arr = np.asarray(self.suffix_ids, dtype=np.int64)
        ids, truncated = [], np.zeros(len(documents), dtype=bool)
        for i, doc in enumerate(self._doc_ids(documents, self.doc_lead)):
            if len(doc) > budget:
                doc = doc[:budget]
                truncated[i] = True
            ids.append(np.concatenate([head_arr, np.asarray(doc, dtype=np.int64), tail_arr]))
        return EncodedPairs(ids=ids, type_ids=None, truncated=truncated)


@register_encoder("encoder-cross")
class EncoderPairEncoder(PairEncoder):
    """BERT/XLM-R style pair: ``P + query + M + document + S`` with segment ids from the tokenizer's template."""

    def __init__(self, manifest: dict[str, Any], tokenizer: Any) -> None:
        super().__init__(manifest, tokenizer)
        tpl = manifest["template"]
        self.lead_ids = list(tpl["lead_ids"])
        self.middle_ids = list(tpl["middle_ids"])
        self.trail_ids = list(tpl["trail_ids"])
        # Segment ids per template piece, read off the tokenizer's own post-processor at export time.
        self.uses_type_ids = bool(tpl["uses_type_ids"])
        self.query_type, self.doc_type = int(tpl["query_type_id"]), int(tpl["document_type_id"])
        self.lead_types = list(tpl["lead_type_ids"])
        self.middle_types = list(tpl["middle_type_ids"])
        self.trail_types = list(tpl["trail_type_ids"])

    def encode(self, query: str, documents: Sequence[str], instruction: str | None = None) -> EncodedPairs:
        if instruction is not None:
            raise ValueError("instruction: encoder cross-encoders take no instruction; pass instruction=None")
        head = self.lead_ids + self._ids(query) + self.middle_ids
        n_head = len(head)
        budget = self.max_length - n_head - len(self.trail_ids)
        if budget < 1:
            raise ValueError(
                f"query: the query and special tokens take {n_head + len(self.trail_ids)} tokens, leaving no room "
                f"for a document within max_length={self.max_length}; shorten the query"
            )
        head_arr = np.asarray(head, dtype=np.int64)
        tail_arr = np.asarray(self.trail_ids, dtype=np.int64)
        ids, types, truncated = [], [], np.zeros(len(documents), dtype=bool)
        if self.uses_type_ids:
            head_types = self.lead_types + [self.query_type] * (n_head - len(self.lead_ids) - len(self.middle_ids))
            head_types = np.asarray(head_types + self.middle_types, dtype=np.int64)
            tail_types = np.asarray(self.trail_types, dtype=np.int64)
        for i, doc in enumerate(self._doc_ids(documents)):
            if len(doc) > budget:
                doc = doc[:budget]
                truncated[i] = True
            ids.append(np.concatenate([head_arr, np.asarray(doc, dtype=np.int64), tail_arr]))
            if self.uses_type_ids:
                types.append(np.concatenate([head_types, np.full(len(doc), self.doc_type, np.int64), tail_types]))
        return EncodedPairs(ids=ids, type_ids=types if self.uses_type_ids else None, truncated=truncated)
