"""The realtime arm's clock: robot time on the wall clock, scaled and pausable.

Robot time is in the task's seconds (what the policy's chunk times mean); it runs
`scale` times as fast as the wall clock (a rate below the task's = slow motion).
The simulated world can stand still: while a video frame renders, or for the part
of a physics step that needs longer than the period, robot time stops and then
resumes from where it stood.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator


class RobotClock:
    """Robot seconds since construction, less every pause."""

    def __init__(self, scale: float, wall: Callable[[], float] = time.perf_counter,
                 shared: Callable[[], float] = time.monotonic) -> None:
        """`wall` is the clock the loop waits on; `shared` the one every process reads
        (CLOCK_MONOTONIC), to line up misses with other processes' records."""
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.scale = scale
        self.wall = wall
        self._shared = shared
        self._origin = wall()  # the wall instant of robot time 0; every pause moves it on

    def now(self) -> float:
        return (self.wall() - self._origin) * self.scale

    def wall_s(self, robot_s: float) -> float:
        """A span of robot seconds in wall seconds."""
        return robot_s / self.scale

    def shared_at(self, t: float) -> float:
        """Robot time `t` on the shared clock (for a `t` since the last pause)."""
        return self._shared() - (self.wall() - (self._origin + t / self.scale))

    def pause(self, wall_s: float) -> None:
        """The world stood still for the last `wall_s` wall seconds."""
        self._origin += wall_s

    @contextmanager
    def paused(self) -> Iterator[None]:
        """The time the block takes is a pause: robot time resumes where it stood."""
        start = self.wall()
        yield
        self.pause(self.wall() - start)

    def pause_past(self, t: float) -> bool:
        """When robot time is already past `t`, the world stood still for the excess:
        set it back to `t`. True when it was past."""
        behind = self.now() - t
        if behind <= 0:
            return False
        self.pause(self.wall_s(behind))
        return True
