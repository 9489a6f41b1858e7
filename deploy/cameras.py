"""Camera capture threads and timestamp alignment for the bridge.

Each camera runs its own thread (an OpenCV read blocks for a frame period) and
keeps a short ring of (capture time, frame). Capture time is arrival time minus
the configured latency. `TimedBuffer.at(t)` returns the last sample taken at or
before t: observations from several sources are aligned that way.
"""
from __future__ import annotations

import bisect
import collections
import logging
import threading
import time
from typing import Any, Generic, TypeVar

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

    def latest(self) -> tuple[float, T] | None:
        with self._lock:
            return (self._t[-1], self._v[-1]) if self._t else None


class OpenCVCamera(threading.Thread):
    def __init__(self, cfg: CameraConfig, buffer_s: float = 2.0):
        super().__init__(daemon=True, name=f"camera-{cfg.name}")
        import cv2  # only when a camera is configured

        self.cv2 = cv2
        self.cfg = cfg
        device: Any = int(cfg.device) if cfg.device.isdigit() else cfg.device
        self.cap = cv2.VideoCapture(device)
        if not self.cap.isOpened():
            raise RuntimeError(f"camera {cfg.name!r}: cannot open device {cfg.device!r}")
        self.cap.set(cv2.CAP_PROP_FPS, cfg.fps)
        self.frames: TimedBuffer[np.ndarray] = TimedBuffer(max(2, int(buffer_s * cfg.fps)))
        self._halt = threading.Event()
        self.n_frames = 0
        self.n_failures = 0

    def run(self) -> None:
        while not self._halt.is_set():
            ok, frame = self.cap.read()
            arrived = time.monotonic()
            if not ok:
                self.n_failures += 1
                time.sleep(0.01)
                continue
            rgb = self.cv2.cvtColor(frame, self.cv2.COLOR_BGR2RGB)
            if rgb.shape[:2] != (self.cfg.height, self.cfg.width):
                rgb = self.cv2.resize(rgb, (self.cfg.width, self.cfg.height), interpolation=self.cv2.INTER_AREA)
            self.frames.append(arrived - self.cfg.latency_s, np.ascontiguousarray(rgb, dtype=np.uint8))
            self.n_frames += 1

    def stop(self) -> None:
        self._halt.set()
        self.join(2.0)
        self.cap.release()


def start_cameras(configs) -> dict[str, OpenCVCamera]:
    """One running OpenCVCamera per configured camera, by name (those started are stopped if one fails)."""
    cameras: dict[str, OpenCVCamera] = {}
    try:
        for c in configs:
            cam = OpenCVCamera(c)
            cam.start()
            cameras[c.name] = cam
    except Exception:
        for cam in cameras.values():
            cam.stop()
        raise
    return cameras
