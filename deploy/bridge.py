"""The real-robot bridge: robot state and cameras -> policy server -> safe servo commands.

One loop at the servo rate (the driver's):
- every cycle: read the arm state (kept in a ring for alignment), poll the action
  source (deploy/sources.py: a policy server's chunks, or a teleop device; fresh
  input feeds the safety watchdog), sample the interpolated trajectory, pass it
  through the safety layer, send the result to the driver (or log it in dry-run mode);
- every control period (the policy's rate): build an observation from the newest
  frame of every camera (each checked: not older than its max_age_s, its counter
  advancing; otherwise the arm holds and the log names the camera) and the arm state
  nearest the frames' capture time (the skew is reported), hand it to the source and
  take its action for now (a policy: the next scheduled one, stale ones dropped),
  convert it to a Cartesian target as the YAML says, and plan a linear/slerp
  segment from the last command to that target over one control period.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from dpstack.deploy import rotations
from dpstack.deploy.cameras import FrameCheck, TimedBuffer
from dpstack.deploy.config import ActionConfig, BridgeConfig
from dpstack.deploy.drivers.base import ArmDriver, ArmState, DriverInfo, Pose
from dpstack.deploy.estop import EStop, EStopServer, KeyWatcher, install_signal
from dpstack.deploy.interpolate import PoseTrajectory, Waypoint
from dpstack.deploy.safety import SafetyLayer
from dpstack.deploy.sources import ActionSource, PolicySource, SourceAction
from dpstack.core.spec import ActionSpec, ArraySpec, RobotSpec
from dpstack.core.stats import summarize_ms

log = logging.getLogger("dpstack.deploy.bridge")


# ---------------------------------------------------------------- spec and observations
def robot_spec(cfg: BridgeConfig, n_joints: int = 7) -> RobotSpec:
    """The RobotSpec this robot publishes (the server checks a policy can serve it)."""
    cams = {c.name: c for c in cfg.cameras}
    obs = []
    for o in cfg.spec.observations:
        if o.source == "camera":
            c = cams[o.camera]
            obs.append(ArraySpec(o.key, (c.height, c.width, 3), "uint8"))
        else:
            size = {"eef_pos": 3, "eef_quat": 4, "gripper_qpos": 2, "gripper_width": 1, "joint_pos": n_joints}[o.source]
            obs.append(ArraySpec(o.key, (size,), "float32"))
    a = cfg.action
    action = ActionSpec(key="action", shape=(a.dim,), gripper_dims=(a.gripper_dim,), low=(-1.0,) * a.dim, high=(1.0,) * a.dim)
    return RobotSpec(cfg.spec.task, cfg.spec.robot, cfg.spec.control_hz, tuple(obs), action)


def state_observation(source: str, s: ArmState) -> np.ndarray:
    if source == "eef_pos":
        v = s.pose.position
    elif source == "eef_quat":
        q = rotations.normalize(s.pose.quat)
        v = q if q[3] >= 0 else -q   # one sign convention for the policy
    elif source == "gripper_qpos":
        v = [s.gripper_width / 2.0, -s.gripper_width / 2.0]   # robosuite's two finger joints
    elif source == "gripper_width":
        v = [s.gripper_width]
    elif source == "joint_pos":
        v = s.joint_positions
    else:
        raise ValueError(f"unknown observation source {source!r}")
    return np.asarray(v, dtype=np.float32)


# ---------------------------------------------------------------- actions -> targets
def action_to_target(action: np.ndarray, cfg: ActionConfig, reference: Pose) -> tuple[Pose, float]:
    """One policy action -> (Cartesian target, gripper width).

    delta: robosuite OSC_POSE: the position moves by a[0:3] * position_scale and the
    orientation by the world-frame rotation vector a[3:6] * rotation_scale, from
    `reference` (the measured pose, as OSC applies deltas to the current pose).
    absolute: a[0:3] is the position, a[3:6] a rotation vector.
    The gripper channel's sign is executed: > 0 closes, otherwise open.
    """
    a = np.asarray(action, dtype=np.float64)
    if cfg.mode == "delta":
        pos = reference.position + np.clip(a[0:3], -1.0, 1.0) * cfg.position_scale
        quat = rotations.apply_rotvec(reference.quat, np.clip(a[3:6], -1.0, 1.0) * cfg.rotation_scale)
    else:
        pos = a[0:3].copy()
        quat = rotations.from_rotvec(a[3:6])
    width = cfg.gripper_closed_width if a[cfg.gripper_dim] > 0 else cfg.gripper_open_width
    return Pose(pos, quat), width


# ---------------------------------------------------------------- the bridge
@dataclass
class Aligned:
    """One control step's observation, as of time `t`: the newest frame of every camera
    (`t` is the oldest of their capture times) and the arm state nearest `t`; without
    cameras, the last state at or before the control step. `times`: each key's sample time."""

    t: float
    arrays: dict[str, np.ndarray]
    times: dict[str, float]
    state: ArmState


@dataclass
class ControlStep:
    """What one control step saw and commanded (what `dpstack record` stores)."""

    t: float
    observation: Aligned | None
    action: np.ndarray | None   # None: the source held


@dataclass
class BridgeStats:
    ticks: int = 0
    control_ticks: int = 0
    commands_sent: int = 0
    would_send: int = 0
    stops_sent: int = 0
    resets: int = 0
    period_error_s: deque = field(default_factory=lambda: deque(maxlen=200_000))
    obs_to_command_s: deque = field(default_factory=lambda: deque(maxlen=100_000))
    loop_work_s: deque = field(default_factory=lambda: deque(maxlen=200_000))
    frame_state_skew_s: deque = field(default_factory=lambda: deque(maxlen=100_000))  # |frame - state| time
    frame_age_s: deque = field(default_factory=lambda: deque(maxlen=100_000))   # control step - capture
    camera_holds: int = 0   # control steps held because a camera's frame was unfit


class Bridge:
    def __init__(self, cfg: BridgeConfig, driver: ArmDriver, client=None, *, source: ActionSource | None = None,
                 dry_run: bool | None = None, estop: EStop | None = None, cameras: dict | None = None,
                 clock: Callable[[], float] = time.monotonic, install_handlers: bool = True):
        """Actions come from `source`, or from a policy server through `client` (a
        runtime.client.PolicyClient); neither: the arm holds.
        `cameras` maps camera name -> a deploy.cameras.Camera (started: start_cameras)."""
        self.cfg = cfg
        self.driver = driver
        self.dry_run = cfg.dry_run if dry_run is None else dry_run
        self.estop = estop or EStop()
        self.cameras = cameras or {}
        self.frame_checks = {c.name: FrameCheck(c) for c in cfg.cameras}
        self.camera_failure: str | None = None   # why the bridge holds for a camera now, or None
        self._failing_camera: str | None = None
        self.camera_failures: Counter[str] = Counter()   # failures (not steps) per camera
        self.clock = clock
        self.install_handlers = install_handlers
        self.servo_dt = 1.0 / cfg.driver.servo_hz
        self.control_dt = 1.0 / cfg.spec.control_hz
        self.info: DriverInfo | None = None
        self.safety: SafetyLayer | None = None
        self.spec = robot_spec(cfg)
        if source is None and client is not None:
            source = PolicySource(client, self.spec.action, cfg.action.mode, cfg.policy.action_latency_s, clock)
        self.source = source
        self.states: TimedBuffer[ArmState] = TimedBuffer(maxlen=int(2.0 * cfg.driver.servo_hz))
        self.stats = BridgeStats()
        self.counts: Counter[str] = Counter()
        self._traj: PoseTrajectory | None = None
        self._gripper: float | None = None
        self._stopped = False
        self._estop_server: EStopServer | None = None
        self._keys: KeyWatcher | None = None
        self._last_log = -math.inf
        self.last_command = None   # the last SafeCommand (sent, or would be in a dry run)

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> DriverInfo:
        self.info = self.driver.connect()
        if self.info.joint_lower is None and self.cfg.driver.joint_lower:
            self.info.joint_lower = np.array(self.cfg.driver.joint_lower)
            self.info.joint_upper = np.array(self.cfg.driver.joint_upper)
        self.spec = robot_spec(self.cfg, self.info.n_joints)
        self.safety = SafetyLayer(self.cfg.safety, self.cfg.driver.servo_hz, self.info, self.estop, self.clock)
        state = self.driver.read_state()
        self.states.append(state.t, state)
        self.safety.start(state)
        s = self.cfg.safety
        if self.install_handlers:
            if s.estop_signal and threading.current_thread() is threading.main_thread():
                install_signal(self.estop, s.estop_signal)
            if s.estop_keys:
                import sys
                if sys.stdin is not None and sys.stdin.isatty():
                    self._keys = KeyWatcher(self.estop)
                    self._keys.start()
        if s.estop_endpoint:
            self._estop_server = EStopServer(self.estop, s.estop_endpoint)
            self._estop_server.start()
        if self.source is not None:
            self.source.reset()
        log.info("bridge started: %s at %.0f Hz servo / %.0f Hz policy%s", self.info.name, self.cfg.driver.servo_hz,
                 self.cfg.spec.control_hz, " (DRY RUN: nothing is commanded)" if self.dry_run else "")
        return self.info

    @property
    def estop_endpoint(self) -> str | None:
        return self._estop_server.bound if self._estop_server else None

    def close(self) -> None:
        if not self.dry_run:
            try:
                self.driver.stop()
            except Exception:
                log.exception("driver stop failed at close")
        if self._estop_server is not None:
            self._estop_server.stop()
            self._estop_server.join(2.0)
        if self._keys is not None:
            self._keys.stop()
        self.driver.close()

    # ---------------------------------------------------------------- the loop
    def run(self, duration_s: float = 0.0, should_stop: Callable[[], bool] | None = None,
            on_tick: Callable[["Bridge", float], None] | None = None,
            on_control: Callable[["Bridge", ControlStep], None] | None = None) -> dict:
        """Run until `duration_s` (0: forever), `should_stop()`, or the source ends for good
        (a policy server refusing this robot: a spec mismatch); returns summary().
        `on_tick` runs after every servo cycle, `on_control` after every control step."""
        start = self.clock()
        next_tick = start
        next_control = start
        while True:
            now = self.clock()
            if duration_s and now - start >= duration_s:
                break
            if should_stop is not None and should_stop():
                break
            if self.source is not None and self.source.ended() is not None:
                break   # no action can ever come: holding on would only hide the mistake
            self.stats.period_error_s.append(now - next_tick)
            control = now >= next_control
            if control:
                next_control += self.control_dt
                if now - next_control > self.control_dt:   # fell far behind: skip, don't burst
                    next_control = now + self.control_dt
            step = self.step(now, control)
            if step is not None and on_control is not None:
                on_control(self, step)
            if on_tick is not None:
                on_tick(self, now)
            self.stats.loop_work_s.append(self.clock() - now)
            next_tick += self.servo_dt
            delay = next_tick - self.clock()
            if delay > 0:
                time.sleep(delay)
            elif delay < -self.servo_dt:
                next_tick = self.clock()   # missed whole periods: resynchronise
        return self.summary()

    def step(self, now: float, control: bool) -> ControlStep | None:
        """One servo cycle (and, when `control`, one policy-rate cycle, returned)."""
        self.stats.ticks += 1
        state = self.driver.read_state()
        self.states.append(state.t, state)
        if self.estop.reset_requested.is_set():
            self._reset_after_estop(state)
        if self.source is not None and self.source.poll(now):
            self.safety.feed(now)
        done = None
        if control:
            self.stats.control_ticks += 1
            aligned = self.aligned(now)
            action = None
            if self.camera_failure is not None:
                self.stats.camera_holds += 1   # no observation, and no action from an older one: hold
            elif self.source is not None:
                action = (self.source.act(now, None, None) if aligned is None else
                          self.source.act(now, aligned.arrays, aligned.state, aligned.t))
            self._plan(now, action)
            done = ControlStep(now, aligned, None if action is None else action.action)
        target = grip = None
        if self._traj is not None:
            w = self._traj.sample(now)
            target, grip = Pose(w.position, w.quat), w.gripper
        cmd = self.safety.filter(target, grip, state=state, now=now)
        self._command(cmd, now)
        return done

    # ---------------------------------------------------------------- pieces
    def aligned(self, now: float) -> Aligned | None:
        """This control step's observation (see Aligned), or None: no state yet, or a camera
        whose frame may not feed the policy (then `camera_failure` says which and why)."""
        frames = {}
        for name, check in self.frame_checks.items():
            cam = self.cameras.get(name)
            frame = cam.latest() if cam is not None else None
            problem = check.problem(frame, now)
            if problem is not None:
                self._camera_failed(name, problem)
                return None
            frames[name] = frame
        self._cameras_ok()
        t = min(f.t for f in frames.values()) if frames else now
        st = self.states.nearest(t) if frames else self.states.at(t)
        if st is None:
            return None
        obs, times = {}, {}
        for o in self.cfg.spec.observations:
            if o.source == "camera":
                f = frames[o.camera]
                times[o.key], obs[o.key] = f.t, f.image
            else:
                times[o.key], obs[o.key] = st[0], state_observation(o.source, st[1])
        for f in frames.values():
            self.stats.frame_state_skew_s.append(abs(f.t - st[0]))
            self.stats.frame_age_s.append(now - f.t)
        return Aligned(t, obs, times, st[1])

    def _camera_failed(self, name: str, problem: str) -> None:
        if self._failing_camera != name:   # one message per failure, not one per step
            if self.frame_checks[name].delivered:
                log.error("%s: holding the arm until it delivers fresh frames", problem)
                self.camera_failures[name] += 1
            else:
                log.warning("%s yet: holding the arm until it does", problem)
            self._failing_camera = name
        self.camera_failure = problem

    def _cameras_ok(self) -> None:
        if self.camera_failure is not None:
            log.warning("cameras deliver fresh frames again: control resumes (was: %s)", self.camera_failure)
            self.camera_failure = self._failing_camera = None

    def _plan(self, now: float, action: SourceAction | None) -> None:
        if action is None:
            self._traj = None   # the safety layer brakes and holds
            return
        st = self.states.at(now)
        reference = st[1].pose if st is not None else self.safety.commanded
        target, width = action_to_target(action.action, self.cfg.action, reference)
        start = self.safety.commanded
        grip0 = self._gripper if self._gripper is not None else width
        self._traj = PoseTrajectory([Waypoint(now, start.position, start.quat, grip0),
                                     Waypoint(now + self.control_dt, target.position, target.quat, width)])
        if action.t_obs is not None:
            # First action of this chunk: its first servo command goes out in this very cycle.
            self.stats.obs_to_command_s.append(self.clock() - action.t_obs)

    def _command(self, cmd, now: float) -> None:
        if cmd is None:   # e-stop latched
            if not self._stopped:
                self._stopped = True
                self._traj = None
                log.error("E-STOP (%s): arm stopped; latched until reset", self.estop.reason)
                if not self.dry_run:
                    self.driver.stop()
                    self.stats.stops_sent += 1
            return
        self._stopped = False
        self.last_command = cmd
        if self.dry_run:
            self.stats.would_send += 1
            if now - self._last_log >= 1.0:
                self._last_log = now
                log.info("dry run: would servo to %s quat %s gripper %.3f%s", np.round(cmd.pose.position, 4),
                         np.round(cmd.pose.quat, 4), cmd.gripper, " (holding)" if cmd.holding else "")
            return
        self.driver.servo(cmd.pose)
        self.stats.commands_sent += 1
        if self._gripper is None or abs(cmd.gripper - self._gripper) > 1e-6:
            self.driver.gripper(cmd.gripper)
        self._gripper = cmd.gripper

    def _reset_after_estop(self, state: ArmState) -> None:
        log.warning("e-stop reset by operator: restarting at rest from the measured pose")
        self.safety.reset(state)
        self._traj = None
        self.stats.resets += 1
        if self.source is not None:
            self.source.reset()

    # ---------------------------------------------------------------- report
    def summary(self) -> dict:
        s = self.stats
        out = {
            "robot": self.cfg.name, "driver": self.info.name if self.info else None, "dry_run": self.dry_run,
            "servo_hz": self.cfg.driver.servo_hz, "control_hz": self.cfg.spec.control_hz,
            "ticks": s.ticks, "control_ticks": s.control_ticks,
            "commands_sent": s.commands_sent, "would_send": s.would_send,
            "stops_sent": s.stops_sent, "estop_resets": s.resets,
            "safety": self.safety.summary() if self.safety else {},
            "other": dict(self.counts),
            "servo_period_error": summarize_ms(s.period_error_s, scale=1e3),
            "loop_work": summarize_ms(s.loop_work_s, scale=1e3),
            "obs_to_command": summarize_ms(s.obs_to_command_s, scale=1e3),
        }
        if self.frame_checks:
            out["cameras"] = {"frame_state_skew": summarize_ms(s.frame_state_skew_s, scale=1e3),
                              "frame_age": summarize_ms(s.frame_age_s, scale=1e3),
                              "held_steps": s.camera_holds, "failures": dict(self.camera_failures),
                              "failing": self.camera_failure}
        if self.source is not None:
            out.update(self.source.summary())
        return out
