"""Cameras for the bridge: one interface, a frame plus its capture time.

Every camera delivers `Frame`s: a uint8 (height, width, 3) RGB image at the configured
size, its capture time on this computer's `time.monotonic()` clock, and the camera's
frame counter. Implementations, one per `CameraConfig.kind`:
- opencv: any OpenCV/V4L2 device; stamped at arrival minus the configured latency;
- realsense: Intel RealSense through pyrealsense2 (optional extra, imported lazily),
  stamped with the device's global/hardware timestamp mapped onto the monotonic clock;
- mujoco: rendered by the simulated arm's process (deploy/drivers/mujoco_arm.py), stamped
  with the simulated instant it shows.
Each runs its own thread (a device read blocks for a frame period) and keeps a short
ring of frames. `FrameCheck` decides whether a camera's newest frame may feed the
policy: the bridge holds the arm when it may not (too old, or a frozen counter).
"""
from __future__ import annotations

import bisect
import collections
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Generic, Iterable, Protocol, TypeVar

import numpy as np

from dpstack.deploy.config import CameraConfig

log = logging.getLogger("dpstack.deploy.cameras")
T = TypeVar("T")


class TimedBuffer(Generic[T]):
    """A thread-safe ring of samples with increasing timestamps."""

    def __init__(self, maxlen: int):
        self._t: collections.deque[float] = collections.deque(maxlen=maxlen)
        self._v: collections.deque[T] = collections.deque(maxlen=maxlen)
        self._lock = threading.Lock()

    def append(self, t: float, value: T) -> None:
        with self._lock:
            if self._t and t < self._t[-1]:
                return  # a sample older than the newest: clocks never go back here
            self._t.append(t)
            self._v.append(value)

    def at(self, t: float) -> tuple[float, T] | None:
        """The last sample with timestamp <= t (None if every sample is newer or none exists)."""
        with self._lock:
            i = bisect.bisect_right(self._t, t) - 1
            return None if i < 0 else (self._t[i], self._v[i])

    def nearest(self, t: float) -> tuple[float, T] | None:
        """The sample whose timestamp is closest to t, before or after it (None if empty)."""
        with self._lock:
            if not self._t:
                return None
            i = bisect.bisect_left(self._t, t)
            best = min((j for j in (i - 1, i) if 0 <= j < len(self._t)), key=lambda j: abs(self._t[j] - t))
            return self._t[best], self._v[best]

    def latest(self) -> tuple[float, T] | None:
        with self._lock:
            return (self._t[-1], self._v[-1]) if self._t else None


@dataclass(frozen=True)
class Frame:
    t: float            # capture time, this computer's time.monotonic()
    image: np.ndarray   # uint8 (height, width, 3) RGB
    seq: int            # the camera's frame counter: the same number again is the same frame


class Camera(Protocol):
    """What the bridge needs from a camera, whatever delivers it."""

    cfg: CameraConfig

    def start(self) -> None:
        """Begin capturing (a thread of its own)."""

    def latest(self) -> Frame | None:
        """The newest frame, or None before the first."""

    def stop(self) -> None:
        """Stop capturing and release the device."""


class FrameCheck:
    """May this camera's newest frame feed the policy? It may not when it is older than
    `max_age_s`, or when the camera's frame counter has not advanced for `max_age_s`
    (a driver re-stamping the same frame would otherwise look fresh)."""

    def __init__(self, cfg: CameraConfig):
        self.name = cfg.name
        self.max_age_s = cfg.max_age_s
        self._seq: int | None = None
        self._first_t = 0.0   # capture time of the first frame seen with this counter
        self.delivered = False   # any frame yet (before the first, a hold is start-up, not a failure)

    def problem(self, frame: Frame | None, now: float) -> str | None:
        """None when `frame` is fit to use at `now`; otherwise one sentence saying why not."""
        if frame is None:
            return f"camera {self.name!r} has delivered no frame"
        self.delivered = True
        age = now - frame.t
        if age > self.max_age_s:
            return f"camera {self.name!r}: its newest frame is {age:.3f} s old (max_age_s {self.max_age_s})"
        if frame.seq != self._seq:
            self._seq, self._first_t = frame.seq, frame.t
            return None
        frozen = now - self._first_t
        if frozen > self.max_age_s:
            return (f"camera {self.name!r} is frozen: frame #{frame.seq} has been repeated for {frozen:.3f} s "
                    f"(max_age_s {self.max_age_s})")
        return None


def fit(image: np.ndarray, cfg: CameraConfig) -> np.ndarray:
    """An RGB image at the configured size, uint8 and contiguous."""
    if image.shape[:2] != (cfg.height, cfg.width):
        import cv2   # only cameras that need resizing use it
        image = cv2.resize(image, (cfg.width, cfg.height), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(image, dtype=np.uint8)


class CameraThread(threading.Thread):
    """A capture thread: `grab()` (one frame or None, blocking up to about a frame period)
    in a loop into a ring of frames. Subclasses open the device in __init__ (so a missing
    camera fails at start, with its name) and implement grab() and release()."""

    def __init__(self, cfg: CameraConfig, buffer_s: float = 2.0):
        super().__init__(daemon=True, name=f"camera-{cfg.name}")
        self.cfg = cfg
        self.frames: TimedBuffer[Frame] = TimedBuffer(max(2, int(buffer_s * cfg.fps)))
        self._halt = threading.Event()
        self.n_frames = 0
        self.n_failures = 0

    def grab(self) -> Frame | None:
        raise NotImplementedError

    def release(self) -> None:
        pass

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                try:
                    frame = self.grab()
                except Exception as e:   # a device error: count it and keep trying; FrameCheck holds the arm
                    if self.n_failures == 0:
                        log.error("camera %r: %s", self.cfg.name, e)
                    self.n_failures += 1
                    time.sleep(0.05)
                    continue
                if frame is not None:
                    self.frames.append(frame.t, frame)
                    self.n_frames += 1
        finally:
            self.release()

    def latest(self) -> Frame | None:
        s = self.frames.latest()
        return None if s is None else s[1]

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(2.0)
        else:
            self.release()


class OpenCVCamera(CameraThread):
    """OpenCV/V4L2. Frames are stamped at arrival minus `latency_s` (measure it: docs/deploy.md).
    The counter advances only when the image changes: a real sensor's noise makes every
    frame differ, so an unchanged image is a stuck device re-delivering its last buffer."""

    def __init__(self, cfg: CameraConfig, buffer_s: float = 2.0):
        super().__init__(cfg, buffer_s)
        import cv2  # only when a camera is configured

        self.cv2 = cv2
        device: Any = int(cfg.device) if cfg.device.isdigit() else cfg.device
        self.cap = cv2.VideoCapture(device)
        if not self.cap.isOpened():
            raise RuntimeError(f"camera {cfg.name!r}: cannot open device {cfg.device!r}")
        self.cap.set(cv2.CAP_PROP_FPS, cfg.fps)
        self._seq = 0
        self._previous: np.ndarray | None = None

    def grab(self) -> Frame | None:
        ok, frame = self.cap.read()
        arrived = time.monotonic()
        if not ok:
            raise RuntimeError(f"no frame from device {self.cfg.device!r}")
        rgb = fit(self.cv2.cvtColor(frame, self.cv2.COLOR_BGR2RGB), self.cfg)
        if self._previous is None or not np.array_equal(rgb, self._previous):
            self._seq += 1
        self._previous = rgb
        return Frame(arrived - self.cfg.latency_s, rgb, self._seq)

    def release(self) -> None:
        self.cap.release()


def _import_realsense() -> Any:
    try:
        import pyrealsense2
    except ImportError as e:
        raise ModuleNotFoundError("a RealSense camera needs pyrealsense2: pip install 'dpstack[realsense]'",
                                  name="pyrealsense2") from e
    return pyrealsense2


class RealSenseCamera(CameraThread):
    """Intel RealSense colour stream through pyrealsense2, captured at STREAM_SIZE and
    resized to the configured size.

    Capture times come from the device: with the SDK's global time enabled, a frame's
    timestamp is the device clock already mapped onto the host's wall clock (ms), which
    we move onto the monotonic clock; with a bare hardware clock, the offset to the
    monotonic clock is the smallest (arrival - device time) seen, i.e. the mapping with
    the least transport delay. `latency_s` is not used: the device stamps the exposure.
    NOT TESTED ON HARDWARE: tests/test_deploy_cameras.py runs it against a fake of the
    SDK calls used here."""

    STREAM_SIZE = (640, 480)

    def __init__(self, cfg: CameraConfig, buffer_s: float = 2.0, sdk: Any | None = None):
        super().__init__(cfg, buffer_s)
        rs = self.rs = sdk or _import_realsense()
        self.pipeline = rs.pipeline()
        config = rs.config()
        if cfg.device and cfg.device != "0":
            config.enable_device(cfg.device)   # the serial number
        config.enable_stream(rs.stream.color, *self.STREAM_SIZE, rs.format.rgb8, int(round(cfg.fps)))
        try:
            profile = self.pipeline.start(config)
        except RuntimeError as e:
            raise RuntimeError(f"camera {cfg.name!r}: cannot start RealSense {cfg.device!r}: {e}") from None
        for sensor in profile.get_device().query_sensors():
            if sensor.supports(rs.option.global_time_enabled):
                sensor.set_option(rs.option.global_time_enabled, 1)
        self._offsets: collections.deque[float] = collections.deque(maxlen=300)

    def capture_time(self, device_ms: float, domain: Any, arrived: float, wall: float) -> float:
        """A frame's device timestamp (ms) in `domain`, on the monotonic clock; `arrived` and
        `wall` are time.monotonic() and time.time() read together when it arrived."""
        if domain == self.rs.timestamp_domain.hardware_clock:
            self._offsets.append(arrived - device_ms / 1e3)
            return device_ms / 1e3 + min(self._offsets)
        # global_time and system_time: the host's wall clock (ms since the epoch)
        return device_ms / 1e3 - (wall - arrived)

    def grab(self) -> Frame | None:
        frames = self.pipeline.wait_for_frames(int(max(1.0, 2.0 / self.cfg.fps) * 1000))
        arrived, wall = time.monotonic(), time.time()
        color = frames.get_color_frame()
        if not color:
            return None
        t = self.capture_time(color.get_timestamp(), color.get_frame_timestamp_domain(), arrived, wall)
        image = fit(np.asanyarray(color.get_data()), self.cfg)
        return Frame(t, image, int(color.get_frame_number()))

    def release(self) -> None:
        try:
            self.pipeline.stop()
        except RuntimeError:
            pass   # never started, or already stopped


def open_camera(cfg: CameraConfig, driver: Any = None) -> Camera:
    """An (unstarted) camera for `cfg`; a mujoco camera is the simulated arm driver's."""
    if cfg.kind == "opencv":
        return OpenCVCamera(cfg)
    if cfg.kind == "realsense":
        return RealSenseCamera(cfg)
    cameras = getattr(driver, "cameras", {})
    if cfg.name not in cameras:
        raise RuntimeError(f"camera {cfg.name!r} (kind: mujoco) is rendered by the simulated arm: "
                           "start it with the MujocoArm driver built with the config's cameras")
    return cameras[cfg.name]


def start_cameras(configs: Iterable[CameraConfig], driver: Any = None) -> dict[str, Camera]:
    """One running camera per configured camera, by name (those started are stopped if one fails)."""
    cameras: dict[str, Camera] = {}
    try:
        for c in configs:
            cam = open_camera(c, driver)
            cam.start()
            cameras[c.name] = cam
    except Exception:
        for cam in cameras.values():
            cam.stop()
        raise
    return cameras


def check_cameras(cameras: dict[str, Camera], seconds: float, save_dir: str | None = None,
                  clock=time.monotonic) -> dict[str, dict]:
    """Watch running cameras for `seconds`: per camera, new frames and their rate, the age of
    each new frame when first seen (now - capture time: what the bridge will see), and the
    verdict of the bridge's FrameCheck at the end ("ok", or why the bridge would hold).
    With `save_dir`, every new frame is written there as NAME_<arrival ms>_<capture ms>.png
    (the latency procedure in docs/deploy.md reads a clock shown in them)."""
    from dpstack.core.stats import summarize_ms

    seen: dict[str, list[Frame]] = {name: [] for name in cameras}
    ages: dict[str, list[float]] = {name: [] for name in cameras}
    checks = {name: FrameCheck(cam.cfg) for name, cam in cameras.items()}   # as the bridge checks them
    verdicts: dict[str, str | None] = {}
    end = clock() + seconds
    while clock() < end:
        for name, cam in cameras.items():
            f = cam.latest()
            now = clock()
            verdicts[name] = checks[name].problem(f, now)
            if f is not None and (not seen[name] or f.seq != seen[name][-1].seq):
                seen[name].append(f)
                ages[name].append(now - f.t)
                if save_dir is not None:
                    _save_png(f"{save_dir}/{name}_{now * 1e3:.0f}_{f.t * 1e3:.0f}.png", f.image)
        time.sleep(0.002)
    out = {}
    for name, cam in cameras.items():
        frames = seen[name]
        span = frames[-1].t - frames[0].t if len(frames) > 1 else 0.0
        out[name] = {"kind": cam.cfg.kind, "frames": len(frames),
                     "fps": (len(frames) - 1) / span if span > 0 else 0.0, "configured_fps": cam.cfg.fps,
                     "size": None if not frames else list(frames[-1].image.shape),
                     "age_when_seen": summarize_ms(ages[name], scale=1e3),
                     "verdict": verdicts.get(name) or "ok"}
    return out


def _save_png(path: str, image: np.ndarray) -> None:
    import cv2
    cv2.imwrite(path, cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
