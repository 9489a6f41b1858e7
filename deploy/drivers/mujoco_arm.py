"""MujocoArm: the driver for the simulated controller in sim/arm_process.py.

It talks to that process exactly as a vendor driver talks to a robot controller:
state arrives over a socket (newest sample only), servo targets and gripper
commands go out fire-and-forget, stop asks the controller to brake and hold.
The process runs the physics at the servo rate with command latency, sensor
noise and limited tracking bandwidth, so hardware-in-the-loop tests and dry
runs exercise the same timing paths as a real arm. deploy/ never imports
mujoco: the process is started as `python -m dpstack.sim.arm_process`.
"""
from __future__ import annotations

import subprocess
from typing import Iterable

import numpy as np
import zmq

from dpstack.core.process import ChildFailed, ChildProcess
from dpstack.deploy.cameras import CameraThread, Frame
from dpstack.deploy.config import CameraConfig, DriverConfig
from dpstack.deploy.drivers.base import ArmState, DriverInfo, Pose
from dpstack.runtime import arm_link


class MujocoCamera(CameraThread):
    """A camera rendered by the simulated arm's process (its `kind: mujoco` cameras): frames
    arrive on the camera's own socket, stamped with the simulated instant they show.
    It delivers once its MujocoArm has connected."""

    def __init__(self, cfg: CameraConfig, buffer_s: float = 2.0):
        super().__init__(cfg, buffer_s)
        self.endpoint: str | None = None   # set by MujocoArm.connect
        self._sub: zmq.Socket | None = None

    def grab(self) -> Frame | None:
        if self._sub is None:
            if self.endpoint is None:
                self._halt.wait(0.01)
                return None
            self._sub = zmq.Context.instance().socket(zmq.SUB)   # made and used in this thread only
            self._sub.setsockopt(zmq.LINGER, 0)
            self._sub.setsockopt(zmq.RCVHWM, 2)
            self._sub.setsockopt(zmq.SUBSCRIBE, b"")
            self._sub.connect(self.endpoint)
        if not self._sub.poll(100):
            return None
        msg = arm_link.decode(self._sub.recv())
        image = msg["image"]
        if image.dtype != np.uint8 or image.shape != (self.cfg.height, self.cfg.width, 3):
            raise arm_link.LinkError(f"frame {image.dtype} {image.shape}, configured {self.cfg.height}x{self.cfg.width}")
        return Frame(float(msg["t"]), image, int(msg["seq"]))

    def release(self) -> None:
        if self._sub is not None:
            self._sub.close(0)
            self._sub = None


class MujocoArm:
    def __init__(self, cfg: DriverConfig, cameras: Iterable[CameraConfig] = (), start_timeout_s: float = 30.0):
        """`cameras`: the robot YAML's cameras; those of kind mujoco are rendered by the
        arm's process and delivered by `self.cameras[name]` (start them: deploy/cameras.py)."""
        self.cfg = cfg
        self.opts = cfg.mujoco
        self.cameras = {c.name: MujocoCamera(c) for c in cameras if c.kind == "mujoco"}
        self.start_timeout_s = start_timeout_s
        self.process: ChildProcess | None = None
        self._ctx = zmq.Context.instance()
        self._cmd: zmq.Socket | None = None
        self._sub: zmq.Socket | None = None
        self._state: ArmState | None = None
        self.last_raw: dict | None = None   # the controller's last state message (overruns, mode...)

    # ---------------------------------------------------------------- lifecycle
    def _spawn(self) -> dict:
        o = self.opts
        args = ["--servo-hz", str(self.cfg.servo_hz), "--command-latency", str(o.command_latency_s),
                "--position-noise", str(o.position_noise), "--rotation-noise", str(o.rotation_noise),
                "--bandwidth-hz", str(o.bandwidth_hz), "--seed", str(o.seed)]
        if o.initial_joints:
            args += ["--initial-joints", *map(str, o.initial_joints)]
        for cam in self.cameras.values():
            c = cam.cfg
            args += ["--camera", f"{c.name}:{c.device}:{c.width}:{c.height}:{c.fps}"]
        self.process = ChildProcess.python("dpstack.sim.arm_process", *args, name="simulated arm process")
        try:
            return self.process.wait_ready(self.start_timeout_s)
        except ChildFailed as e:
            self.process = None
            raise RuntimeError(str(e)) from None

    def connect(self) -> DriverInfo:
        """Start sim/arm_process.py (free loopback ports) and connect to it."""
        info = self._spawn()
        self._cmd = self._ctx.socket(zmq.PUSH)
        self._cmd.setsockopt(zmq.LINGER, 0)
        self._cmd.setsockopt(zmq.SNDHWM, 16)
        self._cmd.connect(info["command"])
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.CONFLATE, 1)   # only the newest state matters
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub.connect(info["state"])
        self._wait_state(5.0)
        for name, endpoint in info.get("cameras", {}).items():
            self.cameras[name].endpoint = endpoint
        return DriverInfo(name="mujoco_panda", servo_hz=self.cfg.servo_hz, n_joints=len(info["joint_lower"]),
                          joint_lower=np.array(info["joint_lower"]), joint_upper=np.array(info["joint_upper"]),
                          gripper_max_width=info["gripper_max_width"], extra={"pid": info["pid"]})

    def close(self) -> None:
        if self._cmd is not None:
            try:
                self._cmd.send(arm_link.encode(arm_link.STOP), zmq.NOBLOCK)
                self._cmd.send(arm_link.encode(arm_link.QUIT), zmq.NOBLOCK)
            except zmq.Again:
                pass
        if self.process is not None:
            try:
                self.process.proc.wait(timeout=3.0)  # it quits on its own after QUIT
            except subprocess.TimeoutExpired:
                pass
            self.process.stop(timeout_s=3.0)
            self.process = None
        for s in (self._cmd, self._sub):
            if s is not None:
                s.close(0)
        self._cmd = self._sub = None

    # ---------------------------------------------------------------- state
    def _wait_state(self, timeout_s: float) -> ArmState:
        if not self._sub.poll(int(timeout_s * 1000)):
            raise TimeoutError(f"no state from the simulated arm within {timeout_s} s")
        return self.read_state()

    def read_state(self) -> ArmState:
        try:
            frame = self._sub.recv(zmq.NOBLOCK)
        except zmq.Again:
            if self._state is None:
                return self._wait_state(1.0)
            return self._state  # nothing newer since the last read
        msg = arm_link.decode(frame)
        self.last_raw = msg
        self._state = ArmState(t=float(msg["t"]), joint_positions=msg["q"],
                               pose=Pose(msg["pos"], msg["quat"]), gripper_width=float(msg["gripper"]),
                               gripper_moving=bool(msg["gripper_moving"]))
        return self._state

    # ---------------------------------------------------------------- commands
    def _send(self, frame: bytes) -> None:
        try:
            self._cmd.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            pass  # controller not keeping up: dropping is what a real servo link does

    def servo(self, target: Pose) -> None:
        self._send(arm_link.encode(arm_link.SERVO, pos=np.asarray(target.position, dtype=np.float64),
                                   quat=np.asarray(target.quat, dtype=np.float64)))

    def gripper(self, width: float) -> None:
        self._send(arm_link.encode(arm_link.GRIPPER, width=float(width)))

    def stop(self) -> None:
        self._send(arm_link.encode(arm_link.STOP))
