"""A simulated Panda controller that behaves like hardware, in its own process.

MuJoCo physics (robosuite's Panda arm model, torque motors) runs in real time at
the servo rate. A Cartesian servo target is tracked by an operational-space
controller (task-space PD on the tool point, gravity/Coriolis compensation,
null-space posture), so the arm moves like a real servo-controlled arm:
- commands act after a configurable latency,
- the target passes a first-order filter (limited tracking bandwidth, lag),
- the reported pose carries Gaussian sensor noise,
- a controller-side watchdog stops the arm when servo commands stop coming
  (like the RTDE watchdog), and `stop` decelerates and holds.
The driver talks to it over runtime/arm_link.py (PUB state, PULL commands).

    python -m dpstack.sim.arm_process --servo-hz 500
prints one JSON line {"ready": true, "command": ..., "state": ..., ...} once serving.
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import math
import os
import sys
import time

os.environ.setdefault("MUJOCO_GL", "egl")   # before mujoco: headless rendering for --camera

import mujoco
import numpy as np
import zmq

from dpstack.core.process import announce_ready
from dpstack.runtime import arm_link

# Panda's home posture as robosuite uses it (the robot definition, so it lives here).
HOME_JOINTS = (0.0, math.pi / 16, 0.0, -math.pi / 2 - math.pi / 3, 0.0, math.pi - 0.2, math.pi / 4)
TOOL_OFFSET = 0.1034   # flange to fingertip centre of a Franka hand, metres along the hand's z
GRIPPER_MAX_WIDTH = 0.08
GRIPPER_SPEED = 0.1    # m/s, the Franka hand's maximum


def panda_model_path() -> str:
    """robosuite's Panda arm MJCF, found without importing robosuite (slow, noisy)."""
    spec = importlib.util.find_spec("robosuite")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("robosuite is not installed: pip install 'dpstack[sim]'")
    return os.path.join(spec.submodule_search_locations[0], "models", "assets", "robots", "panda", "robot.xml")


def panda_scene(cameras: bool) -> mujoco.MjModel:
    """The arm's model; with cameras, also a light, a floor and an `agentview` camera
    facing the arm (visual only: the physics is the same model's)."""
    if not cameras:
        return mujoco.MjModel.from_xml_path(panda_model_path())
    spec = mujoco.MjSpec.from_file(panda_model_path())
    world = spec.worldbody
    world.add_light(pos=[0.8, 0.0, 1.6], dir=[-0.3, 0.0, -1.0], diffuse=[0.8, 0.8, 0.8], castshadow=False)
    world.add_light(pos=[-0.5, 0.8, 1.2], dir=[0.5, -0.6, -1.0], diffuse=[0.3, 0.3, 0.3], castshadow=False)
    world.add_geom(type=mujoco.mjtGeom.mjGEOM_PLANE, size=[1.5, 1.5, 0.01], rgba=[0.45, 0.4, 0.35, 1.0],
                   contype=0, conaffinity=0)
    world.add_geom(type=mujoco.mjtGeom.mjGEOM_BOX, pos=[0.5, 0.0, 0.005], size=[0.2, 0.3, 0.005],
                   rgba=[0.2, 0.3, 0.6, 1.0], contype=0, conaffinity=0)   # a mat: something fixed to see
    eye, target = np.array([1.5, 0.0, 0.9]), np.array([0.45, 0.0, 0.2])
    back = (eye - target) / np.linalg.norm(eye - target)       # a camera looks along its -z
    right = np.cross([0.0, 0.0, 1.0], back)
    right /= np.linalg.norm(right)
    up = np.cross(back, right)
    quat = np.zeros(4)
    mujoco.mju_mat2Quat(quat, np.column_stack([right, up, back]).ravel())
    world.add_camera(name="agentview", pos=eye, quat=quat, fovy=45.0)
    return spec.compile()


def _wxyz_to_xyzw(q: np.ndarray) -> np.ndarray:
    return np.array([q[1], q[2], q[3], q[0]])


def _xyzw_to_wxyz(q: np.ndarray) -> np.ndarray:
    return np.array([q[3], q[0], q[1], q[2]])


class PandaOSC:
    """Physics plus an operational-space controller on the tool point."""

    def __init__(self, initial_joints=HOME_JOINTS, kp: float = 400.0, kp_rot: float = 300.0,
                 kp_null: float = 10.0, cameras: bool = False):
        self.model = panda_scene(cameras)
        self.data = mujoco.MjData(self.model)
        self.nv = self.model.nv
        self.hand = self.model.body("right_hand").id
        self.q_home = np.array(initial_joints, dtype=np.float64)
        self.data.qpos[:] = self.q_home
        mujoco.mj_forward(self.model, self.data)
        self.kp = np.array([kp] * 3 + [kp_rot] * 3)
        self.kd = 2.0 * np.sqrt(self.kp)    # critically damped in task space
        self.kp_null = kp_null
        self.kd_null = 2.0 * math.sqrt(kp_null)
        self.torque_low = self.model.actuator_ctrlrange[:, 0].copy()
        self.torque_high = self.model.actuator_ctrlrange[:, 1].copy()
        self._jacp = np.zeros((3, self.nv))
        self._jacr = np.zeros((3, self.nv))
        self._M = np.zeros((self.nv, self.nv))

    @property
    def joint_range(self) -> np.ndarray:
        return self.model.jnt_range[: self.nv].copy()

    def tool_pose(self) -> tuple[np.ndarray, np.ndarray]:
        """Tool point position and orientation (w, x, y, z) in the base frame."""
        R = self.data.xmat[self.hand].reshape(3, 3)
        pos = self.data.xpos[self.hand] + R[:, 2] * TOOL_OFFSET
        return pos.copy(), self.data.xquat[self.hand].copy()

    def step(self, target_pos: np.ndarray, target_wxyz: np.ndarray) -> None:
        m, d = self.model, self.data
        pos, quat = self.tool_pose()
        mujoco.mj_jac(m, d, self._jacp, self._jacr, pos, self.hand)
        J = np.vstack([self._jacp, self._jacr])
        mujoco.mj_fullM(m, self._M, d.qM)
        M_inv = np.linalg.inv(self._M)
        lam_inv = J @ M_inv @ J.T
        lam = np.linalg.inv(lam_inv + 1e-6 * np.eye(6))
        err_q = np.zeros(4)
        mujoco.mju_mulQuat(err_q, target_wxyz, np.array([quat[0], -quat[1], -quat[2], -quat[3]]))
        rot_err = np.zeros(3)
        mujoco.mju_quat2Vel(rot_err, err_q, 1.0)   # world-frame axis * angle
        err = np.concatenate([target_pos - pos, rot_err])
        vel = J @ d.qvel
        force = lam @ (self.kp * err - self.kd * vel)
        tau = J.T @ force + d.qfrc_bias
        # Null-space posture keeps the elbow near home without disturbing the tool.
        J_bar = M_inv @ J.T @ lam
        null = np.eye(self.nv) - J.T @ J_bar.T
        tau += null @ (self._M @ (self.kp_null * (self.q_home - d.qpos) - self.kd_null * d.qvel))
        d.ctrl[:] = np.clip(tau, self.torque_low, self.torque_high)
        mujoco.mj_step(m, d)


class CameraRenderer:
    """One camera rendered from the simulation at its size and rate, published on its own
    socket: each frame carries the monotonic time of the simulated instant it shows."""

    def __init__(self, sim: PandaOSC, ctx: zmq.Context, spec: str):
        try:
            name, self.camera, width, height, fps = spec.split(":")
            self.width, self.height, self.fps = int(width), int(height), float(fps)
        except ValueError:
            raise SystemExit(f"arm_process: --camera {spec!r} is not NAME:MODEL_CAMERA:WIDTH:HEIGHT:FPS") from None
        if mujoco.mj_name2id(sim.model, mujoco.mjtObj.mjOBJ_CAMERA, self.camera) < 0:
            names = [sim.model.camera(i).name for i in range(sim.model.ncam)]
            raise SystemExit(f"arm_process: camera {self.camera!r} is not in the arm's model (it has {names})")
        if self.width * self.height * 3 > arm_link.MAX_MESSAGE_BYTES - 4096:
            raise SystemExit(f"arm_process: camera {name!r} frames of {self.width}x{self.height} exceed the link's "
                             f"{arm_link.MAX_MESSAGE_BYTES} bytes")
        self.name = name
        self.sim = sim
        self.renderer = mujoco.Renderer(sim.model, self.height, self.width)
        # Geom group 0 only (the arm's collision meshes and the scene): the visual meshes are
        # 140k faces, 4x the render time in software GL for no difference at 84x84.
        self.options = mujoco.MjvOption()
        self.options.geomgroup[:] = [1, 0, 0, 0, 0, 0]
        self.pub = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.setsockopt(zmq.SNDHWM, 2)
        self.pub.bind("tcp://127.0.0.1:*")
        self.endpoint = self.pub.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.next_due = -math.inf
        self.seq = 0

    def due(self, now: float) -> bool:
        return now >= self.next_due

    def render(self, t: float) -> None:
        """Render the simulation as it is at `t` (its last published state) and send it."""
        self.renderer.update_scene(self.sim.data, camera=self.camera, scene_option=self.options)
        image = self.renderer.render()
        self.seq += 1
        self.pub.send(arm_link.encode(arm_link.FRAME, name=self.name, t=t, seq=self.seq, image=image))
        period = 1.0 / self.fps
        # On schedule: the next slot; fell a whole period behind (or the first frame): from now.
        self.next_due = t + period if t - self.next_due > period else self.next_due + period

    def close(self) -> None:
        self.renderer.close()
        self.pub.close(0)


class ArmController:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.sim = PandaOSC(args.initial_joints or HOME_JOINTS, cameras=bool(args.camera))
        self.period = 1.0 / args.servo_hz
        self.substeps = max(1, round(self.period / self.sim.model.opt.timestep))
        self.rng = np.random.default_rng(args.seed)
        pos, quat = self.sim.tool_pose()
        self.raw_pos, self.raw_quat = pos, quat        # last servo target received
        self.filt_pos, self.filt_quat = pos.copy(), quat.copy()  # what the OSC tracks
        self.gripper_width = GRIPPER_MAX_WIDTH
        self.gripper_target = GRIPPER_MAX_WIDTH
        self.mode = "stopped"
        self.last_servo = -math.inf
        self.pending: collections.deque[tuple[float, dict]] = collections.deque()
        self.counts = collections.Counter()
        self.alpha = 1.0 - math.exp(-2.0 * math.pi * args.bandwidth_hz * self.period)

        self.ctx = zmq.Context()
        self.cmd = self.ctx.socket(zmq.PULL)
        self.cmd.setsockopt(zmq.LINGER, 0)
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.setsockopt(zmq.SNDHWM, 4)
        self.cmd_endpoint = self._bind(self.cmd, args.command)
        self.state_endpoint = self._bind(self.pub, args.state)
        self.cameras = [CameraRenderer(self.sim, self.ctx, spec) for spec in args.camera]

    @staticmethod
    def _bind(sock: zmq.Socket, endpoint: str) -> str:
        sock.bind(endpoint)
        return sock.getsockopt(zmq.LAST_ENDPOINT).decode()

    def _hold_here(self) -> None:
        pos, quat = self.sim.tool_pose()
        self.raw_pos, self.raw_quat = pos, quat
        self.filt_pos, self.filt_quat = pos.copy(), quat.copy()

    def _receive(self, now: float) -> bool:
        while True:
            try:
                frame = self.cmd.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                msg = arm_link.decode(frame)
            except arm_link.LinkError as e:
                self.counts["bad_messages"] += 1
                print(f"arm_process: bad command ignored: {e}", file=sys.stderr)
                continue
            if msg["kind"] == arm_link.QUIT:
                return False
            self.pending.append((now + self.args.command_latency, msg))
        while self.pending and self.pending[0][0] <= now:
            _, msg = self.pending.popleft()
            self._apply(msg, now)
        return True

    def _apply(self, msg: dict, now: float) -> None:
        kind = msg["kind"]
        if kind == arm_link.SERVO:
            pos = np.asarray(msg.get("pos"), dtype=np.float64)
            quat = np.asarray(msg.get("quat"), dtype=np.float64)
            if pos.shape != (3,) or quat.shape != (4,) or not (np.isfinite(pos).all() and np.isfinite(quat).all()):
                self.counts["bad_messages"] += 1  # a real controller refuses these too
                return
            if self.mode == "stopped":
                self._hold_here()   # resume from where the arm is, not from a stale target
            self.raw_pos, self.raw_quat = pos, _xyzw_to_wxyz(quat / np.linalg.norm(quat))
            self.mode = "servo"
            self.last_servo = now
            self.counts["servo"] += 1
        elif kind == arm_link.GRIPPER:
            w = float(msg.get("width", self.gripper_target))
            if math.isfinite(w):
                self.gripper_target = min(max(w, 0.0), GRIPPER_MAX_WIDTH)
        elif kind == arm_link.STOP:
            self.mode = "stopped"
            self._hold_here()
            self.counts["stops"] += 1

    def _track(self) -> None:
        # First-order filter on the target: the controller's limited bandwidth.
        self.filt_pos = self.filt_pos + self.alpha * (self.raw_pos - self.filt_pos)
        err_q = np.zeros(4)
        conj = np.array([self.filt_quat[0], -self.filt_quat[1], -self.filt_quat[2], -self.filt_quat[3]])
        mujoco.mju_mulQuat(err_q, conj, self.raw_quat)
        local = np.zeros(3)
        mujoco.mju_quat2Vel(local, err_q, 1.0)
        mujoco.mju_quatIntegrate(self.filt_quat, local, self.alpha)
        mujoco.mju_normalize4(self.filt_quat)
        for _ in range(self.substeps):
            self.sim.step(self.filt_pos, self.filt_quat)
        step = GRIPPER_SPEED * self.period
        self.gripper_width += float(np.clip(self.gripper_target - self.gripper_width, -step, step))

    def _publish(self, tick: int) -> float:
        """Send this tick's state; returns its timestamp."""
        t = time.monotonic()
        pos, quat = self.sim.tool_pose()
        noisy_pos = pos + self.rng.normal(0.0, self.args.position_noise, 3)
        rot_noise = self.rng.normal(0.0, self.args.rotation_noise, 3)
        noisy = np.zeros(4)
        mujoco.mju_copy4(noisy, quat)
        mujoco.mju_quatIntegrate(noisy, rot_noise, 1.0)
        self.pub.send(arm_link.encode(
            arm_link.STATE, t=t, tick=tick, mode=self.mode,
            q=self.sim.data.qpos.copy(), dq=self.sim.data.qvel.copy(),
            pos=noisy_pos, quat=_wxyz_to_xyzw(noisy),
            gripper=float(self.gripper_width), gripper_moving=abs(self.gripper_target - self.gripper_width) > 1e-4,
            overruns=self.counts["overruns"], servo_count=self.counts["servo"], watchdog_stops=self.counts["watchdog_stops"]))
        return t

    def _pause(self, seconds: float) -> float:
        """Stop the controller's clock for `seconds` (its watchdog, command latency); returns it."""
        self.last_servo += seconds
        self.pending = collections.deque((due + seconds, msg) for due, msg in self.pending)
        return seconds

    def run(self) -> int:
        rng = self.sim.joint_range
        pos, quat = self.sim.tool_pose()
        announce_ready(command=self.cmd_endpoint, state=self.state_endpoint, servo_hz=self.args.servo_hz,
                       pid=os.getpid(), joint_lower=rng[:, 0].tolist(), joint_upper=rng[:, 1].tolist(),
                       gripper_max_width=GRIPPER_MAX_WIDTH, pos=pos.tolist(), quat=_wxyz_to_xyzw(quat).tolist(),
                       cameras={c.name: c.endpoint for c in self.cameras})
        next_t = time.monotonic()
        tick = 0
        while True:
            now = time.monotonic()
            if not self._receive(now):
                return 0
            if self.mode == "servo" and now - self.last_servo > self.args.command_timeout:
                # Like the RTDE watchdog: no servo command in time, the controller stops the arm.
                self.mode = "stopped"
                self._hold_here()
                self.counts["watchdog_stops"] += 1
            self._track()
            t = self._publish(tick)
            tick += 1
            for camera in self.cameras:
                if camera.due(t):
                    # The world does not advance while it is rendered: the frame shows the state
                    # just published, and the controller's clock stops for the render's duration.
                    camera.render(t)
                    next_t += self._pause(time.monotonic() - t)
            next_t += self.period
            delay = next_t - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            elif delay < -self.period:
                self.counts["overruns"] += 1
                next_t = time.monotonic()  # missed a whole cycle: resynchronise rather than burst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dpstack.sim.arm_process", description=__doc__.split("\n")[0])
    p.add_argument("--servo-hz", type=float, default=500.0, help="controller rate (default %(default)s)")
    p.add_argument("--command", default="tcp://127.0.0.1:*", help="endpoint to bind for commands (PULL)")
    p.add_argument("--state", default="tcp://127.0.0.1:*", help="endpoint to bind for state (PUB)")
    p.add_argument("--command-latency", type=float, default=0.004, help="seconds before a command takes effect")
    p.add_argument("--position-noise", type=float, default=0.0002, help="sensor noise std, metres")
    p.add_argument("--rotation-noise", type=float, default=0.001, help="sensor noise std, radians")
    p.add_argument("--bandwidth-hz", type=float, default=8.0, help="target filter bandwidth")
    p.add_argument("--command-timeout", type=float, default=0.1, help="controller watchdog: stop after this long without servo")
    p.add_argument("--initial-joints", type=float, nargs=7, default=None, metavar="RAD",
                   help="seven joint angles to start from (default: the robot's home pose)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sensor noise (default 0)")
    p.add_argument("--camera", action="append", default=[], metavar="NAME:MODEL_CAMERA:WIDTH:HEIGHT:FPS",
                   help="render a camera of the model (agentview, eye_in_hand, robotview) and publish its frames")
    args = p.parse_args(argv)
    if args.servo_hz <= 0 or args.bandwidth_hz <= 0:
        p.error("--servo-hz and --bandwidth-hz must be positive")
    controller = ArmController(args)
    try:
        return controller.run()
    except KeyboardInterrupt:
        return 0
    finally:
        for camera in controller.cameras:
            camera.close()
        controller.cmd.close(0)
        controller.pub.close(0)
        controller.ctx.term()


if __name__ == "__main__":
    sys.exit(main())
