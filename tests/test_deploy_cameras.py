"""Cameras and the bridge's use of their frames, on a fake clock.

The bridge builds each observation from the newest frame of every camera and the arm
state nearest its capture time (the skew is reported), and holds, saying which camera,
when a frame is too old or a camera's frame counter stops advancing.
RealSense runs against a FAKE of the pyrealsense2 calls used (hardware we cannot have);
OpenCV reads a real video file.
"""
from __future__ import annotations

import logging
import types

import numpy as np
import pytest

from dpstack.deploy.bridge import Bridge
from dpstack.deploy.cameras import FrameCheck, Frame, OpenCVCamera, RealSenseCamera, TimedBuffer, start_cameras
from dpstack.deploy.config import CameraConfig, ConfigError, load_config
from dpstack.deploy.drivers.base import ArmState, DriverInfo, Pose
from dpstack.deploy.sources import SourceAction

CAM = CameraConfig("front", width=8, height=6, fps=20.0, max_age_s=0.2)


# ---------------------------------------------------------------- FrameCheck
def frame(t: float, seq: int, value: int = 0) -> Frame:
    return Frame(t, np.full((6, 8, 3), value, np.uint8), seq)


def test_a_frame_older_than_max_age_is_refused_and_the_message_names_the_camera():
    check = FrameCheck(CAM)
    assert check.problem(None, 0.0) == "camera 'front' has delivered no frame"
    assert check.problem(frame(1.0, 1), 1.15) is None
    problem = check.problem(frame(1.0, 1), 1.25)
    assert problem is not None and problem.startswith("camera 'front'") and "0.250 s old" in problem
    assert check.problem(frame(1.3, 2), 1.35) is None   # a fresh one is fine again


def test_a_frozen_counter_is_refused_even_when_the_driver_restamps_the_frame():
    check = FrameCheck(CAM)
    # The same frame #7 re-delivered every 50 ms with a fresh timestamp (a stuck device).
    verdicts = [check.problem(frame(t, 7), t + 0.01) for t in np.arange(0.0, 0.5, 0.05)]
    first_refused = next(i for i, v in enumerate(verdicts) if v is not None)
    assert all(v is None for v in verdicts[:first_refused])
    assert 0.2 <= first_refused * 0.05 + 0.01 <= 0.26   # refused once repeated for max_age_s
    assert "frozen: frame #7" in verdicts[first_refused]
    assert all("frozen" in v for v in verdicts[first_refused:])
    assert check.problem(frame(0.5, 8), 0.51) is None   # the counter moves: fit again


def test_nearest_takes_the_sample_closest_in_time_on_either_side():
    buf = TimedBuffer(maxlen=10)
    assert buf.nearest(1.0) is None
    for t in (1.0, 2.0, 3.0):
        buf.append(t, f"s{t}")
    assert buf.nearest(0.0) == (1.0, "s1.0")
    assert buf.nearest(2.4) == (2.0, "s2.0")
    assert buf.nearest(2.6) == (3.0, "s3.0")
    assert buf.nearest(9.0) == (3.0, "s3.0")


def test_camera_config_refuses_a_max_age_no_healthy_frame_could_meet():
    with pytest.raises(ValueError, match="max_age_s 0.05 must exceed latency_s"):
        CameraConfig("front", fps=30.0, latency_s=0.1, max_age_s=0.05)
    with pytest.raises(ConfigError, match="kind: mujoco"):
        load_config("ur5e", ["cameras=[{name: agentview, kind: mujoco}]"])


# ---------------------------------------------------------------- the bridge on a fake clock
class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class FakeArm:
    """An arm whose state is stamped by the fake clock and whose x position is that time,
    so an observation shows which state sample it took."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.sent = 0

    def connect(self) -> DriverInfo:
        return DriverInfo("fake", 125.0, 7)

    def read_state(self) -> ArmState:
        t = self.clock()
        return ArmState(t, np.zeros(7), Pose(np.array([0.5, 0.0, 0.3]), np.array([1.0, 0.0, 0.0, 0.0])), 0.08)

    def servo(self, target: Pose) -> None:
        self.sent += 1

    def gripper(self, width: float) -> None:
        pass

    def stop(self) -> None:
        pass

    def close(self) -> None:
        pass


class FakeCamera:
    def __init__(self):
        self.frame: Frame | None = None

    def latest(self) -> Frame | None:
        return self.frame


class RecordingSource:
    """Every observation the bridge handed over; answers each with a small motion."""

    def __init__(self):
        self.seen: list[tuple[float, dict, ArmState]] = []
        self.observed_at: list[float | None] = []

    def reset(self) -> None:
        pass

    def poll(self, now: float) -> bool:
        return True   # fresh input every cycle: the watchdog never holds in these tests

    def act(self, now, observation, state, observed_at=None):
        if observation is None:
            return None
        self.seen.append((now, observation, state))
        self.observed_at.append(observed_at)
        return SourceAction(np.array([0.1, 0, 0, 0, 0, 0, -1.0]))

    def ended(self):
        return None

    def summary(self) -> dict:
        return {}


def camera_bridge():
    cfg = load_config("sim")   # as shipped: agentview, 84x84, max_age_s 0.25
    cfg.safety.estop_endpoint, cfg.safety.estop_keys, cfg.safety.estop_signal = "", False, ""
    clock, camera, source = Clock(), FakeCamera(), RecordingSource()
    bridge = Bridge(cfg, FakeArm(clock), source=source, cameras={"agentview": camera}, clock=clock,
                    install_handlers=False)
    bridge.start()
    return bridge, clock, camera, source


def image(value: int) -> np.ndarray:
    return np.full((84, 84, 3), value, np.uint8)


def advance(bridge, clock, seconds: float, on_step=None) -> int:
    """Run servo cycles at 500 Hz on the fake clock; a control step every 50 ms."""
    n = int(round(seconds * 500))
    for i in range(n):
        clock.t += 0.002
        if on_step is not None:
            on_step(clock.t)
        bridge.step(clock.t, control=i % 25 == 24)
    return n


def test_the_observation_takes_the_newest_frame_and_the_state_nearest_its_capture():
    bridge, clock, camera, source = camera_bridge()
    states = {}

    def deliver(t):
        states[round(t, 3)] = t
        if round((t - 100.0) * 1000) % 50 == 30:   # a frame every 50 ms, captured 23 ms before it arrives
            camera.frame = Frame(t - 0.023, image(int(t * 10) % 256), int(round(t * 1000)))

    advance(bridge, clock, 1.0, deliver)
    assert len(source.seen) >= 18
    for now, obs, state in source.seen[2:]:
        assert obs["agentview_image"].shape == (84, 84, 3) and obs["agentview_image"].dtype == np.uint8
        # The state nearest the frame's capture time, not the newest one (2 ms servo samples).
        assert state.t < now - 0.015
    last_now, last_obs, last_state = source.seen[-1]
    newest = camera.frame
    np.testing.assert_array_equal(last_obs["agentview_image"], newest.image)
    assert abs(last_state.t - newest.t) <= 0.001 + 1e-9
    # The observation is stamped with the frame's capture time, not the control step's.
    assert source.observed_at[-1] == newest.t and last_now - newest.t >= 0.023 - 1e-9
    summary = bridge.summary()["cameras"]
    assert summary["frame_state_skew"]["n"] == len(source.seen)
    assert summary["frame_state_skew"]["max_ms"] <= 1.0 + 1e-6
    assert 23.0 <= summary["frame_age"]["p50_ms"] <= 75.0
    assert summary["held_steps"] == 0 and summary["failures"] == {}


def test_a_camera_that_stops_delivering_holds_the_arm_with_one_message_naming_it(caplog):
    bridge, clock, camera, source = camera_bridge()
    advance(bridge, clock, 0.5, lambda t: setattr(camera, "frame", Frame(t, image(1), int(t * 1000))))
    fed = len(source.seen)
    assert fed >= 8
    with caplog.at_level(logging.WARNING, logger="dpstack.deploy.bridge"):
        advance(bridge, clock, 1.0)   # no frame any more: the last one ages
    # Fed while the last frame was younger than max_age_s (0.25 s), never after.
    last = camera.frame.t
    assert fed + 3 <= len(source.seen) <= fed + 5
    assert all(now - last <= 0.25 for now, _, _ in source.seen[fed:])
    assert bridge.camera_failure is not None and bridge.camera_failure.startswith("camera 'agentview'")
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "camera 'agentview'" in errors[0].getMessage() and "holding" in errors[0].getMessage()
    assert bridge.last_command.holding and bridge.last_command.linear_speed == 0.0   # braked to rest
    s = bridge.summary()["cameras"]
    assert s["failures"] == {"agentview": 1} and s["held_steps"] >= 10 and s["failing"] == bridge.camera_failure
    # Frames again: control resumes, and the log says so.
    with caplog.at_level(logging.WARNING, logger="dpstack.deploy.bridge"):
        advance(bridge, clock, 0.3, lambda t: setattr(camera, "frame", Frame(t, image(2), int(t * 1000))))
    assert bridge.camera_failure is None and source.seen[-1][1]["agentview_image"][0, 0, 0] == 2
    assert any("control resumes" in r.getMessage() for r in caplog.records)


def test_a_frozen_frame_is_never_fed_beyond_its_age_limit(caplog):
    bridge, clock, camera, source = camera_bridge()
    stuck = image(9)

    def restamp(t):   # a driver re-delivering frame #5 with fresh timestamps
        camera.frame = Frame(t, stuck, 5)

    with caplog.at_level(logging.ERROR, logger="dpstack.deploy.bridge"):
        advance(bridge, clock, 1.0, restamp)
    fed_times = [now for now, _, _ in source.seen]
    # Fed only while within max_age_s of the first copy the bridge saw, never after.
    assert fed_times and max(fed_times) - fed_times[0] <= 0.25 + 1e-9
    assert len(source.seen) <= 6 and bridge.summary()["cameras"]["held_steps"] >= 13
    assert "frozen: frame #5" in bridge.camera_failure
    assert len([r for r in caplog.records if "frozen" in r.getMessage()]) == 1


def test_no_frame_yet_holds_without_calling_it_a_failure(caplog):
    bridge, clock, camera, source = camera_bridge()
    with caplog.at_level(logging.WARNING, logger="dpstack.deploy.bridge"):
        advance(bridge, clock, 0.3)
    assert source.seen == []
    assert bridge.summary()["cameras"]["failures"] == {}
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert bridge.driver.sent > 0 and bridge.last_command.holding


# ---------------------------------------------------------------- RealSense (fake SDK)
class FakeRealSense:
    """A FAKE of the pyrealsense2 calls RealSenseCamera makes (we have no RealSense here)."""

    def __init__(self, frames):
        self.log = []
        self._frames = list(frames)   # (device_ms, domain, number)
        sdk = self
        self.stream = types.SimpleNamespace(color="color")
        self.format = types.SimpleNamespace(rgb8="rgb8")
        self.option = types.SimpleNamespace(global_time_enabled="global_time_enabled")
        self.timestamp_domain = types.SimpleNamespace(hardware_clock="hw", global_time="global", system_time="system")

        class Config:
            def enable_device(self, serial):
                sdk.log.append(("enable_device", serial))

            def enable_stream(self, *args):
                sdk.log.append(("enable_stream", *args))

        class Sensor:
            def supports(self, option):
                return option == "global_time_enabled"

            def set_option(self, option, value):
                sdk.log.append(("set_option", option, value))

        class ColorFrame:
            def __init__(self, ms, domain, number):
                self.ms, self.domain, self.number = ms, domain, number

            def __bool__(self):
                return True

            def get_timestamp(self):
                return self.ms

            def get_frame_timestamp_domain(self):
                return self.domain

            def get_frame_number(self):
                return self.number

            def get_data(self):
                return np.full((480, 640, 3), self.number % 256, np.uint8)

        class Pipeline:
            def start(self, config):
                sdk.log.append(("start",))
                device = types.SimpleNamespace(query_sensors=lambda: [Sensor()])
                return types.SimpleNamespace(get_device=lambda: device)

            def wait_for_frames(self, timeout_ms):
                ms, domain, number = sdk._frames.pop(0)
                color = ColorFrame(ms, domain, number)
                return types.SimpleNamespace(get_color_frame=lambda: color)

            def stop(self):
                sdk.log.append(("stop",))

        self.config = Config
        self.pipeline = Pipeline


def test_realsense_frames_carry_the_device_capture_time_on_the_monotonic_clock():
    cfg = CameraConfig("wrist", kind="realsense", device="123456", width=84, height=84, fps=30.0)
    sdk = FakeRealSense([(5000.0, "hw", 11), (5033.0, "hw", 12)])
    cam = RealSenseCamera(cfg, sdk=sdk)
    assert ("enable_device", "123456") in sdk.log
    assert ("enable_stream", "color", 640, 480, "rgb8", 30) in sdk.log
    assert ("set_option", "global_time_enabled", 1) in sdk.log
    got = [cam.grab() for _ in range(2)]
    assert [f.seq for f in got] == [11, 12]   # the device's own frame counter
    assert got[0].image.shape == (84, 84, 3) and got[0].image.dtype == np.uint8 and got[0].image[0, 0, 0] == 11
    cam.stop()
    assert ("stop",) in sdk.log

    cam = RealSenseCamera(cfg, sdk=FakeRealSense([]))
    hw, wall = sdk.timestamp_domain.hardware_clock, sdk.timestamp_domain.global_time
    # Hardware clock: device time + the smallest (arrival - device time) seen so far.
    assert cam.capture_time(5000.0, hw, 50.020, 0.0) == pytest.approx(50.020)
    assert cam.capture_time(5033.0, hw, 50.050, 0.0) == pytest.approx(50.050)   # offset 45.017 s from now on
    assert cam.capture_time(5066.0, hw, 50.090, 0.0) == pytest.approx(5.066 + 45.017)   # a slow delivery: not 50.090
    # Global time: the device clock on the host's wall clock (ms since the epoch), moved to the monotonic one.
    assert cam.capture_time(1.7e12 + 500.0, wall, 77.0, 1.7e9 + 1.0) == pytest.approx(76.5)


def test_a_realsense_camera_without_its_sdk_is_one_sentence():
    try:
        import pyrealsense2  # noqa: F401
    except ImportError:
        with pytest.raises(ModuleNotFoundError, match=r"pip install 'dpstack\[realsense\]'"):
            start_cameras([CameraConfig("wrist", kind="realsense")])
    else:
        pytest.skip("pyrealsense2 is installed: see the API check")


def test_the_real_pyrealsense2_has_the_calls_the_camera_makes():
    rs = pytest.importorskip("pyrealsense2")
    for name in ("pipeline", "config", "stream", "format", "option", "timestamp_domain"):
        assert hasattr(rs, name), name
    assert hasattr(rs.option, "global_time_enabled") and hasattr(rs.timestamp_domain, "hardware_clock")
    assert hasattr(rs.stream, "color") and hasattr(rs.format, "rgb8")


# ---------------------------------------------------------------- OpenCV (a real video file)
def test_opencv_camera_counts_only_new_images_so_a_stuck_device_reads_as_frozen(tmp_path):
    cv2 = pytest.importorskip("cv2")
    path = str(tmp_path / "clip.avi")
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), 30.0, (32, 24))
    values = [10, 60, 60, 60, 120]
    for v in values:
        writer.write(np.full((24, 32, 3), v, np.uint8))
    writer.release()
    cam = OpenCVCamera(CameraConfig("usb", device=path, width=16, height=12, fps=30.0, latency_s=0.05))
    try:
        frames = [cam.grab() for _ in values]
    finally:
        cam.release()
    assert [f.seq for f in frames] == [1, 2, 2, 2, 3]
    assert all(f.image.shape == (12, 16, 3) and f.image.dtype == np.uint8 for f in frames)
    assert np.all(np.diff([f.t for f in frames]) >= 0)


# ---------------------------------------------------------------- `dpstack bridge --check-cameras`
def test_check_cameras_reports_rate_age_and_a_frozen_camera(tmp_path):
    clock = Clock()

    class Scripted(FakeCamera):
        """Frames at 25 Hz captured 30 ms before the probe sees them; frozen: one counter."""

        def __init__(self, name, frozen):
            super().__init__()
            self.cfg = CameraConfig(name, fps=25.0, max_age_s=0.2)
            self.frozen = frozen

        def latest(self):
            clock.t += 0.001   # every look takes 1 ms of the fake clock
            n = int((clock.t - 100.0) / 0.04)
            return Frame(n * 0.04 + 100.0 - 0.03, image(n % 256), 1 if self.frozen else n)

    from dpstack.deploy.cameras import check_cameras

    cams = {"good": Scripted("good", False), "stuck": Scripted("stuck", True)}
    report = check_cameras(cams, 1.0, str(tmp_path), clock=clock)
    good, stuck = report["good"], report["stuck"]
    assert 20 <= good["frames"] <= 26 and good["fps"] == pytest.approx(25.0, rel=0.05)
    assert good["size"] == [84, 84, 3] and good["verdict"] == "ok"
    assert 30.0 <= good["age_when_seen"]["p50_ms"] <= 33.0
    assert stuck["frames"] == 1 and "frozen: frame #1" in stuck["verdict"]
    assert len(list(tmp_path.glob("good_*.png"))) == good["frames"]
