"""TensorRT engines from an exported artifact (``memrerank build-engine OUT`` / ``export --target tensorrt``).

The engine is built with the TensorRT Python API from the artifact's own ONNX graphs:

* TF32: TensorRT turns ``BuilderFlag.TF32`` on by default, letting fp32 layers round their products to TF32;
  the builder clears it (fp32 stays fp32, as onnxruntime's CUDA provider runs it) unless ``allow_tf32=True``
  (``--allow-tf32``), which the manifest's ``method`` then names.
* ``fp16``: the fp32 graph with ``BuilderFlag.FP16``; the folded head and the final norm are pinned to fp32
  (``OBEY_PRECISION_CONSTRAINTS``), as the fp16 ONNX precision does.
* ``int8``: explicit quantization from the ``int8-static`` QDQ graph when the artifact has it (ranges calibrated on
  query–document pairs at export); otherwise the fp32 graph with an entropy calibrator fed the same pairs.

Optimization profiles come from the manifest (``max_length``, the past-cache layout) and ``--profile
min,opt,max`` (``BATCHxSEQ`` each). Engine + timing cache go to ``OUT/tensorrt-<precision>/`` and the manifest
records the TensorRT version, GPU name and compute capability: engines are not portable, and loading one on
another GPU or TensorRT version is refused with the command that rebuilds it. The engine is checked against the
fp32 ONNX graph (through the runtime's own TensorRT backend) before the manifest lists it, in one atomic write.

TensorRT is not on PyPI's default index for every platform and needs an NVIDIA GPU: without them these functions
fail fast with :data:`INSTALL_HINT`. The parts that need neither (profiles, manifest entries, the calibrator's
batch feeding, compatibility checks) are plain Python and tested on any machine.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memrerank.manifest import (
    EngineEntry,
    EngineParity,
    Manifest,
    file_entries,
    read_manifest,
    write_manifest,
)
from memrerank.runtime.backends.tensorrt import INSTALL_HINT, check_engine_compat, require_tensorrt

__all__ = ["INSTALL_HINT", "ENGINE_PRECISIONS", "Profile", "parse_profile", "default_profile", "profile_shapes",
           "CalibrationFeeder", "engine_entry", "check_engine_compat", "build_engine", "require_tensorrt"]

ENGINE_PRECISIONS = ("fp16", "int8")


@dataclass(frozen=True)
class Profile:
    """One optimization profile: (batch, sequence) at min / opt / max, plus the past (prefix) length range."""

    min: tuple[int, int]
    opt: tuple[int, int]
    max: tuple[int, int]
    past: tuple[int, int, int] = (0, 0, 0)


def parse_profile(text: str, max_length: int) -> Profile:
    """``"1x16,8x128,32x512"`` → Profile; each ``BATCHxSEQ``, non-decreasing, sequence ≤ the artifact's
    ``max_length``."""
    parts = [p.strip().lower() for p in text.split(",")]
    if len(parts) != 3:
        raise ValueError(f"--profile: expected min,opt,max as BATCHxSEQ each (e.g. 1x16,8x128,32x512), got {text!r}")
    shapes = []
    for p in parts:
        b, sep, s = p.partition("x")
        if not sep or not b.isdigit() or not s.isdigit() or int(b) < 1 or int(s) < 1:
            raise ValueError(f"--profile: {p!r} is not BATCHxSEQ with positive integers")
        shapes.append((int(b), int(s)))
    lo, mid, hi = shapes
    if not (lo[0] <= mid[0] <= hi[0] and lo[1] <= mid[1] <= hi[1]):
        raise ValueError(f"--profile: min ≤ opt ≤ max must hold for batch and sequence, got {text!r}")
    if hi[1] > max_length:
        raise ValueError(f"--profile: max sequence {hi[1]} exceeds the artifact's max_length {max_length}")
    return Profile(lo, mid, hi)


def default_profile(manifest: Manifest) -> Profile:
    """Batch 1–64 (opt 32: a memory shortlist), sequence 1–min(max_length, 1024) (opt 128); past 0–256."""
    top = min(manifest.tokens.max_length, 1024)
    past = (0, min(64, top), min(256, top)) if manifest.prefix_reuse is not None else (0, 0, 0)
    return Profile((1, 1), (32, min(128, top)), (64, top), past)


def profile_shapes(manifest: Manifest, input_names: Sequence[str], profile: Profile
                   ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """Min/opt/max shape of every graph input under ``profile`` (what ``IOptimizationProfile.set_shape`` takes)."""
    out: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {}
    layout = manifest.prefix_reuse
    for name in input_names:
        if name in ("input_ids", "attention_mask", "token_type_ids"):
            out[name] = (profile.min, profile.opt, profile.max)
        elif name.startswith(("past_key.", "past_value.")):
            if layout is None:
                raise ValueError(f"graph input {name} but the manifest has no prefix_reuse layout")
            out[name] = tuple((layout.past_batch, layout.kv_heads, p, layout.head_dim)  # type: ignore[assignment]
                              for p in profile.past)
        else:
            raise ValueError(f"graph input {name!r}: no profile rule; re-export the artifact")
    return out


class CalibrationFeeder:
    """Feeds tokenized query–document batches to a TensorRT INT8 calibrator, one batch per ``get_batch``.

    ``to_device(array) -> int`` copies an array to GPU memory and returns its address (the CUDA part); the
    feeder itself only orders the engine's inputs and pads nothing: the batches come from the artifact's own
    packer, so they are exactly what the runtime will run.
    """

    def __init__(self, batches: Sequence[dict[str, np.ndarray]], to_device: Callable[[np.ndarray], int]) -> None:
        if not batches:
            raise ValueError("calibration needs at least one batch of pairs")
        self.batches = list(batches)
        self.to_device = to_device
        self._it: Iterator[dict[str, np.ndarray]] = iter(self.batches)
        self.batch_size = max(int(b["input_ids"].shape[0]) for b in self.batches)
        self.fed = 0

    def get_batch(self, names: Sequence[str]) -> list[int] | None:
        batch = next(self._it, None)
        if batch is None:
            return None
        missing = [n for n in names if n not in batch]
        if missing:
            raise ValueError(f"calibration batch lacks engine inputs {missing}")
        self.fed += 1
        return [self.to_device(np.ascontiguousarray(batch[n])) for n in names]


def calibration_batches(root: Path, max_rows: int = 16) -> list[dict[str, np.ndarray]]:
    """Built-in (or ``--calib-data``-recorded) pairs, packed by the runtime, as engine feeds with an empty past."""
    from memrerank.export.fidelity import encode_groups
    from memrerank.export.pairs import builtin_calibration_groups
    from memrerank.runtime import Reranker

    r = Reranker.load(root, "fp32", prefix_reuse=False)
    feeds = []
    for b in encode_groups(r, builtin_calibration_groups(), max_rows)[0]:
        feed = {"input_ids": b.input_ids, "attention_mask": b.attention_mask}
        if b.token_type_ids is not None:
            feed["token_type_ids"] = b.token_type_ids
        feed.update(r.backend.empty_past())
        feeds.append(feed)
    return feeds


def engine_entry(precision: str, engine: Path, root: Path, *, trt_version: str, gpu: str, capability: str,
                 profile: Profile, source_graph: str, method: str, parity: EngineParity | None
                 ) -> EngineEntry:
    """The manifest's ``engines[<precision>]`` entry: every file of the engine's directory, hashed."""
    files = sorted(p for p in engine.parent.iterdir() if p.is_file())
    return EngineEntry(
        engine=engine.relative_to(root).as_posix(),
        files=file_entries(root, files),
        tensorrt=trt_version, gpu=gpu, compute_capability=capability, source_graph=source_graph,
        profile={k: list(v) for k, v in asdict(profile).items()},  # as JSON stores it
        method=method, parity=parity,
    )


def build_engine(root: str | Path, precision: str, profile: Profile | None = None, workspace_gb: float = 4.0,
                 log: Callable[[str], None] = print, *, allow_tf32: bool = False) -> Path:
    """Build ``OUT/tensorrt-<precision>/model.engine`` and record it in the manifest (see the module docstring).

    The engine's parity vs the fp32 ONNX graph is measured before the manifest is touched; the manifest is then
    written once, atomically, with the engine's entry and its parity.

    Args:
        allow_tf32: keep TensorRT's default ``BuilderFlag.TF32`` (fp32 layers may round products to TF32:
            faster, logits move by ~1e-3). Off by default: the flag is cleared. Must be a bool.

    Raises:
        RuntimeError: TensorRT or a GPU is missing (with the install hint).
        ValueError: unknown precision or a profile outside the artifact's limits.
        TypeError: ``allow_tf32`` is not a bool.
    """
    if precision not in ENGINE_PRECISIONS:
        raise ValueError(f"--precision: TensorRT engines are built for {', '.join(ENGINE_PRECISIONS)}, not {precision!r}")
    if not isinstance(allow_tf32, bool):  # a string such as "false" would be truthy
        raise TypeError(f"build_engine: allow_tf32 must be True or False, got {allow_tf32!r}")
    root = Path(root)
    manifest = read_manifest(root)
    trt = require_tensorrt()
    from memrerank.runtime.backends.cuda import CudaRuntime

    cuda = CudaRuntime.load()
    profile = profile or default_profile(manifest)
    if precision == "int8" and "int8-static" in manifest.precisions:
        source, method = "int8-static", "explicit quantization (QDQ graph calibrated on query-document pairs)"
    elif precision == "int8":
        source, method = "fp32", "implicit INT8, entropy calibrator fed the built-in query-document pairs"
    else:
        source, method = "fp32", "FP16 builder flag; head and final norm pinned to fp32"
    method += "; TF32 allowed" if allow_tf32 else "; TF32 off"
    engine_path = _build(trt, cuda, root, manifest, precision, source, profile, workspace_gb, log, allow_tf32)
    gpu, capability = cuda.device_name(), cuda.capability()
    entry = engine_entry(precision, engine_path, root, trt_version=trt.__version__, gpu=gpu, capability=capability,
                         profile=profile, source_graph=source, method=method, parity=None)
    parity = _engine_parity(root, manifest.with_engine(precision, entry), precision)
    entry = dataclasses.replace(entry, parity=parity)
    # re-read: a calibration written while the engine was building is kept
    write_manifest(root, read_manifest(root).with_engine(precision, entry))
    log(f"wrote {engine_path} ({gpu}, sm_{capability}, TensorRT {trt.__version__}); parity vs fp32: "
        f"{parity.to_dict()}")
    return engine_path


def _build(trt: Any, cuda: Any, root: Path, manifest: Manifest, precision: str, source: str, profile: Profile,
           workspace_gb: float, log: Callable[[str], None], allow_tf32: bool = False) -> Path:
    """Parse the ``source`` graph and build the engine; write it and the timing cache; return the engine's path."""
    graph = root / manifest.precision(source).graph
    out_dir = root / f"tensorrt-{precision}"
    out_dir.mkdir(exist_ok=True)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(graph)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {graph}:\n{errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
    if not allow_tf32:  # on by default in TensorRT: fp32 layers would round their products to TF32
        config.clear_flag(trt.BuilderFlag.TF32)
    cache_path = out_dir / "timing.cache"
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    opt = builder.create_optimization_profile()
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    for name, (lo, mid, hi) in profile_shapes(manifest, names, profile).items():
        opt.set_shape(name, lo, mid, hi)
    config.add_optimization_profile(opt)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        pinned = _pin_fp32(network, trt, _fp32_nodes(graph))
        log(f"fp16: {pinned} layers of the head and final norm pinned to fp32")
    elif source == "int8-static":
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_flag(trt.BuilderFlag.FP16)
    else:
        config.set_flag(trt.BuilderFlag.INT8)
        feeder = CalibrationFeeder(calibration_batches(root), cuda.to_device)
        config.int8_calibrator = _entropy_calibrator(trt, feeder, out_dir / "calibration.cache")
        config.set_calibration_profile(opt)
    log(f"building the {precision} engine from {source} (this takes minutes)")
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise RuntimeError(f"TensorRT failed to build the {precision} engine; see the log above")
    engine_path = out_dir / "model.engine"
    tmp = engine_path.with_suffix(".engine.tmp")
    tmp.write_bytes(bytes(blob))
    os.replace(tmp, engine_path)
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return engine_path


def _pin_fp32(network: Any, trt: Any, keep: set[str]) -> int:
    """Keep the folded head (the last product and what follows it) and the final norm in fp32.

    ``keep`` holds ONNX node names (``graph_info(...).head_nodes`` and the final-norm nodes); TensorRT's ONNX
    parser names each layer after the node it came from (fused layers join names with ``+``).
    """
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if any(part in keep for part in layer.name.split(" + ")):
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            pinned += 1
    return pinned


def _fp32_nodes(graph: Path) -> set[str]:
    import re

    import onnx

    from memrerank.export.quantize import graph_info

    info = graph_info(graph)
    model = onnx.load(str(graph), load_external_data=False)
    norm = {n.name for n in model.graph.node if re.search(r"^/(body|model)/norm/", n.name)}
    return set(info.head_nodes) | norm


def _entropy_calibrator(trt: Any, feeder: CalibrationFeeder, cache: Path) -> Any:
    class Calibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()

        def get_batch_size(self) -> int:
            return feeder.batch_size

        def get_batch(self, names: list[str]) -> list[int] | None:
            return feeder.get_batch(names)

        def read_calibration_cache(self) -> bytes | None:
            return cache.read_bytes() if cache.exists() else None

        def write_calibration_cache(self, data: bytes) -> None:
            cache.write_bytes(bytes(data))

    return Calibrator()


def _engine_parity(root: Path, manifest: Manifest, precision: str) -> EngineParity:
    """Engine vs the fp32 ONNX artifact on the built-in pairs (as for the other precisions).

    ``manifest`` already lists the engine (it is not on disk yet): the engine is opened with the runtime's own
    :meth:`~memrerank.runtime.Scorer.open` (file hashes, GPU/TensorRT compatibility) and scored through a
    :class:`~memrerank.runtime.Reranker` sharing the fp32 one's tokenizer, exactly as
    ``Reranker.load(root, precision, providers=["tensorrt"], prefix_reuse=False)`` will run it.
    """
    from memrerank.export.metrics import spearman, topk_overlap
    from memrerank.export.pairs import builtin_pairs
    from memrerank.runtime import LoadOptions, Reranker, Scorer

    ref = Reranker.load(root, "fp32", prefix_reuse=False)
    options = LoadOptions(precision, providers=("tensorrt",), prefix_reuse=False)
    eng = Reranker(root, manifest, precision, Scorer.open(root, manifest, options), ref.tokenizer)
    diffs, sp, tk = [], [], []
    for q, docs in builtin_pairs():
        a = ref.predict([(q, d) for d in docs], raw=True)
        b = eng.predict([(q, d) for d in docs], raw=True)
        diffs.append(float(np.max(np.abs(a - b))))
        sp.append(spearman(b, a))
        tk.append(topk_overlap(b, a, 3))
    return EngineParity(reference="fp32 onnx", max_abs_logit_diff=max(diffs),
                        spearman_mean=float(np.mean(sp)), top3_agreement=float(np.mean(tk)))
