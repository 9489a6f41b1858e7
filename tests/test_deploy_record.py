"""`dpstack record`: teleoperated recording through the bridge into a ReplayBuffer.

The replay device drives MujocoArm (sim/arm_process.py, a real subprocess) through the
bridge's loop, safety layer and watchdog; what it records must train. Servo rate
125 Hz, as in test_deploy_bridge.py, to keep the 2-core machine's load bounded.
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import redirect_stdout

import numpy as np
import pytest
import yaml

from dpstack import cli
from dpstack.data.replay_buffer import DatasetAttrs, ReplayBuffer
from dpstack.deploy.bridge import Aligned, Bridge, ControlStep, robot_spec
from dpstack.deploy.cameras import CameraThread, Frame
from dpstack.deploy.config import CONFIG_DIR, CameraConfig, ObservationSource, load_config, without_cameras
from dpstack.deploy.drivers.base import ArmState, Pose
from dpstack.deploy.drivers.franky import FrankyDriver
from dpstack.deploy.drivers.mujoco_arm import MujocoArm
from dpstack.deploy.drivers.ur_rtde import URRtdeDriver
from dpstack.deploy.estop import EStop
from dpstack.deploy.record import EpisodeRecorder, RecordError, Session, StatusLine, open_store
from dpstack.deploy.teleop import KeyboardDevice, ReplayDevice, ReplayEpisode, TeleopSource, load_replay

STEPS = 40


def sim_yaml(tmp_path) -> str:
    config = yaml.safe_load((CONFIG_DIR / "sim.yaml").read_text())
    config["spec"]["observations"] = [o for o in config["spec"]["observations"] if o["source"] != "camera"]
    config["cameras"] = []   # the arm's state only: these tests record no frames
    config["driver"]["servo_hz"] = 125
    config["spec"]["control_hz"] = 50   # short episodes in wall time; the loop is the same
    config["safety"].update(estop_endpoint="", estop_keys=False)
    path = tmp_path / "sim.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def episode(direction: int, gripper: float, steps: int = STEPS) -> list[list[float]]:
    a = np.zeros((steps, 7), dtype=np.float32)
    a[:, direction] = 0.4
    a[:, 6] = gripper
    return a.tolist()


def test_replay_records_kept_episodes_that_data_info_shows_and_training_reads(tmp_path):
    stream = [episode(0, -1.0), {"actions": episode(1, 1.0), "keep": False}, episode(1, 1.0), episode(2, -1.0)]
    replay = tmp_path / "replay.json"
    replay.write_text(json.dumps(stream))
    store = tmp_path / "demos.zarr"
    config = sim_yaml(tmp_path)
    out = io.StringIO()
    with redirect_stdout(out):
        assert cli.main(["record", "--config", config, "--out", str(store), "--device", "replay",
                         "--replay", str(replay)]) == 0
    summary = json.loads(out.getvalue().split("summary ", 1)[1])
    assert summary["episodes_kept"] == 3 and summary["episodes_discarded"] == 1, summary
    assert summary["commands_sent"] == summary["ticks"] and summary["safety"]["estop"] == 0

    rb = ReplayBuffer.open(store)
    spec = robot_spec(load_config(config))
    assert rb.attrs.source == "human" and rb.attrs.spec == spec and rb.attrs.extra["device"] == "replay"
    assert rb.n_episodes == 3 and list(rb.episode_lengths()) == [STEPS] * 3
    for i, kept in enumerate([0, 2, 3]):   # the discarded second one is not there
        ep = rb.get_episode(i)
        np.testing.assert_array_equal(ep["action"], np.asarray(stream[kept], dtype=np.float32))
        assert np.all(np.diff(ep["control_time"]) > 0) and ep["control_time"][0] == 0.0
        assert np.all(ep["state_time"] <= ep["control_time"])   # the last state at or before the tick
        # The arm followed the replayed motion: along +x, +y, +z for the kept episodes.
        axis = [0, 1, 2][i]
        moved = ep["robot0_eef_pos"][-1] - ep["robot0_eef_pos"][0]
        assert moved[axis] > 0.01 and abs(moved[axis]) > 2 * np.abs(np.delete(moved, axis)).max(), moved

    info = io.StringIO()
    with redirect_stdout(info):
        assert cli.main(["data", "info", str(store)]) == 0
    assert "episodes  3" in info.getvalue() and "human" in info.getvalue(), info.getvalue()
    # ... and it exports for lerobot's tools as it is (no key clashes with LeRobot's own columns).
    with redirect_stdout(io.StringIO()):
        assert cli.main(["data", "export", str(store), "--format", "lerobot-v3",
                         "--out", str(tmp_path / "lerobot")]) == 0
    assert (tmp_path / "lerobot" / "meta" / "info.json").is_file()

    obs_keys = "[" + ",".join(o.key for o in spec.observations) + "]"
    assert cli.main(["train", "--config", "lift_state_small", "--dataset", str(store), "--out", str(tmp_path / "train"),
                     "--no-progress", "--set", f"policy.obs_keys={obs_keys}", "policy.preset=test", "train.steps=2",
                     "train.batch_size=8", "train.ckpt_every=2", "train.warmup_steps=1", "train.log_every=1",
                     "train.eval_every=0", "train.device=cpu"]) == 0
    assert (tmp_path / "train" / "last.pt").is_file()


def test_a_recorder_killed_mid_episode_keeps_every_episode_before_it(tmp_path):
    stream = [episode(0, -1.0, 10), episode(1, 1.0, 10), episode(2, -1.0, 100_000)]
    replay = tmp_path / "replay.json"
    replay.write_text(json.dumps(stream))
    store = tmp_path / "demos.zarr"
    proc = subprocess.Popen([sys.executable, "-m", "dpstack.cli", "record", "--config", sim_yaml(tmp_path),
                             "--out", str(store), "--device", "replay", "--replay", str(replay)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines = []
    try:
        deadline = time.monotonic() + 60
        for line in proc.stderr:
            lines.append(line)
            if "episode 3: recording" in line or time.monotonic() > deadline:
                break
        time.sleep(0.5)   # well inside the third episode
    finally:
        os.killpg(proc.pid, signal.SIGKILL)   # the recorder and its simulated arm, as a power cut would
        proc.wait(10)
    assert any("episode 3: recording" in line for line in lines), "".join(lines)
    rb = ReplayBuffer.open(store)
    assert rb.n_episodes == 2
    for i in range(2):
        np.testing.assert_array_equal(rb.get_episode(i)["action"], np.asarray(stream[i], dtype=np.float32))


def test_keyboard_keys_become_motions_gripper_episode_events_and_estop():
    estop = EStop()
    keys = KeyboardDevice(estop, speed=0.3)
    keys.feed("wwwa" + "c" + "n")
    got = keys.read()
    np.testing.assert_allclose(got.motion, [0.9, 0.3, 0, 0, 0, 0])
    assert got.gripper == 1.0 and got.events == ("start",)
    keys.feed("wwwwww")
    assert keys.read().motion[0] == 1.0   # clipped to the action's range
    again = keys.read()
    assert not again.motion.any() and again.gripper is None and again.events == ()   # nothing pressed: no motion
    keys.feed("yxh")
    assert keys.read().events == ("keep", "discard", "home")
    keys.feed(" ")
    assert estop.latched
    keys.feed("r")
    assert estop.reset_requested.is_set()


def test_teleop_source_turns_motions_into_the_configured_actions_and_homes():
    cfg = load_config("sim").action
    state = ArmState(0.0, np.zeros(7), Pose(np.array([0.5, 0.0, 0.3]), np.array([1.0, 0, 0, 0])), 0.08)
    keys = KeyboardDevice(speed=0.5)
    source = TeleopSource(keys, cfg)
    keys.feed("wc")
    a = source.act(0.0, None, state).action
    np.testing.assert_allclose(a, [0.5, 0, 0, 0, 0, 0, 1.0])
    # Absolute mode: the same motion becomes a target pose from the measured one.
    absolute = load_config("sim", ["action.mode=absolute"]).action
    source = TeleopSource(keys, absolute)
    keys.feed("w")
    a = source.act(0.0, None, state).action
    np.testing.assert_allclose(a[:3], [0.5 + 0.5 * absolute.position_scale, 0, 0.3], atol=1e-6)
    np.testing.assert_allclose(np.abs(a[3:6]), [np.pi, 0, 0], atol=1e-6)
    # Home: delta actions toward the start pose until there, then the device again.
    source = TeleopSource(keys, cfg, home_pose=Pose(np.array([0.45, 0.0, 0.3]), np.array([1.0, 0, 0, 0])))
    keys.feed("h")
    source.act(0.0, None, state)
    assert source.homing and source.events == ["home"]
    toward = source.act(0.05, None, state).action
    assert toward[0] == -1.0 and np.allclose(toward[1:6], 0)   # 5 cm away: a full step back
    there = ArmState(0.1, np.zeros(7), source.home_pose.copy(), 0.08)
    assert source.act(0.1, None, there) is not None and source.homing   # arrived, still moving: not yet
    assert source.act(0.15, None, there) is None and not source.homing   # home and at rest


def test_replay_streams_load_from_stores_npy_and_json_and_refuse_the_wrong_width(tmp_path):
    np.save(tmp_path / "one.npy", np.ones((5, 7), np.float32))
    assert [e.actions.shape for e in load_replay(tmp_path / "one.npy", action_dim=7)] == [(5, 7)]
    np.save(tmp_path / "two.npy", np.ones((2, 5, 7), np.float32))
    assert len(load_replay(tmp_path / "two.npy")) == 2
    with pytest.raises(Exception, match=r"the robot takes \(T, 8\)"):
        load_replay(tmp_path / "one.npy", action_dim=8)
    spec = robot_spec(load_config("sim"))
    rb = ReplayBuffer.create(tmp_path / "s.zarr", DatasetAttrs(spec.task, spec.control_hz, spec, "human"))
    ep = {o.key: np.zeros((4,) + o.shape, o.dtype) for o in spec.observations}
    rb.add_episode({**ep, "action": np.full((4, 7), 0.5, np.float32)})
    got = load_replay(tmp_path / "s.zarr")
    assert len(got) == 1 and np.all(got[0].actions == 0.5)
    device = ReplayDevice(got)
    script = [device.read() for _ in range(8)]
    assert [s.events for s in script[:2]] == [("home",), ("start",)]
    assert all(s.action is not None for s in script[2:6]) and script[6].events == ("keep",)
    assert script[7].events == ("quit",)


def test_a_store_with_another_spec_is_refused_and_kept(tmp_path):
    spec = robot_spec(load_config("sim"))
    other = robot_spec(load_config("sim", ["spec.task=stack"]))
    ReplayBuffer.create(tmp_path / "s.zarr", DatasetAttrs(other.task, other.control_hz, other, "human")).close()
    with pytest.raises(RecordError, match="record into a new --out"):
        open_store(tmp_path / "s.zarr", DatasetAttrs(spec.task, spec.control_hz, spec, "human"))
    assert ReplayBuffer.open(tmp_path / "s.zarr").attrs.spec == other


@pytest.mark.parametrize("argv, says", [
    (["--device", "replay"], "--device replay needs --replay PATH"),
    (["--device", "keyboard"], "needs an interactive terminal"),
    (["--device", "replay", "--replay", "missing.json"], "no replay stream at missing.json"),
    pytest.param(["--device", "spacemouse"], "pip install 'dpstack[spacemouse]'",
                 marks=pytest.mark.skipif(importlib.util.find_spec("pyspacemouse") is not None,
                                          reason="pyspacemouse is installed: the absent-SDK message cannot show")),
])
def test_record_mistakes_get_one_sentence_and_status_2(tmp_path, argv, says):
    done = subprocess.run([sys.executable, "-m", "dpstack.cli", "record", "--config", sim_yaml(tmp_path),
                           "--out", str(tmp_path / "d.zarr"), *argv], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=60, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().startswith("dpstack record:") and says in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "d.zarr").exists()


class SyntheticCamera(CameraThread):
    """A stand-in for a camera we cannot have here: frames at `fps`, each filled with its own
    index, stamped `latency_s` before they arrive (as OpenCVCamera stamps them)."""

    def __init__(self, size: int = 8, fps: float = 30.0, latency_s: float = 0.02):
        super().__init__(CameraConfig("synthetic", width=size, height=size, fps=fps, latency_s=latency_s))
        self.i = 0

    def grab(self) -> Frame | None:
        if self._halt.wait(1.0 / self.cfg.fps):
            return None
        self.i += 1
        image = np.full((self.cfg.height, self.cfg.width, 3), self.i % 256, np.uint8)
        return Frame(time.monotonic() - self.cfg.latency_s, image, self.i)


def camera_config(size: int = 8):
    cfg = without_cameras(load_config("sim"))
    cfg.driver.servo_hz = 125
    cfg.safety.estop_endpoint, cfg.safety.estop_keys = "", False
    cfg.cameras.append(CameraConfig("agentview", width=size, height=size, fps=30.0))
    cfg.spec.observations.append(ObservationSource("agentview_image", "camera", "agentview"))
    return cfg


def test_camera_frames_are_recorded_aligned_to_the_control_ticks_with_their_skew(tmp_path):
    cfg = camera_config()
    camera = SyntheticCamera()
    camera.start()
    actions = np.asarray(episode(0, -1.0, 12), dtype=np.float32)
    source = TeleopSource(ReplayDevice([ReplayEpisode(actions)]), cfg.action)
    bridge = Bridge(cfg, MujocoArm(cfg.driver), source=source, cameras={"agentview": camera}, install_handlers=False)
    try:
        bridge.start()
        spec = bridge.spec
        store = open_store(tmp_path / "cam.zarr", DatasetAttrs(spec.task, spec.control_hz, spec, "human"))
        session = Session(bridge, source, store, StatusLine(io.StringIO()))
        figures = session.run()
    finally:
        bridge.close()
        camera.stop()
    rb = ReplayBuffer.open(tmp_path / "cam.zarr")
    assert rb.attrs.spec.observations[-1].shape == (8, 8, 3) and rb.n_episodes == 1
    ep = rb.get_episode(0)
    assert ep["agentview_image"].shape == (12, 8, 8, 3) and ep["agentview_image"].dtype == np.uint8
    # Each row holds the last frame captured at or before its tick: never a later one, and
    # frames advance with the ticks (30 Hz camera, 20 Hz control: a new frame nearly every row).
    assert np.all(ep["agentview_image_time"] <= ep["control_time"])
    assert np.all(ep["control_time"] - ep["agentview_image_time"] < 0.2)
    index = ep["agentview_image"][:, 0, 0, 0].astype(int)
    assert np.all(np.diff(index) >= 0) and index[-1] > index[0]
    skew = figures["camera_state_skew"]["agentview_image"]
    assert skew["n"] == 12 and skew["p50_ms"] is not None


def test_a_frame_of_the_wrong_size_stops_the_recording_with_a_sentence():
    spec = robot_spec(camera_config(8))
    recorder = EpisodeRecorder(spec, ("agentview_image",))
    recorder.start()
    state = ArmState(0.0, np.zeros(7), Pose(np.array([0.5, 0.0, 0.3]), np.array([1.0, 0, 0, 0])), 0.08)
    arrays = {o.key: np.zeros(o.shape, o.dtype) for o in spec.observations}
    recorder.add(ControlStep(0.0, Aligned(0.0, arrays, {}, state), np.zeros(7, np.float32)))
    arrays["agentview_image"] = np.zeros((84, 84, 3), np.uint8)
    with pytest.raises(RecordError, match=r"agentview_image: expected shape .* fix the YAML"):
        recorder.add(ControlStep(0.05, Aligned(0.05, arrays, {}, state), np.zeros(7, np.float32)))


def vendor_driver(robot: str, cfg):
    """The UR or Franka driver over the test FAKES of their SDKs (tests/test_deploy_drivers.py):
    recording drives the same driver interface; the fakes record every SDK call."""
    from test_deploy_drivers import FakeFranky, fake_rtde_modules

    if robot == "ur5e":
        log = []
        sdk, _ = fake_rtde_modules(log)
        return URRtdeDriver(cfg.driver, sdk=sdk), lambda: [c[1] for c in log if c[0] == "control"]
    franky = FakeFranky()
    return FrankyDriver(cfg.driver, sdk=franky), lambda: [c[0] for c in franky.log]


@pytest.mark.parametrize("robot, servo_call", [("ur5e", "servoL"), ("franka", "move")])
def test_recording_drives_the_vendor_drivers_through_the_same_interface(tmp_path, robot, servo_call):
    cfg = load_config(robot)
    cfg.safety.estop_endpoint, cfg.safety.estop_keys = "", False
    cameras = {}
    if cfg.cameras:   # ur5e's YAML lists a camera: the synthetic stand-in, at the YAML's size
        c = cfg.cameras[0]
        cameras[c.name] = SyntheticCamera(size=c.width)
        cameras[c.name].start()
    driver, calls = vendor_driver(robot, cfg)
    actions = np.asarray(episode(0, 1.0, 4), dtype=np.float32)
    source = TeleopSource(ReplayDevice([ReplayEpisode(actions)]), cfg.action)
    bridge = Bridge(cfg, driver, source=source, cameras=cameras, install_handlers=False)
    try:
        bridge.start()
        spec = bridge.spec
        store = open_store(tmp_path / f"{robot}.zarr", DatasetAttrs(spec.task, spec.control_hz, spec, "human"))
        Session(bridge, source, store, StatusLine(io.StringIO())).run()
    finally:
        bridge.close()
        for cam in cameras.values():
            cam.stop()
    rb = ReplayBuffer.open(tmp_path / f"{robot}.zarr")
    assert rb.n_episodes == 1 and rb.attrs.spec == bridge.spec
    np.testing.assert_array_equal(rb.get_episode(0)["action"], actions)
    assert set(rb.keys) >= {o.key for o in bridge.spec.observations}
    assert calls().count(servo_call) > 10   # the servo stream went to the vendor SDK


def test_the_keyboard_device_records_from_a_real_terminal_and_restores_it(tmp_path):
    """`dpstack record` on a pseudo-terminal: keys typed into it start, move, keep, quit."""
    import pty
    import termios

    master, slave = pty.openpty()
    before = termios.tcgetattr(slave)
    store = tmp_path / "keys.zarr"
    proc = subprocess.Popen([sys.executable, "-m", "dpstack.cli", "record", "--config", sim_yaml(tmp_path),
                             "--out", str(store)], stdin=slave, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    lines = []

    def wait_for(text):
        for line in proc.stderr:
            lines.append(line)
            if text in line:
                return
        raise AssertionError(f"no {text!r} in {''.join(lines)}")

    try:
        # Type only once the recorder has the terminal in cbreak mode: entering it flushes
        # what was typed before (a loaded machine starts the recorder in seconds, not 0.5 s).
        deadline = time.monotonic() + 60.0
        while termios.tcgetattr(slave)[3] & termios.ICANON and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.write(master, b"n")
        wait_for("episode 1: recording")
        for _ in range(25):
            os.write(master, b"w")   # a held key: the terminal's auto-repeat
            time.sleep(0.02)
        os.write(master, b"y")
        wait_for("episode 1: kept")
        os.write(master, b"Q")
        assert proc.wait(30) == 0, "".join(lines)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        after = termios.tcgetattr(slave)
        os.close(master)
        os.close(slave)
    assert after == before   # cbreak mode undone at exit
    rb = ReplayBuffer.open(store)
    assert rb.n_episodes == 1 and rb.attrs.extra["device"] == "keyboard"
    action = rb.get_episode(0)["action"]
    assert action[:, 0].max() > 0 and np.all(action[:, 1:6] == 0) and np.all(action[:, 6] == -1.0)
