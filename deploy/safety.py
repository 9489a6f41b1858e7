"""The safety layer: every servo command passes through `SafetyLayer.filter`.

Limits come from the robot YAML (SafetyConfig), never from constants here. In
order, a target is
  1. rejected if it holds NaN/Inf (the arm holds instead),
  2. replaced by a hold when the watchdog sees no fresh chunk, or when a joint
     is inside its margin and the target does not retreat,
  3. clamped into the workspace box,
  4. pulled to within the per-step caps of the last command (a leash),
  5. followed with limited linear/angular speed and acceleration, braking
     early enough to arrive at rest (so a hold decelerates smoothly),
  6. clamped into the workspace box once more (a hard guarantee).
The e-stop is a latch (deploy/estop.py): while set, nothing is commanded.
Each intervention is counted by kind in `counts` and logged (rate-limited).
"""
from __future__ import annotations

import logging
import math
import time
from collections import Counter, deque
from dataclasses import dataclass

import numpy as np

from dpstack.deploy import rotations
from dpstack.deploy.config import SafetyConfig
from dpstack.deploy.drivers.base import ArmState, DriverInfo, Pose
from dpstack.deploy.estop import EStop

log = logging.getLogger("dpstack.deploy.safety")

KINDS = ("rejected_nan", "watchdog_hold", "joint_limit", "clamped_workspace", "clamped_step",
         "clamped_speed", "clamped_accel", "clamped_gripper", "clamped_gripper_rate", "estop")


@dataclass
class SafeCommand:
    pose: Pose
    gripper: float
    holding: bool          # True when the layer replaced the target by a hold
    linear_speed: float    # |v| of this command, m/s
    angular_speed: float   # |w| of this command, rad/s


def _braking_speed(d: np.ndarray | float, amax: float, dt: float) -> np.ndarray | float:
    """The highest speed from which braking at amax, in steps of dt, stops exactly within d.

    Braking over k whole steps (v = k*a*dt, then k-1, ...) covers a*dt^2*k(k+1)/2;
    take the largest such k and spread the remainder r over its k+1 steps, so the
    last step before rest is slower than a*dt and the stop needs no extra decel.
    """
    d = np.maximum(d, 0.0)
    k = np.floor(np.sqrt(0.25 + 2.0 * d / (amax * dt * dt)) - 0.5)
    r = np.maximum(d - amax * dt * dt * k * (k + 1) / 2.0, 0.0)
    return k * amax * dt + r / ((k + 1) * dt)


def _limit_motion(error: np.ndarray, v_prev: np.ndarray, vmax: float, amax: float, dt: float,
                  hold: bool, room: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, bool, bool]:
    """Velocity for the next step toward `error` away (or to rest when `hold`).

    Speed is capped by vmax and by the braking curve so the motion can stop at
    the target; `room` (distance to the walls below and above, per axis) caps
    each component by the same curve so momentum never carries the arm out of
    the box. The change of velocity is capped by amax*dt.
    Returns (velocity, speed_clamped, accel_clamped).
    """
    speed_clamped = False
    if hold:
        v_des = np.zeros_like(v_prev)
    else:
        d = float(np.linalg.norm(error))
        if d < 1e-12:
            v_des = np.zeros_like(v_prev)
        else:
            speed = float(_braking_speed(d, amax, dt))
            if speed > vmax:
                speed, speed_clamped = vmax, d / dt > vmax
            v_des = error / d * speed
    if room is not None:
        below, above = room
        v_des = np.clip(v_des, -_braking_speed(below, amax, dt), _braking_speed(above, amax, dt))
    dv = v_des - v_prev
    n = float(np.linalg.norm(dv))
    accel_clamped = n > amax * dt * (1 + 1e-9)
    if accel_clamped:
        dv = dv * (amax * dt / n)
    return v_prev + dv, speed_clamped, accel_clamped


class SafetyLayer:
    def __init__(self, cfg: SafetyConfig, servo_hz: float, info: DriverInfo | None = None,
                 estop: EStop | None = None, clock=time.monotonic):
        self.cfg = cfg
        self.dt = 1.0 / servo_hz
        self.estop = estop or EStop()
        self.clock = clock
        self.low = np.array(cfg.workspace_low, dtype=np.float64)
        self.high = np.array(cfg.workspace_high, dtype=np.float64)
        self.joint_lower = self.joint_upper = None
        if info is not None and info.joint_lower is not None and info.joint_upper is not None:
            self.joint_lower = np.asarray(info.joint_lower, dtype=np.float64) + cfg.joint_margin
            self.joint_upper = np.asarray(info.joint_upper, dtype=np.float64) - cfg.joint_margin
        self.counts: Counter[str] = Counter()
        self.events: deque[tuple[float, str, str]] = deque(maxlen=1000)
        self._last_log: dict[str, float] = {}
        self._pose: Pose | None = None
        self._v = np.zeros(3)
        self._w = np.zeros(3)
        self._gripper = 0.0
        self._last_feed: float | None = None
        self._last_safe_pose: Pose | None = None
        self._estop_seen = 0

    # ---- state -----------------------------------------------------------------
    def start(self, state: ArmState) -> None:
        """Begin from the measured state: first command equals where the arm is, at rest."""
        pose = state.pose.copy()
        pose.position = np.clip(pose.position, self.low, self.high)
        self._pose = pose
        self._last_safe_pose = pose.copy()
        self._v = np.zeros(3)
        self._w = np.zeros(3)
        self._gripper = float(np.clip(state.gripper_width, self.cfg.gripper_min_width, self.cfg.gripper_max_width))

    def feed(self, now: float | None = None) -> None:
        """A fresh chunk arrived: the watchdog is satisfied until now + watchdog_s."""
        self._last_feed = self.clock() if now is None else now

    def reset(self, state: ArmState) -> None:
        """Explicit operator reset after an e-stop: restart at rest from the measured state."""
        self.estop.reset()
        self._estop_seen = self.estop.count
        self.start(state)
        self._last_feed = None
        self._note("reset", "e-stop reset by operator", count=False)

    @property
    def last_feed(self) -> float | None:
        """When the last fresh chunk arrived (None: none yet)."""
        return self._last_feed

    @property
    def commanded(self) -> Pose | None:
        return None if self._pose is None else self._pose.copy()

    def summary(self) -> dict[str, int]:
        return {k: int(self.counts.get(k, 0)) for k in KINDS}

    # ---- the filter ----------------------------------------------------------
    def filter(self, target: Pose | None, gripper: float | None, state: ArmState | None = None,
               now: float | None = None) -> SafeCommand | None:
        """The command to send this servo cycle, or None while the e-stop is latched."""
        if self._pose is None:
            if state is None:
                raise RuntimeError("SafetyLayer.filter before start(): no reference pose")
            self.start(state)
        now = self.clock() if now is None else now
        if self.estop.latched:
            if self.estop.count != self._estop_seen:
                self._estop_seen = self.estop.count
                self._note("estop", self.estop.reason)
            return None

        hold = False
        if target is not None and not (np.all(np.isfinite(target.position)) and np.all(np.isfinite(target.quat))
                                       and np.linalg.norm(target.quat) > 1e-6):
            self._note("rejected_nan", f"non-finite target {target.position} {target.quat}")
            target, hold = None, True
        if gripper is not None and not math.isfinite(gripper):
            self._note("rejected_nan", f"non-finite gripper {gripper}")
            gripper = None
        if self._last_feed is None or target is None:
            hold = True  # nothing fresh to follow yet
        elif now - self._last_feed > self.cfg.watchdog_s - self.cfg.stop_time - self.dt:
            # Brake early enough (one cycle to spare) that the arm is at rest by watchdog_s.
            self._note("watchdog_hold", f"no fresh chunk for {now - self._last_feed:.3f} s")
            hold = True
        if not hold and state is not None and not self._joints_ok(state, target):
            hold = True

        prev = self._pose
        if hold:
            goal_pos, goal_quat = prev.position, prev.quat
        else:
            goal_pos = np.asarray(target.position, dtype=np.float64)
            goal_quat = rotations.normalize(target.quat)
            clamped = np.clip(goal_pos, self.low, self.high)
            if np.any(clamped != goal_pos):
                self._note("clamped_workspace", f"target {goal_pos} outside the workspace box")
                goal_pos = clamped
            goal_pos, goal_quat = self._leash(prev, goal_pos, goal_quat)

        v, s1, a1 = _limit_motion(goal_pos - prev.position, self._v, self.cfg.max_linear_speed,
                                  self.cfg.max_linear_accel, self.dt, hold,
                                  room=(prev.position - self.low, self.high - prev.position))
        w, s2, a2 = _limit_motion(rotations.error_rotvec(prev.quat, goal_quat), self._w,
                                  self.cfg.max_angular_speed, self.cfg.max_angular_accel, self.dt, hold)
        if s1 or s2:
            self._note("clamped_speed", f"target needs more than the speed limit (linear {s1}, angular {s2})")
        if a1 or a2:
            self._note("clamped_accel", f"velocity change above the acceleration limit (linear {a1}, angular {a2})")
        pos = prev.position + v * self.dt
        hard = np.clip(pos, self.low, self.high)
        if np.any(hard != pos):
            # Momentum carried past the box: stop at the wall on that axis.
            v = np.where(hard != pos, 0.0, v)
            pos = hard
        quat = rotations.apply_rotvec(prev.quat, w * self.dt)
        self._pose, self._v, self._w = Pose(pos, quat), v, w
        self._gripper = self._filter_gripper(gripper)
        return SafeCommand(self._pose.copy(), self._gripper, hold,
                           float(np.linalg.norm(v)), float(np.linalg.norm(w)))

    # ---- pieces ----------------------------------------------------------------
    def _leash(self, prev: Pose, pos: np.ndarray, quat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        step = pos - prev.position
        d = float(np.linalg.norm(step))
        if d > self.cfg.max_step_position:
            self._note("clamped_step", f"target {d:.3f} m from the last command")
            pos = prev.position + step * (self.cfg.max_step_position / d)
        err = rotations.error_rotvec(prev.quat, quat)
        a = float(np.linalg.norm(err))
        if a > self.cfg.max_step_rotation:
            self._note("clamped_step", f"target {a:.3f} rad from the last command")
            quat = rotations.apply_rotvec(prev.quat, err * (self.cfg.max_step_rotation / a))
        return pos, quat

    def _joints_ok(self, state: ArmState, target: Pose) -> bool:
        """Inside the joint margins, or retreating toward the last pose that was."""
        if self.joint_lower is None:
            return True
        q = np.asarray(state.joint_positions, dtype=np.float64)
        if q.shape != self.joint_lower.shape:
            return True  # the driver reports limits for a different joint set; nothing to compare
        if np.all(q >= self.joint_lower) and np.all(q <= self.joint_upper):
            self._last_safe_pose = state.pose.copy()
            return True
        safe = self._last_safe_pose
        cur = self._pose
        retreat = (np.linalg.norm(target.position - safe.position) < np.linalg.norm(cur.position - safe.position) - 1e-6
                   or rotations.angle_between(target.quat, safe.quat) < rotations.angle_between(cur.quat, safe.quat) - 1e-6)
        if not retreat:
            self._note("joint_limit", f"joint positions {np.round(q, 3)} inside the margin; holding")
        return retreat

    def _filter_gripper(self, gripper: float | None) -> float:
        prev = self._gripper
        if gripper is None:
            return prev
        g = float(np.clip(gripper, self.cfg.gripper_min_width, self.cfg.gripper_max_width))
        if g != gripper:
            self._note("clamped_gripper", f"gripper {gripper} outside [{self.cfg.gripper_min_width}, {self.cfg.gripper_max_width}]")
        step = self.cfg.gripper_max_rate * self.dt
        if abs(g - prev) > step + 1e-12:
            self._note("clamped_gripper_rate", "gripper rate limited")
            g = prev + math.copysign(step, g - prev)
        return g

    def _note(self, kind: str, detail: str, count: bool = True) -> None:
        now = self.clock()
        if count:
            self.counts[kind] += 1
        self.events.append((now, kind, detail))
        # One line per kind per second keeps a 500 Hz loop from flooding the log.
        if now - self._last_log.get(kind, -math.inf) >= 1.0:
            self._last_log[kind] = now
            level = logging.WARNING if kind in ("estop", "rejected_nan", "watchdog_hold", "joint_limit") else logging.INFO
            log.log(level, "safety %s (x%d): %s", kind, self.counts.get(kind, 0), detail)
