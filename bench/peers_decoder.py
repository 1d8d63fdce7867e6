"""Decoder peers on the Qwen3-Reranker-0.6B shape, same pairs, same thread count, one process, interleaved.

Scorers:

- the official transformers recipe from the Qwen3-Reranker model card (fp32; full-vocabulary logits at every
  position), and the same recipe with ``logits_to_keep=1`` (what a careful user writes: PyTorch computes the
  last position's logits only; the scores are checked to agree with the full recipe's);
- sentence-transformers' CrossEncoder on the causal LM (Transformer + LogitScore(yes, no)), same prompt;
- llama.cpp through llama-cpp-python: the checkpoint converted to GGUF by llama.cpp's ``convert_hf_to_gguf.py``
  (which turns a Qwen3-Reranker's yes/no rows into a rank head), quantized to Q8_0 and Q4_K_M, scored with
  rank pooling (``embeddings=True, pooling_type=LLAMA_POOLING_TYPE_RANK``, what ``llama-server --reranking``
  runs) and with plain last-token logits (only the last token an output: llama.cpp's ``logits_to_keep=1``);
- memrerank fp32 and int8, whole pairs and with prefix reuse. int8 is the graph ``memrerank export`` writes by
  default (default fidelity budget, built-in calibration pairs); the JSON records which products it kept in fp32
  and the fidelity the export measured.

Random weights (no hub here): latency, plus each scorer's agreement with the official recipe on the timed pairs.
The shape is the real config: 28 layers, hidden 1024, 16/8 heads, head_dim 128, FFN 3072, vocab 151669, tied
embeddings. Timing: one warm-up call each, then ``--rounds`` rounds over the whole workload, every scorer once
per round, the order reversed every other round (a shared machine drifts; ratios within a round stay meaningful).

    python bench/peers_decoder.py --threads 2 --workdir /tmp/peers-decoder \\
        --llama-convert /path/to/llama.cpp/convert_hf_to_gguf.py

``--llama-convert``: llama.cpp's converter, e.g. from the llama-cpp-python sdist
(``pip download --no-deps --no-binary :all: llama-cpp-python``, then ``vendor/llama.cpp/``). Without it, or
without llama-cpp-python, the JSON says why llama.cpp was not run. Results: ``bench/results/peers_decoder.json``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from common import DEFAULT_LOCOMO, RESULTS, environment, group_agreement, locomo_workload, write  # noqa: E402

PREFIX = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
          "provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n")
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
OFFICIAL = "transformers, official recipe"
OFFICIAL_LAST = "transformers, official recipe + logits_to_keep=1"
GGUF_TYPES = {"Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
LLAMA_MODES = ("rank", "logits")  # see llama_cpp_scorer


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


@dataclass
class Peer:
    """One scorer: ``score(query, docs)`` returns yes-vs-no log-odds, one per document."""

    name: str
    score: Callable[[str, list[str]], np.ndarray]
    info: dict = field(default_factory=dict)
    seconds: list[float] = field(default_factory=list)
    logits: np.ndarray | None = None


def _log_odds(p) -> np.ndarray:
    """log p(yes) − log p(no) from p(yes) = softmax over (no, yes), as the recipes return it."""
    p = np.asarray(p, dtype=np.float64)
    return np.log(p) - np.log1p(-p)


def official_recipe(ckpt: Path, threads: int, prefix: str = PREFIX, suffix: str = SUFFIX):
    """The Qwen3-Reranker model card's code (fp32). ``logits_to_keep=1`` is the one change a careful user makes:
    transformers then runs the LM head on the last position only, which is the only row the recipe reads.
    ``prefix`` / ``suffix``: the prompt around the body (a Qwen2 model has no think block)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(ckpt, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    token_false_id = tokenizer.convert_tokens_to_ids("no")
    token_true_id = tokenizer.convert_tokens_to_ids("yes")
    max_length = 8192
    prefix_tokens = tokenizer.encode(prefix, add_special_tokens=False)
    suffix_tokens = tokenizer.encode(suffix, add_special_tokens=False)

    def inputs_of(query, docs):
        pairs = [f"<Instruct>: {INSTRUCTION}\n<Query>: {query}\n<Document>: {d}" for d in docs]
        inputs = tokenizer(pairs, padding=False, truncation="longest_first", return_attention_mask=False,
                           max_length=max_length - len(prefix_tokens) - len(suffix_tokens))
        for i, ele in enumerate(inputs["input_ids"]):
            inputs["input_ids"][i] = prefix_tokens + ele + suffix_tokens
        return tokenizer.pad(inputs, padding=True, return_tensors="pt", max_length=max_length)

    def make(logits_to_keep: int):
        def score(query, docs):
            inputs = inputs_of(query, docs)
            extra = {"logits_to_keep": logits_to_keep} if logits_to_keep else {}
            with torch.no_grad():
                batch_scores = model(**inputs, **extra).logits[:, -1, :]
                true_vector = batch_scores[:, token_true_id]
                false_vector = batch_scores[:, token_false_id]
                batch_scores = torch.stack([false_vector, true_vector], dim=1)
                batch_scores = torch.nn.functional.log_softmax(batch_scores, dim=1)
                return batch_scores[:, 1].exp().tolist()
        return score

    def ids(query, doc):
        return inputs_of(query, [doc])["input_ids"][0].tolist()

    return make(0), make(1), model, ids


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


def st_cross_encoder(ckpt: Path, threads: int, share=None):
    """sentence-transformers' CrossEncoder on a causal LM (Transformer + LogitScore(yes, no)); ``predict``
    applies its default sigmoid, so it returns p(yes) like the recipe.

    ``share``: run on this already loaded module (the official recipe's: same class, same weights) instead of a
    second 2.4 GB copy; the computation is the CrossEncoder's own either way.
    """
    import torch
    from sentence_transformers import CrossEncoder

    torch.set_num_threads(threads)
    model = CrossEncoder(str(ckpt), device="cpu", processor_kwargs={"chat_template": ST_CHAT_TEMPLATE})
    if share is not None:
        if type(model[0].model) is not type(share):
            raise RuntimeError(f"CrossEncoder loaded {type(model[0].model).__name__}, not {type(share).__name__}")
        model[0].model = share
        gc.collect()

    def score(query, docs):
        return model.predict([(query, d) for d in docs], batch_size=len(docs), show_progress_bar=False)

    return score


# ----------------------------------------------------------------------------------------------- llama.cpp
def gguf_files(ckpt: Path, workdir: Path, convert: Path, threads: int) -> tuple[dict[str, Path], dict]:
    """Convert the checkpoint with llama.cpp's converter (f16, the usual first step), then quantize it to each of
    :data:`GGUF_TYPES` with llama.cpp's own quantizer (``llama_model_quantize``, what ``llama-quantize`` runs).

    The converter recognises a Qwen3-Reranker by the folder name or its model card's heading and then writes the
    yes/no rows of the tied embedding as a rank (classifier) head with the reranker's prompt as a chat template; a
    link named ``Qwen3-Reranker-0.6B-shape`` gives it the name.
    """
    import llama_cpp

    out = workdir / "gguf"
    out.mkdir(parents=True, exist_ok=True)
    named = workdir / "Qwen3-Reranker-0.6B-shape"
    if not named.exists():
        named.symlink_to(ckpt.resolve(), target_is_directory=True)
    f16 = out / "model-f16.gguf"
    info: dict = {"converter": str(convert)}
    if not f16.exists():
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, str(convert), str(named), "--outfile", str(f16), "--outtype", "f16"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"convert_hf_to_gguf.py failed:\n{proc.stderr[-3000:]}")
        info["convert_s"] = round(time.perf_counter() - t, 1)
    info["size_f16_bytes"] = f16.stat().st_size
    files = {}
    for name, ftype in GGUF_TYPES.items():
        dst = out / f"model-{name}.gguf"
        if not dst.exists():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, ftype)
            params.nthread = threads
            t = time.perf_counter()
            rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(dst).encode(), ctypes.byref(params))
            if rc != 0:
                raise RuntimeError(f"llama_model_quantize to {name} returned {rc}")
            info[f"quantize_{name}_s"] = round(time.perf_counter() - t, 1)
        files[name] = dst
        info[f"size_{name}_bytes"] = dst.stat().st_size
    return files, info


def llama_cpp_scorer(gguf: Path, threads: int, mode: str, n_batch: int, n_ubatch: int, unified: bool = True,
                     n_seq: int = 16, model=None, template: str | None = None):
    """Score with llama.cpp (through llama-cpp-python's bindings) the way ``llama-server`` batches: every
    document one sequence, documents packed into one ``llama_decode`` up to ``n_batch`` tokens.

    ``mode``:

    - ``"rank"``: rank pooling (``embeddings=True``, ``pooling_type=LLAMA_POOLING_TYPE_RANK``), what
      ``llama-server --reranking`` runs: softmax over the rank head's (yes, no) at each sequence's last token.
      llama.cpp marks every token of an embeddings batch as an output, so its Qwen3 graph applies the LM head
      to every position (as the official recipe does).
    - ``"logits"``: plain causal-LM decoding with only each sequence's last token marked as an output (the
      llama.cpp analogue of ``logits_to_keep=1``), score logit(yes) − logit(no).

    ``Llama.embed`` is not used: it tokenizes without special tokens and reads ``n_embd`` floats per sequence
    where rank pooling writes two. ``unified``: one KV cache shared by the sequences of a call (llama-server's
    default) or ``n_seq`` separate ones of ``n_batch / n_seq`` cells each. ``model``: a loaded
    ``llama_cpp._internals.LlamaModel`` of ``gguf`` to share between contexts. ``template``: the whole prompt with
    ``{query}`` and ``{document}`` (default: the GGUF's rerank chat template, which only a converted
    Qwen3-Reranker has).

    Returns ``(score, tokens, info, keep_alive)``; ``score`` gives log-odds of yes vs no per document.
    """
    import llama_cpp
    from llama_cpp import _internals

    if mode not in ("rank", "logits"):
        raise ValueError(f"mode: 'rank' or 'logits', got {mode!r}")
    if model is None:
        model = _internals.LlamaModel(path_model=str(gguf), params=llama_cpp.llama_model_default_params(),
                                      verbose=False)
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch = n_batch, n_batch, n_ubatch
    cp.n_threads = cp.n_threads_batch = threads
    cp.kv_unified = unified
    cp.n_seq_max = min(n_batch, llama_cpp.llama_max_parallel_sequences()) if unified else n_seq
    if mode == "rank":
        cp.embeddings = True
        cp.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_RANK
    ctx = _internals.LlamaContext(model=model, params=cp, verbose=False)
    batch = _internals.LlamaBatch(n_tokens=n_batch, embd=0, n_seq_max=cp.n_seq_max, verbose=False)
    meta = model.metadata()
    template = template or meta.get("tokenizer.chat_template.rerank")
    if template is None:
        raise RuntimeError(f"{gguf}: no rerank chat template; the converter did not see a Qwen3-Reranker")
    if mode == "rank" and llama_cpp.llama_pooling_type(ctx.ctx) != llama_cpp.LLAMA_POOLING_TYPE_RANK:
        raise RuntimeError(f"{gguf}: pooling type {llama_cpp.llama_pooling_type(ctx.ctx)}, not rank")
    yes, no = (model.tokenize(w, add_bos=False, special=False) for w in (b"yes", b"no"))
    if len(yes) != 1 or len(no) != 1:
        raise RuntimeError(f"'yes'/'no' are not single tokens: {yes}, {no}")
    per_seq = n_batch if unified else n_batch // n_seq

    def tokens(query, doc):
        return model.tokenize(template.replace("{query}", query).replace("{document}", doc).encode("utf-8"),
                              add_bos=False, special=True)

    def score(query, docs):
        out: list[float] = []
        seqs: list[list[int]] = []

        def flush():
            ctx.kv_cache_clear()
            batch.reset()
            last = []
            for i, toks in enumerate(seqs):
                batch.add_sequence(toks, i, mode == "rank")
                last.append(batch.n_tokens() - 1)
            ctx.decode(batch)
            for i, j in enumerate(last):
                if mode == "rank":
                    p = llama_cpp.llama_get_embeddings_seq(ctx.ctx, i)
                    out.append(float(np.log(p[0]) - np.log(p[1])))  # softmax over (yes, no)
                else:
                    logits = ctx.get_logits_ith(j)
                    out.append(float(logits[yes[0]]) - float(logits[no[0]]))
            seqs.clear()

        for d in docs:
            toks = tokens(query, d)
            if len(toks) > min(per_seq, n_ubatch if mode == "rank" else n_batch):
                raise ValueError(f"a pair of {len(toks)} tokens does not fit (n_batch {n_batch}, n_ubatch "
                                 f"{n_ubatch}, {per_seq} cells per sequence)")
            if seqs and (sum(map(len, seqs)) + len(toks) > n_batch or len(seqs) >= cp.n_seq_max):
                flush()
            seqs.append(toks)
        flush()
        return np.asarray(out)

    info = {"mode": mode, "n_batch": n_batch, "n_ubatch": n_ubatch, "n_ctx": n_batch, "kv_unified": unified,
            "n_seq_max": cp.n_seq_max, "file_type": meta.get("general.file_type"), "size_bytes": gguf.stat().st_size}
    return score, tokens, info, (model, ctx, batch)


# ------------------------------------------------------------------------------------------------ memrerank
def memrerank_artifact(ckpt: Path, artifact: Path, fidelity: str | None) -> Path:
    """The artifact ``memrerank export CKPT --precision fp32 --precision int8`` writes (default budget and
    built-in calibration pairs unless ``fidelity`` says otherwise); reused when present."""
    from memrerank.export import export_model

    if not (artifact / "manifest.json").exists():
        export_model(str(ckpt), artifact, precisions=["fp32", "int8"], fidelity=fidelity,
                     log=lambda m: print(m, file=sys.stderr, flush=True))
    return artifact


def int8_graph_record(artifact: Path) -> dict:
    """What the int8 graph is: the export's budget, whether it met it, the products kept fp32 and the fidelity
    on the calibration pairs, from the manifest."""
    manifest = json.loads((artifact / "manifest.json").read_text())
    entry = manifest["precisions"]["int8"]
    fid = entry.get("fidelity") or {}
    kept = fid.get("kept_fp32") or fid.get("kept_fp32_nodes") or []
    record = {"budget": fid.get("budget"), "meets_budget": fid.get("meets_budget"),
              "kept_fp32_nodes": len(kept), "kept_fp32": kept,
              "fidelity_on_calibration_pairs": fid.get("fidelity"), "plain_fidelity": fid.get("plain"),
              "search_timing": fid.get("timing"), "parity_vs_fp32": entry.get("parity"),
              "batch_independent": (entry.get("build") or {}).get("batch_independent"),
              "size_bytes": sum(f.get("bytes", 0) for f in (entry.get("files") or {}).values()),
              "export_command": manifest.get("export", {}).get("command"),
              "export_date": manifest.get("export", {}).get("date")}
    budget = record["budget"] or {}
    if budget.get("top10") == 0 and budget.get("spearman") == 0:
        record["graph"] = "every weight product int8 (fidelity budget off)"
    else:
        goal = f"top10 ≥ {budget.get('top10')}, spearman ≥ {budget.get('spearman')}"
        record["graph"] = (f"{len(kept)} weight products kept fp32 to meet {goal}" if kept and record["meets_budget"]
                           else f"every weight product int8 (met {goal} as built)" if record["meets_budget"]
                           else f"{len(kept)} weight products kept fp32; {goal} NOT met")
    return record


def weight_products(graph: Path) -> dict[str, int]:
    """How many weight products of an ONNX graph run int8 (``MatMulIntegerToFloat``) and how many fp32 (``MatMul``
    / ``Gemm`` with a constant second operand)."""
    import onnx

    g = onnx.load(str(graph), load_external_data=False).graph
    consts = {i.name for i in g.initializer}
    consts |= {n.output[0] for n in g.node if n.op_type == "Constant"}
    int8 = sum(n.op_type == "MatMulIntegerToFloat" for n in g.node)
    fp32 = sum(n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in consts for n in g.node)
    return {"int8_products": int8, "fp32_weight_products": fp32}


def graph_size(graph: Path) -> int:
    return sum(p.stat().st_size for p in graph.parent.iterdir() if p.is_file() and p.name.startswith(graph.name))


# --------------------------------------------------------------------------------------------------- report
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--locomo", type=Path, default=DEFAULT_LOCOMO)
    ap.add_argument("--workdir", type=Path, default=Path(__file__).parent / "out" / "qwen3-0.6b-shape",
                    help="checkpoint, artifact and GGUF files (reused when present; multi-GB)")
    ap.add_argument("--artifact", type=Path, default=None, help="memrerank artifact (default: WORKDIR/artifact)")
    ap.add_argument("--fidelity", default=None,
                    help="int8 budget when the artifact is exported here (default: the export's default)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--queries", type=int, default=2)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip", default="", help="comma-separated: official,st,llama,memrerank")
    ap.add_argument("--int8-graph", type=Path, default=None,
                    help="a second int8 graph of the same fp32 graph to time beside the artifact's (e.g. every "
                         "product int8, built with the budget off)")
    ap.add_argument("--int8-graph-label", default="every product int8, budget off")
    ap.add_argument("--int8-graph-source", default=None, help="how --int8-graph was built (recorded)")
    ap.add_argument("--llama-convert", type=Path, default=None, help="llama.cpp's convert_hf_to_gguf.py")
    # n_ubatch: llama.cpp's default 512. 2048 ran 1.4-1.5x faster in a one-query check here, but each context
    # then reserves 1.2 GB (logits) to 2.5 GB (rank) of compute buffer, and the four contexts beside the other
    # scorers ran this 24 GB machine out of memory. Separate KV caches per sequence were slower.
    ap.add_argument("--llama-batch", type=int, default=2048, help="llama.cpp n_batch (= n_ctx)")
    ap.add_argument("--llama-ubatch", type=int, default=512, help="llama.cpp n_ubatch")
    ap.add_argument("--out", type=Path, default=RESULTS / "peers_decoder.json")
    args = ap.parse_args()
    if args.rounds < 1:
        raise SystemExit("--rounds must be >= 1")
    skip = set(filter(None, args.skip.split(",")))
    env = environment(args.threads)

    from memrerank import LoadOptions, Reranker

    ckpt = build_checkpoint(args.workdir / "checkpoint")
    work = locomo_workload(args.locomo, args.queries, args.k)
    sizes = [len(d) for _, d in work]
    n_pairs = sum(sizes)
    peers: list[Peer] = []
    notes: dict[str, object] = {}

    official_ids = None
    if "official" not in skip:
        full, last, model, official_ids = official_recipe(ckpt, args.threads)
        peers.append(Peer(OFFICIAL, lambda q, d: _log_odds(full(q, d)),
                          {"what": "model card code, fp32, full-vocabulary logits at every position"}))
        peers.append(Peer(OFFICIAL_LAST, lambda q, d: _log_odds(last(q, d)),
                          {"what": "model card code with model(**inputs, logits_to_keep=1)"}))
        if "st" not in skip:
            st = st_cross_encoder(ckpt, args.threads, share=model)
            peers.append(Peer("sentence-transformers CrossEncoder", lambda q, d: _log_odds(st(q, d)),
                              {"what": "CrossEncoder + LogitScore(yes, no), fp32, same prompt; runs on the "
                                       "official recipe's module (same weights, one copy in memory)"}))

    llama_record: dict[str, object] = {"status": "not run"}
    keep_alive: list[object] = []  # llama.cpp model/context/batch objects behind the scorers
    if "llama" in skip:
        llama_record["why"] = "skipped (--skip llama)"
    else:
        try:
            import llama_cpp

            if args.llama_convert is None or not args.llama_convert.is_file():
                raise RuntimeError("llama.cpp's convert_hf_to_gguf.py not given (--llama-convert)")
            files, conv = gguf_files(ckpt, args.workdir, args.llama_convert, args.threads)
            llama_record = {"status": "run", "llama_cpp_python": llama_cpp.__version__, **conv,
                            "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip()}
            from llama_cpp import _internals

            for name, path in files.items():
                model = _internals.LlamaModel(path_model=str(path), params=llama_cpp.llama_model_default_params(),
                                              verbose=False)
                for mode in LLAMA_MODES:
                    score, tokens, info, keep = llama_cpp_scorer(path, args.threads, mode, args.llama_batch,
                                                                 args.llama_ubatch, model=model)
                    keep_alive.append(keep)
                    if official_ids is not None:
                        q, d = work[0][0], work[0][1][0]
                        info["token_ids_match_official"] = tokens(q, d) == official_ids(q, d)
                    peers.append(Peer(f"llama.cpp {name} {mode}", score, info))
        except Exception as exc:  # noqa: BLE001 - the bench records why a peer could not run and goes on
            llama_record = {"status": "not run", "why": f"{type(exc).__name__}: {exc}"}
            print(f"llama.cpp not run: {llama_record['why']}", file=sys.stderr, flush=True)

    int8_record = None
    if "memrerank" not in skip:
        artifact = memrerank_artifact(ckpt, args.artifact or args.workdir / "artifact", args.fidelity)
        int8_record = int8_graph_record(artifact)
        int8_record.update(weight_products(artifact / "int8" / "model.onnx"))
        variants = [("fp32", "fp32", None), ("int8", "int8", None)]
        if args.int8_graph is not None:
            extra = {"label": args.int8_graph_label, "path": str(args.int8_graph), "source": args.int8_graph_source,
                     "size_bytes": graph_size(args.int8_graph), **weight_products(args.int8_graph)}
            notes["int8_extra_graph"] = extra
            variants.append((f"int8, {args.int8_graph_label}", "int8", args.int8_graph))
        for label, precision, graph in variants:
            options = LoadOptions(precision, threads=args.threads, prefix_reuse=False)
            r = Reranker.load(artifact, options)
            if graph is not None:
                r = r.with_graph(graph, options)

            def run(q, d, r=r, reuse=False):
                r.prefix_reuse = reuse
                return r.predict([(q, x) for x in d], raw=True).astype(np.float64)

            info = {"batch_size": r.batch_size, **({"graph": str(graph)} if graph is not None else {})}
            peers.append(Peer(f"memrerank {label}", run, info))
            peers.append(Peer(f"memrerank {label} + prefix reuse", lambda q, d, run=run: run(q, d, reuse=True),
                              dict(info)))

    # warm-up: one short call each (allocations, first-run kernels)
    for p in peers:
        p.score(work[0][0], work[0][1][:4])
    load_before = open("/proc/loadavg").read().split()[:3]
    for rnd in range(args.rounds):
        for p in peers if rnd % 2 == 0 else peers[::-1]:
            t = time.perf_counter()
            logits = np.concatenate([p.score(q, d) for q, d in work])
            p.seconds.append(time.perf_counter() - t)
            if p.logits is None:
                p.logits = logits
            gc.collect()
        print(f"round {rnd + 1}/{args.rounds}: " + ", ".join(f"{p.name} {n_pairs / p.seconds[-1]:.2f}"
                                                            for p in peers), file=sys.stderr, flush=True)
    load_after = open("/proc/loadavg").read().split()[:3]

    by_name = {p.name: p for p in peers}
    ref = by_name.get(OFFICIAL)
    results: dict[str, dict] = {}
    for p in peers:
        r = {"pairs_per_s": n_pairs / min(p.seconds), "pairs_per_s_median": n_pairs / statistics.median(p.seconds),
             "seconds": [round(s, 3) for s in p.seconds], **p.info}
        for key, base in (("vs_official", OFFICIAL), ("vs_official_logits_to_keep", OFFICIAL_LAST)):
            b = by_name.get(base)
            if b is not None:
                per_round = [bs / s for bs, s in zip(b.seconds, p.seconds)]
                r[key] = {"best": min(b.seconds) / min(p.seconds),
                          "median": statistics.median(b.seconds) / statistics.median(p.seconds),
                          "per_round": [round(x, 3) for x in per_round]}
        if ref is not None and p is not ref:
            r["agreement_with_official"] = group_agreement(p.logits, ref.logits, sizes, "max_abs_log_odds_diff")
        results[p.name] = r
    if ref is not None and OFFICIAL_LAST in by_name:
        full_p = 1 / (1 + np.exp(-ref.logits))
        last_p = 1 / (1 + np.exp(-by_name[OFFICIAL_LAST].logits))
        diff = float(np.max(np.abs(full_p - last_p)))
        notes["logits_to_keep_check"] = {"max_abs_score_diff": diff, "max_abs_log_odds_diff": float(
            np.max(np.abs(ref.logits - by_name[OFFICIAL_LAST].logits))), "tolerance": 1e-5, "agree": diff <= 1e-5}
    if "memrerank" not in skip:
        enc = Reranker.load(args.artifact or args.workdir / "artifact").encoder
        notes["example_pair_tokens"] = len(enc.encode(work[0][0], work[0][1][:1]).ids[0])
    cfg = json.loads((ckpt / "config.json").read_text())
    write(args.out, {
        "model": f"Qwen3ForCausalLM, {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
                 f"{cfg['num_attention_heads']}/{cfg['num_key_value_heads']} heads, FFN {cfg['intermediate_size']}, "
                 f"vocab {cfg['vocab_size']}, random weights",
        "workload": f"{len(work)} LoCoMo queries x {args.k} candidate turns ({n_pairs} pairs)",
        "rounds": args.rounds, "order": "interleaved, reversed every other round; one warm-up call each",
        "loadavg_before_after": [load_before, load_after], "environment": env, "results": results,
        "int8_graph": int8_record, "llama.cpp": llama_record, **notes})
    print(f"{'scorer':<52} {'best':>7} {'median':>7} {'×full':>6} {'×ltk1':>6} {'max|Δ|':>8}")
    for name, r in results.items():
        a = r.get("agreement_with_official", {})
        print(f"{name:<52} {r['pairs_per_s']:7.2f} {r['pairs_per_s_median']:7.2f} "
              f"{r.get('vs_official', {}).get('best', float('nan')):6.2f} "
              f"{r.get('vs_official_logits_to_keep', {}).get('best', float('nan')):6.2f} "
              f"{a.get('max_abs_log_odds_diff', 0):8.2e}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
