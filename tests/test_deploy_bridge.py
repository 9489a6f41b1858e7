"""The bridge closed loop: MujocoArm (sim/arm_process.py, a real subprocess) <- bridge ->
the real PolicyServer in a real subprocess, over real sockets.

The policy served is tests/deploy_goal_server.py's GoalPolicy, a TEST stand-in for a
trained package (a proportional controller emitting robosuite-style delta actions
toward a known goal), so the tests can say where the arm must end up.
Servo rate 125 Hz here to keep the 2-core CI machine's load bounded.
"""
import json
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from dpstack.deploy import rotations as R
from dpstack.deploy.bridge import Bridge, action_to_target, robot_spec
from dpstack.deploy.cameras import TimedBuffer
from dpstack.deploy.config import CONFIG_DIR, load_config, without_cameras
from dpstack.deploy.drivers.base import Pose
from dpstack.deploy.drivers.mujoco_arm import MujocoArm
from dpstack.deploy.estop import send
from dpstack.runtime.client import PolicyClient
from server_process import ServerProcess

GOAL = np.array([0.62, 0.08, 0.15])


def sim_config(**safety):
    """sim.yaml publishing the arm's state only (the goal policy reads no camera)."""
    cfg = without_cameras(load_config("sim"))
    cfg.driver.servo_hz = 125
    cfg.safety.estop_endpoint = ""
    for k, v in safety.items():
        setattr(cfg.safety, k, v)
    return cfg


def goal_server(bind="tcp://127.0.0.1:*", *args):
    return ServerProcess(command=[sys.executable, "tests/deploy_goal_server.py", "--bind", bind,
                                 "--goal", *map(str, GOAL), *args]).start()


def reached(bridge, tol=0.01):
    """should_stop for runs that end when the arm is at the goal (bounded by duration_s)."""
    st = bridge.states.latest()
    return st is not None and np.linalg.norm(st[1].pose.position - GOAL) < tol


def make_bridge(cfg, endpoint, **kw):
    client = PolicyClient(endpoint, robot_spec(cfg), "sim-arm", timeout_s=0.3, heartbeat_s=0.2, retry_s=0.1)
    bridge = Bridge(cfg, MujocoArm(cfg.driver), client, install_handlers=False, **kw)
    bridge.start()
    return bridge, client


def run_then_close(bridge, client, servers: list, **run) -> dict:
    """bridge.run(**run); then, whatever happened, close the bridge and its link and kill
    every server in `servers` (a run that restarts one appends the new one)."""
    try:
        return bridge.run(**run)
    finally:
        bridge.close()
        client.close()
        for server in servers:
            server.kill()


def record_sent(arm) -> dict:
    """Every pose and gripper width that actually reaches `arm` from now on."""
    sent = {"pos": [], "quat": [], "gripper": []}
    servo, gripper = arm.servo, arm.gripper
    arm.servo = lambda p: (sent["pos"].append(p.position.copy()), sent["quat"].append(p.quat.copy()), servo(p))[-1]
    arm.gripper = lambda w: (sent["gripper"].append(float(w)), gripper(w))[-1]
    return sent


def assert_within_limits(sent: dict, cfg) -> None:
    """Every command in `sent` (record_sent) stayed inside the robot YAML's safety limits."""
    s = cfg.safety
    dt = 1.0 / cfg.driver.servo_hz
    pos, quat, widths = np.array(sent["pos"]), np.array(sent["quat"]), np.array(sent["gripper"])
    assert np.isfinite(pos).all() and np.isfinite(quat).all() and np.isfinite(widths).all()
    eps = 1e-9
    assert np.all(pos >= np.array(s.workspace_low) - eps) and np.all(pos <= np.array(s.workspace_high) + eps)
    step = np.linalg.norm(np.diff(pos, axis=0), axis=1)
    assert step.max() <= min(s.max_linear_speed * dt, s.max_step_position) + eps, step.max()
    turn = np.array([R.angle_between(a, b) for a, b in zip(quat[:-1], quat[1:])])
    assert turn.max() <= min(s.max_angular_speed * dt, s.max_step_rotation) + 1e-6, turn.max()
    assert np.all(widths >= s.gripper_min_width - eps) and np.all(widths <= s.gripper_max_width + eps)


def assert_held_by_the_watchdog_deadline(trace: "Trace", killed: float, cfg) -> None:
    """After the policy server died at `killed`: at rest within watchdog_s + one servo period
    of the last chunk, and still there. The safety layer brakes by servo cycles, so on a
    machine loaded enough to stretch the loop's cycles the deadline is also at least that
    many cycles after the last chunk."""
    t, speed, cpos, chunks = np.array(trace.t), np.array(trace.speed), np.array(trace.pos), np.array(trace.chunks)
    before_kill = t < killed
    last_chunk = np.flatnonzero(before_kill & (chunks == chunks[before_kill].max()))[0]
    last_chunk_time = t[last_chunk]
    cycles = int(np.ceil(cfg.safety.watchdog_s * cfg.driver.servo_hz)) + 1
    window = (t > last_chunk_time + cfg.safety.watchdog_s + 1.0 / cfg.driver.servo_hz) & \
        (np.arange(len(t)) >= last_chunk + cycles)
    assert window.sum() > 20
    moving = t[window][speed[window] > 0]
    assert moving.size == 0, ("the commanded motion must be stopped by the watchdog deadline: still moving "
                              f"{moving[-1] - last_chunk_time:.3f} s after the last chunk; servo cycles after it "
                              f"came up to {np.diff(t[t >= last_chunk_time]).max() * 1e3:.0f} ms apart")
    assert np.all(cpos[window] == cpos[window][0])


class Trace:
    """Every command the bridge produced, with its time."""

    def __init__(self):
        self.t, self.pos, self.speed, self.holding, self.chunks = [], [], [], [], []

    def __call__(self, bridge, now):
        c = bridge.last_command
        if c is None:
            return
        self.t.append(now)
        self.pos.append(c.pose.position.copy())
        self.speed.append(c.linear_speed + c.angular_speed)
        self.holding.append(c.holding)
        self.chunks.append(bridge.source.chunks)


def test_closed_loop_reaches_the_goal_through_the_safety_layer():
    cfg = sim_config()
    server = goal_server()
    bridge, client = make_bridge(cfg, server.endpoint)
    try:
        summary = bridge.run(duration_s=15.0, should_stop=lambda: reached(bridge, 0.005))
        final = bridge.driver.read_state().pose.position
    finally:
        bridge.close()
        client.close()
        server.kill()
    assert np.linalg.norm(final - GOAL) < 0.01, final
    assert summary["chunks"] > 20 and summary["commands_sent"] == summary["ticks"]
    assert summary["link"]["reconnects"] == 0
    assert summary["safety"]["rejected_nan"] == 0 and summary["safety"]["clamped_workspace"] == 0
    assert summary["obs_to_chunk"]["n"] > 20


def test_policy_server_killed_mid_episode_arm_holds_then_resumes_after_restart():
    cfg = sim_config()
    server = goal_server()
    servers = [server]
    endpoint = server.endpoint
    bridge, client = make_bridge(cfg, endpoint)
    trace = Trace()
    events = {}

    def on_tick(b, now):
        trace(b, now)
        moving = b.last_command is not None and b.last_command.linear_speed > 0.1
        if "killed" not in events and b.source.chunks >= 5 and moving:
            server.kill()   # SIGKILL: no Bye, the link just goes silent
            events["killed"] = now
        elif "killed" in events and "restarted" not in events and now - events["killed"] > 0.8:
            servers.append(goal_server(bind=endpoint))
            events["restarted"] = b.clock()
            events["chunks_at_restart"] = b.source.chunks

    summary = run_then_close(bridge, client, servers, duration_s=15.0, on_tick=on_tick,
                             should_stop=lambda: "restarted" in events and reached(bridge, 0.005))
    final = bridge.states.latest()[1].pose.position   # the last state the bridge read
    assert "killed" in events and "restarted" in events
    t = np.array(trace.t)
    speed = np.array(trace.speed)
    pos = np.array(trace.pos)
    # The last chunk before the kill: the watchdog clock starts there.
    chunks = np.array(trace.chunks)
    before_kill = t < events["killed"]
    last_chunk_time = t[np.flatnonzero(before_kill & (chunks == chunks[before_kill].max()))[0]]
    deadline = last_chunk_time + cfg.safety.watchdog_s + 1.0 / cfg.driver.servo_hz
    window = (t > deadline) & (t < events["restarted"])
    assert window.sum() > 20
    assert np.all(speed[window] == 0.0), "the commanded motion must be stopped by the watchdog deadline"
    assert np.all(pos[window] == pos[window][0])
    assert summary["safety"]["watchdog_hold"] > 0
    # Control resumed after the restart: new chunks and the arm reached the goal.
    assert summary["chunks"] > events["chunks_at_restart"] + 10
    assert summary["link"]["reconnects"] >= 1
    assert np.linalg.norm(final - GOAL) < 0.01, final


def test_dry_run_computes_everything_and_commands_nothing():
    cfg = sim_config()
    server = goal_server()
    bridge, client = make_bridge(cfg, server.endpoint, dry_run=True)
    try:
        start = bridge.driver.read_state().pose.position
        summary = bridge.run(duration_s=1.5)
        time.sleep(0.2)
        end = bridge.driver.read_state().pose.position
    finally:
        bridge.close()
        client.close()
        server.kill()
    assert summary["dry_run"] and summary["commands_sent"] == 0 and summary["would_send"] > 100
    assert summary["chunks"] > 5
    assert np.linalg.norm(end - start) < 0.003   # the simulated arm never moved
    # ... although the bridge planned a motion toward the goal (delta actions from the
    # measured pose, which stays put: about one action step ahead of it).
    planned = bridge.last_command.pose.position - start
    assert planned @ (GOAL - start) / np.linalg.norm(GOAL - start) > 0.01


def test_estop_over_zmq_stops_the_arm_until_reset():
    cfg = sim_config(estop_endpoint="tcp://127.0.0.1:*")
    server = goal_server()
    bridge, client = make_bridge(cfg, server.endpoint)
    events = {}

    def on_tick(b, now):
        if "estop" not in events and b.source.chunks >= 5:
            assert send(b.estop_endpoint, "estop").startswith("latched")
            events["estop"] = now
            events["commands"] = b.stats.commands_sent
        elif "estop" in events and "reset" not in events and now - events["estop"] > 0.5:
            events["commands_while_stopped"] = b.stats.commands_sent - events["commands"]
            send(b.estop_endpoint, "reset")
            events["reset"] = now

    try:
        summary = bridge.run(duration_s=15.0, on_tick=on_tick,
                             should_stop=lambda: "reset" in events and reached(bridge, 0.005))
        final = bridge.driver.read_state().pose.position
    finally:
        bridge.close()
        client.close()
        server.kill()
    assert events["commands_while_stopped"] == 0
    assert summary["stops_sent"] == 1 and summary["estop_resets"] == 1
    assert summary["safety"]["estop"] == 1
    assert np.linalg.norm(final - GOAL) < 0.01   # resumed after the reset


def test_action_conversion_follows_the_configured_osc_pose_scaling():
    cfg = load_config("sim").action
    ref = Pose(np.array([0.5, 0.0, 0.3]), R.from_rotvec(np.array([np.pi, 0, 0])))
    target, width = action_to_target(np.array([1.0, -0.5, 0.0, 0.0, 0.0, 1.0, 1.0]), cfg, ref)
    np.testing.assert_allclose(target.position, [0.5 + cfg.position_scale, -0.5 * cfg.position_scale, 0.3])
    assert R.angle_between(target.quat, ref.quat) == pytest.approx(cfg.rotation_scale)
    # World-frame rotation about z, applied to the current orientation.
    assert R.angle_between(target.quat, R.multiply(R.from_rotvec(np.array([0, 0, cfg.rotation_scale])), ref.quat)) < 1e-9
    assert width == cfg.gripper_closed_width
    _, width = action_to_target(np.array([0, 0, 0, 0, 0, 0, -1.0]), cfg, ref)
    assert width == cfg.gripper_open_width
    # Out-of-range actions are clipped to +-1 like the OSC controller does.
    target, _ = action_to_target(np.array([50.0, 0, 0, 0, 0, 0, 0]), cfg, ref)
    assert target.position[0] == pytest.approx(0.5 + cfg.position_scale)


def test_alignment_takes_the_last_sample_at_or_before_the_observation_time():
    buf = TimedBuffer(maxlen=10)
    for t in (1.0, 2.0, 3.0):
        buf.append(t, f"s{t}")
    assert buf.at(0.5) is None
    assert buf.at(2.0) == (2.0, "s2.0")
    assert buf.at(2.9) == (2.0, "s2.0")
    assert buf.at(99.0) == (3.0, "s3.0")
    buf.append(2.5, "older")   # out of order: ignored
    assert buf.latest() == (3.0, "s3.0")


def test_bridge_cli_stops_with_a_sentence_when_the_policy_reads_an_observation_the_robot_lacks(tmp_path):
    """spec_mismatch is fatal: `dpstack bridge` stops at once with a non-zero status and says
    what the policy reads and what the robot config publishes, instead of holding for the run."""
    config = yaml.safe_load((CONFIG_DIR / "sim.yaml").read_text())
    config["driver"]["servo_hz"] = 125
    config["safety"].update(estop_endpoint="", estop_keys=False)
    path = tmp_path / "sim.yaml"
    path.write_text(yaml.safe_dump(config))
    server = goal_server("tcp://127.0.0.1:*", "--needs", "object-state")
    try:
        done = subprocess.run([sys.executable, "-m", "dpstack.cli", "bridge", "--config", str(path), "--dry-run",
                               "--duration", "30", "--connect", server.endpoint],
                              capture_output=True, text=True, timeout=120)
    finally:
        server.kill()
    assert done.returncode == 1, done.stdout + done.stderr
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("dpstack bridge:") and "object-state" in message, done.stderr
    published = "['robot0_eef_pos', 'robot0_eef_quat', 'robot0_gripper_qpos', 'agentview_image']"
    assert f"the robot publishes {published}" in message and "the policy reads" in message, message
    assert "Traceback" not in done.stderr
    assert json.loads(done.stdout.split("summary ", 1)[1])["ticks"] < 125 * 5   # stopped at once, not after the run
