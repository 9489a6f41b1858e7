"""Universal Robots through ur_rtde (pip install ur_rtde; tested against 1.6.x's API).

- servoL at the configured servo rate (125 Hz on CB3, 500 Hz on e-Series), with
  the configured lookahead time and gain; `time` is one servo period;
- RTDE's own watchdog is armed at connect (setWatchdog(min_frequency)) and kicked
  on every servo cycle: if this process stalls or dies, the UR controller stops
  the arm by itself;
- stop() is servoStop (decelerating at the configured rate); the next servo()
  after a stop re-uploads the control script if the watchdog had ended it.
- UR poses are [x, y, z, rx, ry, rz] with a rotation vector; the driver converts
  to and from (position, quaternion x y z w).
- The gripper is optional: a binary gripper on a tool digital output.

NOT TESTED ON HARDWARE: tests/test_deploy_drivers.py runs this driver against a
fake of the ur_rtde classes (the methods called here, recording each call).
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from dpstack.deploy import rotations
from dpstack.deploy.config import DriverConfig
from dpstack.deploy.drivers.base import ArmState, DriverInfo, Pose


def _import_sdk() -> tuple[Any, Any, Any]:
    try:
        import rtde_control
        import rtde_io
        import rtde_receive
    except ImportError as e:
        raise ModuleNotFoundError("the UR driver needs ur_rtde: pip install ur_rtde", name="rtde_control") from e
    return rtde_control, rtde_receive, rtde_io


class URRtdeDriver:
    def __init__(self, cfg: DriverConfig, sdk: tuple[Any, Any, Any] | None = None):
        """`sdk` = (rtde_control, rtde_receive, rtde_io) modules; injected by tests, imported otherwise."""
        self.cfg = cfg
        self.opts = cfg.ur_rtde
        self._sdk = sdk
        self.control = self.receive = self.io = None
        self.period = 1.0 / cfg.servo_hz
        self._stopped = False
        self._gripper_closed: bool | None = None

    def connect(self) -> DriverInfo:
        rtde_control, rtde_receive, rtde_io = self._sdk or _import_sdk()
        self.receive = rtde_receive.RTDEReceiveInterface(self.cfg.host, self.cfg.servo_hz)
        self.control = rtde_control.RTDEControlInterface(self.cfg.host, self.cfg.servo_hz)
        if self.opts.gripper == "tool_digital_out":
            self.io = rtde_io.RTDEIOInterface(self.cfg.host)
        self._arm_watchdog()
        n = len(self.receive.getActualQ())
        lower = np.array(self.cfg.joint_lower) if self.cfg.joint_lower else None
        upper = np.array(self.cfg.joint_upper) if self.cfg.joint_upper else None
        return DriverInfo(name="ur_rtde", servo_hz=self.cfg.servo_hz, n_joints=n, joint_lower=lower, joint_upper=upper,
                          extra={"lookahead_time": self.opts.lookahead_time, "gain": self.opts.gain})

    def _arm_watchdog(self) -> None:
        self.control.setWatchdog(self.opts.watchdog_min_hz)
        self.control.kickWatchdog()

    def read_state(self) -> ArmState:
        t = time.monotonic()
        tcp = np.asarray(self.receive.getActualTCPPose(), dtype=np.float64)
        q = np.asarray(self.receive.getActualQ(), dtype=np.float64)
        pose = Pose(tcp[:3], rotations.from_rotvec(tcp[3:6]))
        width = 0.0 if self._gripper_closed else 1.0
        return ArmState(t=t, joint_positions=q, pose=pose, gripper_width=width)

    def servo(self, target: Pose) -> None:
        if self._stopped:
            # The watchdog may have ended the control script while we were stopped.
            if not self.control.isProgramRunning():
                self.control.reuploadScript()
            self._arm_watchdog()
            self._stopped = False
        self.control.kickWatchdog()
        pose = [*map(float, target.position), *map(float, rotations.to_rotvec(target.quat))]
        self.control.servoL(pose, self.opts.velocity, self.opts.acceleration, self.period,
                            self.opts.lookahead_time, self.opts.gain)

    def gripper(self, width: float) -> None:
        if self.io is None:
            return
        closed = width < self.opts.gripper_close_below
        if closed != self._gripper_closed:
            self.io.setToolDigitalOut(self.opts.gripper_output, closed)
            self._gripper_closed = closed

    def stop(self) -> None:
        if self.control is not None and not self._stopped:
            self.control.servoStop(self.opts.stop_deceleration)
            self._stopped = True

    def close(self) -> None:
        if self.control is not None:
            self.stop()
            self.control.stopScript()
            self.control.disconnect()
        if self.receive is not None:
            self.receive.disconnect()
        if self.io is not None:
            self.io.disconnect()
        self.control = self.receive = self.io = None
