"""Qwen2ForCausalLM as a decoder-yes-no family: q/k/v biases, no q/k norms, tied or untied embeddings, the prompt
without a think block by default, and a recorded way to set another prompt and answer tokens."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import models
from conftest import PARITY_ATOL
from memrerank import LoadOptions, Reranker
from texts import DOCS, QUERIES

# The Qwen3-Reranker model card's prompt, written out here independently of memrerank.export; a Qwen2 tokenizer
# has no think tokens, so its suffix stops at the assistant turn.
SYSTEM = ("Judge whether the Document meets the requirements based on the Query and the Instruct provided. Note "
          "that the answer can only be \"yes\" or \"no\".")
INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
QWEN2_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"


def chatml_prefix(system: str) -> str:
    return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"


def reference_logits(ckpt, pairs, *, system=SYSTEM, suffix=QWEN2_SUFFIX, yes="yes", no="no"):
    """logit(yes) − logit(no) at the last token with left padding, computed by transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ckpt, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    prefix_ids = tokenizer.encode(chatml_prefix(system), add_special_tokens=False)
    suffix_ids = tokenizer.encode(suffix, add_special_tokens=False)
    rows = [prefix_ids + tokenizer.encode(f"<Instruct>: {INSTRUCTION}\n<Query>: {q}\n<Document>: {d}",
                                          add_special_tokens=False) + suffix_ids for q, d in pairs]
    padded = tokenizer.pad({"input_ids": rows}, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**padded).logits[:, -1, :]
    y, n = tokenizer.convert_tokens_to_ids(yes), tokenizer.convert_tokens_to_ids(no)
    return (logits[:, y] - logits[:, n]).numpy()


PAIRS = [(q, d) for q in QUERIES[:3] for d in DOCS]


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    """Tiny Qwen2 checkpoints (tied: traced graph; untied: fused graph, int8 too) and their artifacts."""
    from memrerank.export import export_model

    out = {}
    for tied, graph, precisions in ((True, "traced", ["fp32"]), (False, "fused", ["fp32", "int8"])):
        ckpt = models.make_qwen2(tmp_path_factory.mktemp("ckpt") / f"qwen2-{tied}", tied=tied, seed=int(tied))
        art = export_model(str(ckpt), tmp_path_factory.mktemp("art") / f"qwen2-{graph}", precisions=precisions,
                           graph=graph, log=lambda m: None)
        out[tied] = (ckpt, art)
    return out


@pytest.mark.parametrize("tied", [True, False], ids=["tied-traced", "untied-fused"])
@pytest.mark.parametrize("prefix_reuse", [True, False])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_qwen2_matches_transformers(qwen2, tied, prefix_reuse, padding_side):
    ckpt, art = qwen2[tied]
    ref = reference_logits(ckpt, PAIRS)
    assert np.ptp(ref) > 0.1, "the reference must spread (a flat score would hide a wrong graph)"
    r = Reranker.load(art, LoadOptions(prefix_reuse=prefix_reuse, batch_size=4))
    r.padding_side = padding_side
    got = r.predict(PAIRS, raw=True)
    np.testing.assert_allclose(got, ref, atol=PARITY_ATOL["fp32"], rtol=0)


def test_qwen2_default_prompt_has_no_think_block_and_is_recorded(qwen2):
    _ckpt, art = qwen2[True]
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["family"] == "decoder-yes-no" and manifest["source"]["architecture"] == "Qwen2ForCausalLM"
    assert manifest["template"]["prefix"] == chatml_prefix(SYSTEM)
    assert manifest["template"]["suffix"] == QWEN2_SUFFIX and "think" not in manifest["template"]["suffix"]
    assert manifest["template"]["prompt"] == "qwen3-reranker, no think block"
    assert (manifest["tokens"]["yes_id"], manifest["tokens"]["no_id"]) == (9693, 2152)


def test_qwen2_bias_is_in_the_graphs_and_int8_holds(qwen2):
    """The random q/k/v biases reach both graph kinds (one Add per layer in the fused graph); int8 builds and
    keeps its score whatever shares the batch."""
    from memrerank.export.fused import fused_op_counts

    _ckpt, art = qwen2[False]
    assert fused_op_counts(art / "fp32" / "model.onnx")["Add"] >= 2
    # a fused graph is rotated by default (the parity tests above run on it), the traced one never
    assert "rotation" in json.loads((art / "manifest.json").read_text())["export"]
    assert "rotation" not in json.loads((qwen2[True][1] / "manifest.json").read_text())["export"]
    r = Reranker.load(art, "int8")
    alone = r.predict([PAIRS[0]], raw=True)[0]
    crowd = r.predict(PAIRS, raw=True)[0]
    assert abs(alone - crowd) < 1e-5


def test_a_custom_prompt_and_answer_tokens_are_exported_and_recorded(qwen2, tmp_path):
    """Another Qwen2-based yes/no reranker: its own system message, suffix and answer tokens, given on the CLI;
    the scores follow that prompt (checked against transformers) and the manifest records it."""
    ckpt, _art = qwen2[True]
    system, suffix = "You rank an assistant's memories.", "<|im_end|>\n<|im_start|>assistant\nAnswer:"
    out = tmp_path / "custom"
    proc = subprocess.run([sys.executable, "-m", "memrerank.cli", "export", str(ckpt), "-o", str(out), "-q",
                           "--system-prompt", system, "--prompt-suffix", suffix.replace("\n", "\\n"),
                           "--yes-token", "Yes", "--no-token", "No"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    ref = reference_logits(ckpt, PAIRS, system=system, suffix=suffix, yes="Yes", no="No")
    got = Reranker.load(out).predict(PAIRS, raw=True)
    np.testing.assert_allclose(got, ref, atol=PARITY_ATOL["fp32"], rtol=0)
    default = reference_logits(ckpt, PAIRS)
    assert np.max(np.abs(got - default)) > 0.1, "the custom prompt must change the scores"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["template"]["prefix"] == chatml_prefix(system) and manifest["template"]["suffix"] == suffix
    assert manifest["template"]["prompt"] == "custom"
    assert manifest["template"]["answer_tokens"] == {"yes": "Yes", "no": "No"}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    assert (manifest["tokens"]["yes_id"], manifest["tokens"]["no_id"]) == tuple(
        tok.convert_tokens_to_ids(t) for t in ("Yes", "No"))


def test_prompt_options_are_refused_for_an_encoder_and_checked(bert_ckpt, tmp_path):
    from memrerank.export import export_model
    from memrerank.export.families.decoder_yes_no import YesNoPrompt

    with pytest.raises(ValueError, match="no prompt"):
        export_model(str(bert_ckpt), tmp_path / "b", prompt=YesNoPrompt.chatml("x"), log=lambda m: None)
    with pytest.raises(ValueError, match="same token"):
        YesNoPrompt(yes="yes", no="yes")
    with pytest.raises(ValueError, match="non-empty"):
        YesNoPrompt.chatml(suffix="")


def _with_outlier_norms(ckpt, tmp_path):
    """A copy of ``ckpt`` whose RMSNorm weights are uneven and carry one channel 40x the rest, as a real LLM's
    hidden states do (the residual stream's massive channels): what per-token int8 codes handle worst."""
    import shutil

    from safetensors.torch import load_file, save_file

    out = tmp_path / (ckpt.name + "-outlier")
    shutil.copytree(ckpt, out)
    weights = load_file(str(out / "model.safetensors"))
    gen = torch.Generator().manual_seed(3)
    for name in weights:
        if "norm" in name:  # the final norm too, without the outlier (it would only scale the logits)
            w = 1 + 0.3 * torch.randn(weights[name].shape, generator=gen)
            if "layers." in name and "layernorm" in name:
                w[5] = 40.0
            weights[name] = w
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("make", ["qwen2", "qwen3"])
def test_a_rotated_graph_scores_as_transformers_and_int8_codes_it_better(make, tmp_path):
    """``--rotate``: the fused graph's weights in a rotated basis (RMSNorm weights folded, residual stream by an
    orthogonal matrix, value heads by a Hadamard matrix). fp32 still equals transformers on both scoring paths;
    the stored embedding table is not the checkpoint's; and the inputs of the products that read the residual
    stream (Q/K/V, gate/up) lose their outlier channel: the largest channel over the median channel, the figure
    that sets a per-token int8 code's resolution, falls severalfold (on real weights: bench/real_weights.py)."""
    import onnx
    from onnx import numpy_helper

    from memrerank.export import export_model
    from memrerank.export.fidelity import CalibSet
    from memrerank.export.optimize import activation_stats_of_file

    base = (models.make_qwen2 if make == "qwen2" else models.make_qwen3)(tmp_path / make)
    ckpt = _with_outlier_norms(base, tmp_path)
    arts = {rot: export_model(str(ckpt), tmp_path / f"art-{rot}", graph="fused", rotate=rot, log=lambda m: None)
            for rot in (False, True)}
    manifest = json.loads((arts[True] / "manifest.json").read_text())
    assert manifest["export"]["rotation"]["seed"] == 0 and "rotation" not in json.loads(
        (arts[False] / "manifest.json").read_text())["export"]
    # export checked it against transformers on both scoring paths; here again, by this file's own recipe
    assert manifest["precisions"]["fp32"]["parity"]["max_abs_logit_diff"] <= 1e-4
    pairs = PAIRS if make == "qwen2" else [(q, d) for q in QUERIES[:2] for d in DOCS]
    want = (reference_logits(ckpt, pairs) if make == "qwen2" else
            Reranker.load(arts[False], LoadOptions("fp32")).predict(pairs, raw=True))
    for reuse in (True, False):
        got = Reranker.load(arts[True], LoadOptions("fp32", prefix_reuse=reuse)).predict(pairs, raw=True)
        np.testing.assert_allclose(got, want, atol=1e-4)

    def embed(art):
        g = onnx.load(str(art / "fp32" / "model.onnx"))
        return next(numpy_helper.to_array(i) for i in g.graph.initializer if i.name == "embed_tokens")

    assert np.abs(embed(arts[True]) - embed(arts[False])).max() > 1e-2
    spread = {}
    for rot, art in arts.items():
        fp32 = art / "fp32" / "model.onnx"
        products = [n for n in onnx.load(str(fp32), load_external_data=False).graph.node
                    if n.op_type == "MatMul" and ("qkv_proj" in n.name or "gate_up_proj" in n.name)]
        feeds = CalibSet(art, [(q, list(DOCS)) for q in QUERIES[:2]]).feeds(fp32)
        stats = activation_stats_of_file(fp32, [n.input[0] for n in products], feeds)
        spread[rot] = max(float(r.max() / np.median(r)) for r, _ in stats.values())
    assert spread[False] > 10 and spread[True] < spread[False] / 4, spread


def test_rotate_needs_a_fused_graph(tmp_path):
    from memrerank.export import export_model

    with pytest.raises(ValueError, match="--graph fused"):
        export_model(str(tmp_path / "none"), tmp_path / "out", rotate=True, graph="traced")
