"""Peak resident memory of a process tree (this process and every descendant).

A pipeline like the demo runs its work in subprocesses, several at once (servers
and simulated arms), so neither this process's own peak nor any single child's is
what the machine needed. A background thread sums VmRSS over the tree from /proc
every `interval_s` and keeps the maximum. Linux only; elsewhere it reports None.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

PROC = Path("/proc")


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        # "pid (comm) state ppid ...": comm may hold spaces or parentheses.
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def _rss_bytes(pid: int) -> int:
    try:
        for line in (PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_rss_bytes(root: int | None = None) -> int:
    """Current resident memory of `root` (default: this process) and all its descendants."""
    root = os.getpid() if root is None else root
    children = _children_map()
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += _rss_bytes(pid)
        stack.extend(children.get(pid, ()))
    return total


class PeakMemory:
    """with PeakMemory() as peak: ...; peak.peak_mb -> the largest tree total seen (None off Linux)."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.available = (PROC / "self" / "status").exists()
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        self._peak = max(self._peak, tree_rss_bytes())

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> "PeakMemory":
        if self.available:
            self._sample()
            self._thread = threading.Thread(target=self._loop, name="peak-memory", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._sample()

    @property
    def peak_mb(self) -> float | None:
        return self._peak / 2**20 if self.available else None
