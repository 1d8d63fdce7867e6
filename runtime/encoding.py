"""Fused pair tokenization.

Template pieces are tokenized once per artifact, the query (and instruction) once per call, and all documents
in one ``encode_batch`` call; pair ids are assembled from these pieces without re-tokenizing anything.

Why this is exact for the decoder template: the body ``<Instruct>: {instruction}\\n<Query>: {query}\\n<Document>:
{doc}`` is cut right after each ``>:``. The Qwen pre-tokenizer always ends a token there (``>:`` is a run of
punctuation that stops at the following space), the user text piece always begins with that literal space, and
a space neither composes under NFC nor belongs to any added token of the template. So tokenizing
``"...<Query>:"`` , ``" {query}\\n<Document>:"`` and ``" {doc}"`` separately yields exactly the ids of the whole
body string; ``tests/test_encoding.py`` checks this over arbitrary unicode and whitespace with hypothesis.
No whitespace normalisation is applied to user text. The one rewrite: lone surrogates (``"\ud800"``, which Python
strings may hold but UTF-8 cannot encode) become U+FFFD before tokenizing; every other code point — NUL, control
characters, RTL marks, combining marks, emoji — is tokenized as given.

Truncation only ever shortens the document, keeping its first tokens (as the official recipe's end-truncation
of the body does); a query that cannot fit with the template raises ``ValueError``.

Dialogue context: previous turns go on the query side, one per line before the question
(``"{turn 1}\n{turn 2}\n{query}"``), so they belong to the part every candidate shares (and, for decoders, to
the reused prefix). Turns are dropped oldest first (the oldest kept one cut from its start) until they fit
``max_context_tokens`` and still leave :data:`MIN_DOCUMENT_TOKENS` for the document; the question is never cut.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from memrerank.manifest import DECODER_YES_NO, ENCODER_CROSS, FAMILIES, DecoderTemplate, EncoderTemplate, Manifest

__all__ = ["EncodedPairs", "SplitPairs", "PairEncoder", "register_encoder", "make_encoder", "ENCODERS",
           "MIN_DOCUMENT_TOKENS", "MAX_CONTEXT_TOKENS", "render_query"]

#: Context turns never squeeze the document below this many tokens (when max_length allows it).
MIN_DOCUMENT_TOKENS = 64
#: Default cap on the tokens dialogue context may take.
MAX_CONTEXT_TOKENS = 256


_SURROGATE = re.compile("[\ud800-\udfff]")


def utf8_safe(text: str) -> str:
    """``text`` with lone surrogates replaced by U+FFFD (the tokenizer only takes encodable strings)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)


def render_query(query: str, context: Sequence[str] = ()) -> str:
    """The query-side text: context turns, oldest first, one per line, then the question."""
    return "\n".join([*context, query])

ENCODERS: dict[str, type[PairEncoder]] = {}


def register_encoder(family: str) -> Callable[[type[PairEncoder]], type[PairEncoder]]:
    """Class decorator registering the pair encoder of one artifact family (a name of
    :data:`memrerank.manifest.FAMILIES`, the one list of family names)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; the manifest knows {', '.join(FAMILIES)}")

    def wrap(cls: type[PairEncoder]) -> type[PairEncoder]:
        ENCODERS[family] = cls
        return cls

    return wrap


def make_encoder(manifest: Manifest, tokenizer: Any) -> PairEncoder:
    """Build the pair encoder of the artifact's family."""
    family = manifest.family
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


@dataclass
class SplitPairs:
    """One query's pairs as the pieces the packer assembles: ``head + document[:budget] + tail``.

    Attributes:
        head: ids every pair shares (template lead, instruction, context, query).
        docs: each document's ids, untruncated, as ``encode_batch`` returned them.
        tail: ids after the document (template suffix / trailing special tokens).
        budget: most document tokens that fit ``max_length``.
        head_types / doc_type / tail_types: segment ids, or ``None`` when the model has none.
        context_kept: how many context turns (the most recent) made it into ``head``.
    """

    head: np.ndarray
    docs: list[list[int]]
    tail: np.ndarray
    budget: int
    head_types: np.ndarray | None = None
    doc_type: int = 0
    tail_types: np.ndarray | None = None
    context_kept: int = 0

    @property
    def truncated(self) -> np.ndarray:
        return np.fromiter((len(d) > self.budget for d in self.docs), dtype=bool, count=len(self.docs))

    def join(self) -> EncodedPairs:
        """Whole-pair ids (the unpacked form; the runtime packs with :mod:`memrerank.kernels` instead)."""
        ids, types = [], []
        for doc in self.docs:
            doc = doc[: self.budget]
            ids.append(np.concatenate([self.head, np.asarray(doc, dtype=np.int64), self.tail]))
            if self.head_types is not None:
                types.append(np.concatenate([self.head_types, np.full(len(doc), self.doc_type, np.int64),
                                             self.tail_types]))
        return EncodedPairs(ids=ids, type_ids=types if self.head_types is not None else None,
                            truncated=self.truncated)


class PairEncoder:
    """Turns (query, documents) into token ids following an artifact's template."""

    def __init__(self, manifest: Manifest, tokenizer: Any) -> None:
        self.manifest = manifest
        self.tokenizer = tokenizer
        self.max_length = manifest.tokens.max_length
        self.max_context_tokens = MAX_CONTEXT_TOKENS

    def split(self, query: str, documents: Sequence[str], instruction: str | None = None,
              context: Sequence[str] = ()) -> SplitPairs:
        """Encode one query against many documents, as shared head, per-document ids and tail."""
        raise NotImplementedError

    def encode(self, query: str, documents: Sequence[str], instruction: str | None = None,
               context: Sequence[str] = ()) -> EncodedPairs:
        """Encode one query against many documents as whole pairs."""
        return self.split(query, documents, instruction, context).join()

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(utf8_safe(text), add_special_tokens=False).ids

    def _doc_ids(self, documents: Sequence[str], prefix: str = "") -> list[list[int]]:
        texts = [prefix + d for d in documents] if prefix else list(documents)
        try:
            encoded = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        except TypeError:  # a lone surrogate somewhere: only then pay for the per-text check
            encoded = self.tokenizer.encode_batch([utf8_safe(t) for t in texts], add_special_tokens=False)
        return [e.ids for e in encoded]

    def _query_ids(self, render: Callable[[str], str], query: str, context: Sequence[str],
                   room: int) -> tuple[list[int], int]:
        """Ids of ``render(query side)`` with as many recent context turns as fit ``room`` extra tokens.

        Returns the ids and how many turns were kept (a partly kept oldest turn counts).
        """
        bare = self._ids(render(query))
        room = min(room, self.max_context_tokens)
        if not context or room <= 0:
            return bare, 0
        turns = list(context)
        sizes = [len(e.ids) + 1 for e in self.tokenizer.encode_batch([utf8_safe(t) for t in turns],
                                                                      add_special_tokens=False)]
        kept, used = 0, 0
        for size in reversed(sizes):  # newest first
            if used + size > room:
                break
            kept, used = kept + 1, used + size
        keep = turns[len(turns) - kept:]
        if kept < len(turns) and used < room - 8:  # part of the next-older turn fits: keep its end
            older = turns[len(turns) - kept - 1]
            older = utf8_safe(older)
            enc = self.tokenizer.encode(older, add_special_tokens=False)
            take = room - used - 1
            if 0 < take < len(enc.ids):
                keep = [older[enc.offsets[len(enc.ids) - take][0]:]] + keep
        ids = self._ids(render(render_query(query, keep)))
        while len(ids) - len(bare) > room and keep:  # piece-wise counts are estimates: re-check the whole
            keep = keep[1:]
            ids = self._ids(render(render_query(query, keep)))
        return ids, len(keep)


@register_encoder(DECODER_YES_NO)
class DecoderPairEncoder(PairEncoder):
    """Qwen3-Reranker style prompt: prefix + instruction/query body + document + suffix."""

    def __init__(self, manifest: Manifest, tokenizer: Any) -> None:
        super().__init__(manifest, tokenizer)
        tpl = manifest.template
        if not isinstance(tpl, DecoderTemplate):
            raise TypeError(f"{type(self).__name__} needs a decoder template, got {type(tpl).__name__}")
        self.instruction_piece = tpl.instruction_piece
        self.query_piece = tpl.query_piece
        self.document_piece = tpl.document_piece
        self.default_instruction = tpl.default_instruction
        self.prefix_ids = list(tpl.prefix_ids)
        self.suffix_ids = list(tpl.suffix_ids)
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

    def head_ids(self, query: str, instruction: str | None = None, context: Sequence[str] = ()) -> list[int]:
        """Ids shared by every pair of one query: template prefix + instruction + (context +) query."""
        return self.split(query, [], instruction, context).head.tolist()

    def split(self, query: str, documents: Sequence[str], instruction: str | None = None,
              context: Sequence[str] = ()) -> SplitPairs:
        instruction = self.default_instruction if instruction is None else instruction
        lead = self.prefix_ids + self._instruction_ids(instruction)
        bare = len(self._ids(self.query_piece.format(query=query))) if context else 0
        room = self.max_length - len(lead) - len(self.suffix_ids) - bare - min(MIN_DOCUMENT_TOKENS,
                                                                                 self.max_length // 4)
        query_ids, kept = self._query_ids(lambda q: self.query_piece.format(query=q), query, context, room)
        head = lead + query_ids
        budget = self.max_length - len(head) - len(self.suffix_ids)
        if budget < 1:
            raise ValueError(
                f"query: the query, instruction and template take {len(head) + len(self.suffix_ids)} tokens, "
                f"leaving no room for a document within max_length={self.max_length}; shorten the query or "
                "instruction, or export with a larger --max-length"
            )
        docs = self._doc_ids(documents, self.doc_lead) if len(documents) else []
        return SplitPairs(head=np.asarray(head, dtype=np.int64), docs=docs,
                          tail=np.asarray(self.suffix_ids, dtype=np.int64), budget=budget, context_kept=kept)


@register_encoder(ENCODER_CROSS)
class EncoderPairEncoder(PairEncoder):
    """BERT/XLM-R style pair: ``P + query + M + document + S`` with segment ids from the tokenizer's template."""

    def __init__(self, manifest: Manifest, tokenizer: Any) -> None:
        super().__init__(manifest, tokenizer)
        tpl = manifest.template
        if not isinstance(tpl, EncoderTemplate):
            raise TypeError(f"{type(self).__name__} needs an encoder template, got {type(tpl).__name__}")
        self.lead_ids = list(tpl.lead_ids)
        self.middle_ids = list(tpl.middle_ids)
        self.trail_ids = list(tpl.trail_ids)
        # Segment ids per template piece, read off the tokenizer's own post-processor at export time.
        self.uses_type_ids = tpl.uses_type_ids
        self.query_type, self.doc_type = tpl.query_type_id, tpl.document_type_id
        self.lead_types = list(tpl.lead_type_ids)
        self.middle_types = list(tpl.middle_type_ids)
        self.trail_types = list(tpl.trail_type_ids)

    def split(self, query: str, documents: Sequence[str], instruction: str | None = None,
              context: Sequence[str] = ()) -> SplitPairs:
        if instruction is not None:
            raise ValueError("instruction: encoder cross-encoders take no instruction; pass instruction=None")
        fixed = len(self.lead_ids) + len(self.middle_ids) + len(self.trail_ids)
        bare = len(self._ids(query)) if context else 0
        room = self.max_length - fixed - bare - min(MIN_DOCUMENT_TOKENS, self.max_length // 4)
        query_ids, kept = self._query_ids(lambda q: q, query, context, room)
        head = self.lead_ids + query_ids + self.middle_ids
        n_head = len(head)
        budget = self.max_length - n_head - len(self.trail_ids)
        if budget < 1:
            raise ValueError(
                f"query: the query and special tokens take {n_head + len(self.trail_ids)} tokens, leaving no room "
                f"for a document within max_length={self.max_length}; shorten the query"
            )
        head_types = tail_types = None
        if self.uses_type_ids:
            head_types = np.asarray(self.lead_types + [self.query_type] * len(query_ids) + self.middle_types,
                                    dtype=np.int64)
            tail_types = np.asarray(self.trail_types, dtype=np.int64)
        docs = self._doc_ids(documents) if len(documents) else []
        return SplitPairs(head=np.asarray(head, dtype=np.int64), docs=docs,
                          tail=np.asarray(self.trail_ids, dtype=np.int64), budget=budget, head_types=head_types,
                          doc_type=self.doc_type, tail_types=tail_types, context_kept=kept)
