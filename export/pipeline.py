"""The export pipeline: load → build graph → validate against PyTorch → quantize → validate against fp32.

Everything is written into a staging sibling directory that is swapped into place at the end
(:mod:`memrerank.atomic`: a kill at any moment leaves the previous artifact, or puts it back at the next
start, which also removes the siblings killed exports left). The manifest is assembled as a typed
:class:`~memrerank.manifest.Manifest` while the steps run: the family gives its template, tokens and cache
layout, each precision its entry (files, build record, parity, fidelity). Every write goes through
:func:`memrerank.manifest.write_manifest`, which parses the JSON back first, so nothing writes a manifest the
runtime would refuse.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import inspect
import logging
import os
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memrerank.atomic import create_staging, discard, recover, swap_into_place
from memrerank.errors import ParityError
from memrerank.progress import Steps
from memrerank.export.families import family_for
from memrerank.export.fidelity import CalibSet, FidelityBudget, load_calib_jsonl, search_exclusions
from memrerank.export.fused import FUSED_GRAPHS, FUSED_OPSET, GRAPH_KINDS, Rotation, write_fused_graph
from memrerank.export.graph import DEFAULT_OPSET, export_onnx
from memrerank.export.metrics import spearman, topk_overlap
from memrerank.export.pairs import builtin_calibration_groups, builtin_pairs
from memrerank.export.quantize import PRECISION_BUILDERS, GraphInfo, graph_info
from memrerank.export import int4 as _int4  # noqa: F401  (registers the int4 builder)
from memrerank.manifest import (
    PARITY_TOLERANCE,
    PRECISION_PROVIDERS,
    PRECISIONS,
    TOKENIZER_NAME,
    Build,
    CalibrationData,
    ExportInfo,
    Fidelity,
    Manifest,
    Parity,
    PrecisionEntry,
    Source,
    Template,
    Tokens,
    file_entries,
    read_manifest,
    write_manifest,
)

__all__ = ["export_model", "validate_artifact", "TOPK"]

TOPK = 3  # top-k agreement on the built-in groups (4–6 documents each)
#: Precisions an export may write without an fp32 graph: streamed from the checkpoint's safetensors one tensor at
#: a time (:func:`_build_streamed`), so a model larger than memory in fp32 still exports.
STREAMED = ("int4", "int8")
#: A streamed export judges its fidelity on at most this many calibration pairs (PyTorch scores them in the
#: checkpoint's dtype on the CPU: at 4B, seconds per pair), as groups of at most :data:`STREAM_GROUP_DOCS`.
STREAM_CALIB_PAIRS = 96
STREAM_GROUP_DOCS = 24
_log = logging.getLogger(__name__)


def _versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for mod in ("memrerank", "torch", "transformers", "optimum", "onnx", "onnxruntime", "tokenizers"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover - version lookup is informative only
            pass
    return out


@dataclass(frozen=True)
class _Job:
    """What :func:`export_model` was asked to write, as the manifest's ``source`` and ``export`` blocks record
    it."""

    model: str
    revision: str | None
    opset: int
    graph: str
    command: str | None
    allow_pickle: bool
    rotation: Any = None  # a fused graph's Rotation, or None
    int4_block: int | None = None  # input channels per 4-bit block (None: INT4_BLOCK)
    int4_coding: str | None = None  # how int4 chooses its codes (None: rtn; export.int4.CODINGS)
    auto_graph: bool = False  # the graph was the default's choice: a fused graph that cannot be written falls back
    fallback: str | None = None  # why the default's fused graph fell back to the traced one

    def source(self, config: Any) -> Source:
        model = self.model if not Path(self.model).exists() else str(Path(self.model).resolve())
        revision = self.revision or getattr(config, "_commit_hash", None)
        return Source(model=model, architecture=config.architectures[0], revision=revision,
                      model_type=config.model_type)

    def export_info(self) -> ExportInfo:
        """The ``export`` block, dated now (the step seconds are added at the end)."""
        return ExportInfo(date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                          versions=_versions(), opset=self.opset if self.graph == "traced" else FUSED_OPSET,
                          graph=self.graph, command=self.command, allow_pickle=self.allow_pickle,
                          extra={**({"rotation": self.rotation.record()} if self.rotation is not None else {}),
                                 **({"graph_fallback": self.fallback} if self.fallback else {})})


def validate_artifact(root: Path, family: Any, precision: str = "fp32",
                      groups: Sequence[tuple[str, list[str]]] | None = None, *, release: bool = False,
                      reference: tuple[str, list[np.ndarray]] | None = None) -> Parity:
    """Score the built-in groups with the artifact and with PyTorch.

    Every run is checked: batch 8 on each padding side the family supports, batch 1 on its own side (a batch of
    one has no padding, so the other side would repeat it), and for decoder artifacts
    both scoring paths: ``reuse`` (the shared prefix run once per query, the default on onnxruntime) and
    ``whole`` (whole pairs with an empty past: ``prefix_reuse=False``, TensorRT engines, single documents).

    Returns:
        The parity stored in the manifest: ``max_abs_logit_diff`` is the worst run, and ``extra`` holds the
        pair and query counts, ``max_abs_logit_diff_by_run`` (keyed ``[reuse|whole/]side/batchN``) and the
        top-k agreement.

    ``release``: free the PyTorch model once the reference scores are computed, before onnxruntime loads the
    graph (the export needs it no more), so the two never share the memory at once. ``reference``: the PyTorch
    scores of ``groups`` computed before (the streaming export frees the model before it writes the graph), as
    ``(what computed them, scores per group)``.
    """
    from memrerank.runtime import Reranker

    groups = list(groups) if groups is not None else builtin_pairs()
    label, ref = reference or ("pytorch (transformers, fp32)", [family.reference(q, docs, None) for q, docs in groups])
    if release:
        family.release()
    paths: tuple[tuple[str, bool | None], ...] = (("", None),)
    if read_manifest(root).prefix_reuse is not None:
        paths = (("reuse/", True), ("whole/", False))
    by_run: dict[str, float] = {}
    spear, topk = [], []
    for path, prefix_reuse in paths:
        reranker = None  # one session at a time
        reranker = Reranker.load(root, precision=precision, prefix_reuse=prefix_reuse)
        for side in family.padding_sides:
            reranker.padding_side = side
            # a batch of one has no padding: it runs once per path, on the family's own side
            for batch_size in (1, 8) if side == family.padding_side else (8,):
                reranker.batch_size = batch_size
                diffs = []
                for (q, docs), r in zip(groups, ref):
                    got = reranker.predict([(q, d) for d in docs], raw=True).astype(np.float64)
                    diffs.append(float(np.max(np.abs(got - r))))
                    if side == family.padding_side and batch_size == 8:
                        spear.append(spearman(got, r))
                        topk.append(topk_overlap(got, r, TOPK))
                by_run[f"{path}{side}/batch{batch_size}"] = max(diffs)
    return Parity(
        reference=label,
        max_abs_logit_diff=max(by_run.values()),
        tolerance=PARITY_TOLERANCE[precision],
        spearman_mean=float(np.mean(spear)),
        extra={"pairs": sum(len(d) for _, d in groups), "queries": len(groups),
               "max_abs_logit_diff_by_run": by_run, f"top{TOPK}_agreement": float(np.mean(topk))},
    )


def export_model(
    model: str,
    out: str | Path,
    *,
    precisions: Sequence[str] = ("fp32",),
    max_length: int | None = None,
    instruction: str | None = None,
    force: bool = False,
    revision: str | None = None,
    trust_remote_code: bool = False,
    opset: int = DEFAULT_OPSET,
    calib_data: str | Path | None = None,
    fidelity: FidelityBudget | str | None = None,
    allow_pickle: bool = False,
    graph: str | None = None,
    rotate: bool | None = None,
    int4_block: int | None = None,
    int4_coding: str | None = None,
    prompt: Any = None,
    command: str | None = None,
    log: Callable[[str], None] = _log.info,
    progress: bool | None = False,
) -> Path:
    """Turn a Hugging Face checkpoint into a validated artifact directory.

    The artifact is built beside ``out`` and swapped in at the end (:func:`memrerank.atomic.swap_into_place`):
    killed at any moment, ``out`` is the previous artifact or, for a kill at the swap itself, is put back
    when the next export of ``out`` starts (which also removes what killed exports left beside it).

    Args:
        model: hub id or local directory.
        out: artifact directory to create.
        precisions: subset of :data:`memrerank.manifest.PRECISIONS`.
        max_length: longest pair in tokens (default: the family's).
        instruction: default instruction stored for decoder rerankers.
        force: replace an existing ``out``.
        revision: hub revision.
        trust_remote_code: allow the checkpoint's own code (off by default).
        opset: ONNX opset.
        calib_data: JSONL of {"query","document"} pairs for static calibration and fidelity checks
            (default: the built-in pairs).
        int4_block: input channels per 4-bit block of the ``int4`` precision (a power of two >= 16; default
            :data:`~memrerank.export.int4.INT4_BLOCK`). Larger blocks: a smaller file and less memory once loaded
            (fewer scales), coarser weights.
        int4_coding: how the ``int4`` precision chooses its 4-bit codes (:data:`~memrerank.export.int4.CODINGS`):
            ``"rtn"`` (the default: round to nearest), ``"gptq"`` / ``"gptq-act"`` (error compensation from the
            calibration pairs' activations; needs the fp32 graph, so fp32 among the precisions).
        fidelity: budget every quantized precision must meet vs fp32 (``"top10=0.95,spearman=0.99"``); default:
            each precision's own (:meth:`~memrerank.export.fidelity.FidelityBudget.default`).
        allow_pickle: load a checkpoint whose weights are only a pickle (``pytorch_model.bin``). Off by
            default: weights load from safetensors only, because unpickling can run code.
        graph: ``"traced"`` (Optimum's trace of the PyTorch module) or, for decoder families, ``"fused"`` /
            ``"fused-cuda"`` (:mod:`memrerank.export.fused`: onnxruntime's fused attention, rotary and RMSNorm
            operators, written for the CPU or the CUDA provider; same inputs, outputs and scores). ``None`` (the
            default): ``"fused"`` for decoder families, falling back to ``"traced"`` (said in the log and
            recorded as ``export.graph_fallback``) where the fused graph does not cover the model or the
            installed onnxruntime lacks its operators; ``"traced"`` for encoders.
        rotate: a fused graph's weights in a rotated basis (:class:`~memrerank.export.fused.Rotation`, recorded in
            the manifest's ``export.rotation``): the same scores at every precision (checked against PyTorch
            like any fp32 graph), no outlier channels for int8 to code on the residual stream. ``None`` (the
            default): on for the fused graphs; the traced graph cannot be rotated (``True`` with ``graph``
            ``"traced"`` is refused; with ``graph`` ``None`` it asks for the fused graph, fallback excluded).
        prompt: decoder yes/no rerankers: a :class:`~memrerank.export.families.decoder_yes_no.YesNoPrompt`
            replacing the checkpoint's default (Qwen3: the Qwen3-Reranker recipe; Qwen2: the same without think).
        command: the command line recorded in the manifest's ``export`` block.
        log: progress messages.
        progress: a progress bar over the export's steps on stderr (``None``: when stderr is a terminal). Each
            step's seconds are logged at the end and recorded in the manifest (``export.step_seconds``).

    Raises:
        FileExistsError: ``out`` exists and ``force`` is false.
        UnsupportedModelError: no family handles the checkpoint.
        UnsafeCheckpointError: the weights are only a pickle and ``allow_pickle`` is false.
        ParityError: the graph misses the precision's tolerance against PyTorch.
    """
    out = Path(out)
    recover(out, log)  # an artifact a killed export left aside comes back before anything looks at ``out``
    budgets, calib_groups = _check_arguments(out, precisions, force=force, max_length=max_length,
                                            calib_data=calib_data, fidelity=fidelity, graph=graph,
                                             int4_block=int4_block, int4_coding=int4_coding)
    if rotate and graph == "traced":
        raise ValueError("rotate: the rotated basis is written by the fused graphs; pass --graph fused "
                         f"(or fused-cuda), not {graph!r}")
    lower = [p for p in PRECISIONS if p in precisions and p != "fp32"]
    stream = "fp32" not in precisions  # the checkpoint's files read one tensor at a time, no fp32 graph
    if stream and lower == ["int8"] and rotate is False:
        raise ValueError("precision int8 alone is streamed with the rotated recipe, which needs nothing measured; "
                         "without --rotate int8 measures its plan on the fp32 graph: add fp32 (--precision fp32,int8)")
    n_steps = 4 if stream else 3 + len(lower) + bool(lower)
    steps = Steps(n_steps, desc=f"export {Path(model).name}", enabled=progress, log=log)
    log = steps.log
    family, config, blocks, tmp = _load_step(model, out, steps, revision=revision, instruction=instruction,
                                             trust_remote_code=trust_remote_code, max_length=max_length,
                                             allow_pickle=allow_pickle, prompt=prompt,
                                             dtype="auto" if stream else None)
    auto = graph is None and not rotate  # --rotate without --graph asks for the fused graph: no quiet fallback
    if graph is None:
        graph = "fused" if rotate or family.cache_layout() is not None else "traced"
    if rotate is None:
        rotate = graph in FUSED_GRAPHS
    job = _Job(model, revision, opset, graph, command, allow_pickle, Rotation() if rotate else None, int4_block,
               int4_coding, auto)
    try:
        if stream:
            manifest = _build_streamed(tmp, job, config, family, blocks, lower[0], calib_groups,
                                       budgets[lower[0]], steps)
        else:
            manifest = _build_artifact(tmp, job, config, family, blocks, lower, calib_groups, budgets, steps)
        seconds = steps.finish()
        write_manifest(tmp, _with_step_seconds(manifest, seconds))
        _readable_as_created(tmp)
        swap_into_place(tmp, out, replace=force)  # an OUT that appeared meanwhile is refused, never clobbered
    except BaseException:
        steps.finish()
        discard(tmp)
        raise
    log(f"wrote {out} (" + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()) + ")")
    return out


def _check_arguments(out: Path, precisions: Sequence[str], *, force: bool, max_length: int | None,
                     calib_data: str | Path | None, fidelity: FidelityBudget | str | None,
                     graph: str | None = None, int4_block: int | None = None, int4_coding: str | None = None
                     ) -> tuple[dict[str, FidelityBudget], list[tuple[str, list[str]]] | None]:
    """Refuse bad arguments before anything loads; return the fidelity budget of each precision (``fidelity``
    for all, else each one's default: :meth:`FidelityBudget.default`) and the ``--calib-data`` groups."""
    if graph is not None and graph not in GRAPH_KINDS:
        raise ValueError(f"graph: unknown {graph!r}; choose from {', '.join(GRAPH_KINDS)}")
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown or not precisions:
        raise ValueError(f"precision: unknown {unknown or 'none given'}; choose from {', '.join(PRECISIONS)}")
    if "fp32" not in precisions and not set(precisions) <= set(STREAMED):
        raise ValueError("precision: fp32 is the reference every other precision is validated against; include it "
                         f"(only {', '.join(STREAMED)} exports alone: streamed from the checkpoint's files and "
                         "validated against PyTorch)")
    if "fp32" not in precisions and len(precisions) > 1:
        raise ValueError(f"precision: {', '.join(precisions)} without fp32 would stream the checkpoint once per "
                         "precision; export one at a time (or add fp32)")
    if "fp32" not in precisions and graph == "traced":
        raise ValueError(f"precision {', '.join(precisions)} alone streams the fused graph from the checkpoint's "
                         "files; drop --graph traced or add fp32")
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force (force=True) to replace it")
    if int4_block is not None:
        from memrerank.export.int4 import check_block

        if "int4" not in precisions:
            raise ValueError(f"--int4-block sets the int4 precision's blocks; add int4 to --precision "
                             f"(asked: {', '.join(precisions)})")
        check_block(int4_block)
    if int4_coding is not None:
        from memrerank.export.int4 import CODINGS

        if int4_coding not in CODINGS:
            raise ValueError(f"--int4-coding: unknown {int4_coding!r}; choose from {', '.join(CODINGS)}")
        if "int4" not in precisions:
            raise ValueError(f"--int4-coding sets how int4 codes its weights; add int4 to --precision "
                             f"(asked: {', '.join(precisions)})")
        if int4_coding != "rtn" and "fp32" not in precisions:
            raise ValueError(f"--int4-coding {int4_coding} measures the fp32 graph's activations; a streamed int4 "
                             "rounds to nearest: add fp32 (--precision fp32,int4) or drop --int4-coding")
    given = fidelity if isinstance(fidelity, FidelityBudget) else (
        FidelityBudget.parse(fidelity) if fidelity else None)
    budgets = {p: given or FidelityBudget.default(p) for p in precisions}
    calib_groups = load_calib_jsonl(calib_data) if calib_data else None
    if max_length is not None and max_length < 32:
        raise ValueError(f"--max-length must be at least 32, got {max_length}")
    return budgets, calib_groups


def _load_family(model: str, *, revision: str | None, trust_remote_code: bool, instruction: str | None,
                 max_length: int | None, allow_pickle: bool, log: Callable[[str], None], prompt: Any = None,
                 dtype: Any = None) -> tuple[Any, Any]:
    """Read the checkpoint's config, pick its registered family and load the PyTorch model and tokenizer."""
    from transformers import AutoConfig

    log(f"loading {model}")
    try:
        config = AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        where = ("local directory" if Path(model).exists() else
                 "hub id (or the hub is unreachable: set HF_HUB_OFFLINE=1 and pass a local directory)")
        raise ValueError(f"{model}: cannot read a transformers config.json from this {where}: {exc}") from exc
    family = family_for(config)(model, config, revision=revision, trust_remote_code=trust_remote_code,
                                instruction=instruction, max_length=max_length, allow_pickle=allow_pickle,
                                prompt=prompt)
    family.load_dtype = dtype
    family.load()
    return family, config


def _load_step(model: str, out: Path, steps: Steps, *, revision: str | None, trust_remote_code: bool,
               instruction: str | None, max_length: int | None, allow_pickle: bool, prompt: Any = None,
               dtype: Any = None) -> tuple[Any, Any, tuple[Template, Tokens], Path]:
    """The load step: the checkpoint in its family, the family's template and tokens, and the staging
    directory.

    The template is taken before anything is written: it refuses options the family does not take.
    """
    try:
        steps.start("load")
        family, config = _load_family(model, revision=revision, trust_remote_code=trust_remote_code,
                                      instruction=instruction, max_length=max_length,
                                      allow_pickle=allow_pickle, log=steps.log, prompt=prompt, dtype=dtype)
        blocks = family.template()
        return family, config, blocks, _staging(out)
    except BaseException:
        steps.finish()
        raise


def _staging(out: Path) -> Path:
    """A new, empty staging directory beside ``out``, with its lock (:func:`memrerank.atomic.create_staging`)."""
    return create_staging(out, "partial")


def _readable_as_created(root: Path) -> None:
    """Give every file of the artifact the mode a plain ``open()`` would have (0666 less the umask): ``onnx``
    writes external weight data 0600, which would leave a service running as another user unable to read the
    graph its manifest lists."""
    mask = os.umask(0)
    os.umask(mask)
    for path in Path(root).rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, 0o666 & ~mask)


def _with_step_seconds(manifest: Manifest, seconds: Mapping[str, float]) -> Manifest:
    """``manifest`` with each step's seconds in its ``export`` block."""
    export = dataclasses.replace(manifest.export, step_seconds={k: round(v, 2) for k, v in seconds.items()})
    return dataclasses.replace(manifest, export=export)


def _build_artifact(tmp: Path, job: _Job, config: Any, family: Any, blocks: tuple[Template, Tokens],
                    lower: Sequence[str], groups: Sequence[tuple[str, list[str]]] | None,
                    budgets: Mapping[str, FidelityBudget], steps: Steps) -> Manifest:
    """The steps between loading and the swap: the fp32 graph, its check against PyTorch, then each lower
    precision. Each writes the manifest into ``tmp``; returns it as last written."""
    steps.start("fp32 graph")
    manifest = _write_fp32(tmp, job, config, family, blocks, steps.log)
    steps.start("validate fp32")
    manifest = _validate_fp32(tmp, family, manifest, steps.log)
    if lower:
        manifest = _build_precisions(tmp, lower, groups, budgets, manifest, steps.log, steps,
                                     options={"int4": _int4_options(job, builder=True)})
    return manifest


def _build_streamed(tmp: Path, job: _Job, config: Any, family: Any, blocks: tuple[Template, Tokens], name: str,
                    groups: Sequence[tuple[str, list[str]]] | None, budget: FidelityBudget, steps: Steps) -> Manifest:
    """The streaming export of one precision (:data:`STREAMED`), for models whose fp32 graph would not fit.

    PyTorch, holding the model in the checkpoint's own dtype (bf16: half of fp32), scores the built-in validation
    pairs and the calibration pairs and is freed; then the graph is written from the checkpoint's safetensors one
    tensor at a time, each weight coded as it is read (:class:`~memrerank.export.int4.Int4Coder`,
    :class:`~memrerank.export.quantize.Int8Coder`), so neither an
    fp32 graph nor a second copy of the model ever exists; then onnxruntime scores the same pairs. The parity and
    the fidelity budget are judged against PyTorch (there is no fp32 graph); with no fp32 graph there is no
    sensitivity search either, so a precision that misses the budget fails with what to do instead.
    """
    import onnx

    from memrerank.export.checkpoint import Checkpoint
    from memrerank.export.fused import CheckpointSource
    from memrerank.export.int4 import Int4Coder
    from memrerank.export.quantize import Int8Coder
    from memrerank.runtime import Reranker

    layout = family.cache_layout()
    if layout is None or job.graph not in FUSED_GRAPHS:
        raise ValueError(f"precision {name} alone streams the fused decoder graph; {family.name} exports the traced "
                         f"graph: add fp32 (--precision fp32,{name})")
    if name == "int8" and job.rotation is None:
        raise ValueError("precision int8 alone is streamed with the rotated recipe, which needs nothing measured; "
                         "without --rotate int8 measures its plan on the fp32 graph: add fp32 (--precision fp32,int8)")
    template, tokens = blocks
    steps.start("pytorch reference")
    dtype = str(next(family.model.parameters()).dtype).removeprefix("torch.")
    label = f"pytorch (transformers, {dtype})"
    source = "user --calib-data" if groups is not None else "built-in pairs"
    groups = _first_pairs(groups if groups is not None else builtin_calibration_groups(), STREAM_CALIB_PAIRS,
                          STREAM_GROUP_DOCS)
    validation = builtin_pairs()
    steps.log(f"scoring {sum(len(d) for _, d in validation) + sum(len(d) for _, d in groups)} pairs with PyTorch "
              f"({dtype})")
    ref_validation = [family.reference(q, docs, None) for q, docs in validation]
    ref_calib = [family.reference(q, docs, None) for q, docs in groups]
    head = None if family.is_seq_cls else family._yes_no_ids()
    family.tokenizer.save_pretrained(tmp, legacy_format=False)
    tokenizer_files = [p for p in sorted(tmp.iterdir()) if p.is_file()]
    family.release()  # before the graph is written: the model and the writer never share the memory

    steps.start(f"{name} graph")
    steps.log(f"writing the {name} graph from the checkpoint's files ({family.name}, {job.graph}, streamed)")
    coder = Int4Coder(**_int4_options(job)) if name == "int4" else Int8Coder()
    path = tmp / name / "model.onnx"
    checkpoint = Checkpoint(_checkpoint_dir(job))
    files = write_fused_graph(CheckpointSource(checkpoint, config, head), path, ep=FUSED_GRAPHS[job.graph],
                              rotation=job.rotation, coder=coder)
    graph = onnx.load(str(path), load_external_data=False).graph
    entry = PrecisionEntry(graph=f"{name}/model.onnx", files=file_entries(tmp, files),
                           inputs=tuple(i.name for i in graph.input if not i.name.startswith("past_")),
                           outputs=("logits",), providers=PRECISION_PROVIDERS[name], build=coder.build())
    export = job.export_info()
    export = dataclasses.replace(export, extra={**export.extra, "streamed": {
        "checkpoint": checkpoint.describe(), "reference": label}})
    manifest = write_manifest(tmp, Manifest(
        family=family.name, source=job.source(config), template=template, tokens=tokens,
        tokenizer_files=file_entries(tmp, tokenizer_files), precisions={name: entry}, prefix_reuse=layout,
        export=export, calibration_data=CalibrationData(source, sum(len(d) for _, d in groups), len(groups))))

    steps.start(f"validate {name}")
    steps.log(f"validating the {name} graph against PyTorch ({dtype})")
    parity = validate_artifact(tmp, family, name, validation, reference=(label, ref_validation))
    reranker = Reranker.load(tmp, precision=name)
    got = [reranker.predict([(q, d) for d in docs], raw=True) for q, docs in groups]
    del reranker
    metrics = _agreement(got, ref_calib)
    report = {"budget": asdict(budget), "fidelity": metrics, "kept_fp32": [], "meets_budget": budget.met(metrics),
              "reference": label, "search": "none: a streamed export has no fp32 graph to search with"}
    entry = dataclasses.replace(entry, parity=parity, fidelity=Fidelity.from_dict(report, f"precisions.{name}.fidelity"))
    manifest = write_manifest(tmp, manifest.with_precision(name, entry))
    steps.log(f"  {name}: max|Δlogit| {metrics['max_abs_logit_diff']:.3e}, spearman {metrics['spearman_mean']:.4f}, "
              f"top10 {metrics['top10_overlap']:.3f} vs {label}")
    if not report["meets_budget"]:
        raise ParityError(
            f"{name} (streamed) misses the fidelity budget vs {label}: spearman {metrics['spearman_mean']:.4f} (need "
            f"{budget.spearman}), top10 {metrics['top10_overlap']:.3f} (need {budget.top10}); a streamed export has "
            f"no fp32 graph for the sensitivity search: export --precision fp32,{name} where memory allows, or relax "
            "the budget with --fidelity top10=X,spearman=Y")
    return manifest


def _int4_options(job: _Job, builder: bool = False) -> dict[str, Any]:
    """The int4 coder's (streamed) or ``builder``'s keyword arguments the export was asked for."""
    options: dict[str, Any] = {"block": job.int4_block} if job.int4_block is not None else {}
    if builder and job.int4_coding is not None:
        options["coding"] = job.int4_coding
    return options


def _first_pairs(groups: Sequence[tuple[str, list[str]]], most: int, per_group: int) -> list[tuple[str, list[str]]]:
    """The first groups, each cut to ``per_group`` documents, up to ``most`` pairs in all (at least one group)."""
    out: list[tuple[str, list[str]]] = []
    for q, docs in groups:
        docs = list(docs[:per_group])
        if out and sum(len(d) for _, d in out) + len(docs) > most:
            break
        out.append((q, docs))
    return out


def _agreement(got: Sequence[np.ndarray], ref: Sequence[np.ndarray]) -> dict[str, float]:
    """max |Δlogit|, mean per-query Spearman and top-10 overlap of ``got`` vs ``ref`` (per query group)."""
    return {"max_abs_logit_diff": float(max(np.max(np.abs(np.asarray(g) - r)) for g, r in zip(got, ref))),
            "spearman_mean": float(np.mean([spearman(g, r) for g, r in zip(got, ref)])),
            "top10_overlap": float(np.mean([topk_overlap(g, r, 10) for g, r in zip(got, ref)])),
            "pairs": int(sum(len(r) for r in ref)), "queries": len(ref)}


def _checkpoint_dir(job: _Job) -> Path:
    """The checkpoint's local directory (a hub id: the snapshot transformers already downloaded)."""
    if Path(job.model).is_dir():
        return Path(job.model)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(job.model, revision=job.revision,
                                  allow_patterns=["*.safetensors", "*.safetensors.index.json", "config.json"]))


def _write_fp32(tmp: Path, job: _Job, config: Any, family: Any, blocks: tuple[Template, Tokens],
                log: Callable[[str], None]) -> Manifest:
    """Write the tokenizer, the fp32 graph and the first manifest into ``tmp``; return the manifest.

    ``blocks`` is the family's ``(template, tokens)`` pair (:meth:`Family.template`).
    """
    template, tokens = blocks
    family.tokenizer.save_pretrained(tmp, legacy_format=False)
    tokenizer_files = [p for p in sorted(tmp.iterdir()) if p.is_file()]
    if not (tmp / TOKENIZER_NAME).is_file():
        raise ValueError(f"{job.model}: the tokenizer did not produce {TOKENIZER_NAME}")

    log(f"exporting fp32 graph ({family.name}, {job.graph})")
    onnx_config = family.onnx_config()
    layout = family.cache_layout()
    path = tmp / "fp32" / "model.onnx"
    files = None
    if job.graph in FUSED_GRAPHS:
        if layout is None:
            raise ValueError(f"--graph {job.graph} is for decoder rerankers; {family.name} exports the "
                             "traced graph")
        try:
            files = write_fused_graph(family.graph_module(), path, ep=FUSED_GRAPHS[job.graph],
                                      rotation=job.rotation)
        except (ValueError, RuntimeError) as exc:
            if not job.auto_graph:
                raise
            log(f"the fused graph does not cover this model ({exc}); exporting the traced graph")
            job = dataclasses.replace(job, graph="traced", rotation=None, fallback=str(exc))
            shutil.rmtree(path.parent, ignore_errors=True)  # whatever the fused writer left
            log(f"exporting fp32 graph ({family.name}, {job.graph})")
    if files is None:
        files = export_onnx(family.graph_module(), onnx_config, path, opset=job.opset)
    fp32 = PrecisionEntry(graph="fp32/model.onnx", files=file_entries(tmp, files),
                          inputs=tuple(onnx_config.inputs), outputs=tuple(onnx_config.outputs),
                          providers=PRECISION_PROVIDERS["fp32"])
    manifest = Manifest(family=family.name, source=job.source(config), template=template, tokens=tokens,
                        tokenizer_files=file_entries(tmp, tokenizer_files), precisions={"fp32": fp32},
                        prefix_reuse=layout, export=job.export_info())
    return write_manifest(tmp, manifest)


def _validate_fp32(tmp: Path, family: Any, manifest: Manifest, log: Callable[[str], None]) -> Manifest:
    """Score the fp32 artifact against PyTorch, record the parity and refuse a graph outside its tolerance."""
    log("validating fp32 graph against PyTorch")
    parity = validate_artifact(tmp, family, "fp32", release=True)
    fp32 = dataclasses.replace(manifest.precision("fp32"), parity=parity)
    manifest = write_manifest(tmp, manifest.with_precision("fp32", fp32))
    if not parity.within_tolerance:
        by_run = parity.extra["max_abs_logit_diff_by_run"]
        runs = "\n".join(f"  {k}: max |Δlogit| = {v:.3e}" for k, v in by_run.items())
        raise ParityError(
            f"fp32 graph differs from PyTorch by {parity.max_abs_logit_diff:.3e} > {parity.tolerance:.0e}:\n"
            f"{runs}\nthe export is not trustworthy; please report this checkpoint"
        )
    return manifest


def _build_precisions(tmp: Path, names: Sequence[str], groups: Sequence[tuple[str, list[str]]] | None,
                      budgets: Mapping[str, FidelityBudget], manifest: Manifest, log: Callable[[str], None],
                      steps: Steps | None = None, options: Mapping[str, Mapping[str, Any]] | None = None
                      ) -> Manifest:
    """Build each lower precision from the fp32 graph and validate it against fp32 on the calibration pairs;
    write the manifest with their entries and return it.

    Raises:
        ParityError: a precision misses the fidelity budget even after the sensitivity search.
    """
    source = "user --calib-data" if groups is not None else "built-in pairs"
    if groups is None:
        groups = builtin_calibration_groups()
        log("no --calib-data given: calibrating and checking fidelity on the built-in pairs")
    fp32 = manifest.precision("fp32")
    if steps is not None:  # the fp32 logits every lower precision is judged against, scored once
        steps.start("fp32 reference")
    calib = CalibSet(tmp, groups)
    info = graph_info(tmp / fp32.graph)
    calibration_data = CalibrationData(source, calib.n_pairs, len(groups))
    manifest = dataclasses.replace(manifest, calibration_data=calibration_data)
    failures = []
    for name in names:
        if steps is not None:
            steps.start(name)
        log(f"building {name}")
        entry, shortfall = _build_precision(tmp, name, fp32, calib, info, budgets[name], log, steps,
                                            (options or {}).get(name))
        manifest = manifest.with_precision(name, entry)
        if shortfall is not None:
            failures.append(shortfall)
    if failures:
        raise ParityError("precisions below the fidelity budget vs fp32 even after the sensitivity search:\n"
                          + "\n".join(failures) + "\nrelax it with --fidelity top10=X,spearman=Y or drop the precision")
    return write_manifest(tmp, manifest)


def _build_precision(tmp: Path, name: str, fp32: PrecisionEntry, calib: CalibSet, info: GraphInfo,
                     budget: FidelityBudget, log: Callable[[str], None], steps: Steps | None,
                     options: Mapping[str, Any] | None = None
                     ) -> tuple[PrecisionEntry, str | None]:
    """Build one lower precision from the fp32 graph (the quantized ones through the sensitivity search).

    Returns:
        Its entry (files, the build record of the graph kept, fidelity and parity vs fp32) and, when it misses
        the budget, the line saying by how much.
    """
    out_graph = tmp / name / "model.onnx"
    builder = PRECISION_BUILDERS[name]
    builds: list[Build] = []  # the last one describes the graph on disk (the search rebuilds the one kept)

    def build(exclude: list[str], kept_as: str = "fp32") -> None:
        extra: dict[str, Any] = {"kept_as": kept_as} if kept_as != "fp32" else {}
        extra.update(options or {})
        if "log" in inspect.signature(builder).parameters:  # a builder with long steps of its own (int4's GPTQ)
            extra["log"] = log
        builds.append(builder(tmp / fp32.graph, out_graph, info, calib, exclude, **extra))

    if name == "fp16":  # no search: fp16 keeps head and final norm in fp32 and is gated by its tolerance
        build([])
        metrics = calib.fidelity(calib.score(out_graph))
        report: dict[str, Any] = {"budget": asdict(budget), "fidelity": metrics, "kept_fp32": [],
                                  "meets_budget": budget.met(metrics)
                                  and metrics["max_abs_logit_diff"] <= PARITY_TOLERANCE["fp16"]}
    else:
        # the products the search keeps run as the builder's first way that meets the budget (int8 of a decoder:
        # two-pass int8, then fp32); the search starts again only when a way the builds used misses it
        ways = getattr(builder, "kept_as", ("fp32",))
        for way in ways:
            report = search_exclusions(lambda exclude, way=way: build(exclude, way), out_graph, calib,
                                       info.groups, budget, log, label=f"{name} search",
                                       progress=steps.enabled if steps is not None else False)
            # what the kept graph's build did (a builder may run a way it cannot apply as fp32: an encoder)
            used = builds[-1].extra.get("kept_as", "fp32")
            if report["meets_budget"] or used == ways[-1]:
                break
            log(f"  {name}: products kept as {used} miss the budget; searching again keeping them {ways[-1]}")
        report["kept_as"] = used
    m = report["fidelity"]
    kept_as = report.get("kept_as", "fp32")
    log(f"  {name}: max|Δlogit| {m['max_abs_logit_diff']:.3e}, spearman {m['spearman_mean']:.4f}, "
        f"top10 {m['top10_overlap']:.3f}, kept {kept_as}: {report['kept_fp32'] or 'none'}")
    shortfall = None if report["meets_budget"] else (
        f"  {name}: spearman {m['spearman_mean']:.4f} (need {budget.spearman}), top10 "
        f"{m['top10_overlap']:.3f} (need {budget.top10}), max|Δlogit| {m['max_abs_logit_diff']:.3e}")
    # the search's report and its metrics are plain dicts (memrerank.export.fidelity): typed here, at the seam
    parity = {"reference": "fp32 onnx", **m, "tolerance": PARITY_TOLERANCE[name]}
    files = sorted(p for p in out_graph.parent.iterdir() if p.is_file())
    entry = PrecisionEntry(
        graph=f"{name}/model.onnx", files=file_entries(tmp, files), inputs=fp32.inputs, outputs=fp32.outputs,
        providers=PRECISION_PROVIDERS[name], build=builds[-1],
        parity=Parity.from_dict(parity, f"precisions.{name}.parity"),
        fidelity=Fidelity.from_dict(report, f"precisions.{name}.fidelity"),
    )
    return entry, shortfall
