"""Reading JSONL inputs (one object per line) with errors that name the option, file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["iter_jsonl"]


def iter_jsonl(path: str | Path, option: str) -> Iterator[tuple[str, Any]]:
    """Yield ``("FILE:LINE", parsed value)`` for each non-blank line.

    Raises:
        ValueError: the file is missing or a line is not JSON, naming ``option`` (e.g. ``--data``) and the line.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{option}: {path} does not exist")
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{n}", json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{option}: {path}:{n} is not JSON ({exc})") from exc
