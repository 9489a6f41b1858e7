"""What the bridge needs from an arm, whatever its vendor.

A driver reads timestamped state and takes Cartesian servo targets, gripper
commands and a stop. Vendor SDKs are imported inside `connect()`, never at
module level, so deploy/ imports on a machine without them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass
class Pose:
    position: np.ndarray  # (3,) metres, robot base frame
    quat: np.ndarray      # (4,) x, y, z, w

    def copy(self) -> "Pose":
        return Pose(np.array(self.position, dtype=np.float64), np.array(self.quat, dtype=np.float64))


@dataclass
class ArmState:
    t: float                   # time.monotonic() on this computer when the sample was taken
    joint_positions: np.ndarray  # (n_joints,) rad
    pose: Pose                 # end-effector pose
    gripper_width: float       # metres between the fingers
    gripper_moving: bool = False


@dataclass
class DriverInfo:
    """Metadata the driver reports; joint limits let the safety layer guard joints."""

    name: str
    servo_hz: float
    n_joints: int
    joint_lower: np.ndarray | None = None
    joint_upper: np.ndarray | None = None
    gripper_max_width: float | None = None
    extra: dict = field(default_factory=dict)


@runtime_checkable
class ArmDriver(Protocol):
    def connect(self) -> DriverInfo:
        """Open the link to the controller; return what the driver knows about the arm."""

    def read_state(self) -> ArmState:
        """The latest state; never blocks for longer than one servo period."""

    def servo(self, target: Pose) -> None:
        """Command a Cartesian target for this servo cycle (also keeps vendor watchdogs fed)."""

    def gripper(self, width: float) -> None:
        """Command the gripper opening in metres."""

    def stop(self) -> None:
        """Stop the arm now (vendor stop, decelerating within the controller's limits)."""

    def close(self) -> None:
        """Release the link; the arm is stopped first."""
