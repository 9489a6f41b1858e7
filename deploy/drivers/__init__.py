"""Arm drivers. `make_driver` picks one from the config; vendor SDKs load lazily."""
from __future__ import annotations

from typing import Iterable

from dpstack.deploy.config import CameraConfig, DriverConfig
from dpstack.deploy.drivers.base import ArmDriver, ArmState, DriverInfo, Pose


def make_driver(cfg: DriverConfig, cameras: Iterable[CameraConfig] = ()) -> ArmDriver:
    """The driver for `cfg`; the simulated arm also renders the `cameras` of kind mujoco."""
    if cfg.kind == "ur_rtde":
        from dpstack.deploy.drivers.ur_rtde import URRtdeDriver
        return URRtdeDriver(cfg)
    if cfg.kind == "franky":
        from dpstack.deploy.drivers.franky import FrankyDriver
        return FrankyDriver(cfg)
    if cfg.kind == "mujoco":
        from dpstack.deploy.drivers.mujoco_arm import MujocoArm
        return MujocoArm(cfg, cameras)
    raise ValueError(f"unknown driver kind {cfg.kind!r}")


__all__ = ["ArmDriver", "ArmState", "DriverInfo", "Pose", "make_driver"]
