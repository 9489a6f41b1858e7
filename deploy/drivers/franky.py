"""Franka (Panda / FR3) through franky (PyPI: franky-control, `import franky`).

Why franky rather than panda-python (panda-py): both are maintained and on PyPI
(franky-control 2.0.0, panda-python 1.1.1 at the time of writing). franky's
asynchronous motions can be preempted by the next one in real time, with
Ruckig generating a jerk-limited trajectory inside libfranka's 1 kHz loop; that
is exactly a servo stream (a new Cartesian target every cycle) without writing
our own 1 kHz controller, and it surfaces libfranka errors as Python
exceptions. It ships wheels for both the Panda and the FR3 firmware lines.
panda-py is excellent for custom 1 kHz controllers but would have us own the
impedance/trajectory layer that franky already provides.

- servo(): robot.move(CartesianMotion(Affine(pos, quat), ReferenceType.Absolute),
  asynchronous=True); each call preempts the previous target;
- the Robot's relative_dynamics_factor (a fraction of Franka's velocity,
  acceleration and jerk limits) is set from the YAML at connect;
- stop(): robot.stop(); the next servo() recovers from errors first;
- libfranka's own communication watchdog stops the arm if the 1 kHz loop
  starves; franky has no settable "stop if not fed" timer like RTDE's, so a
  stalled bridge is caught by the safety layer's watchdog (hold) instead;
- the gripper: move_async to open, grasp_async to close (so closing on an
  object is a success, not an error), only when the width changes by more than
  the configured deadband.

NOT TESTED ON HARDWARE: tests/test_deploy_drivers.py runs this driver against a
fake of the franky classes (the calls used here, recorded).
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from dpstack.deploy.config import DriverConfig
from dpstack.deploy.drivers.base import ArmState, DriverInfo, Pose


def _import_sdk() -> Any:
    try:
        import franky
    except ImportError as e:
        raise ModuleNotFoundError("the Franka driver needs franky: pip install franky-control", name="franky") from e
    return franky


class FrankyDriver:
    def __init__(self, cfg: DriverConfig, sdk: Any | None = None):
        """`sdk` is the franky module; injected by tests, imported otherwise."""
        self.cfg = cfg
        self.opts = cfg.franky
        self._sdk = sdk
        self.robot = self.hand = None
        self._stopped = False
        self._gripper_sent: float | None = None

    def connect(self) -> DriverInfo:
        franky = self._sdk or _import_sdk()
        self.franky = franky
        self.robot = franky.Robot(self.cfg.host)
        self.robot.recover_from_errors()
        self.robot.relative_dynamics_factor = self.opts.relative_dynamics_factor
        self.hand = franky.Gripper(self.cfg.host)
        lower = np.array(self.cfg.joint_lower) if self.cfg.joint_lower else None
        upper = np.array(self.cfg.joint_upper) if self.cfg.joint_upper else None
        return DriverInfo(name="franky", servo_hz=self.cfg.servo_hz, n_joints=7, joint_lower=lower, joint_upper=upper,
                          gripper_max_width=float(self.hand.max_width),
                          extra={"relative_dynamics_factor": self.opts.relative_dynamics_factor})

    def read_state(self) -> ArmState:
        t = time.monotonic()
        ee = self.robot.current_cartesian_state.pose.end_effector_pose
        q = np.asarray(self.robot.current_joint_state.position, dtype=np.float64)
        pose = Pose(np.asarray(ee.translation, dtype=np.float64), np.asarray(ee.quaternion, dtype=np.float64))
        return ArmState(t=t, joint_positions=q, pose=pose, gripper_width=float(self.hand.width))

    def servo(self, target: Pose) -> None:
        f = self.franky
        if self._stopped:
            self.robot.recover_from_errors()
            self._stopped = False
        affine = f.Affine([float(x) for x in target.position], [float(x) for x in target.quat])
        self.robot.move(f.CartesianMotion(affine, f.ReferenceType.Absolute), asynchronous=True)

    def gripper(self, width: float) -> None:
        prev = self._gripper_sent
        if prev is not None and abs(width - prev) < self.opts.gripper_deadband:
            return
        if prev is not None and width < prev:
            # Wide tolerances: stopping on an object of any size counts as a grasp.
            self.hand.grasp_async(width, self.opts.gripper_speed, self.opts.gripper_force,
                                  epsilon_inner=1.0, epsilon_outer=1.0)
        else:
            self.hand.move_async(width, self.opts.gripper_speed)
        self._gripper_sent = width

    def stop(self) -> None:
        if self.robot is not None and not self._stopped:
            self.robot.stop()
            self._stopped = True

    def close(self) -> None:
        if self.robot is not None:
            self.stop()
        self.robot = self.hand = None
