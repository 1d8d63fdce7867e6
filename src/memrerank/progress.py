"""Progress for the long jobs (export, calibrate, bench, eval): a tqdm bar on a terminal, nothing elsewhere.

Bars go to stderr and only when it is a terminal (``enabled=None``), so logs, pipes and CI stay clean; the CLI's
``--quiet`` turns them off. :class:`Steps` also times each step, for the "time per step" summary export prints and
records.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

__all__ = ["on_terminal", "bar", "Steps"]

T = TypeVar("T")


def on_terminal() -> bool:
    """Whether stderr is an interactive terminal (where a progress bar helps rather than litters)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _tqdm(**kwargs: Any) -> Any:
    from tqdm.auto import tqdm

    return tqdm(file=sys.stderr, dynamic_ncols=True, leave=False, **kwargs)


def bar(iterable: Iterable[T], *, desc: str, total: int | None = None, enabled: bool | None = None,
        unit: str = "it") -> Iterator[T]:
    """``iterable``, with a progress bar while it is consumed when ``enabled`` (default: on a terminal)."""
    if not (on_terminal() if enabled is None else enabled):
        yield from iterable
        return
    progress = _tqdm(total=total if total is not None else _len(iterable), desc=desc, unit=unit)
    try:
        for item in iterable:
            yield item
            progress.update(1)
    finally:
        progress.close()


def _len(iterable: Iterable[Any]) -> int | None:
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None


class Steps:
    """Named steps of one job: a bar that advances per step (when enabled) and each step's wall time.

    Usage: ``steps.start("building int8")`` at each step; ``steps.finish()`` at the end returns
    ``{step: seconds}``. ``log`` messages printed while the bar is shown go through tqdm so the bar stays whole.
    """

    def __init__(self, total: int, *, desc: str, enabled: bool | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.enabled = on_terminal() if enabled is None else enabled
        self.seconds: dict[str, float] = {}
        self._current: str | None = None
        self._t0 = 0.0
        self._bar = _tqdm(total=total, desc=desc, unit="step") if self.enabled else None
        self._log = log

    def log(self, message: str) -> None:
        """Print a log line without breaking the bar."""
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        elif self._log is not None:
            self._log(message)

    def start(self, name: str) -> None:
        self._close_current()
        self._current, self._t0 = name, time.perf_counter()
        if self._bar is not None:
            self._bar.set_postfix_str(name)

    def _close_current(self) -> None:
        if self._current is not None:
            self.seconds[self._current] = self.seconds.get(self._current, 0.0) + time.perf_counter() - self._t0
            if self._bar is not None:
                self._bar.update(1)
            self._current = None

    def finish(self) -> dict[str, float]:
        self._close_current()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        return dict(self.seconds)

    def summary(self) -> str:
        """``step 1.2 s, step 3.4 s`` for the steps finished so far."""
        return ", ".join(f"{name} {sec:.1f} s" for name, sec in self.seconds.items())
