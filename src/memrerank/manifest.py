"""The artifact contract: ``OUT/manifest.json`` and the files it names.

Export writes it, everything else only reads it. This module holds what both sides must agree on: the schema
version, the precision names, the tolerances, and the read/verify helpers. It imports nothing heavy.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from memrerank.errors import ArtifactError

__all__ = [
    "SCHEMA_VERSION",
    "MANIFEST_NAME",
    "TOKENIZER_NAME",
    "FAMILIES",
    "PRECISIONS",
    "PARITY_TOLERANCE",
    "PRECISION_PROVIDERS",
    "AUTO_ORDER",
    "pick_auto_precision",
    "sha256_file",
    "read_manifest",
    "model_files",
    "verify_files",
]

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "tokenizer.json"

#: Reranker families an artifact can hold (``manifest["family"]``).
FAMILIES = ("decoder-yes-no", "encoder-cross")

#: Precisions, defined once: CLI choices, manifest keys and test parametrisation all use this tuple.
PRECISIONS = ("fp32", "fp16", "int8", "int8-static")

#: Max |Δlogit| allowed at export: fp32 vs the PyTorch reference, fp16 vs the fp32 graph. Quantized precisions
#: are gated by the ranking fidelity budget instead (memrerank.export.fidelity.FidelityBudget); their max |Δlogit|
#: is recorded, not bounded.
PARITY_TOLERANCE = {"fp32": 1e-4, "fp16": 5e-2, "int8": None, "int8-static": None}

#: Providers each precision is meant for, best first (``precision="auto"`` uses this).
PRECISION_PROVIDERS = {
    "fp32": ("CPUExecutionProvider", "CUDAExecutionProvider"),
    "fp16": ("CUDAExecutionProvider", "TensorrtExecutionProvider"),
    "int8": ("CPUExecutionProvider",),
    "int8-static": ("CPUExecutionProvider", "TensorrtExecutionProvider"),
}

#: ``precision="auto"`` preference per provider: the first exported precision that met its budget wins.
AUTO_ORDER = {
    "CPUExecutionProvider": ("int8", "int8-static", "fp32"),
    "CUDAExecutionProvider": ("fp16", "fp32"),
    "TensorrtExecutionProvider": ("fp16", "int8-static", "fp32"),
}


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Return the hex sha256 of a file, read in chunks so multi-GB weights do not load into memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(root: str | Path) -> dict[str, Any]:
    """Read and check ``root/manifest.json``.

    Raises:
        ArtifactError: the directory or manifest is missing, unreadable, or of another schema version.
    """
    root = Path(root)
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise ArtifactError(f"{root} is not an artifact directory; create one with `memrerank export MODEL -o {root}`")
    if not path.is_file():
        raise ArtifactError(f"{path} is missing; re-export with `memrerank export MODEL -o {root} --force`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); re-export with `memrerank export --force`") from exc
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if version != SCHEMA_VERSION:
        raise ArtifactError(
            f"{path} has schema_version {version!r}, this memrerank reads {SCHEMA_VERSION}; "
            "re-export the model with this version (`memrerank export MODEL -o OUT --force`)"
        )
    if manifest.get("family") not in FAMILIES:
        raise ArtifactError(f"{path} names family {manifest.get('family')!r}; known families: {', '.join(FAMILIES)}")
    return manifest


def model_files(manifest: dict[str, Any], precision: str) -> dict[str, dict[str, Any]]:
    """Return ``{relative path: {"sha256", "bytes"}}`` for one precision, or raise naming what exists."""
    entries = manifest.get("precisions", {})
    if precision not in entries:
        have = ", ".join(sorted(entries)) or "none"
        raise ArtifactError(
            f"this artifact has no {precision!r} precision (it has: {have}); "
            f"export it with `memrerank export MODEL -o OUT --precision {precision} --force`"
        )
    return entries[precision]["files"]


def verify_files(root: str | Path, files: dict[str, dict[str, Any]]) -> None:
    """Check presence, size and sha256 of each listed file before anything parses it.

    Raises:
        ArtifactError: naming the first file that is missing, truncated or altered.
    """
    root = Path(root)
    for rel, meta in files.items():
        path = root / rel
        if not path.is_file():
            raise ArtifactError(f"{path} is missing; re-export with `memrerank export MODEL -o {root} --force`")
        size = path.stat().st_size
        if size != meta["bytes"]:
            raise ArtifactError(
                f"{path} has {size} bytes, the manifest records {meta['bytes']} (truncated or replaced); "
                f"re-export with `memrerank export MODEL -o {root} --force`"
            )
        if sha256_file(path) != meta["sha256"]:
            raise ArtifactError(
                f"{path} does not match its sha256 in the manifest (corrupted or edited); "
                f"re-export with `memrerank export MODEL -o {root} --force`"
            )


def pick_auto_precision(manifest: dict[str, Any], provider: str) -> str:
    """The best exported precision for ``provider`` among those that met their fidelity budget."""
    entries = manifest.get("precisions", {})
    for name in AUTO_ORDER.get(provider, ("fp32",)):
        entry = entries.get(name)
        if entry is not None and entry.get("fidelity", {}).get("meets_budget", True):
            return name
    return "fp32"
