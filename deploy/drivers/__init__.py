"""Arm drivers. `make_driver` picks one from the config; vendor SDKs load lazily."""
from __future__ import annotations

from deploy.config import DriverConfig
from deploy.drivers.base import ArmDriver, ArmState, DriverInfo, Pose


def make_driver(cfg: DriverConfig) -> ArmDriver:
    if cfg.kind == "ur_rtde":
        from deploy.drivers.ur_rtde import URRtdeDriver
        return URRtdeDriver(cfg)
    if cfg.kind == "franky":
        from deploy.drivers.franky import FrankyDriver
        return FrankyDriver(cfg)
    if cfg.kind == "mujoco":
        from deploy.drivers.mujoco_arm import MujocoArm
        return MujocoArm(cfg)
    raise ValueError(f"unknown driver kind {cfg.kind!r}")


__all__ = ["ArmDriver", "ArmState", "DriverInfo", "Pose", "make_driver"]
