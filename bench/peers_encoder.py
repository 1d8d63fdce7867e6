"""Encoder peers on the real all-MiniLM-L6-v2 weights with a relevance head fitted on LoCoMo.

sentence-transformers CrossEncoder (torch fp32; ``backend="onnx"`` with its avx512_vnni qint8 export; and, when
optimum-intel and openvino import, ``backend="openvino"`` with ``export_static_quantized_openvino_model``) vs
memrerank fp32 / int8 (what ``memrerank export`` builds) — the same pairs, thread count and batch size (32),
every scorer once per round, the order reversed every other round, several rounds. Speed: pairs per second of
wall time and per second of process CPU time (with one thread every scorer computes on one core, so CPU time is
what a shared machine perturbs least; with more threads, spinning pool threads count too and wall time is the
figure). The head (the one-label classifier on BERT's pooled output) is fitted by logistic regression on
conversations 1-5 of LoCoMo; quality is measured on held-out queries of conversations 6-10.

    python bench/peers_encoder.py --threads 1
    PYTHONPATH=/path/to/openvino-packages python bench/peers_encoder.py --threads 1   # + the OpenVINO peer

The OpenVINO peer needs ``optimum-intel`` and ``openvino``. ``pip install "sentence-transformers[openvino]"``
into this project's environment would also replace torch (CPU build → the default CUDA build) and optimum (2.1 →
2.3); installing ``optimum==2.2.0 optimum-intel==2.0.0 openvino nncf datasets<5`` (and their small dependencies)
with ``pip install --target DIR --no-deps`` and putting DIR on PYTHONPATH for this bench leaves it untouched.
Its calibration set: 300 LoCoMo training-split pairs written as ``query [SEP] document`` (the function takes one
text column and reads it from a local dataset folder here, the hub being offline); everything else is
sentence-transformers' default (``OVQuantizationConfig()``: static int8, SmoothQuant, 300 samples).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from common import DEFAULT_LOCOMO, environment, int8_fidelity, interleaved, write  # noqa: E402

BATCH_SIZE = 32
ST_QINT8 = "sentence-transformers onnx qint8"
ST_OPENVINO = "sentence-transformers openvino int8 (static)"
ST_TORCH = "sentence-transformers torch fp32"


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


def checkpoint_and_artifact(workdir: Path, train, threads: int) -> tuple[Path, Path, dict]:
    """The checkpoint with its LoCoMo-fitted head and its fp32+int8 artifact (calibrated on 40 training questions)
    under ``workdir``, each made when missing; and the head fit's record (empty when the checkpoint existed)."""
    from memrerank.export import export_model

    ckpt, artifact = workdir / "checkpoint", workdir / "artifact"
    info = {}
    if not (ckpt / "config.json").exists():
        info = fit_head(ckpt, train, threads)
    if not (artifact / "manifest.json").exists():
        calib = workdir / "calib.jsonl"
        rng = random.Random(1)
        rows = [{"query": q.query, "document": d} for q in rng.sample(train, 40) for d in q.documents]
        calib.write_text("\n".join(json.dumps(r) for r in rows))
        export_model(str(ckpt), artifact, precisions=["fp32", "int8"], calib_data=calib, max_length=256,
                     log=lambda m: print(m, file=sys.stderr))
    return ckpt, artifact, info


def st_onnx(workdir: Path, threads: int):
    """sentence-transformers' ``backend="onnx"`` CrossEncoder on its avx512_vnni qint8 export (made once)."""
    import onnxruntime as ort
    from sentence_transformers import CrossEncoder
    from sentence_transformers.backend import export_dynamic_quantized_onnx_model

    st_dir = workdir / "st-onnx"
    if not (st_dir / "onnx" / "model_qint8_avx512_vnni.onnx").exists():
        st = CrossEncoder(str(workdir / "checkpoint"), backend="onnx", device="cpu", max_length=256)
        st.save_pretrained(str(st_dir))
        export_dynamic_quantized_onnx_model(st, "avx512_vnni", str(st_dir))
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return CrossEncoder(str(st_dir), backend="onnx", device="cpu", max_length=256,
                        model_kwargs={"file_name": "onnx/model_qint8_avx512_vnni.onnx", "session_options": so})


def st_openvino(workdir: Path, threads: int, train) -> tuple[object | None, str]:
    """sentence-transformers' ``backend="openvino"`` CrossEncoder on its static int8 export, or why not."""
    missing = [m for m in ("openvino", "optimum.intel", "nncf", "datasets") if _missing(m)]
    if missing:
        return None, (f"not importable here: {', '.join(missing)} (see this script's docstring for an install that "
                      "leaves the project's torch and optimum alone)")
    from sentence_transformers import CrossEncoder
    from sentence_transformers.backend import export_static_quantized_openvino_model

    ov_dir = workdir / "st-openvino"
    xml = "openvino/openvino_model_qint8_quantized.xml"
    if not (ov_dir / xml).exists():
        data = workdir / "ov-calibration"  # a local dataset folder: load_dataset(str(data), "default", ...)
        data.mkdir(parents=True, exist_ok=True)
        rng = random.Random(1)
        rows = [{"sentence": f"{q.query} [SEP] {d}"} for q in rng.sample(train, 40) for d in q.documents]
        rng.shuffle(rows)
        (data / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        st = CrossEncoder(str(workdir / "checkpoint"), backend="openvino", device="cpu", max_length=256)
        st.save_pretrained(str(ov_dir))
        export_static_quantized_openvino_model(st, None, str(ov_dir), dataset_name=str(data),
                                               dataset_config_name="default", dataset_split="train",
                                               column_name="sentence")
    model = CrossEncoder(str(ov_dir), backend="openvino", device="cpu", max_length=256,
                         model_kwargs={"file_name": xml, "ov_config": {"INFERENCE_NUM_THREADS": str(threads)}})
    return model, "run"


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except ModuleNotFoundError:
        return True


def quality(queries, scores: list[np.ndarray], reference: list[np.ndarray] | None) -> dict:
    """NDCG@10 and MAP on the labels; NDCG vs the reference's, top-10 overlap and Spearman vs the reference."""
    from memrerank.evaluation import evaluate_scores
    from memrerank.export.metrics import spearman, topk_overlap

    m = evaluate_scores(queries, scores)["overall"]
    out = {"NDCG@10": m["NDCG@10"], "MAP": m["MAP"], "queries": len(queries),
           "pairs": int(sum(len(s) for s in scores))}
    if reference is not None:
        ref = evaluate_scores(queries, reference)["overall"]["NDCG@10"]
        out.update({"ndcg_vs_fp32": m["NDCG@10"] / ref,
                    "top10_vs_fp32": float(np.mean([topk_overlap(a, b, 10) for a, b in zip(scores, reference)])),
                    "spearman_vs_fp32": float(np.mean([spearman(a, b) for a, b in zip(scores, reference)]))})
    return out


def run_info(loads: list[str]) -> dict:
    """The load average at the start of each round (the machine may be shared)."""
    return {"loadavg_per_round": [float(x) for x in loads]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--locomo", type=Path, default=DEFAULT_LOCOMO)
    ap.add_argument("--workdir", type=Path, default=Path(__file__).parent / "out" / "minilm-locomo")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-queries", type=int, default=300, help="held-out queries for quality")
    ap.add_argument("--speed-queries", type=int, default=8, help="held-out queries timed for speed")
    ap.add_argument("--repeats", type=int, default=7, help="interleaved rounds")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "peers_encoder.json")
    args = ap.parse_args()

    import torch
    from sentence_transformers import CrossEncoder

    from memrerank import Reranker

    torch.set_num_threads(args.threads)
    train, test = split_queries(args.locomo)
    ckpt, artifact, info = checkpoint_and_artifact(args.workdir, train, args.threads)
    peers: dict[str, object] = {
        ST_TORCH: CrossEncoder(str(ckpt), device="cpu", max_length=256),
        ST_QINT8: st_onnx(args.workdir, args.threads),
    }
    ov, ov_status = st_openvino(args.workdir, args.threads, train)
    if ov is not None:
        peers[ST_OPENVINO] = ov
    peers["memrerank fp32"] = Reranker.load(artifact, "fp32", threads=args.threads, batch_size=BATCH_SIZE)
    peers["memrerank int8"] = Reranker.load(artifact, "int8", threads=args.threads, batch_size=BATCH_SIZE)

    def scorer(model):
        if isinstance(model, Reranker):
            return lambda q, docs: model.predict([(q, d) for d in docs], raw=True)
        return lambda q, docs: np.asarray(model.predict([(q, d) for d in docs], batch_size=BATCH_SIZE,
                                                        show_progress_bar=False, activation_fn=torch.nn.Identity()))

    fns = {name: scorer(model) for name, model in peers.items()}
    quality_set, speed_set = test[: args.eval_queries], test[: args.speed_queries]
    n_speed = sum(len(q.documents) for q in speed_set)
    for fn in fns.values():  # warm-up
        [fn(q.query, q.documents) for q in speed_set]
    runs = {name: (lambda fn=fn: [fn(q.query, q.documents) for q in speed_set]) for name, fn in fns.items()}
    wall, cpu, loads = interleaved(runs, args.repeats, progress=lambda rnd, cpu: print(
        f"round {rnd + 1}/{args.repeats}: " + ", ".join(f"{k} {n_speed / cpu[k][-1]:.1f}" for k in fns)
        + " pairs/cpu-s", file=sys.stderr, flush=True))
    scores = {name: [fn(q.query, q.documents) for q in quality_set] for name, fn in fns.items()}
    results: dict[str, dict] = {}
    for name in fns:
        ref = "memrerank fp32" if name.startswith("memrerank") else ST_TORCH
        results[name] = {
            "pairs_per_s": n_speed / min(wall[name]), "pairs_per_s_median": n_speed / statistics.median(wall[name]),
            "pairs_per_cpu_s": n_speed / min(cpu[name]),
            "pairs_per_cpu_s_median": n_speed / statistics.median(cpu[name]),
            "wall_s": wall[name], "cpu_s": cpu[name],
            **quality(quality_set, scores[name], None if name == ref else scores[ref]),
        }
    for name, r in results.items():
        r["vs_st_onnx_qint8"] = r["pairs_per_s"] / results[ST_QINT8]["pairs_per_s"]
        r["vs_st_onnx_qint8_cpu"] = r["pairs_per_cpu_s"] / results[ST_QINT8]["pairs_per_cpu_s"]
        # per round: the two scorers ran within seconds of each other, so the ratio cancels the load of the moment
        per_round = [c / m for c, m in zip(cpu[ST_QINT8], cpu[name])]
        r["vs_st_onnx_qint8_cpu_per_round"] = {"min": min(per_round), "median": statistics.median(per_round),
                                               "max": max(per_round)}
    manifest = json.loads((artifact / "manifest.json").read_text())
    write(args.out, {
        "environment": {**environment(args.threads), **run_info(loads), **_peer_versions()},
        "head_fit": info,
        "quality_set": f"{len(quality_set)} held-out LoCoMo queries (conversations 6-10), candidates = turns of the "
                       "evidence sessions",
        "speed_set": f"{len(speed_set)} held-out queries, {n_speed} pairs, batch size {BATCH_SIZE}, "
                     f"{args.repeats} interleaved rounds",
        "openvino": ov_status,
        "results": results,
        "manifest_int8": {"build": manifest["precisions"]["int8"].get("build"), "fidelity": int8_fidelity(artifact)},
    })
    print(markdown(results))
    return 0


def _peer_versions() -> dict:
    out = {}
    for name, module in (("openvino", "openvino"), ("optimum_intel", "optimum.intel.version"),
                         ("optimum", "optimum.version")):
        try:
            mod = __import__(module, fromlist=["__version__"])
            out[name] = getattr(mod, "__version__", "?")
        except Exception:  # noqa: BLE001 - informative only
            continue
    out["pythonpath"] = os.environ.get("PYTHONPATH", "")
    return out


def markdown(results: dict) -> str:
    """The README table."""
    lines = ["| scorer | pairs/s (wall) | pairs per CPU-second | vs ST onnx-qint8 (CPU time; median of rounds) | "
             "NDCG@10 | NDCG@10 vs its fp32 | top-10 overlap vs its fp32 |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['pairs_per_s']:.1f} | {r['pairs_per_cpu_s']:.1f} | "
                     f"{r['vs_st_onnx_qint8_cpu']:.2f}× ({r['vs_st_onnx_qint8_cpu_per_round']['median']:.2f}×) | "
                     f"{r['NDCG@10']:.4f} | " + (f"{100 * r['ndcg_vs_fp32']:.1f} % | {r['top10_vs_fp32']:.3f} |"
                                                 if "ndcg_vs_fp32" in r else "100 % | 1.000 |"))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
