"""Turn timestamped policy-rate waypoints into servo-rate targets.

Positions are interpolated linearly, orientations by slerp, gripper widths
linearly. Before the first waypoint the trajectory holds the first one, after
the last it holds the last one: the servo loop never extrapolates a policy.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dpstack.deploy import rotations


@dataclass
class Waypoint:
    t: float             # absolute time (the bridge's monotonic clock), seconds
    position: np.ndarray  # (3,) metres
    quat: np.ndarray      # (4,) x, y, z, w
    gripper: float        # width in metres


class PoseTrajectory:
    """Piecewise linear / slerp trajectory through waypoints sorted by time."""

    def __init__(self, waypoints: list[Waypoint]):
        if not waypoints:
            raise ValueError("a trajectory needs at least one waypoint")
        ts = np.array([w.t for w in waypoints], dtype=np.float64)
        if np.any(np.diff(ts) <= 0):
            raise ValueError(f"waypoint times must increase strictly, got {ts.tolist()}")
        self.times = ts
        self.positions = np.stack([np.asarray(w.position, dtype=np.float64) for w in waypoints])
        quats = rotations.normalize(np.stack([np.asarray(w.quat, dtype=np.float64) for w in waypoints]))
        # Keep consecutive quaternions in the same hemisphere so slerp takes the short arc.
        for i in range(1, len(quats)):
            if np.dot(quats[i - 1], quats[i]) < 0:
                quats[i] = -quats[i]
        self.quats = quats
        self.grippers = np.array([w.gripper for w in waypoints], dtype=np.float64)

    @property
    def start(self) -> float:
        return float(self.times[0])

    @property
    def end(self) -> float:
        return float(self.times[-1])

    def sample(self, t: float) -> Waypoint:
        ts = self.times
        if t <= ts[0]:
            i, s = 0, 0.0
        elif t >= ts[-1]:
            i, s = len(ts) - 1, 0.0
        else:
            i = int(np.searchsorted(ts, t, side="right")) - 1
            s = (t - ts[i]) / (ts[i + 1] - ts[i])
        if s == 0.0:
            return Waypoint(t, self.positions[i].copy(), self.quats[i].copy(), float(self.grippers[i]))
        # a + s (b - a): exact when a == b (no 0.08000000000000002 widths).
        pos = self.positions[i] + s * (self.positions[i + 1] - self.positions[i])
        quat = rotations.slerp(self.quats[i], self.quats[i + 1], s)
        grip = self.grippers[i] + s * (self.grippers[i + 1] - self.grippers[i])
        return Waypoint(t, pos, quat, float(grip))
