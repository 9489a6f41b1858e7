"""Ctrl-C that waits for a native call to return.

Python raises KeyboardInterrupt at the next bytecode, wherever that is. Inside a
callback from compiled code (robosuite's numba controller runs inside every
`env.step`) the exception comes out as a SystemError, so the command crashes
instead of stopping in order. `install` makes SIGINT (and SIGTERM, for batch
commands) raise KeyboardInterrupt as before, except inside `shielded()`: there
the signal is remembered and raised when the block ends.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

_depth = 0
_pending = False


def _handler(signum, frame) -> None:
    global _pending
    if _depth:
        _pending = True
        return
    raise KeyboardInterrupt


def install(*signums: int) -> dict[int, object]:
    """Route these signals through the shield. Returns the handlers replaced, for
    `restore`; empty when not on the main thread (signals belong to it)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, _handler) for s in signums}


def restore(previous: dict[int, object]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


@contextmanager
def shielded() -> Iterator[None]:
    """Defer an interrupt that arrives in this block to its end."""
    global _depth, _pending
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if not _depth and _pending:
            _pending = False
            raise KeyboardInterrupt
