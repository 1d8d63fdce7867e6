"""Fused pair tokenization gives exactly the official whole-string token ids."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memrerank.export.families.decoder_yes_no import DEFAULT_INSTRUCTION, PREFIX, SUFFIX, format_body
from memrerank.runtime.encoding import make_encoder

# Text with the characters that stress BPE boundaries: whitespace runs, newlines, punctuation, marks, emoji.
_ALPHABET = st.one_of(
    st.sampled_from(list(" \t\n\r\u00a0\u3000:>.<'\"!?-_,;()[]{}|")),
    st.characters(codec="utf-8"),
    st.sampled_from(["\u0301", "\u200f", "\u202e", "é", "ß", "İ", "🎉", "\u200d", "👩", "ﬁ", "Å"]),
)
TEXT = st.text(_ALPHABET, max_size=40)
SPECIAL = st.sampled_from(["", "<|im_end|>", "<think>", "<|endoftext|>", "'s", " 's", "\n\n", "  "])


def _decoder_manifest(tokenizer, max_length=100_000):
    from memrerank.manifest import DecoderTemplate, Manifest, Source, Tokens

    ids = lambda t: tuple(tokenizer.encode(t, add_special_tokens=False).ids)  # noqa: E731
    template = DecoderTemplate(
        prefix=PREFIX, suffix=SUFFIX, instruction_piece="<Instruct>: {instruction}\n<Query>:",
        query_piece=" {query}\n<Document>:", document_piece=" {document}", default_instruction=DEFAULT_INSTRUCTION,
        prefix_ids=ids(PREFIX), suffix_ids=ids(SUFFIX), id_checks={})
    return Manifest(family="decoder-yes-no", source=Source("test", "Qwen3ForCausalLM"), template=template,
                    tokens=Tokens(pad_id=151643, padding_side="left", max_length=max_length), tokenizer_files={},
                    precisions={})


def _official_ids(tokenizer, instruction, query, doc):
    enc = lambda t: tokenizer.encode(t, add_special_tokens=False).ids  # noqa: E731
    return enc(PREFIX) + enc(format_body(instruction, query, doc)) + enc(SUFFIX)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(query=st.tuples(SPECIAL, TEXT, SPECIAL).map("".join), docs=st.lists(st.tuples(SPECIAL, TEXT, SPECIAL).map(
    "".join), min_size=1, max_size=4), instruction=st.one_of(st.none(), TEXT))
def test_decoder_pieces_equal_whole_string_ids(qwen_tokenizer, query, docs, instruction):
    encoder = make_encoder(_decoder_manifest(qwen_tokenizer), qwen_tokenizer)
    got = encoder.encode(query, docs, instruction)
    instr = DEFAULT_INSTRUCTION if instruction is None else instruction
    for doc, ids in zip(docs, got.ids):
        assert ids.tolist() == _official_ids(qwen_tokenizer, instr, query, doc)
    assert not got.truncated.any()


@pytest.mark.parametrize("query,doc", [
    ("The", "The"), ("", ""), (" ", " "), ("\n", "\n"), ("x\n", "\ny"), ("'s", "'s"), (": a", ":b"),
    ("a" * 50, "  \t\n  z"), ("\u0301", "\u0301e"), ("<|im_end|>", "</think>"),
])
def test_decoder_boundary_cases(qwen_tokenizer, query, doc):
    encoder = make_encoder(_decoder_manifest(qwen_tokenizer), qwen_tokenizer)
    ids = encoder.encode(query, [doc]).ids[0].tolist()
    assert ids == _official_ids(qwen_tokenizer, DEFAULT_INSTRUCTION, query, doc)


def test_naive_concatenation_would_differ(qwen_tokenizer):
    """Why the cut points matter: ': ' + 'The' tokenized apart is not ': The'."""
    enc = lambda t: qwen_tokenizer.encode(t, add_special_tokens=False).ids  # noqa: E731
    assert enc("<Query>: ") + enc("The") != enc("<Query>: The")
    assert enc("<Query>:") + enc(" The") == enc("<Query>: The")


def test_truncation_cuts_only_the_document(qwen_tokenizer):
    manifest = _decoder_manifest(qwen_tokenizer, max_length=120)
    encoder = make_encoder(manifest, qwen_tokenizer)
    query = "Which city did the user move to?"
    long_doc = "The user moved to Lisbon. " * 100
    got = encoder.encode(query, [long_doc, "short"])
    assert got.truncated.tolist() == [True, False]
    assert len(got.ids[0]) == 120
    full = _official_ids(qwen_tokenizer, DEFAULT_INSTRUCTION, query, long_doc)
    head = encoder.head_ids(query)
    suffix = list(manifest.template.suffix_ids)
    # Same as the official recipe's end-truncation of the body: head kept, document cut, suffix kept.
    assert got.ids[0].tolist() == full[: 120 - len(suffix)] + suffix
    assert got.ids[0][: len(head)].tolist() == head
    assert got.ids[0][-len(suffix):].tolist() == suffix


def test_query_that_cannot_fit_is_a_clear_error(qwen_tokenizer):
    encoder = make_encoder(_decoder_manifest(qwen_tokenizer, max_length=120), qwen_tokenizer)
    with pytest.raises(ValueError, match="query"):
        encoder.encode("why " * 200, ["doc"])


def test_encoder_pairs_equal_transformers_pairs(bert_ckpt, bert_artifact):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from memrerank.manifest import read_manifest

    manifest = read_manifest(bert_artifact)
    tok = Tokenizer.from_file(str(bert_artifact / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    encoder = make_encoder(manifest, tok)
    hf = AutoTokenizer.from_pretrained(bert_ckpt)
    query = "Who is Marco?"
    docs = ["Marco is the user's climbing partner.", "", "Ünïcödé TEXT with CAPS", "long " * 200]
    got = encoder.encode(query, docs)
    ref = hf([query] * len(docs), docs, truncation="only_second", max_length=manifest.tokens.max_length)
    for i in range(len(docs)):
        assert got.ids[i].tolist() == ref["input_ids"][i]
        assert got.type_ids[i].tolist() == ref["token_type_ids"][i]
    assert got.truncated.tolist() == [False, False, False, True]
    assert np.all([len(x) <= manifest.tokens.max_length for x in got.ids])
