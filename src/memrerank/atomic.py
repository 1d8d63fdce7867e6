"""Replace a directory so that a kill at any moment leaves the old one or the new one, never neither.

A job (``export``, ``rescore --force``) writes its result into a staging sibling ``.OUT.partial-…``
and, when it is complete, swaps it in with two renames: ``OUT`` → ``.OUT.old-…``, then ``.OUT.partial-…`` →
``OUT``. POSIX has no portable atomic exchange of two non-empty directories, so a kill between the two renames
leaves no ``OUT``. :func:`recover` repairs that at the next start: it renames the orphaned ``.OUT.old-…``
back to ``OUT`` and removes every sibling whose job is gone.

Sibling names carry their job's process id and start time (``.OUT.partial-PID-START-RANDOM``), so recovery
never touches the siblings of a job that is still running (a concurrent export or rescore of the same
``OUT``), even when an old process id has been reused. Where liveness cannot be checked safely (Windows)
siblings are left alone.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

__all__ = ["recover", "staging_path", "swap_into_place"]

#: Test-only fault hook: called as ``_FAULT("swap")`` between the two renames of :func:`swap_into_place`
#: (after ``OUT`` was renamed aside, before the new directory is renamed in). Tests set it to raise or to
#: ``SIGKILL`` the process; it is ``None`` otherwise.
_FAULT: Callable[[str], None] | None = None

_KINDS = ("partial", "old")


def _process_stat(pid: int) -> tuple[str, int] | None:
    """``(state, start time in ticks since boot)`` of a process from ``/proc`` (Linux), else ``None``."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the command name (field 2) may hold spaces
        return fields[0], int(fields[19])  # fields 3 (state) and 22 (starttime) of proc(5)
    except (OSError, IndexError, ValueError):
        return None


def _owner_token() -> str:
    stat = _process_stat(os.getpid())
    return f"{os.getpid()}-{stat[1] if stat else 0}-{uuid.uuid4().hex[:8]}"


def _owner_alive(pid: int, start: int) -> bool:
    """Whether the process that named a sibling may still be running (``True`` when it cannot be told)."""
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there; no safe probe
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    except OSError:
        return True
    stat = _process_stat(pid)
    if stat is None:
        return True
    state, started = stat
    if state in ("Z", "X"):  # killed, not yet reaped by its parent
        return False
    return not (start and started != start)  # a different start time: the id was reused


def staging_path(out: str | Path, kind: str = "partial") -> Path:
    """A fresh sibling name ``.OUT.<kind>-PID-START-RANDOM`` for ``out`` (not created).

    Args:
        out: the directory the job replaces.
        kind: ``"partial"`` (the job's output being written) or ``"old"`` (the previous ``out``, moved aside).
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {', '.join(_KINDS)}, got {kind!r}")
    out = Path(out)
    return out.parent / f".{out.name}.{kind}-{_owner_token()}"


def _siblings(out: Path) -> list[tuple[Path, str, bool]]:
    """``(path, kind, stale)`` of every partial/old sibling of ``out``.

    Siblings named before owners were recorded (``.OUT.partial-RANDOM``) count as stale.
    """
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(partial|old)-(?:(\d+)-(\d+)-)?[0-9a-f]+$")
    found = []
    try:
        entries = list(out.parent.iterdir())
    except OSError:  # no parent directory (yet): nothing to recover; writing there fails with its own error
        return []
    for path in entries:
        match = pattern.match(path.name)
        if match is None:
            continue
        kind, pid, start = match.groups()
        stale = pid is None or not _owner_alive(int(pid), int(start))
        found.append((path, kind, stale))
    return found


def recover(out: str | Path, log: Callable[[str], None] | None = None) -> list[str]:
    """Repair what a killed job left beside ``out``; call it before a job looks at ``out``.

    An ``.OUT.old-…`` sibling whose job is gone, with no ``OUT``, is the previous complete directory that a
    kill between the two renames of :func:`swap_into_place` left aside: it is renamed back to ``OUT`` (the
    newest, if several). Every other stale partial/old sibling is removed. Siblings of running jobs are never
    touched.

    Args:
        out: the directory a job is about to write.
        log: receives one message per action.

    Returns:
        What was done, one message per sibling.
    """
    out = Path(out)
    done: list[str] = []
    stale = [(p, kind) for p, kind, is_stale in _siblings(out) if is_stale]
    if not os.path.lexists(out):
        olds = sorted((p for p, kind in stale if kind == "old"), key=_mtime, reverse=True)
        for old in olds:
            try:
                os.replace(old, out)
            except OSError:  # another process restored it (or made OUT) first
                continue
            done.append(f"restored {out} from {old.name}, left aside by an interrupted swap")
            break
    for path, _ in stale:
        if os.path.lexists(path):
            _remove(path)
            done.append(f"removed {path.name}, left by an interrupted job")
    for message in done:
        if log is not None:
            log(message)
    return done


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:
            pass


def swap_into_place(new: str | Path, out: str | Path) -> None:
    """Rename the complete directory ``new`` to ``out``, replacing any ``out``.

    An existing ``out`` is renamed aside first and removed only once ``new`` is in place. An exception between
    the two renames puts it back at once; a kill there leaves it aside for :func:`recover` to put back.

    Args:
        new: the finished staging directory (a sibling of ``out``, from :func:`staging_path`).
        out: the destination.
    """
    new, out = Path(new), Path(out)
    if not os.path.lexists(out):
        os.replace(new, out)
        return
    old = staging_path(out, "old")
    os.replace(out, old)
    try:
        if _FAULT is not None:
            _FAULT("swap")
        os.replace(new, out)
    except BaseException:
        os.replace(old, out)
        raise
    _remove(old)
