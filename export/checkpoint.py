"""A safetensors checkpoint read one tensor at a time, without torch.

The streaming export (:func:`memrerank.export.fused.write_fused_graph` with a :class:`Checkpoint`) writes each
weight of the graph as soon as it is read, so the model is never whole in memory: a 4B checkpoint (8 GB in bf16,
16 GB in fp32) is read tensor by tensor, each converted to float32 on its own. The files are the checkpoint's own
``model.safetensors`` or the shards its ``model.safetensors.index.json`` lists; bf16 (the hub's usual dtype), fp16
and fp32 tensors are read (bf16 → fp32 is exact: its bits are the upper half of the fp32 value).

The format (https://github.com/huggingface/safetensors): 8 bytes little-endian header length, a JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}}`` (offsets relative to the end of the header), then the
data.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Checkpoint", "SAFETENSORS_DTYPES"]

#: safetensors dtypes read here → the numpy dtype of their bytes (bf16 read as uint16, then widened).
SAFETENSORS_DTYPES = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


class Checkpoint:
    """The tensors of a local safetensors checkpoint by name, each read on demand.

    Args:
        root: the checkpoint directory (``model.safetensors``, or shards listed in ``model.safetensors.index.json``).

    Raises:
        FileNotFoundError: no safetensors weights in ``root`` (the message says what to do).
        ValueError: a file that is not safetensors, a tensor outside its file, or a dtype not read here.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        index = self.root / _INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (self.root / _SINGLE).is_file():
            files = [_SINGLE]
        else:
            raise FileNotFoundError(
                f"{self.root}: no {_SINGLE} or {_INDEX}; the streaming export reads safetensors weights only "
                "(convert a pickle checkpoint with transformers' save_pretrained(safe_serialization=True))")
        #: name → (file, dtype, shape, absolute byte offset, byte length)
        self._where: dict[str, tuple[Path, str, tuple[int, ...], int, int]] = {}
        for name in files:
            path = self.root / name
            if path.resolve().parent != self.root.resolve():
                raise ValueError(f"{index}: shard {name!r} is outside the checkpoint directory")
            self._read_header(path)

    def _read_header(self, path: Path) -> None:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{path}: not a safetensors file (shorter than its header length)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 << 20):
                raise ValueError(f"{path}: not a safetensors file (header length {n} beyond the file)")
            header = json.loads(f.read(n))
        start = 8 + n
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            begin, end = meta["data_offsets"]
            shape = tuple(int(d) for d in meta["shape"])
            dtype = meta["dtype"]
            if not 0 <= begin <= end <= size - start:
                raise ValueError(f"{path}: tensor {name!r} lies outside the file (truncated download?)")
            if dtype in SAFETENSORS_DTYPES:
                expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(SAFETENSORS_DTYPES[dtype]).itemsize
                if end - begin != expected:
                    raise ValueError(f"{path}: tensor {name!r} has {end - begin} bytes, its shape {shape} needs "
                                     f"{expected}")
            self._where[name] = (path, dtype, shape, start + begin, end - begin)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self) -> list[str]:
        """Every tensor name, in file order."""
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[self._key(name)][2]

    def dtypes(self) -> dict[str, int]:
        """How many tensors of each safetensors dtype."""
        out: dict[str, int] = {}
        for _, dtype, _, _, _ in self._where.values():
            out[dtype] = out.get(dtype, 0) + 1
        return out

    def nbytes(self) -> int:
        """The tensor data's size on disk."""
        return sum(w[4] for w in self._where.values())

    def _key(self, name: str) -> str:
        if name not in self._where:
            raise KeyError(f"{self.root}: the checkpoint has no tensor {name!r}")
        return name

    def tensor(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a new float32 array (read from disk now; nothing is cached)."""
        path, dtype, shape, offset, length = self._where[self._key(name)]
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} is {dtype}; the streaming export reads "
                             f"{', '.join(SAFETENSORS_DTYPES)} checkpoints")
        raw = np.fromfile(path, dtype=SAFETENSORS_DTYPES[dtype], count=length // np.dtype(
            SAFETENSORS_DTYPES[dtype]).itemsize, offset=offset)
        if dtype == "BF16":
            out = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            out = raw.astype(np.float32, copy=False)
        return out.reshape(shape)

    def rows(self, name: str, rows: Any) -> np.ndarray:
        """Rows ``rows`` of a 2-D tensor as float32, reading those rows only (e.g. the yes/no rows of a
        150k-row output head)."""
        path, dtype, shape, offset, _ = self._where[self._key(name)]
        if len(shape) != 2 or dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} ({dtype}, {shape}) is not a 2-D float tensor")
        item = np.dtype(SAFETENSORS_DTYPES[dtype])
        out = []
        for r in np.asarray(rows, dtype=np.int64).reshape(-1):
            if not 0 <= r < shape[0]:
                raise IndexError(f"{name}: row {r} outside its {shape[0]} rows")
            raw = np.fromfile(path, dtype=item, count=shape[1], offset=offset + int(r) * shape[1] * item.itemsize)
            out.append((raw.astype(np.uint32) << 16).view(np.float32) if dtype == "BF16" else raw.astype(np.float32))
        return np.stack(out) if out else np.empty((0, shape[1]), np.float32)

    def describe(self) -> dict[str, Any]:
        return {"files": sorted({str(w[0].name) for w in self._where.values()}), "tensors": len(self._where),
                "dtypes": self.dtypes(), "bytes": self.nbytes()}

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.root)!r}, {len(self._where)} tensors)"
