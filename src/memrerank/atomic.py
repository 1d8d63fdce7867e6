"""Replace a directory so that a kill at any moment leaves the old one or the new one, never neither.

A job (``export``, ``rescore``) writes its result into a staging sibling ``.OUT.partial-TOKEN`` (``rescore``:
``.OUT.resume-TOKEN``, kept when the job dies so that ``--resume`` can finish it) and, when it is complete,
fsyncs every file and directory in it and swaps it in with two renames: ``OUT`` → ``.OUT.old-TOKEN``, then
staging → ``OUT``. POSIX has no portable atomic exchange of two non-empty directories, so a kill between the two
renames leaves no ``OUT``. :func:`recover` repairs that at the next start: it renames the orphaned
``.OUT.old-TOKEN`` back to ``OUT`` and removes what dead jobs left beside it.

Ownership: before it creates its staging directory a job writes a lock file ``.OUT.lock-TOKEN`` beside it, naming
its host (``socket.gethostname()``), the host's boot id, its process id and start time (ticks since boot, from
``/proc``) and the wall-clock start. :func:`recover` and a resuming ``rescore`` read it:

* a lock naming another host: that job is never touched (the process id means nothing here); it is reported,
  with the lock to delete by hand once that job is known to be gone;
* this host, another boot id: the job died in a reboot (stale);
* this host and boot: stale once the process id is gone, a zombie, or reused by a process with another start time.

Siblings without a lock (written before locks existed, or whose lock a person removed) fall back to the owner
their name encodes (``PID-START-RANDOM``: checked on this host; a bare ``RANDOM`` counts as stale). Where
liveness cannot be checked safely (Windows) they are left alone.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Owner", "Sibling", "adopt", "create_staging", "discard", "fsync_tree", "lock_path", "recover",
           "release", "siblings", "staging_path", "swap_into_place", "write_file_atomic"]

#: Test-only fault hook: called as ``_FAULT("swap")`` between the two renames of :func:`swap_into_place`
#: (after ``OUT`` was renamed aside, before the new directory is renamed in). Tests set it to raise or to
#: ``SIGKILL`` the process; it is ``None`` otherwise.
_FAULT: Callable[[str], None] | None = None

#: Directory kinds of :func:`staging_path`; ``resume`` directories are never removed by :func:`recover`.
_KINDS = ("partial", "old", "resume")
#: Tokens of the staging directories this process's jobs hold right now. A lock naming this very process is
#: "running" only while its token is here: a job interrupted by an exception it did not survive (Ctrl-C in a
#: notebook) is gone even though its process lives on (:func:`release`).
_HELD: set[str] = set()


def _process_stat(pid: int) -> tuple[str, int] | None:
    """``(state, start time in ticks since boot)`` of a process from ``/proc`` (Linux), else ``None``."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the command name (field 2) may hold spaces
        return fields[0], int(fields[19])  # fields 3 (state) and 22 (starttime) of proc(5)
    except (OSError, IndexError, ValueError):
        return None


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def _owner_alive(pid: int, start: int) -> bool:
    """Whether a process of this host may still be running (``True`` when it cannot be told)."""
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


@dataclass(frozen=True)
class Owner:
    """The job a lock file names: where and which process, and since when."""

    host: str
    pid: int
    start: int = 0  #: start time in ticks since boot (``/proc/PID/stat``), 0 when unknown
    boot_id: str = ""  #: ``/proc/sys/kernel/random/boot_id`` of its host, "" when unknown
    started: str = ""  #: UTC wall-clock start, for people

    @classmethod
    def current(cls) -> Owner:
        stat = _process_stat(os.getpid())
        return cls(socket.gethostname(), os.getpid(), stat[1] if stat else 0, _boot_id(),
                   time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    @classmethod
    def from_dict(cls, data: Any) -> Owner | None:
        try:
            return cls(str(data["host"]), int(data["pid"]), int(data.get("start", 0)), str(data.get("boot_id", "")),
                       str(data.get("started", "")))
        except (TypeError, KeyError, ValueError):
            return None

    def state(self) -> str:
        """``"running"``, ``"gone"`` or ``"other-host"`` (never judged from here)."""
        if self.host != socket.gethostname():
            return "other-host"
        here = _boot_id()
        if self.boot_id and here and self.boot_id != here:
            return "gone"  # this host rebooted since: no process of that boot runs
        return "running" if _owner_alive(self.pid, self.start) else "gone"

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host}" + (f", started {self.started}" if self.started else "")


@dataclass(frozen=True)
class Sibling:
    """One ``.OUT.<kind>-TOKEN`` directory a job left beside ``OUT``, with the owner its lock (or name) gives."""

    path: Path
    kind: str  #: ``partial``, ``old`` or ``resume``
    token: str
    owner: Owner | None  #: ``None``: no lock and no owner in the name (stale)
    lock: Path | None  #: its lock file, when there is one
    info: dict[str, Any] = field(default_factory=dict)  #: what the job stored in its lock besides its owner

    @property
    def state(self) -> str:
        if self.owner is None:
            return "gone"
        if _is_this_process(self.owner):
            return "running" if self.token in _HELD else "gone"
        if self.lock is None and self.owner.host == "":  # owner from the name only: a local check
            return "running" if _owner_alive(self.owner.pid, self.owner.start) else "gone"
        return self.owner.state()


def _is_this_process(owner: Owner) -> bool:
    if owner.pid != os.getpid() or owner.host not in ("", socket.gethostname()):
        return False
    stat = _process_stat(os.getpid())
    return not (owner.start and stat and stat[1] != owner.start)


def release(staging: str | Path) -> None:
    """Mark a staging directory this process keeps (for a later resume) as no longer held by a running job."""
    parts = _split(Path(staging))
    if parts is not None:
        _HELD.discard(parts[2])


def _new_token() -> str:
    owner = Owner.current()
    return f"{owner.pid}-{owner.start}-{uuid.uuid4().hex[:8]}"


def _pattern(out: Path) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(out.name)}\.(partial|old|resume|lock)-((?:(\d+)-(\d+)-)?[0-9a-f]+)$")


def staging_path(out: str | Path, kind: str = "partial", token: str | None = None) -> Path:
    """A sibling name ``.OUT.<kind>-PID-START-RANDOM`` for ``out`` (not created).

    Args:
        out: the directory the job replaces.
        kind: ``"partial"`` (the job's output being written), ``"resume"`` (the same, kept for ``--resume``
            when the job dies) or ``"old"`` (the previous ``out``, moved aside).
        token: the owner token to use (default: a new one for this process).
    """
    if kind not in _KINDS + ("lock",):
        raise ValueError(f"kind must be one of {', '.join(_KINDS)}, got {kind!r}")
    out = Path(out)
    return out.parent / f".{out.name}.{kind}-{token or _new_token()}"


def _split(staging: Path) -> tuple[Path, str, str] | None:
    """``(out, kind, token)`` of a staging path, or ``None`` when it is not one."""
    m = re.match(r"^\.(.+)\.(partial|old|resume)-((?:\d+-\d+-)?[0-9a-f]+)$", staging.name)
    return (staging.parent / m.group(1), m.group(2), m.group(3)) if m else None


def lock_path(staging: str | Path) -> Path:
    """The lock file ``.OUT.lock-TOKEN`` of a staging directory ``.OUT.<kind>-TOKEN``."""
    staging = Path(staging)
    parts = _split(staging)
    if parts is None:
        raise ValueError(f"{staging} is not a staging directory name (.OUT.partial-TOKEN)")
    out, _, token = parts
    return staging_path(out, "lock", token)


def _fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    if os.name != "nt":  # directories cannot be opened for fsync there
        _fsync(path)


def write_file_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a fsynced temporary sibling and a rename (the directory fsynced too)."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def _write_lock(lock: Path, info: dict[str, Any] | None) -> None:
    body = {"owner": asdict(Owner.current()), **(info or {})}
    write_file_atomic(lock, (json.dumps(body, indent=1, ensure_ascii=False) + "\n").encode())


def _read_lock(lock: Path) -> tuple[Owner | None, dict[str, Any]] | None:
    """The owner and the rest of a lock file; ``None`` when it is missing; ``(None, {})`` when unreadable."""
    try:
        data = json.loads(lock.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None, {}
    if not isinstance(data, dict):
        return None, {}
    owner = Owner.from_dict(data.get("owner"))
    return owner, {k: v for k, v in data.items() if k != "owner"}


def create_staging(out: str | Path, kind: str = "partial", info: dict[str, Any] | None = None) -> Path:
    """Write this job's lock beside ``out``, then create its empty staging directory; return the directory.

    Args:
        out: the directory the job will replace (its parent is created when missing).
        kind: ``"partial"`` (removed by :func:`recover` once the job is gone) or ``"resume"`` (kept for a
            resuming job).
        info: JSON-able facts stored in the lock beside the owner (``rescore``: the job's fingerprint).
    """
    if kind not in ("partial", "resume"):
        raise ValueError(f"kind must be partial or resume, got {kind!r}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(out, kind)
    lock = lock_path(staging)
    _write_lock(lock, info)  # first: a staging directory without its lock is never this job's
    try:
        staging.mkdir()
    except BaseException:
        with contextlib.suppress(OSError):
            lock.unlink()
        raise
    _HELD.add(_split(staging)[2])
    return staging


def adopt(staging: str | Path, info: dict[str, Any] | None = None) -> Path:
    """Take over a dead job's ``resume`` staging directory: a lock of this job, then a rename to its token.

    The rename fences the dead job's writers: a straggler still holding the old path can no longer add a file
    (its path is gone), so what the new job reads from the directory after this call is all there is.

    Raises:
        FileExistsError: another job took it over first.
    """
    staging = Path(staging)
    parts = _split(staging)
    if parts is None:
        raise ValueError(f"{staging} is not a staging directory name")
    out, kind, _ = parts
    new = staging_path(out, kind)
    lock = lock_path(new)
    _write_lock(lock, info)
    _HELD.add(_split(new)[2])
    try:
        os.rename(staging, new)
    except FileNotFoundError:
        release(new)
        with contextlib.suppress(OSError):
            lock.unlink()
        raise FileExistsError(f"{staging.name} was taken over by another job meanwhile") from None
    with contextlib.suppress(OSError):
        lock_path(staging).unlink()
    _fsync_dir(out.parent)
    return new


def discard(staging: str | Path) -> None:
    """Remove a staging directory, then its lock."""
    staging = Path(staging)
    _remove(staging)
    release(staging)
    with contextlib.suppress(ValueError, OSError):
        lock_path(staging).unlink()


def siblings(out: str | Path) -> list[Sibling]:
    """Every ``partial``/``old``/``resume`` directory beside ``out``, with its owner (lock first, else its name)."""
    out = Path(out)
    pattern = _pattern(out)
    try:
        entries = list(out.parent.iterdir())
    except OSError:  # no parent directory (yet): nothing to recover; writing there fails with its own error
        return []
    found = []
    for path in entries:
        m = pattern.match(path.name)
        if m is None or m.group(1) == "lock":
            continue
        kind, token, pid, start = m.groups()
        lock = staging_path(out, "lock", token)
        read = _read_lock(lock)
        info: dict[str, Any] = {}
        if read is not None:
            owner, info = read
            if owner is None:  # unreadable lock (a kill while it was written is impossible: it is renamed in)
                owner = Owner(socket.gethostname(), int(pid), int(start)) if pid else None
        else:
            lock = None
            owner = Owner("", int(pid), int(start)) if pid else None  # host "": judged on this host
        found.append(Sibling(path, kind, token, owner, lock, info))
    return found


def _orphan_locks(out: Path, tokens: set[str]) -> Iterator[Path]:
    """Lock files whose staging directory is gone (a job killed before its mkdir or after its swap)."""
    pattern = _pattern(out)
    with contextlib.suppress(OSError):
        for path in out.parent.iterdir():
            m = pattern.match(path.name)
            if m is not None and m.group(1) == "lock" and m.group(2) not in tokens:
                yield path


def recover(out: str | Path, log: Callable[[str], None] | None = None) -> list[str]:
    """Repair what a killed job left beside ``out``; call it before a job looks at ``out``.

    An ``.OUT.old-…`` sibling whose job is gone, with no ``OUT``, is the previous complete directory that a
    kill between the two renames of :func:`swap_into_place` left aside: it is renamed back to ``OUT`` (the
    newest, if several). Every other ``partial``/``old`` sibling of a gone job is removed, then its lock.
    ``resume`` siblings of gone jobs are kept (a resuming ``rescore`` finishes them) and reported. Siblings of
    running jobs are never touched, nor those whose lock names another host (reported).

    Args:
        out: the directory a job is about to write.
        log: receives one message per action or report.

    Returns:
        What was done or found, one message per sibling.
    """
    out = Path(out)
    done: list[str] = []
    found = siblings(out)
    states = {s.path: s.state for s in found}  # judged once: a process may exit while this runs
    stale = [s for s in found if states[s.path] == "gone"]
    for s in found:
        if states[s.path] == "other-host":
            what = s.lock.name if s.lock else "its lock"
            done.append(f"left {s.path.name} alone: its job runs on another host ({s.owner.describe()}); "
                        f"once that job is gone, delete {what} and it is cleaned up here")
    if not os.path.lexists(out):
        olds = sorted((s.path for s in stale if s.kind == "old"), key=_mtime, reverse=True)
        for old in olds:
            try:
                os.replace(old, out)
            except OSError:  # another process restored it (or made OUT) first
                continue
            done.append(f"restored {out} from {old.name}, left aside by an interrupted swap")
            break
    kept: set[str] = set()
    for s in stale:
        if s.kind == "resume":
            kept.add(s.token)
            done.append(f"kept {s.path.name}: the committed blocks of an interrupted rescore "
                        "(rescore --resume finishes it; --force without --resume discards it)")
        elif os.path.lexists(s.path):
            _remove(s.path)
            done.append(f"removed {s.path.name}, left by an interrupted job")
    for s in stale:
        if s.lock is not None and s.token not in kept:
            with contextlib.suppress(OSError):
                s.lock.unlink()
    live = {s.token for s in found if states[s.path] != "gone"} | kept
    for lock in _orphan_locks(out, live):
        read = _read_lock(lock)
        owner = read[0] if read else None
        if owner is None or owner.state() == "gone":
            with contextlib.suppress(OSError):
                lock.unlink()
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


def fsync_tree(root: str | Path) -> None:
    """fsync every file and directory under ``root`` (deepest first) and ``root`` itself, so that a rename of
    ``root`` never publishes data still in the page cache (a power loss after the swap keeps whole files)."""
    root = Path(root)
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                _fsync(path)
        _fsync_dir(Path(dirpath))


def swap_into_place(new: str | Path, out: str | Path, *, replace: bool = False) -> None:
    """Rename the complete directory ``new`` to ``out``, after fsyncing everything in it.

    Without ``replace`` an ``out`` that exists by now (other than an empty directory) is left as it is and
    :class:`FileExistsError` raised: a job that checked ``out`` at its start never clobbers one that appeared
    while it ran (the rename itself refuses, so there is no window between a check and the rename). With
    ``replace`` an existing ``out`` is renamed aside first and removed only once ``new`` is in place; an
    exception between the two renames puts it back at once, a kill there leaves it aside for :func:`recover`.
    The job's lock (:func:`create_staging`) is removed once ``new`` is in place.

    Args:
        new: the finished staging directory (a sibling of ``out``, from :func:`create_staging`).
        out: the destination.
        replace: replace an existing ``out`` (``--force``).

    Raises:
        FileExistsError: ``out`` exists and ``replace`` is false; ``new`` is left where it is.
    """
    new, out = Path(new), Path(out)
    fsync_tree(new)
    parts = _split(new)
    if not replace or not os.path.lexists(out):
        try:
            os.rename(new, out)  # onto nothing, or onto an empty directory; never onto a non-empty one
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise
            raise FileExistsError(f"{out} appeared while the job ran and was not replaced (pass --force / "
                                  "force=True to replace it)") from None
    else:
        old = staging_path(out, "old", parts[2] if parts else None)
        os.replace(out, old)
        try:
            if _FAULT is not None:
                _FAULT("swap")
            os.replace(new, out)
        except BaseException:
            os.replace(old, out)
            raise
        _remove(old)
    _fsync_dir(out.parent)
    if parts is not None:
        release(new)
        with contextlib.suppress(OSError):
            lock_path(new).unlink()
