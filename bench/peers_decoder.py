"""Decoder peers on the Qwen3-Reranker-0.6B shape: the official transformers recipe, sentence-transformers'
CrossEncoder (LogitScore), and memrerank fp32 / int8 — same pairs, same thread count, one run.

Random weights (no hub here): latency only. The shape is the real config: 28 layers, hidden 1024, 16/8 heads,
head_dim 128, FFN 3072, vocab 151669, tied embeddings.

    python bench/peers_decoder.py --locomo ../shared/data/locomo/locomo10.json --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import DEFAULT_LOCOMO, environment, int8_fidelity, locomo_workload, time_it, write  # noqa: E402

PREFIX = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
          "provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n")
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


def build_checkpoint(path: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from models import qwen_tokenizer_dir

    if (path / "config.json").exists():
        return path
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=151669, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                         num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                         rope_theta=1000000, rms_norm_eps=1e-6, tie_word_embeddings=True, pad_token_id=151643,
                         eos_token_id=151645, architectures=["Qwen3ForCausalLM"])
    Qwen3ForCausalLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(qwen_tokenizer_dir()).save_pretrained(path)
    return path


def official_recipe(ckpt: Path, threads: int):
    """The Qwen3-Reranker model card's code (fp32, full-vocabulary logits at every position)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(ckpt, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    token_false_id = tokenizer.convert_tokens_to_ids("no")
    token_true_id = tokenizer.convert_tokens_to_ids("yes")
    max_length = 8192
    prefix_tokens = tokenizer.encode(PREFIX, add_special_tokens=False)
    suffix_tokens = tokenizer.encode(SUFFIX, add_special_tokens=False)

    def score(query, docs):
        pairs = [f"<Instruct>: {INSTRUCTION}\n<Query>: {query}\n<Document>: {d}" for d in docs]
        inputs = tokenizer(pairs, padding=False, truncation="longest_first", return_attention_mask=False,
                           max_length=max_length - len(prefix_tokens) - len(suffix_tokens))
        for i, ele in enumerate(inputs["input_ids"]):
            inputs["input_ids"][i] = prefix_tokens + ele + suffix_tokens
        inputs = tokenizer.pad(inputs, padding=True, return_tensors="pt", max_length=max_length)
        with torch.no_grad():
            batch_scores = model(**inputs).logits[:, -1, :]
            true_vector = batch_scores[:, token_true_id]
            false_vector = batch_scores[:, token_false_id]
            batch_scores = torch.stack([false_vector, true_vector], dim=1)
            batch_scores = torch.nn.functional.log_softmax(batch_scores, dim=1)
            return batch_scores[:, 1].exp().tolist()

    return score, model


def _jinja_literal(text: str) -> str:
    return "{{- '" + text.replace("\\", "\\\\").replace("\n", "\\n").replace("'", "\\'") + "' -}}"


# The Qwen3-Reranker prompt as a chat template over sentence-transformers' query/document roles (renders the
# same token ids as the official recipe; checked when this bench was written).
ST_CHAT_TEMPLATE = (
    _jinja_literal(PREFIX) + "<Instruct>: " + INSTRUCTION + "\n<Query>: "
    "{{ messages | selectattr('role', 'eq', 'query') | map(attribute='content') | first }}"
    "\n<Document>: {{ messages | selectattr('role', 'eq', 'document') | map(attribute='content') | first }}"
    + _jinja_literal(SUFFIX)
)


def st_cross_encoder(ckpt: Path, threads: int):
    """sentence-transformers' CrossEncoder on a causal LM (Transformer + LogitScore(yes, no))."""
    import torch
    from sentence_transformers import CrossEncoder

    torch.set_num_threads(threads)
    model = CrossEncoder(str(ckpt), device="cpu", processor_kwargs={"chat_template": ST_CHAT_TEMPLATE})

    def score(query, docs):
        return model.predict([(query, d) for d in docs], batch_size=len(docs), show_progress_bar=False)

    return score


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--locomo", type=Path, default=DEFAULT_LOCOMO)
    ap.add_argument("--workdir", type=Path, default=Path(__file__).parent / "out" / "qwen3-0.6b-shape")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--queries", type=int, default=2)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip", default="", help="comma-separated peers to skip: official,st,memrerank")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "peers_decoder.json")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    from memrerank import Reranker
    from memrerank.export import export_model

    ckpt = build_checkpoint(args.workdir / "checkpoint")
    work = locomo_workload(args.locomo, args.queries, args.k)
    n_pairs = sum(len(d) for _, d in work)
    artifact = args.workdir / "artifact"
    if not (artifact / "manifest.json").exists():
        calib = args.workdir / "calib.jsonl"
        calib.write_text("\n".join(json.dumps({"query": q, "document": d})
                                   for q, docs in locomo_workload(args.locomo, 2, 12, skip=50) for d in docs))
        # Random weights: ranking fidelity is not meaningful, so the budget is opened; it is still recorded.
        export_model(str(ckpt), artifact, precisions=["fp32", "int8"], calib_data=calib,
                     fidelity="top10=0,spearman=0", log=lambda m: print(m, file=sys.stderr))

    results: dict[str, dict] = {}

    def run(name, score):
        t = time_it(lambda: [score(q, d) for q, d in work], args.repeats)
        results[name] = {**t, "pairs_per_s": n_pairs / t["min_s"]}
        print(f"{name:<32} {results[name]['pairs_per_s']:8.2f} pairs/s", file=sys.stderr, flush=True)

    for precision in ("fp32", "int8"):
        if "memrerank" in skip:
            break
        for reuse in (False, True):
            r = Reranker.load(artifact, precision=precision, threads=args.threads, prefix_reuse=reuse)
            run(f"memrerank {precision}" + (" + prefix reuse" if reuse else ""),
                lambda q, d, r=r: r.predict([(q, x) for x in d]))
            del r
    if "official" not in skip:
        score, model = official_recipe(ckpt, args.threads)
        run("transformers official recipe fp32", score)
        del model
    if "st" not in skip:
        run("sentence-transformers CrossEncoder fp32", st_cross_encoder(ckpt, args.threads))

    base = results.get("transformers official recipe fp32", {}).get("pairs_per_s")
    for r in results.values():
        r["vs_official"] = r["pairs_per_s"] / base if base else None
    tokens = [len(Reranker.load(artifact).encoder.encode(q, d).ids[0]) for q, d in work[:1]]
    write(args.out, {"workload": f"{args.queries} LoCoMo queries x {args.k} candidate turns ({n_pairs} pairs)",
                     "example_pair_tokens": tokens, "environment": environment(args.threads), "results": results,
                     "manifest_int8": int8_fidelity(artifact)})
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
