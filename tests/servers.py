"""A real uvicorn server for the serve tests: a free loopback port, and the server run in a thread."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(server: Any) -> Iterator[Any]:
    """Run a ``uvicorn.Server`` in a daemon thread until the block ends (started within 30 s, or the test fails)."""
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started
    try:
        yield server
    finally:
        server.should_exit = True
        thread.join(10)
