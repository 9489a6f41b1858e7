"""The shape description that tasks, datasets, policies and robots meet through.

A task (sim or real robot) publishes a `RobotSpec`; a dataset stores it in its
attributes; a policy is trained for it and exports it in its manifest; the
server checks a connecting robot's spec against it. Nothing else is shared.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np


class SpecMismatch(ValueError):
    """Two specs that must agree do not; the message says what differs."""


@dataclass(frozen=True)
class ArraySpec:
    key: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    # Per-dimension names for 1-D arrays (e.g. "x", "y", "z"); empty for images.
    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "names", tuple(self.names))
        np.dtype(self.dtype)  # raises on an unknown dtype
        if self.names and len(self.shape) == 1 and len(self.names) != self.shape[0]:
            raise ValueError(f"{self.key}: {len(self.names)} names for shape {self.shape}")

    @property
    def is_image(self) -> bool:
        return len(self.shape) == 3

    def check(self, value: np.ndarray, leading: int = 0) -> None:
        """Raise ValueError naming the key unless `value` fits this spec.

        `leading` is the number of leading batch/time axes allowed before the shape.
        """
        value = np.asarray(value)
        if value.shape[leading:] != self.shape or value.ndim != leading + len(self.shape):
            raise ValueError(f"{self.key}: expected shape (..., {self.shape}) got {value.shape}")
        if np.dtype(self.dtype).kind == "f" and not np.all(np.isfinite(value)):
            raise ValueError(f"{self.key}: contains NaN or Inf")

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "shape": list(self.shape), "dtype": self.dtype, "names": list(self.names)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ArraySpec":
        return cls(key=d["key"], shape=tuple(d["shape"]), dtype=d.get("dtype", "float32"), names=tuple(d.get("names", ())))


@dataclass(frozen=True, kw_only=True)
class ActionSpec(ArraySpec):
    key: str = "action"
    # Indices of binary gripper channels (executed as their sign).
    gripper_dims: tuple[int, ...] = ()
    # Command bounds per dimension; empty means unbounded.
    low: tuple[float, ...] = ()
    high: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "gripper_dims", tuple(int(i) for i in self.gripper_dims))
        object.__setattr__(self, "low", tuple(float(x) for x in self.low))
        object.__setattr__(self, "high", tuple(float(x) for x in self.high))
        if len(self.shape) != 1:
            raise ValueError(f"action must be 1-D per step, got shape {self.shape}")
        for i in self.gripper_dims:
            if not 0 <= i < self.shape[0]:
                raise ValueError(f"gripper dim {i} outside action dim {self.shape[0]}")

    @property
    def dim(self) -> int:
        return self.shape[0]

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d.update(gripper_dims=list(self.gripper_dims), low=list(self.low), high=list(self.high))
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ActionSpec":
        return cls(key=d.get("key", "action"), shape=tuple(d["shape"]), dtype=d.get("dtype", "float32"),
                   names=tuple(d.get("names", ())), gripper_dims=tuple(d.get("gripper_dims", ())),
                   low=tuple(d.get("low", ())), high=tuple(d.get("high", ())))


@dataclass(frozen=True)
class RobotSpec:
    """What a policy consumes and produces, and at which rate."""

    task: str
    robot: str
    control_hz: float
    observations: tuple[ArraySpec, ...]
    action: ActionSpec
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "observations", tuple(self.observations))
        keys = [o.key for o in self.observations]
        if len(set(keys)) != len(keys):
            raise ValueError(f"duplicate observation keys in {keys}")
        if self.control_hz <= 0:
            raise ValueError(f"control_hz must be positive, got {self.control_hz}")

    @property
    def obs_keys(self) -> tuple[str, ...]:
        return tuple(o.key for o in self.observations)

    def obs(self, key: str) -> ArraySpec:
        for o in self.observations:
            if o.key == key:
                return o
        raise KeyError(f"no observation {key!r}; have {self.obs_keys}")

    def with_observations(self, keys: tuple[str, ...] | list[str]) -> "RobotSpec":
        return RobotSpec(self.task, self.robot, self.control_hz, tuple(self.obs(k) for k in keys), self.action, self.extra)

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "robot": self.robot, "control_hz": self.control_hz,
                "observations": [o.to_dict() for o in self.observations],
                "action": self.action.to_dict(), "extra": dict(self.extra)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RobotSpec":
        try:
            return cls(task=d["task"], robot=d["robot"], control_hz=float(d["control_hz"]),
                       observations=tuple(ArraySpec.from_dict(o) for o in d["observations"]),
                       action=ActionSpec.from_dict(d["action"]), extra=dict(d.get("extra", {})))
        except KeyError as e:
            raise ValueError(f"robot spec is missing field {e}") from None

    def check_serves(self, other: "RobotSpec") -> None:
        """Raise SpecMismatch unless a policy with this spec can serve a robot with `other`.

        The robot may publish more observations than the policy uses.
        """
        problems = []
        if self.robot != other.robot:
            problems.append(f"robot: policy {self.robot!r}, robot {other.robot!r}")
        if abs(self.control_hz - other.control_hz) > 1e-6:
            problems.append(f"control_hz: policy {self.control_hz}, robot {other.control_hz}")
        have = {o.key: o for o in other.observations}
        n_before = len(problems)
        for o in self.observations:
            if o.key not in have:
                problems.append(f"observation {o.key!r} missing on robot")
            elif (o.shape, o.dtype) != (have[o.key].shape, have[o.key].dtype):
                problems.append(f"observation {o.key!r}: policy {o.shape} {o.dtype}, robot {have[o.key].shape} {have[o.key].dtype}")
        if len(problems) > n_before:  # say both sides: what to train on, or what to publish
            problems.append(f"the policy reads {list(self.obs_keys)}, the robot publishes {list(other.obs_keys)}")
        a, b = self.action, other.action
        if (a.shape, a.gripper_dims) != (b.shape, b.gripper_dims):
            problems.append(f"action: policy {a.shape} grippers {a.gripper_dims}, robot {b.shape} grippers {b.gripper_dims}")
        if problems:
            raise SpecMismatch("; ".join(problems))


def parse_cameras(text: str | None) -> tuple[str, ...]:
    """A `--cameras a,b` list as camera names (empty for none); a camera named twice is refused."""
    if not text:
        return ()
    cams = tuple(c.strip() for c in text.split(",") if c.strip())
    if len(set(cams)) != len(cams):
        raise ValueError(f"--cameras lists a camera twice: {text!r}")
    return cams
