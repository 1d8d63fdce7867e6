"""The artifact contract: ``OUT/manifest.json`` as frozen dataclasses, and the one atomic writer.

Export writes it, everything else only reads it. :func:`read_manifest` parses the JSON once, at the edge, into a
:class:`Manifest`; inside, code reads attributes. A missing or malformed field is an :class:`ArtifactError` that
names the field (``manifest.json: precisions.int8.files: missing``) and says to re-export. Writers build the
same types (export assembles a :class:`Manifest` from its families' and builders' blocks; ``calibrate`` and
``build-engine`` add theirs with the ``with_*`` methods) and :func:`write_manifest` is the only writer: the
JSON is parsed back first, then a temporary file in the same directory, fsync, rename. The family names live
here too (:data:`FAMILIES`), so export and runtime register against one spelling. This module imports nothing
heavy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import stat
import tempfile
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, TypeVar, Union

from memrerank.errors import ArtifactError

__all__ = [
    "SCHEMA_VERSION",
    "MANIFEST_NAME",
    "TOKENIZER_NAME",
    "DECODER_YES_NO",
    "ENCODER_CROSS",
    "FAMILIES",
    "FAMILY_TEMPLATES",
    "PRECISIONS",
    "PARITY_TOLERANCE",
    "PRECISION_PROVIDERS",
    "AUTO_ORDER",
    "BATCH_DEPENDENT_UNLESS_RECORDED",
    "FileEntry",
    "Source",
    "Tokens",
    "DecoderTemplate",
    "EncoderTemplate",
    "Template",
    "CacheLayout",
    "Parity",
    "Fidelity",
    "Build",
    "PrecisionEntry",
    "EngineParity",
    "EngineEntry",
    "CalibrationEntry",
    "CALIBRATION_PARAMS",
    "CALIBRATION_SLOPE_RANGE",
    "CALIBRATION_MAX_BIAS",
    "calibration_problem",
    "CalibrationData",
    "ExportInfo",
    "Manifest",
    "sha256_file",
    "file_entries",
    "read_manifest",
    "write_manifest",
    "verify_files",
    "verify_files_while",
    "load_verified",
    "artifact_path",
    "relative_path_problem",
    "is_weight_data",
]

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "tokenizer.json"

#: The reranker families an artifact can hold (``Manifest.family``), named here once: export's family
#: classes (``@register_family``) and the runtime's pair encoders (``@register_encoder``) register against
#: these names, and :data:`FAMILY_TEMPLATES` maps each to the template type its manifest holds.
DECODER_YES_NO = "decoder-yes-no"
ENCODER_CROSS = "encoder-cross"

#: Precisions, defined once: CLI choices, manifest keys and test parametrisation all use this tuple.
PRECISIONS = ("fp32", "fp16", "int8", "int8-static", "int4")

#: Max |Δlogit| allowed at export: fp32 vs the PyTorch reference, fp16 vs the fp32 graph. Quantized precisions
#: are gated by the ranking fidelity budget instead (memrerank.export.fidelity.FidelityBudget); their max |Δlogit|
#: is recorded, not bounded.
PARITY_TOLERANCE = {"fp32": 1e-4, "fp16": 5e-2, "int8": None, "int8-static": None, "int4": None}

#: Providers each precision is meant for, best first (``precision="auto"`` uses this).
PRECISION_PROVIDERS = {
    "fp32": ("CPUExecutionProvider", "CUDAExecutionProvider"),
    "fp16": ("CUDAExecutionProvider", "TensorrtExecutionProvider"),
    "int8": ("CPUExecutionProvider",),
    "int8-static": ("CPUExecutionProvider", "TensorrtExecutionProvider"),
    "int4": ("CPUExecutionProvider",),
}

#: ``precision="auto"`` preference per provider: the first exported precision that met its budget and is
#: batch-independent (a score never moves with the other documents of its call) wins.
AUTO_ORDER = {
    "CPUExecutionProvider": ("int8", "int4", "int8-static", "fp32"),
    "CUDAExecutionProvider": ("fp16", "fp32"),
    "TensorrtExecutionProvider": ("fp16", "int8-static", "fp32"),
}

#: Precisions ``auto`` treats as batch-dependent unless their build records ``batch_independent: true``: int8
#: exported before per-row activation scales took one scale per input tensor, i.e. per batch. The others compute
#: each row alone or with fixed scales; a build recording ``batch_independent: false`` is skipped whatever its name.
BATCH_DEPENDENT_UNLESS_RECORDED = ("int8", "int4")

_REEXPORT = "re-export with `memrerank export MODEL -o OUT --force`"
_INSIDE_ONLY = ("a manifest may only name files inside its artifact directory (relative paths, no '..'): this one was "
                "edited or not written by memrerank, so do not load it; " + _REEXPORT)


def relative_path_problem(rel: str) -> str | None:
    """Why ``rel`` cannot name a file inside an artifact directory (``None``: it can, as far as its spelling
    goes; symlinks are checked where the file is opened, :func:`artifact_path`)."""
    if not rel or rel in (".", "./"):
        return "is empty"
    if "\0" in rel:
        return "contains a NUL character"
    if "\\" in rel:
        return "contains a backslash (a manifest's paths use '/')"
    if PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).drive:
        return "is an absolute path"
    if ".." in PurePosixPath(rel).parts:
        return "climbs out of the artifact directory with '..'"
    return None


# ----------------------------------------------------------------------------------------------- parsing helpers
class _Reader:
    """Reads one JSON object's fields, raising an ArtifactError that names ``where.key`` on any problem."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, Mapping):
            raise ArtifactError(f"{MANIFEST_NAME}: {where or 'top level'}: expected an object, got "
                                f"{type(data).__name__}; {_REEXPORT}")
        self.data = data
        self.where = where
        self.used: set[str] = set()

    def _path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def fail(self, key: str, what: str) -> ArtifactError:
        return ArtifactError(f"{MANIFEST_NAME}: {self._path(key)}: {what}; {_REEXPORT}")

    def get(self, key: str, kind: type | tuple[type, ...], *, optional: bool = False, default: Any = None) -> Any:
        self.used.add(key)
        if key not in self.data or (optional and self.data[key] is None):
            if optional:
                return default
            raise self.fail(key, "missing")
        value = self.data[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise self.fail(key, f"expected {_kind_name(kind)}, got a boolean")
        if not isinstance(value, kind):
            raise self.fail(key, f"expected {_kind_name(kind)}, got {type(value).__name__} {value!r:.60}")
        return value

    def ints(self, key: str) -> tuple[int, ...]:
        value = self.get(key, list)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise self.fail(key, "expected a list of integers")
        return tuple(value)

    def strs(self, key: str, *, optional: bool = False) -> tuple[str, ...]:
        value = self.get(key, list, optional=optional, default=[])
        if not all(isinstance(v, str) for v in value):
            raise self.fail(key, "expected a list of strings")
        return tuple(value)

    def sub(self, key: str) -> _Reader:
        return _Reader(self.get(key, dict), self._path(key))

    def has(self, key: str) -> bool:
        """Whether an optional field is given (present and not null)."""
        self.used.add(key)
        return self.data.get(key) is not None

    def numbers(self, key: str) -> dict[str, float]:
        """An object of numbers, each checked (``{name: float}``)."""
        block = self.sub(key)
        return {k: block.get(k, float) for k in block.data}

    def texts(self, key: str) -> dict[str, str]:
        """An object of strings, each checked (``{name: str}``)."""
        block = self.sub(key)
        return {k: block.get(k, str) for k in block.data}

    def mapping(self, key: str, *, optional: bool = False) -> dict[str, Any]:
        return dict(self.get(key, dict, optional=optional, default={}))

    def rest(self) -> dict[str, Any]:
        """The fields no typed attribute took (kept so a read-modify-write round trip loses nothing)."""
        return {k: v for k, v in self.data.items() if k not in self.used}


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "a list",
             dict: "an object"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _dump(value: Any) -> Any:
    """Dataclasses → JSON-ready dicts (``extra`` merged back in), tuples → lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(value):
            if f.name == "extra":
                continue
            key = f.metadata.get("json", f.name)
            v = getattr(value, f.name)
            if v is None and f.metadata.get("omit_none"):
                continue
            out[key] = _dump(v)
        out.update({k: _dump(v) for k, v in getattr(value, "extra", {}).items()})
        return out
    if isinstance(value, Mapping):
        return {k: _dump(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_dump(v) for v in value]
    return value


def _files(r: _Reader, key: str) -> dict[str, FileEntry]:
    block = r.sub(key)
    for rel in block.data:
        problem = relative_path_problem(rel)
        if problem:
            raise ArtifactError(f"{MANIFEST_NAME}: {r._path(key)}: {rel!r} {problem}; {_INSIDE_ONLY}")
    return {rel: FileEntry.parse(block.sub(rel)) for rel in block.data}


_B = TypeVar("_B", bound="_Block")


class _Block:
    """What every block of the manifest shares: :meth:`parse` reads its JSON object, :meth:`to_dict` writes it
    back (``type(b).from_dict(b.to_dict(), where) == b``)."""

    @classmethod
    def parse(cls: type[_B], r: _Reader) -> _B:
        raise NotImplementedError

    @classmethod
    def from_dict(cls: type[_B], data: Any, where: str) -> _B:
        """Parse one block's JSON object found at ``where`` (``precisions.int8.fidelity``).

        Raises:
            ArtifactError: naming ``where.<field>`` for the first missing or malformed field.
        """
        return cls.parse(_Reader(data, where))

    def to_dict(self) -> dict[str, Any]:
        """The block's JSON object: its fields (JSON names), then ``extra``."""
        return _dump(self)


# ---------------------------------------------------------------------------------------------------- the types
@dataclass(frozen=True)
class FileEntry(_Block):
    """One file of the artifact, checked before anything parses it."""

    sha256: str
    bytes: int

    @classmethod
    def parse(cls, r: _Reader) -> FileEntry:
        return cls(r.get("sha256", str), r.get("bytes", int))


@dataclass(frozen=True)
class Source(_Block):
    """Where the artifact came from."""

    model: str
    architecture: str
    revision: str | None = None
    model_type: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, r: _Reader) -> Source:
        return cls(r.get("model", str), r.get("architecture", str), r.get("revision", str, optional=True),
                   r.get("model_type", str, optional=True), r.rest())


@dataclass(frozen=True)
class Tokens(_Block):
    """Token-level facts the runtime needs: padding, length limit, and (decoders) the yes/no ids."""

    pad_id: int
    padding_side: str
    max_length: int
    yes_id: int | None = field(default=None, metadata={"omit_none": True})
    no_id: int | None = field(default=None, metadata={"omit_none": True})
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, r: _Reader) -> Tokens:
        side = r.get("padding_side", str)
        if side not in ("left", "right"):
            raise r.fail("padding_side", f"expected 'left' or 'right', got {side!r}")
        max_length = r.get("max_length", int)
        if max_length < 1:
            raise r.fail("max_length", f"must be positive, got {max_length}")
        return cls(r.get("pad_id", int), side, max_length, r.get("yes_id", int, optional=True),
                   r.get("no_id", int, optional=True), r.rest())


@dataclass(frozen=True)
class DecoderTemplate(_Block):
    """The official prompt of a yes/no decoder reranker, as text and as ids."""

    prefix: str
    suffix: str
    instruction_piece: str
    query_piece: str
    document_piece: str
    default_instruction: str
    prefix_ids: tuple[int, ...]
    suffix_ids: tuple[int, ...]
    id_checks: dict[str, tuple[int, ...]]
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, r: _Reader) -> DecoderTemplate:
        return cls(r.get("prefix", str), r.get("suffix", str), r.get("instruction_piece", str),
                   r.get("query_piece", str), r.get("document_piece", str), r.get("default_instruction", str),
                   r.ints("prefix_ids"), r.ints("suffix_ids"), _id_checks(r), r.rest())


@dataclass(frozen=True)
class EncoderTemplate(_Block):
    """Where a cross-encoder's special tokens sit around the query and the document (ids and type ids)."""

    lead_ids: tuple[int, ...]
    middle_ids: tuple[int, ...]
    trail_ids: tuple[int, ...]
    uses_type_ids: bool
    query_type_id: int
    document_type_id: int
    lead_type_ids: tuple[int, ...]
    middle_type_ids: tuple[int, ...]
    trail_type_ids: tuple[int, ...]
    id_checks: dict[str, tuple[int, ...]]
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, r: _Reader) -> EncoderTemplate:
        return cls(r.ints("lead_ids"), r.ints("middle_ids"), r.ints("trail_ids"), r.get("uses_type_ids", bool),
                   r.get("query_type_id", int), r.get("document_type_id", int), r.ints("lead_type_ids"),
                   r.ints("middle_type_ids"), r.ints("trail_type_ids"), _id_checks(r), r.rest())


Template = Union[DecoderTemplate, EncoderTemplate]

#: Each reranker family → the template type its manifest holds; the keys are the families there are.
FAMILY_TEMPLATES: dict[str, type[DecoderTemplate | EncoderTemplate]] = {
    DECODER_YES_NO: DecoderTemplate,
    ENCODER_CROSS: EncoderTemplate,
}
#: Reranker families an artifact can hold (``Manifest.family``), in :data:`FAMILY_TEMPLATES`' order.
FAMILIES = tuple(FAMILY_TEMPLATES)


def _id_checks(r: _Reader) -> dict[str, tuple[int, ...]]:
    checks = r.sub("id_checks")
    return {text: checks.ints(text) for text in checks.data}


@dataclass(frozen=True)
class CacheLayout(_Block):
    """The shared-past (prefix reuse) layout of a decoder graph: one batch-1 key/value pair per layer."""

    layers: int
    kv_heads: int
    head_dim: int
    past_batch: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, r: _Reader) -> CacheLayout:
        out = cls(r.get("layers", int), r.get("kv_heads", int), r.get("head_dim", int),
                  r.get("past_batch", int, optional=True, default=1), r.rest())
        if min(out.layers, out.kv_heads, out.head_dim) < 1:
            raise r.fail("layers", "layers, kv_heads and head_dim must be positive")
        return out

    @property
    def past_names(self) -> tuple[str, ...]:
        """Graph input names of the past, layer by layer (keys then values)."""
        return tuple(f"past_{kind}.{i}" for i in range(self.layers) for kind in ("key", "value"))


@dataclass(frozen=True)
class Parity(_Block):
    """How far a graph's logits are from its reference (PyTorch for fp32, the fp32 graph otherwise)."""

    reference: str
    max_abs_logit_diff: float
    tolerance: float | None = None
    spearman_mean: float | None = field(default=None, metadata={"omit_none": True})
    top10_overlap: float | None = field(default=None, metadata={"omit_none": True})
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, r: _Reader) -> Parity:
        return cls(r.get("reference", str), r.get("max_abs_logit_diff", float),
                   r.get("tolerance", float, optional=True), r.get("spearman_mean", float, optional=True),
                   r.get("top10_overlap", float, optional=True), r.rest())

    @property
    def within_tolerance(self) -> bool:
        return self.tolerance is None or self.max_abs_logit_diff <= self.tolerance


@dataclass(frozen=True)
class Fidelity(_Block):
    """A quantized precision's ranking fidelity vs fp32 and the products the sensitivity search kept out of the
    plain quantization (``kept_fp32``, named when fp32 was the only way to keep them); ``extra["kept_as"]`` says
    how they run: ``"fp32"`` (absent in older artifacts) or ``"two-pass"`` (int8 weights, activation coded
    twice: :func:`memrerank.export.quantize.quantize_per_row`)."""

    meets_budget: bool
    kept_fp32: tuple[str, ...] = ()
    budget: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict, metadata={"json": "fidelity"})
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, r: _Reader) -> Fidelity:
        return cls(r.get("meets_budget", bool), r.strs("kept_fp32", optional=True), r.mapping("budget", optional=True),
                   r.mapping("fidelity", optional=True), r.rest())


@dataclass(frozen=True)
class Build(_Block):
    """How a precision's graph was built (``precisions.<name>.build``; empty for fp32): the builder's method,
    whether a score is independent of what shares its batch, and the builder's own records in ``extra``
    (products kept in fp32, smoothing, embedding tables, ...)."""

    method: str | None = field(default=None, metadata={"omit_none": True})
    batch_independent: bool | None = field(default=None, metadata={"omit_none": True})
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, r: _Reader) -> Build:
        return cls(r.get("method", str, optional=True), r.get("batch_independent", bool, optional=True),
                   r.rest())

    def is_batch_independent(self, precision: str) -> bool:
        """The recorded ``batch_independent``; for a build recording none, whether ``precision`` is not one of
        :data:`BATCH_DEPENDENT_UNLESS_RECORDED`."""
        if self.batch_independent is None:
            return precision not in BATCH_DEPENDENT_UNLESS_RECORDED
        return self.batch_independent


@dataclass(frozen=True)
class PrecisionEntry(_Block):
    """One exported precision: its graph, files, interface, the providers it is meant for, and how good it is."""

    graph: str
    files: dict[str, FileEntry]
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    providers: tuple[str, ...] = ()
    parity: Parity | None = field(default=None, metadata={"omit_none": True})
    fidelity: Fidelity | None = field(default=None, metadata={"omit_none": True})
    build: Build = field(default_factory=Build)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, r: _Reader) -> PrecisionEntry:
        graph = r.get("graph", str)
        files = _files(r, "files")
        if graph not in files:
            raise r.fail("graph", f"{graph!r} is not among the listed files")
        parity = Parity.parse(r.sub("parity")) if r.has("parity") else None
        fidelity = Fidelity.parse(r.sub("fidelity")) if r.has("fidelity") else None
        build = Build.parse(r.sub("build")) if r.has("build") else Build()
        return cls(graph, files, r.strs("inputs", optional=True), r.strs("outputs", optional=True),
                   r.strs("providers", optional=True), parity, fidelity, build, r.rest())

    @property
    def meets_budget(self) -> bool:
        """Whether the precision met its fidelity budget at export (fp32 and unchecked precisions: True)."""
        return self.fidelity is None or self.fidelity.meets_budget

    @property
    def size_bytes(self) -> int:
        return sum(f.bytes for f in self.files.values())


@dataclass(frozen=True)
class EngineParity(_Block):
    """A TensorRT engine's logits vs the fp32 ONNX graph on the built-in pairs (``engines.<name>.parity``)."""

    reference: str
    max_abs_logit_diff: float
    spearman_mean: float | None = field(default=None, metadata={"omit_none": True})
    top3_agreement: float | None = field(default=None, metadata={"omit_none": True})
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, r: _Reader) -> EngineParity:
        return cls(r.get("reference", str), r.get("max_abs_logit_diff", float),
                   r.get("spearman_mean", float, optional=True),
                   r.get("top3_agreement", float, optional=True), r.rest())


@dataclass(frozen=True)
class EngineEntry(_Block):
    """A TensorRT engine built on one GPU with one TensorRT version (engines are not portable)."""

    engine: str
    files: dict[str, FileEntry]
    tensorrt: str
    gpu: str
    compute_capability: str
    source_graph: str
    profile: dict[str, Any] = field(default_factory=dict)
    method: str = ""
    parity: EngineParity | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, r: _Reader) -> EngineEntry:
        engine = r.get("engine", str)
        files = _files(r, "files")
        if engine not in files:
            raise r.fail("engine", f"{engine!r} is not among the listed files")
        parity = EngineParity.parse(r.sub("parity")) if r.has("parity") else None
        return cls(engine, files, r.get("tensorrt", str), r.get("gpu", str), r.get("compute_capability", str),
                   r.get("source_graph", str), r.mapping("profile", optional=True), r.get("method", str, optional=True,
                   default=""), parity, r.rest())


#: The calibration methods a manifest may record and the parameters each takes: ``p = sigmoid(a·logit + b)``,
#: with temperature scaling ``a = 1/T, b = 0``.
CALIBRATION_PARAMS = {"temperature": ("temperature",), "platt": ("a", "b")}
#: Bounds on the slope ``a`` (``1/T``), taking ±20 as a generous span for a reranker's logits (a decoder's
#: yes−no logit, a cross-encoder's head). Below 0.01, that whole span moves the score by less than ±0.05 around
#: one value: every document scores alike. Above 100, logits 0.2 apart score below 5e-5 and above 1 − 5e-5: every
#: score is 0 or 1. Neither is a calibration; an honest fit lands far inside (LoCoMo pairs, MiniLM: a = 1.74).
CALIBRATION_SLOPE_RANGE = (1e-2, 1e2)
#: Bound on the bias ``|b|``, the calibrated log-odds where the raw logit is 0. At 50 the probability there is
#: 2e-22: far beyond any base rate a calibration set can measure (ln N is 28 for N = 10^12 pairs), with room left
#: for the slope times the logits' offset from 0 (LoCoMo, MiniLM: b = −3.25).
CALIBRATION_MAX_BIAS = 50.0


def calibration_problem(method: str, params: Mapping[str, float]) -> str | None:
    """Why ``(method, params)`` is not a calibration the runtime applies (``None``: it is one).

    Checked when a manifest is read (an edited or corrupted calibration is refused at load, not turned into NaN
    or constant scores), by :class:`memrerank.calibration.Calibrator` and by ``memrerank calibrate`` before it
    writes (a fit that would map every score to one value never lands in an artifact).
    """
    if method not in CALIBRATION_PARAMS:
        return f"unknown method {method!r}; known: {', '.join(CALIBRATION_PARAMS)}"
    names = CALIBRATION_PARAMS[method]
    if set(params) != set(names):
        return f"{method} takes the parameters {', '.join(names)}, got {', '.join(params) or 'none'}"
    values = {k: params[k] for k in names}
    for k, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return f"{k} = {v!r} is not a finite number"
    lo, hi = CALIBRATION_SLOPE_RANGE
    if method == "temperature":
        t = values["temperature"]
        if not 1 / hi <= t <= 1 / lo:
            return (f"temperature = {t:g} is outside [{1 / hi:g}, {1 / lo:g}] (at 0 or below it is undefined; "
                    "near 0 every score is 0 or 1, very large every score is 0.5)")
        return None
    a, b = values["a"], values["b"]
    if not lo <= a <= hi:
        return (f"a = {a:g} is outside [{lo:g}, {hi:g}] (a slope at or below 0 reverses or erases the ranking; "
                "near 0 every score is the same, very large every score is 0 or 1)")
    if abs(b) > CALIBRATION_MAX_BIAS:
        return f"b = {b:g} is outside [-{CALIBRATION_MAX_BIAS:g}, {CALIBRATION_MAX_BIAS:g}]"
    return None


@dataclass(frozen=True)
class CalibrationEntry(_Block):
    """A fitted score calibration for one precision (``memrerank calibrate``); its parameters are checked by
    :func:`calibration_problem` when read."""

    method: str
    params: dict[str, float]
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, r: _Reader) -> CalibrationEntry:
        method, params = r.get("method", str), r.numbers("params")
        problem = calibration_problem(method, params)
        if problem:
            where = r._path("params" if method in CALIBRATION_PARAMS else "method")
            raise ArtifactError(f"{MANIFEST_NAME}: {where}: {problem}; fit it again with `memrerank calibrate` or "
                                f"remove the block (scores are then sigmoid(logit))")
        return cls(method, params, r.rest())


@dataclass(frozen=True)
class CalibrationData(_Block):
    """The query–document pairs the lower precisions were built and checked on (``calibration_data``)."""

    source: str
    pairs: int
    queries: int
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, r: _Reader) -> CalibrationData:
        return cls(r.get("source", str), r.get("pairs", int), r.get("queries", int), r.rest())


@dataclass(frozen=True)
class ExportInfo(_Block):
    """How the artifact was exported (``export``); informative, nothing the runtime does depends on it.

    Every field is optional (artifacts from before a field existed lack it) except ``command``, which is
    written even when unknown (``null``: the export did not come from a command line).
    """

    date: str | None = field(default=None, metadata={"omit_none": True})
    versions: dict[str, str] | None = field(default=None, metadata={"omit_none": True})
    opset: int | None = field(default=None, metadata={"omit_none": True})
    graph: str | None = field(default=None, metadata={"omit_none": True})
    command: str | None = None
    allow_pickle: bool | None = field(default=None, metadata={"omit_none": True})
    step_seconds: dict[str, float] | None = field(default=None, metadata={"omit_none": True})
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, r: _Reader) -> ExportInfo:
        return cls(r.get("date", str, optional=True), r.texts("versions") if r.has("versions") else None,
                   r.get("opset", int, optional=True), r.get("graph", str, optional=True),
                   r.get("command", str, optional=True), r.get("allow_pickle", bool, optional=True),
                   r.numbers("step_seconds") if r.has("step_seconds") else None, r.rest())


@dataclass(frozen=True)
class Manifest:
    """``manifest.json`` as types. Build one with :func:`read_manifest` or :meth:`from_dict`."""

    family: str
    source: Source
    template: Template
    tokens: Tokens
    tokenizer_files: dict[str, FileEntry] = field(metadata={"json": "tokenizer"})
    precisions: dict[str, PrecisionEntry]
    calibration: dict[str, CalibrationEntry] = field(default_factory=dict)
    prefix_reuse: CacheLayout | None = None
    engines: dict[str, EngineEntry] = field(default_factory=dict, metadata={"omit_empty": True})
    export: ExportInfo = field(default_factory=ExportInfo)
    calibration_data: CalibrationData | None = field(default=None, metadata={"omit_none": True})
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        """Parse and check a manifest's JSON object.

        Raises:
            ArtifactError: naming the first missing or malformed field.
        """
        r = _Reader(data, "")
        version = data.get("schema_version") if isinstance(data, Mapping) else None
        if version != SCHEMA_VERSION:
            raise ArtifactError(f"{MANIFEST_NAME} has schema_version {version!r}, this memrerank reads "
                                f"{SCHEMA_VERSION}; re-export the model with this version "
                                "(`memrerank export MODEL -o OUT --force`)")
        r.used.add("schema_version")
        family = r.get("family", str)
        if family not in FAMILIES:
            raise r.fail("family", f"unknown family {family!r}; known families: {', '.join(FAMILIES)}")
        precisions_r = r.sub("precisions")
        precisions = {}
        for name in precisions_r.data:
            if name not in PRECISIONS:
                raise precisions_r.fail(name, f"unknown precision; known: {', '.join(PRECISIONS)}")
            precisions[name] = PrecisionEntry.parse(precisions_r.sub(name))
        if not precisions:
            raise r.fail("precisions", "no precision exported")
        calib_r = r.sub("calibration") if r.has("calibration") else None
        calibration = {n: CalibrationEntry.parse(calib_r.sub(n)) for n in calib_r.data} if calib_r else {}
        layout = CacheLayout.parse(r.sub("prefix_reuse")) if data.get("prefix_reuse") else None
        r.used.add("prefix_reuse")
        engines_r = r.sub("engines") if data.get("engines") else None
        engines = {n: EngineEntry.parse(engines_r.sub(n)) for n in engines_r.data} if engines_r else {}
        r.used.add("engines")
        tokenizer = r.sub("tokenizer")
        tokenizer_files = _files(tokenizer, "files")
        if TOKENIZER_NAME not in tokenizer_files:  # the runtime loads it: unlisted, it could not be verified
            raise tokenizer.fail("files", f"{TOKENIZER_NAME} is not listed (with its sha256 and size), so it cannot "
                                 "be verified before it is loaded")
        return cls(
            family=family,
            source=Source.parse(r.sub("source")),
            template=FAMILY_TEMPLATES[family].parse(r.sub("template")),
            tokens=Tokens.parse(r.sub("tokens")),
            tokenizer_files=tokenizer_files,
            precisions=precisions,
            calibration=calibration,
            prefix_reuse=layout,
            engines=engines,
            export=ExportInfo.parse(r.sub("export")) if r.has("export") else ExportInfo(),
            calibration_data=(CalibrationData.parse(r.sub("calibration_data")) if r.has("calibration_data")
                              else None),
            extra=r.rest(),
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON object :func:`write_manifest` writes (``from_dict(m.to_dict()) == m``)."""
        out = _dump(self)
        out["tokenizer"] = {"files": out["tokenizer"]}
        if not self.engines:
            out.pop("engines")
        return {"schema_version": out.pop("schema_version"), **out}

    # ---------------------------------------------------------------------------------------------- queries
    @property
    def is_decoder(self) -> bool:
        return self.family == DECODER_YES_NO

    def precision(self, name: str) -> PrecisionEntry:
        """The entry of one exported precision, or an ArtifactError naming those that exist."""
        if name not in self.precisions:
            have = ", ".join(self.precisions) or "none"
            raise ArtifactError(
                f"this artifact has no {name!r} precision (it has: {have}); "
                f"export it with `memrerank export MODEL -o OUT --precision {name} --force`")
        return self.precisions[name]

    def pick_auto(self, provider: str) -> str:
        """The best exported precision (or engine) for ``provider`` among those that met their fidelity budget and
        are batch-independent (see :data:`BATCH_DEPENDENT_UNLESS_RECORDED`); ``serve`` and ``rescore`` default to it,
        so a request's scores never depend on other requests batched with it."""
        for name in AUTO_ORDER.get(provider, ("fp32",)):
            entry = self.precisions.get(name)
            if entry is not None and entry.meets_budget and entry.build.is_batch_independent(name):
                return name
            if provider == "TensorrtExecutionProvider" and name in self.engines:
                return name
        return "fp32"

    # ---------------------------------------------------------------------------------------------- updates
    def with_calibration(self, entries: Mapping[str, CalibrationEntry]) -> Manifest:
        return dataclasses.replace(self, calibration={**self.calibration, **entries})

    def with_engine(self, name: str, entry: EngineEntry) -> Manifest:
        return dataclasses.replace(self, engines={**self.engines, name: entry})

    def with_precision(self, name: str, entry: PrecisionEntry) -> Manifest:
        return dataclasses.replace(self, precisions={**self.precisions, name: entry})


# ------------------------------------------------------------------------------------------------------ files
def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Return the hex sha256 of a file, read in chunks so multi-GB weights do not load into memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_entries(root: Path, paths: list[Path] | tuple[Path, ...]) -> dict[str, FileEntry]:
    """``{path relative to root: FileEntry}`` for files about to be listed in the manifest."""
    return {p.relative_to(root).as_posix(): FileEntry(sha256_file(p), p.stat().st_size) for p in paths}


def read_manifest(root: str | Path) -> Manifest:
    """Read and check ``root/manifest.json``.

    Raises:
        ArtifactError: the directory or manifest is missing, unreadable, of another schema version, or a field
            is missing or malformed (named in the message).
    """
    root = Path(root)
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise ArtifactError(f"{root} is not an artifact directory; create one with `memrerank export MODEL -o {root}`")
    if not path.is_file():
        raise ArtifactError(f"{path} is missing; re-export with `memrerank export MODEL -o {root} --force`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); re-export with `memrerank export --force`") from exc
    try:
        return Manifest.from_dict(data)
    except ArtifactError as exc:
        raise ArtifactError(f"{root}: {exc}") from None


def write_manifest(root: str | Path, manifest: Manifest) -> Manifest:
    """Write ``root/manifest.json`` atomically: a temporary file in the same directory, fsync, rename.

    The JSON is parsed back before anything is written, so nothing writes a manifest the runtime would
    refuse (a block built with a wrong type or value fails here, named). A reader (or a crash) sees the old
    manifest or the new one, never a mix.

    Returns:
        The manifest as written, as :func:`read_manifest` will read it.

    Raises:
        ArtifactError: the manifest would not read back (the message names the field).
        TypeError: ``manifest`` is not a :class:`Manifest`.
    """
    if not isinstance(manifest, Manifest):
        raise TypeError(f"write_manifest takes a Manifest, got {type(manifest).__name__}; "
                        "build one with Manifest.from_dict")
    root = Path(root)
    data = manifest.to_dict()
    typed = Manifest.from_dict(data)
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{MANIFEST_NAME}.", suffix=".tmp", dir=root)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, root / MANIFEST_NAME)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # the rename itself survives a power cut only once the directory entry is on disk
        dir_fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    return typed


def is_weight_data(rel: str) -> bool:
    """Whether an artifact file is an ONNX graph's external data: raw tensor bytes that onnxruntime copies (and
    prepacks) but never parses; the graph that names them, its shapes and offsets, is the parsed part."""
    return rel.endswith((".onnx_data", ".onnx.data"))


def artifact_path(root: str | Path, rel: str) -> Path:
    """``root/rel`` with every symlink resolved, refused unless it is inside ``root`` (resolved too).

    Raises:
        ArtifactError: ``rel`` is absolute or climbs out with ``..``, or a symlink on the way leads out of the
            artifact directory.
    """
    problem = relative_path_problem(rel)
    if problem:
        raise ArtifactError(f"{root}: the manifest names {rel!r}, which {problem}; {_INSIDE_ONLY}")
    base = Path(root).resolve()
    real = (base / rel).resolve()
    if real != base and base not in real.parents:
        raise ArtifactError(
            f"{Path(root) / rel} leads out of the artifact directory (to {real}, through a symlink); an artifact's "
            f"files must be inside it: copy the file in instead of linking it (huggingface_hub's "
            f"snapshot_download(..., local_dir=DIR) writes real files), or re-export with "
            f"`memrerank export MODEL -o {root} --force`")
    return real


_T = TypeVar("_T")
_O_FLAGS = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0)


@dataclass
class _Opened:
    """One artifact file opened once: its descriptor and what ``fstat`` said when it was opened."""

    rel: str
    real: Path
    fd: int
    stat: os.stat_result


def _identity(st: os.stat_result) -> tuple[int, ...]:
    # ctime too: unlike mtime, no ordinary call (utime) can set it back after a file is rewritten in place
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def verify_files(root: str | Path, files: Mapping[str, FileEntry]) -> None:
    """Check that each listed file is inside ``root``, present, of its size and sha256 (read in chunks).

    This says what the files hold now, not what a later ``open`` reads: to load, use :func:`load_verified`.

    Raises:
        ArtifactError: naming the first file that is outside the artifact, missing, truncated or altered.
    """
    load_verified(root, files, lambda contents: None, by_path=tuple(files))


def verify_files_while(root: str | Path, files: Mapping[str, FileEntry], load: Callable[[], _T]) -> _T:
    """:func:`load_verified` for a ``load()`` that opens every file itself by path: each is hashed through a
    descriptor opened before ``load`` runs (the weight data while it runs) and must still be the same file
    (device, inode, size, mtime, ctime) once it returned."""
    return load_verified(root, files, lambda contents: load(), by_path=tuple(files))


def load_verified(root: str | Path, files: Mapping[str, FileEntry], load: Callable[[Mapping[str, bytes]], _T], *,
                  by_path: Collection[str] = ()) -> _T:
    """Check the listed files and hand ``load`` what was checked; returns what ``load`` returns.

    Every file must resolve inside ``root`` (:func:`artifact_path`), be a regular file and have the recorded
    size before anything is hashed. Then what is hashed is what is loaded:

    * each file a parser reads (graph, tokenizer, configs, TensorRT engine), unless named in ``by_path``, is read
      once into memory, its sha256 checked on those bytes, and the bytes handed to ``load`` (``contents[rel]``):
      nothing opens it again, so a concurrent ``export --force`` cannot slip another file in between the check
      and the parse. Loading then holds the file in memory once more than a parser reading it itself would;
      graphs above 1 GiB keep their weights in external data, which is not read here.
    * the external weight data (:func:`is_weight_data`), most of an artifact's bytes, is opened before ``load``
      runs and hashed through that descriptor on a thread while ``load`` builds its session (hashing a 1.5 GiB
      int8 decoder takes ~1.1 s, building its onnxruntime session ~1.5 s: overlapped, cold start loses the
      hash). onnxruntime opens it by path, so the guarantee is this: after ``load`` returned, the path still
      names the very file that was hashed (same device and inode) and that file was not written meanwhile
      (same size, mtime and ctime as when it was opened). ``export --force`` swaps whole directories by
      rename and never rewrites a file in place, so a load that overlaps it gets the file it hashed or fails;
      what could still pass is a path renamed away and back between the two checks, or a file rewritten
      without a change of ctime (which takes setting the system clock back). The graph names its data file;
      as the graph's own bytes were hash-checked, the name is the one export wrote.
    * files in ``by_path`` (a parser that can only open a path) are hashed through a descriptor opened
      before ``load`` and held to the same same-file check afterwards.

    The result is handed back only once every hash matched and every file checked above was unchanged: an
    altered weight file fails the load, its session dropped unused.

    Args:
        root: the artifact directory.
        files: ``{path relative to root: FileEntry}`` from the manifest.
        load: builds what the files are for from ``contents`` (``{rel: bytes}`` of the files read).
        by_path: files ``load`` opens by path itself (not read into ``contents``).

    Raises:
        ArtifactError: naming the first file that is outside the artifact, missing, truncated, altered or
            changed while loading (an altered weight file wins over ``load``'s own error, which it likely
            caused).
    """
    import threading

    opened: dict[str, _Opened] = {}
    try:
        for rel, meta in files.items():
            opened[rel] = _open_checked(root, rel, meta)
        contents: dict[str, bytes] = {}
        for rel, meta in files.items():
            if is_weight_data(rel):
                continue
            if rel in by_path:
                _check_digest(root, opened[rel], meta, _sha256_fd(opened[rel].fd))
            else:
                contents[rel] = _read_checked(root, opened[rel], meta)
        later = [rel for rel in files if is_weight_data(rel)]
        watched = [rel for rel in files if is_weight_data(rel) or rel in by_path]
        failed: list[BaseException] = []

        def check() -> None:
            try:
                for rel in later:
                    _check_digest(root, opened[rel], files[rel], _sha256_fd(opened[rel].fd))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                failed.append(exc)

        hashing = threading.Thread(target=check, name="memrerank-sha256", daemon=True)
        if later:
            hashing.start()
        try:
            result = load(contents)
        except BaseException:
            if later:
                hashing.join()
            if failed:
                raise failed[0] from None
            raise
        del contents
        if later:
            hashing.join()
        if failed:
            raise failed[0]
        for rel in watched:
            _check_unchanged(root, opened[rel])
        return result
    finally:
        for o in opened.values():
            os.close(o.fd)


def _reexport(root: str | Path) -> str:
    return f"re-export with `memrerank export MODEL -o {root} --force`"


def _open_checked(root: str | Path, rel: str, meta: FileEntry) -> _Opened:
    real = artifact_path(root, rel)
    path = Path(root) / rel
    if not real.is_file():
        raise ArtifactError(f"{path} is missing; {_reexport(root)}")
    try:
        fd = os.open(real, _O_FLAGS)
    except OSError as exc:
        raise ArtifactError(f"{path} could not be opened ({exc}); {_reexport(root)}") from exc
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size != meta.bytes:
        os.close(fd)
        what = "is not a regular file" if not stat.S_ISREG(st.st_mode) else (
            f"has {st.st_size} bytes, the manifest records {meta.bytes} (truncated or replaced)")
        raise ArtifactError(f"{path} {what}; {_reexport(root)}")
    return _Opened(rel, real, fd, st)


def _sha256_fd(fd: int, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    while block := os.read(fd, chunk):
        digest.update(block)
    return digest.hexdigest()


def _read_checked(root: str | Path, o: _Opened, meta: FileEntry) -> bytes:
    os.lseek(o.fd, 0, os.SEEK_SET)
    with os.fdopen(o.fd, "rb", closefd=False) as fh:
        data = fh.read()
    if len(data) != meta.bytes:
        raise ArtifactError(f"{Path(root) / o.rel} changed while it was read ({len(data)} bytes, the manifest "
                            f"records {meta.bytes}); load again, or {_reexport(root)}")
    _check_digest(root, o, meta, hashlib.sha256(data).hexdigest())
    return data


def _check_digest(root: str | Path, o: _Opened, meta: FileEntry, digest: str) -> None:
    if digest != meta.sha256:
        raise ArtifactError(f"{Path(root) / o.rel} does not match its sha256 in the manifest (corrupted or "
                            f"edited); {_reexport(root)}")


def _check_unchanged(root: str | Path, o: _Opened) -> None:
    """The file opened (and hashed) is still what its path names, unwritten since it was opened."""
    try:
        now = os.stat(o.real)
    except OSError:
        now = None
    if now is None or _identity(now) != _identity(o.stat) or _identity(os.fstat(o.fd)) != _identity(o.stat):
        raise ArtifactError(
            f"{Path(root) / o.rel} changed while the artifact was loading (replaced or rewritten, e.g. by a "
            "concurrent `memrerank export --force`): what was hashed may not be what was loaded; load again once "
            "the export has finished")
