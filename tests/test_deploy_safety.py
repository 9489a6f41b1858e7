"""Safety layer with fault injection: every command that would reach a driver is checked.

A RecordingDriver stands in for the arm here (the safety layer is pure logic);
the closed-loop tests with a real simulated arm process are in test_deploy_bridge.py.
"""
import math
import os
import signal
import time

import numpy as np
import pytest

from dpstack.deploy import rotations as R
from dpstack.deploy.config import SafetyConfig
from dpstack.deploy.drivers.base import ArmState, DriverInfo, Pose
from dpstack.deploy.estop import EStop, EStopServer, install_signal, send
from dpstack.deploy.safety import SafeCommand, SafetyLayer

SERVO_HZ = 500.0
DT = 1.0 / SERVO_HZ
DOWN = np.array([1.0, 0.0, 0.0, 0.0])  # tool pointing down


def config(**kw) -> SafetyConfig:
    base = dict(workspace_low=(0.3, -0.3, 0.05), workspace_high=(0.7, 0.3, 0.5),
                max_linear_speed=0.25, max_angular_speed=0.6, max_linear_accel=2.0, max_angular_accel=6.0,
                max_step_position=0.075, max_step_rotation=0.15, gripper_min_width=0.0, gripper_max_width=0.08,
                gripper_max_rate=0.1, watchdog_s=0.3, estop_endpoint="")
    base.update(kw)
    return SafetyConfig(**base)


def state(pos=(0.5, 0.0, 0.3), quat=DOWN, q=None, t=0.0, gripper=0.08) -> ArmState:
    return ArmState(t=t, joint_positions=np.zeros(7) if q is None else np.asarray(q, dtype=float),
                    pose=Pose(np.array(pos, dtype=float), np.array(quat, dtype=float)), gripper_width=gripper)


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class Checker:
    """Asserts the limits on every command, as a driver would receive them."""

    def __init__(self, cfg: SafetyConfig, start: ArmState, tol: float = 1e-9):
        self.cfg = cfg
        self.tol = tol
        # The arm starts at rest where it is measured.
        self.prev = SafeCommand(start.pose.copy(), start.gripper_width, True, 0.0, 0.0)
        self.prev_v = np.zeros(3)
        self.prev_w = np.zeros(3)
        self.commands = []

    def check(self, cmd):
        cfg = self.cfg
        p, q = cmd.pose.position, cmd.pose.quat
        assert np.all(np.isfinite(p)) and np.all(np.isfinite(q)) and math.isfinite(cmd.gripper)
        assert np.all(p >= np.array(cfg.workspace_low) - self.tol) and np.all(p <= np.array(cfg.workspace_high) + self.tol), p
        assert abs(np.linalg.norm(q) - 1.0) < 1e-9
        assert cfg.gripper_min_width - self.tol <= cmd.gripper <= cfg.gripper_max_width + self.tol
        if self.prev is not None:
            v = (p - self.prev.pose.position) / DT
            w = R.error_rotvec(self.prev.pose.quat, q) / DT
            assert np.linalg.norm(v) <= cfg.max_linear_speed * (1 + 1e-6), np.linalg.norm(v)
            assert np.linalg.norm(w) <= cfg.max_angular_speed * (1 + 1e-6), np.linalg.norm(w)
            assert np.linalg.norm(v - self.prev_v) <= cfg.max_linear_accel * DT * (1 + 1e-6) + 1e-9
            assert np.linalg.norm(w - self.prev_w) <= cfg.max_angular_accel * DT * (1 + 1e-6) + 1e-9
            assert abs(cmd.gripper - self.prev.gripper) <= cfg.gripper_max_rate * DT + 1e-12
            self.prev_v, self.prev_w = v, w
        self.prev = cmd
        self.commands.append(cmd)


def run(layer, clock, checker, targets, feed=True):
    for target, grip in targets:
        clock.t += DT
        if feed:
            layer.feed(clock.t)
        cmd = layer.filter(target, grip, now=clock.t)
        checker.check(cmd)
    return checker.commands


def test_fault_injection_never_leaves_the_limits_and_counts_every_kind():
    rng = np.random.default_rng(1)
    cfg = config()
    clock = Clock()
    layer = SafetyLayer(cfg, SERVO_HZ, clock=clock)
    start = state()
    layer.start(start)
    checker = Checker(cfg, start)
    targets = []
    n_nan = 0
    for i in range(3000):
        kind = rng.choice(["ok", "nan", "inf", "huge", "jump", "flip"], p=[0.6, 0.08, 0.04, 0.1, 0.12, 0.06])
        pos = np.array([0.5, 0.0, 0.3]) + rng.uniform(-0.15, 0.15, 3)
        quat = R.apply_rotvec(DOWN, rng.normal(0, 0.3, 3))
        grip = float(rng.uniform(0, 0.08))
        if kind == "nan":
            pos[rng.integers(3)] = np.nan
            n_nan += 1
        elif kind == "inf":
            quat[rng.integers(4)] = np.inf
            n_nan += 1
        elif kind == "huge":
            pos = rng.uniform(-1e6, 1e6, 3)
            grip = float(rng.uniform(-10, 10))
        elif kind == "jump":
            pos = pos + rng.uniform(-0.5, 0.5, 3)
        elif kind == "flip":
            quat = R.apply_rotvec(quat, np.array([np.pi * 0.99, 0, 0]))
        targets.append((Pose(pos, quat), grip))
    run(layer, clock, checker, targets)
    c = layer.summary()
    assert c["rejected_nan"] == n_nan
    for kind in ("clamped_workspace", "clamped_step", "clamped_speed", "clamped_accel", "clamped_gripper",
                 "clamped_gripper_rate"):
        assert c[kind] > 0, (kind, c)
    assert c["estop"] == 0 and c["watchdog_hold"] == 0


def test_a_nan_target_is_never_executed_the_arm_holds():
    cfg = config()
    clock = Clock()
    layer = SafetyLayer(cfg, SERVO_HZ, clock=clock)
    start = state()
    layer.start(start)
    checker = Checker(cfg, start)
    run(layer, clock, checker, [(Pose(np.array([0.5, 0.0, 0.3]), DOWN), 0.08)] * 10)
    before = layer.commanded.position.copy()
    cmds = run(layer, clock, checker, [(Pose(np.array([np.nan, 0.0, 0.3]), DOWN), float("nan"))] * 20)[-20:]
    assert all(c.holding for c in cmds)
    np.testing.assert_allclose(cmds[-1].pose.position, before, atol=1e-9)
    assert layer.summary()["rejected_nan"] == 40  # 20 poses + 20 gripper widths


def test_huge_target_goes_to_the_box_edge_at_limited_speed_and_stops_there():
    cfg = config()
    clock = Clock()
    layer = SafetyLayer(cfg, SERVO_HZ, clock=clock)
    start = state(pos=(0.65, 0.0, 0.3))
    layer.start(start)
    checker = Checker(cfg, start)
    cmds = run(layer, clock, checker, [(Pose(np.array([1e9, 0.0, 0.3]), DOWN), 0.08)] * 1000)
    assert cmds[-1].pose.position[0] == pytest.approx(0.7, abs=1e-6)
    assert cmds[-1].linear_speed < 1e-9
    assert layer.summary()["clamped_workspace"] == 1000


def test_sudden_jump_is_leashed_and_followed_at_limited_speed():
    cfg = config()
    clock = Clock()
    layer = SafetyLayer(cfg, SERVO_HZ, clock=clock)
    start = state()
    layer.start(start)
    checker = Checker(cfg, start)
    goal = np.array([0.5, 0.25, 0.3])  # 25 cm away in one step
    cmds = run(layer, clock, checker, [(Pose(goal, DOWN), 0.08)] * 3 * int(SERVO_HZ))
    speeds = [c.linear_speed for c in cmds]
    assert max(speeds) == pytest.approx(cfg.max_linear_speed, rel=1e-6)
    np.testing.assert_allclose(cmds[-1].pose.position, goal, atol=1e-6)
    assert layer.summary()["clamped_step"] > 0


def test_watchdog_decelerates_and_holds_within_watchdog_time_plus_one_period():
    cfg = config()
    clock = Clock()
    layer = SafetyLayer(cfg, SERVO_HZ, clock=clock)
    start = state(pos=(0.35, 0.0, 0.3))
    layer.start(start)
    checker = Checker(cfg, start)
    # A target that keeps running ahead: the arm moves at full speed when the chunks stop.
    last_feed = None
    for i in range(int(0.9 * SERVO_HZ)):
        clock.t += DT
        if i < int(0.3 * SERVO_HZ):
            layer.feed(clock.t)
            last_feed = clock.t
        x = min(0.35 + 0.3 * clock.t, 0.69)
        checker.check(layer.filter(Pose(np.array([x, 0.0, 0.3]), DOWN), 0.08, now=clock.t))
    times = np.arange(1, len(checker.commands) + 1) * DT
    speeds = np.array([c.linear_speed for c in checker.commands])
    assert speeds[times <= last_feed].max() == pytest.approx(cfg.max_linear_speed)
    after = times > last_feed + cfg.watchdog_s + DT
    assert after.any()
    assert np.all(speeds[after] == 0.0)
    held = np.array([c.pose.position for c in checker.commands])[after]
    assert np.all(held == held[0])
    assert layer.summary()["watchdog_hold"] > 0
    # A fresh chunk: control resumes.
    clock.t += DT
    layer.feed(clock.t)
    cmd = layer.filter(Pose(np.array([0.69, 0.0, 0.3]), DOWN), 0.08, now=clock.t)
    assert not cmd.holding and cmd.linear_speed > 0


def test_estop_latches_until_explicit_reset():
    cfg = config()
    clock = Clock()
    estop = EStop()
    layer = SafetyLayer(cfg, SERVO_HZ, estop=estop, clock=clock)
    layer.start(state())
    target = (Pose(np.array([0.55, 0.0, 0.3]), DOWN), 0.08)
    run(layer, clock, Checker(cfg, state()), [target] * 5)
    estop.trigger("test")
    for _ in range(50):
        clock.t += DT
        layer.feed(clock.t)
        assert layer.filter(*target, now=clock.t) is None
    assert layer.summary()["estop"] == 1
    layer.reset(state(pos=(0.52, 0.0, 0.3)))
    clock.t += DT
    layer.feed(clock.t)
    cmd = layer.filter(*target, now=clock.t)
    assert cmd is not None
    # Restarted at rest from the measured pose, not from the pre-stop command.
    assert np.linalg.norm(cmd.pose.position - np.array([0.52, 0.0, 0.3])) <= cfg.max_linear_accel * DT * DT + 1e-12


def test_joint_margin_holds_unless_the_target_retreats():
    cfg = config(joint_margin=0.1)
    clock = Clock()
    info = DriverInfo("fake", SERVO_HZ, 2, joint_lower=np.array([-1.0, -1.0]), joint_upper=np.array([1.0, 1.0]))
    layer = SafetyLayer(cfg, SERVO_HZ, info=info, clock=clock)
    ok = state(pos=(0.5, 0.0, 0.3), q=[0.0, 0.0])
    layer.start(ok)
    clock.t += DT
    layer.feed(clock.t)
    layer.filter(Pose(np.array([0.5, 0.0, 0.3]), DOWN), 0.08, state=ok, now=clock.t)
    near = state(pos=(0.52, 0.0, 0.3), q=[0.95, 0.0])   # inside the 0.1 rad margin
    layer._pose = near.pose.copy()
    clock.t += DT
    layer.feed(clock.t)
    cmd = layer.filter(Pose(np.array([0.6, 0.0, 0.3]), DOWN), 0.08, state=near, now=clock.t)
    assert cmd.holding and layer.summary()["joint_limit"] == 1
    clock.t += DT
    layer.feed(clock.t)
    cmd = layer.filter(Pose(np.array([0.5, 0.0, 0.3]), DOWN), 0.08, state=near, now=clock.t)  # back toward safety
    assert not cmd.holding and layer.summary()["joint_limit"] == 1


def test_signal_pulls_the_estop():
    estop = EStop()
    old = signal.getsignal(signal.SIGUSR1)
    try:
        install_signal(estop, "SIGUSR1")
        os.kill(os.getpid(), signal.SIGUSR1)
        deadline = time.monotonic() + 2
        while not estop.latched and time.monotonic() < deadline:
            time.sleep(0.01)
        assert estop.latched and estop.reason == "signal SIGUSR1"
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_zmq_estop_socket_latches_and_requests_reset():
    estop = EStop()
    server = EStopServer(estop, "tcp://127.0.0.1:*")
    server.start()
    try:
        assert send(server.bound, "status") == "ok"
        assert send(server.bound, "estop").startswith("latched")
        assert estop.latched
        send(server.bound, "reset")
        assert estop.reset_requested.is_set() and estop.latched  # the owner resets, from the measured state
        assert send(server.bound, "bogus").startswith("error")
    finally:
        server.stop()
        server.join(2)


@pytest.mark.parametrize("bad, match", [
    (dict(watchdog_s=0.1), "watchdog_s"),
    (dict(workspace_low=(0.8, -0.3, 0.05)), "workspace_low"),
    (dict(max_linear_speed=-1.0), "max_linear_speed"),
])
def test_bad_safety_config_is_refused_with_the_key_named(bad, match):
    with pytest.raises(ValueError, match=match):
        config(**bad)
