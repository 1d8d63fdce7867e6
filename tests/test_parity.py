"""Runtime logits vs an independent transformers implementation of each model's official recipe."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import PARITY_ATOL
from memrerank import Reranker
from texts import DOCS, QUERIES

# The Qwen3-Reranker model card's recipe, written out here independently of memrerank.export.
QWEN_PREFIX = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
               "Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n")
QWEN_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
QWEN_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


def official_qwen3_logits(ckpt, pairs, max_length=8192, seq_cls=False):
    """logit(yes) - logit(no) at the last token, left padding, as the Qwen3-Reranker README codes it."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ckpt, padding_side="left")
    cls = AutoModelForSequenceClassification if seq_cls else AutoModelForCausalLM
    model = cls.from_pretrained(ckpt).eval()
    prefix_tokens = tokenizer.encode(QWEN_PREFIX, add_special_tokens=False)
    suffix_tokens = tokenizer.encode(QWEN_SUFFIX, add_special_tokens=False)
    bodies = [f"<Instruct>: {QWEN_INSTRUCTION}\n<Query>: {q}\n<Document>: {d}" for q, d in pairs]
    inputs = tokenizer(bodies, padding=False, truncation="longest_first", return_attention_mask=False,
                       max_length=max_length - len(prefix_tokens) - len(suffix_tokens))
    for i, ele in enumerate(inputs["input_ids"]):
        inputs["input_ids"][i] = prefix_tokens + ele + suffix_tokens
    out = []
    with torch.no_grad():
        if seq_cls:
            for ids in inputs["input_ids"]:
                out.append(float(model(input_ids=torch.tensor([ids])).logits[0, 0]))
            return np.array(out)
        padded = tokenizer.pad(inputs, padding=True, return_tensors="pt")
        # logits_to_keep=1 only skips the lm_head at positions the recipe discards ([:, -1, :] is unchanged).
        logits = model(**padded, logits_to_keep=1).logits[:, -1, :]
        yes = tokenizer.convert_tokens_to_ids("yes")
        no = tokenizer.convert_tokens_to_ids("no")
        assert (yes, no) == (9693, 2152)
        return (logits[:, yes] - logits[:, no]).numpy()


def all_pairs():
    return [(q, d) for q in QUERIES for d in DOCS]


@pytest.mark.parametrize("prefix_reuse", [True, False])
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("batch_size", [1, 8])
def test_qwen3_matches_official_recipe(qwen_ckpt, qwen_artifact, padding_side, batch_size, prefix_reuse):
    pairs = all_pairs()
    ref = official_qwen3_logits(qwen_ckpt, pairs)
    reranker = Reranker.load(qwen_artifact, batch_size=batch_size, prefix_reuse=prefix_reuse)
    reranker.padding_side = padding_side
    got = reranker.predict(pairs, raw=True)
    assert np.ptp(ref) > 1.0, "reference logits should spread like a reranker's"
    np.testing.assert_allclose(got, ref, atol=PARITY_ATOL["fp32"], rtol=0)


@pytest.mark.parametrize("prefix_reuse", [True, False])
def test_qwen3_truncated_document_matches_official_recipe(qwen_ckpt, qwen_short_artifact, prefix_reuse):
    pairs = [(q, DOCS[-1]) for q in QUERIES] + [(QUERIES[0], d) for d in DOCS[:4]]
    ref = official_qwen3_logits(qwen_ckpt, pairs, max_length=128)
    reranker = Reranker.load(qwen_short_artifact, batch_size=8, prefix_reuse=prefix_reuse)
    got, truncated = reranker.predict_with_truncation(pairs, raw=True)
    assert truncated[: len(QUERIES)].all() and not truncated[len(QUERIES):].any()
    np.testing.assert_allclose(got, ref, atol=PARITY_ATOL["fp32"], rtol=0)


def test_qwen3_probability_is_the_official_yes_probability(qwen_ckpt, qwen_artifact):
    """Uncalibrated score == softmax([no, yes])[yes], the recipe's score."""
    pairs = all_pairs()[:10]
    ref = official_qwen3_logits(qwen_ckpt, pairs)
    official = torch.log_softmax(torch.tensor(np.stack([np.zeros_like(ref), ref], 1)), 1)[:, 1].exp().numpy()
    got = Reranker.load(qwen_artifact).predict(pairs)
    np.testing.assert_allclose(got, official, atol=2e-5)


def test_qwen3_seq_cls_matches_transformers(qwen_seqcls_ckpt, qwen_seqcls_artifact):
    pairs = all_pairs()[::3]
    ref = official_qwen3_logits(qwen_seqcls_ckpt, pairs, seq_cls=True)
    got = Reranker.load(qwen_seqcls_artifact, batch_size=8).predict(pairs, raw=True)
    np.testing.assert_allclose(got, ref, atol=PARITY_ATOL["fp32"], rtol=0)


def cross_encoder_logits(ckpt, pairs, max_length):
    """sentence-transformers CrossEncoder's computation: tokenizer(queries, docs) → logits[:, 0]."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForSequenceClassification.from_pretrained(ckpt).eval()
    enc = tok([q for q, _ in pairs], [d for _, d in pairs], padding=True, truncation=True, max_length=max_length,
              return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits[:, 0].numpy()


@pytest.mark.parametrize("batch_size", [1, 8])
def test_real_minilm_matches_transformers(minilm_ckpt, minilm_artifact, batch_size):
    pairs = all_pairs()
    ref = cross_encoder_logits(minilm_ckpt, pairs, 512)
    got = Reranker.load(minilm_artifact, batch_size=batch_size).predict(pairs, raw=True)
    assert np.ptp(ref) > 1.0
    np.testing.assert_allclose(got, ref, atol=PARITY_ATOL["fp32"], rtol=0)


def test_tiny_bert_matches_transformers_with_truncation(bert_ckpt, bert_artifact):
    pairs = all_pairs()
    ref = cross_encoder_logits(bert_ckpt, pairs, 64)
    got, truncated = Reranker.load(bert_artifact, batch_size=8).predict_with_truncation(pairs, raw=True)
    assert truncated.any()
    np.testing.assert_allclose(got, ref, atol=PARITY_ATOL["fp32"], rtol=0)


def test_xlm_roberta_family_matches_transformers(tmp_path):
    import models
    from memrerank.export import export_model
    from memrerank.manifest import read_manifest

    ckpt = models.make_xlm_roberta(tmp_path / "xlmr")
    art = export_model(str(ckpt), tmp_path / "xlmr-art", log=lambda m: None)
    tpl = read_manifest(art).template
    assert tpl.uses_type_ids is False and len(tpl.middle_ids) == 2  # </s></s> between the segments
    pairs = all_pairs()
    ref = cross_encoder_logits(ckpt, pairs, read_manifest(art).tokens.max_length)
    got = Reranker.load(art, batch_size=8).predict(pairs, raw=True)
    np.testing.assert_allclose(got, ref, atol=PARITY_ATOL["fp32"], rtol=0)
