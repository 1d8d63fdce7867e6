"""Encoder peers on the real all-MiniLM-L6-v2 weights with a relevance head fitted on LoCoMo.

sentence-transformers CrossEncoder (torch fp32, and backend="onnx" with its avx512_vnni qint8 export) vs
memrerank fp32 / int8 — same pairs, same thread count, one run. The head (the one-label classifier on BERT's
pooled output) is fitted by logistic regression on conversations 0–4 of LoCoMo; quality is measured on the
held-out conversations 5–9.

    python bench/peers_encoder.py --locomo ../shared/data/locomo/locomo10.json --threads 2
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from common import DEFAULT_LOCOMO, environment, int8_fidelity, time_it, write  # noqa: E402


def split_queries(locomo: Path):
    from memrerank.evaluation import load_locomo

    queries = load_locomo(locomo, candidates="sessions", window=0).queries
    samples = sorted({q.group for q in queries})
    train = [q for q in queries if q.group in samples[:5]]
    test = [q for q in queries if q.group in samples[5:]]
    return train, test


def fit_head(ckpt_out: Path, train, threads: int, negatives: int = 8, seed: int = 0) -> dict:
    """Logistic regression of relevance on the pooled output; written into the classifier of a checkpoint."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    from models import minilm_dir

    torch.set_num_threads(threads)
    rng = random.Random(seed)
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    model = BertForSequenceClassification.from_pretrained(minilm_dir(), num_labels=1).eval()
    pairs, labels = [], []
    for q in train:
        neg = [i for i in range(len(q.documents)) if i not in q.relevant]
        for i in list(q.relevant) + rng.sample(neg, min(negatives, len(neg))):
            pairs.append((q.query, q.documents[i]))
            labels.append(float(i in q.relevant))
    feats = []
    with torch.no_grad():
        for s in range(0, len(pairs), 64):
            batch = pairs[s:s + 64]
            enc = tok([a for a, _ in batch], [b for _, b in batch], padding=True, truncation=True,
                      max_length=256, return_tensors="pt")
            feats.append(model.bert(**enc).pooler_output)
    x = torch.cat(feats)
    y = torch.tensor(labels)
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    pos_weight = (y == 0).sum() / (y == 1).sum()
    opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y, pos_weight=pos_weight)
        loss = loss + 1e-3 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        model.classifier.weight[0] = w
        model.classifier.bias[0] = b[0]
    model.config.architectures = ["BertForSequenceClassification"]
    model.save_pretrained(ckpt_out)
    tok.save_pretrained(ckpt_out)
    return {"train_pairs": len(pairs), "positives": int(y.sum())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--locomo", type=Path, default=DEFAULT_LOCOMO)
    ap.add_argument("--workdir", type=Path, default=Path(__file__).parent / "out" / "minilm-locomo")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-queries", type=int, default=300, help="held-out queries for quality")
    ap.add_argument("--speed-queries", type=int, default=8, help="held-out queries timed for speed")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "peers_encoder.json")
    args = ap.parse_args()

    import torch
    from sentence_transformers import CrossEncoder
    from sentence_transformers.backend import export_dynamic_quantized_onnx_model

    from memrerank import Reranker
    from memrerank.evaluation import evaluate_scores
    from memrerank.export import export_model
    from memrerank.export.metrics import topk_overlap

    torch.set_num_threads(args.threads)
    train, test = split_queries(args.locomo)
    ckpt = args.workdir / "checkpoint"
    info = {}
    if not (ckpt / "config.json").exists():
        info = fit_head(ckpt, train, args.threads)
    artifact = args.workdir / "artifact"
    if not (artifact / "manifest.json").exists():
        calib = args.workdir / "calib.jsonl"
        rng = random.Random(1)
        rows = [{"query": q.query, "document": d} for q in rng.sample(train, 40) for d in q.documents]
        calib.write_text("\n".join(json.dumps(r) for r in rows))
        export_model(str(ckpt), artifact, precisions=["fp32", "int8"], calib_data=calib, max_length=256,
                     log=lambda m: print(m, file=sys.stderr))
    st_dir = args.workdir / "st-onnx"
    if not (st_dir / "onnx").exists():
        st = CrossEncoder(str(ckpt), backend="onnx", device="cpu", max_length=256)
        st.save_pretrained(str(st_dir))
        export_dynamic_quantized_onnx_model(st, "avx512_vnni", str(st_dir))

    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    peers = {
        "sentence-transformers torch fp32": CrossEncoder(str(ckpt), device="cpu", max_length=256),
        "sentence-transformers onnx qint8": CrossEncoder(
            str(st_dir), backend="onnx", device="cpu", max_length=256,
            model_kwargs={"file_name": "onnx/model_qint8_avx512_vnni.onnx", "session_options": so}),
        "memrerank fp32": Reranker.load(artifact, "fp32", threads=args.threads),
        "memrerank int8": Reranker.load(artifact, "int8", threads=args.threads),
    }

    def scorer(model):
        if isinstance(model, Reranker):
            return lambda q, docs: model.predict([(q, d) for d in docs], raw=True)
        return lambda q, docs: np.asarray(model.predict([(q, d) for d in docs], batch_size=32,
                                                        show_progress_bar=False, activation_fn=torch.nn.Identity()))

    quality_set = test[: args.eval_queries]
    speed_set = test[: args.speed_queries]
    n_speed = sum(len(q.documents) for q in speed_set)
    results: dict[str, dict] = {}
    scores: dict[str, list[np.ndarray]] = {}
    for name, model in peers.items():
        fn = scorer(model)
        t = time_it(lambda fn=fn: [fn(q.query, q.documents) for q in speed_set], args.repeats)
        scores[name] = [fn(q.query, q.documents) for q in quality_set]
        m = evaluate_scores(quality_set, scores[name])["overall"]
        results[name] = {**t, "pairs_per_s": n_speed / t["min_s"], "NDCG@10": m["NDCG@10"], "MAP": m["MAP"]}
        print(f"{name:<36} {results[name]['pairs_per_s']:8.1f} pairs/s  NDCG@10 {m['NDCG@10']:.4f}", file=sys.stderr)
    for name in results:
        fp32 = "memrerank fp32" if name.startswith("memrerank") else "sentence-transformers torch fp32"
        results[name]["ndcg_vs_fp32"] = results[name]["NDCG@10"] / results[fp32]["NDCG@10"]
        results[name]["top10_vs_fp32"] = float(np.mean([topk_overlap(a, b, 10) for a, b in
                                                         zip(scores[name], scores[fp32])]))
    st_q = results["sentence-transformers onnx qint8"]["pairs_per_s"]
    for r in results.values():
        r["vs_st_onnx_qint8"] = r["pairs_per_s"] / st_q
    write(args.out, {"environment": environment(args.threads), "head_fit": info,
                     "quality_set": f"{len(quality_set)} held-out LoCoMo queries (conversations 6-10), "
                                    "candidates = turns of the evidence sessions",
                     "speed_set": f"{len(speed_set)} queries, {n_speed} pairs", "results": results,
                     "manifest_int8": int8_fidelity(artifact)})
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
