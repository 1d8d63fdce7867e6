"""A hub id (or a Hugging Face checkpoint directory) where an artifact directory is expected.

``Reranker.load("Qwen/Qwen3-Reranker-0.6B", precision="int8")`` and every CLI command that takes an artifact accept
a model reference. The first use exports it into the cache — ``$MEMRERANK_CACHE``, else
``$XDG_CACHE_HOME/memrerank``, else ``~/.cache/memrerank`` — and later uses load it from there. A cached artifact
that lacks the precision asked for is re-exported with it added.

The export runs as ``python -m memrerank.cli export`` in a child process: the runtime never imports the exporter
(nor torch), and the memory the export takes is returned when the child exits. Offline, or without the ``export``
extra, the result is one :class:`~memrerank.errors.ArtifactError` line that names ``memrerank export``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from memrerank.errors import ArtifactError
from memrerank.manifest import MANIFEST_NAME, PRECISIONS, read_manifest

__all__ = ["cache_dir", "is_model_reference", "resolve_artifact", "artifact_cache_path"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
#: Precisions exported for ``precision="auto"`` on each kind of first provider.
_AUTO_EXPORT = {"CPUExecutionProvider": ("fp32", "int8"), "CUDAExecutionProvider": ("fp32", "fp16"),
                "TensorrtExecutionProvider": ("fp32", "fp16")}


def cache_dir() -> Path:
    """Where exported artifacts of model references are kept."""
    if os.environ.get("MEMRERANK_CACHE"):
        return Path(os.environ["MEMRERANK_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "memrerank"


def is_model_reference(path: str | Path) -> bool:
    """A checkpoint directory (``config.json``, no manifest) or a hub id (``org/name`` that is not a path here)."""
    p = Path(path)
    if p.is_dir():
        return not (p / MANIFEST_NAME).is_file() and (p / "config.json").is_file()
    return not p.exists() and bool(_HUB_ID.match(str(path))) and not looks_like_a_path(str(path))


def looks_like_a_path(text: str) -> bool:
    """Whether a name that does not exist means a local path rather than a hub id ``org/name``: it starts with
    ``/``, ``.`` or ``~``, holds a backslash or more than one ``/``, or its first component is a directory here
    (``arts/qwen3-rr`` with ``./arts`` present is a typo for a local artifact, never a download)."""
    if text.startswith(("/", ".", "~")) or "\\" in text or (os.sep != "/" and os.sep in text):
        return True
    parts = text.split("/")
    return len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).is_dir())


def artifact_cache_path(reference: str | Path, revision: str | None = None) -> Path:
    """The cache directory of one model reference (a local checkpoint is keyed by its absolute path)."""
    p = Path(reference)
    if p.is_dir():
        real = str(p.resolve())
        name = f"local--{p.resolve().name}-{hashlib.sha256(real.encode()).hexdigest()[:10]}"
    else:
        name = str(reference).replace("/", "--")
    if revision:
        name += "@" + re.sub(r"[^\w.-]", "_", revision)
    return cache_dir() / "artifacts" / name


def _wanted(precisions: Sequence[str], provider: str) -> tuple[str, ...]:
    out = ["fp32"]
    for p in precisions:
        if p != "auto" and p not in PRECISIONS:
            raise ValueError(f"precision: unknown {p!r}; choose one of {', '.join(PRECISIONS)} or 'auto'")
        out += _AUTO_EXPORT.get(provider, ("fp32",)) if p == "auto" else [p]
    return tuple(dict.fromkeys(out))


def resolve_artifact(reference: str | Path, precision: str | Sequence[str] = "fp32",
                     provider: str = "CPUExecutionProvider", *,
                     revision: str | None = None, quiet: bool = False) -> Path:
    """The artifact directory for ``reference``: itself when it is one, else the cache's (exported on first use).

    Args:
        reference: an artifact directory, a Hugging Face checkpoint directory, or a hub id.
        precision: the precision (or precisions) that will be loaded (``"auto"``: what ``auto`` picks on
            ``provider``).
        provider: the first provider it will run on.
        revision: hub revision (part of the cache key).
        quiet: hide the export's progress (it goes to stderr otherwise).

    Raises:
        ArtifactError: the reference is neither, or exporting it failed (offline, no export extra) — one line
            naming ``memrerank export``.
    """
    if not is_model_reference(reference):
        return Path(reference)
    out = artifact_cache_path(reference, revision)
    wanted = _wanted([precision] if isinstance(precision, str) else list(precision), provider)
    have: tuple[str, ...] = ()
    if (out / MANIFEST_NAME).is_file():
        try:
            have = tuple(read_manifest(out).precisions)
        except ArtifactError:
            have = ()  # unreadable cache entry: export it again
        if set(wanted) <= set(have):
            return out
    _export(str(reference), out, tuple(dict.fromkeys((*have, *wanted))), revision, quiet)
    return out


def _export(reference: str, out: Path, precisions: Sequence[str], revision: str | None, quiet: bool) -> None:
    missing = [m for m in ("torch", "transformers", "optimum") if importlib.util.find_spec(m) is None]
    how = f"`memrerank export {reference} -o DIR` and load DIR"
    if missing:
        raise ArtifactError(f"{reference} is not an artifact directory and exporting it needs the export extra "
                            f"({', '.join(missing)} missing): pip install \"memrerank[export]\", or run {how} "
                            "where it is installed")
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "memrerank.cli", "export", reference, "-o", str(out), "--precision",
           ",".join(precisions), "--force", "--json"]
    if revision:
        cmd += ["--revision", revision]
    if not quiet:
        print(f"memrerank: exporting {reference} ({', '.join(precisions)}) into {out} (first use)", file=sys.stderr)
    # stderr is relayed line by line (the export's progress) and its last line kept for the error message
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    last = ""
    for line in child.stderr:
        if line.strip():
            last = line.strip()
        if not quiet:
            sys.stderr.write(line)
    if child.wait() != 0:
        raise ArtifactError(f"{reference}: exporting it into the cache failed ({last or f'exit {child.returncode}'})"
                            f"; if the hub is unreachable, run {how} on a machine that reaches it (or on a local "
                            "checkpoint)")
