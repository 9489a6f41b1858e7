"""A wall clock for RobotClock tests: it moves only when a test moves it."""
from __future__ import annotations


class FakeWall:
    """Reads `t`; its shared clock (CLOCK_MONOTONIC's stand-in) reads it 5000 s on."""

    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def shared(self) -> float:
        return self.t + 5000.0
