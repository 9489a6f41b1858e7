"""An added inference delay for the realtime arm: replies held back on the robot clock.

`dpstack sim --extra-latency-ms D` (and `dpstack eval --extra-latency-ms ...`) adds D
between observation capture and the answer's arrival: a reply the link delivers at
robot time t reaches the arm at t + D. Robot time, not wall time, so a pause of the
simulated world (a render, an overrun) pauses the delay too. Meanwhile the arm
executes what it has, as it does while any answer is on its way.
"""
from __future__ import annotations

import collections
import math
from typing import Generic, TypeVar

T = TypeVar("T")


class DelayLine(Generic[T]):
    """First in, first out; each item comes out `delay_s` robot seconds after it went in."""

    def __init__(self, delay_s: float) -> None:
        if not 0 <= delay_s < math.inf:  # NaN too
            raise ValueError(f"delay must be a finite number >= 0, got {delay_s}")
        self.delay_s = float(delay_s)
        self._items: collections.deque[tuple[float, T]] = collections.deque()

    def push(self, item: T, now: float) -> None:
        self._items.append((now + self.delay_s, item))

    def pop_due(self, now: float) -> list[T]:
        """The items whose time has come, oldest first."""
        out = []
        while self._items and self._items[0][0] <= now:
            out.append(self._items.popleft()[1])
        return out

    def next_due(self) -> float | None:
        """Robot time the oldest item comes out; None when empty."""
        return self._items[0][0] if self._items else None

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        self._items.clear()
