"""Recording demonstrations through the bridge (`dpstack record`).

The bridge runs as it does for a policy (same loop, safety layer, watchdog and
e-stop) with a TeleopSource in the policy's place. Every control step of an
episode adds one row: the bridge's aligned observation (the robot YAML's keys),
the commanded action, and the times: `control_time` (the control tick),
`state_time` (the arm state sample) and `<camera key>_time` (the frame's capture
time), in seconds from the episode's first tick, so a camera's skew to the state
is `<key>_time - state_time`. (Not `timestamp`: LeRobot reserves that name.)

An episode lives in memory until it is kept; a writer thread then appends it to
the ReplayBuffer, whose add_episode is atomic. A crash loses at most the episode
in progress (and one being written). An e-stop during an episode discards it:
its last actions were never executed.
"""
from __future__ import annotations

import logging
import queue
import sys
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TextIO

import numpy as np

from dpstack.core.spec import RobotSpec
from dpstack.core.stats import summarize_ms
from dpstack.data.replay_buffer import DatasetAttrs, DatasetError, ReplayBuffer
from dpstack.deploy.bridge import Bridge, ControlStep
from dpstack.deploy.teleop import TeleopSource

log = logging.getLogger("dpstack.deploy.record")


class RecordError(ValueError):
    """The store cannot take these recordings; the message names the fix."""


def open_store(path: str | Path, attrs: DatasetAttrs) -> ReplayBuffer:
    """A new store at `path`, or an existing one recorded with the same RobotSpec (appended to)."""
    path = Path(path)
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return ReplayBuffer.create(path, attrs)
    try:
        rb = ReplayBuffer.open(path, mode="a")
    except (DatasetError, FileNotFoundError) as e:
        raise RecordError(f"{path} exists and is not a store to append to ({e}); pass a new --out") from None
    have = rb.attrs
    if have is None or have.spec != attrs.spec:
        rb.close()
        raise RecordError(f"{path} holds demonstrations with another robot spec than this config publishes; "
                          "record into a new --out")
    return rb


class EpisodeRecorder:
    """Rows of the episode in progress."""

    def __init__(self, spec: RobotSpec, camera_keys: tuple[str, ...] = ()):
        self.spec = spec
        self.keys = tuple(o.key for o in spec.observations)
        self.action_key = spec.action.key
        self.camera_keys = camera_keys
        self.recording = False
        self.rows: list[ControlStep] = []
        self.skipped = 0   # control steps with no observation (a camera without a frame yet)

    def start(self) -> None:
        self.recording, self.rows, self.skipped = True, [], 0

    def add(self, step: ControlStep) -> None:
        if not self.recording:
            return
        if step.observation is None or step.action is None:
            self.skipped += 1
            return
        # Checked row by row, so a camera giving the wrong size stops the recording at once
        # instead of failing the write of an episode a person just demonstrated.
        try:
            for o in self.spec.observations:
                o.check(step.observation.arrays[o.key])
            self.spec.action.check(step.action)
        except ValueError as e:
            raise RecordError(f"{e}, against the spec the robot YAML publishes; fix the YAML (camera "
                              "width/height, observation sources) and record again") from None
        self.rows.append(step)

    def discard(self) -> int:
        n, self.recording, self.rows = len(self.rows), False, []
        return n

    def finish(self) -> dict[str, np.ndarray] | None:
        """The episode as arrays (None when it has no rows); recording stops."""
        rows, self.recording, self.rows = self.rows, False, []
        if not rows:
            return None
        t0 = rows[0].t
        out = {k: np.stack([r.observation.arrays[k] for r in rows]) for k in self.keys}
        out[self.action_key] = np.stack([r.action for r in rows]).astype(np.float32)
        out["control_time"] = np.array([r.t - t0 for r in rows])
        out["state_time"] = np.array([r.observation.state.t - t0 for r in rows])
        for k in self.camera_keys:
            out[f"{k}_time"] = np.array([r.observation.times[k] - t0 for r in rows])
        return out


class EpisodeWriter(threading.Thread):
    """Appends kept episodes to the store off the control loop (writing images takes a while)."""

    def __init__(self, store: ReplayBuffer):
        super().__init__(daemon=True, name="episode-writer")
        self.store = store
        self._queue: queue.Queue = queue.Queue()
        self.saved = 0
        self.error: str | None = None

    def put(self, episode: dict[str, np.ndarray]) -> None:
        self._queue.put(episode)

    def run(self) -> None:
        while True:
            episode = self._queue.get()
            if episode is None:
                return
            if self.error is not None:
                continue
            try:
                self.store.add_episode(episode)
                self.saved += 1
            except Exception as e:   # disk full, permissions: stop recording, say why
                self.error = f"writing episode {self.store.n_episodes} to {self.store.path} failed: {e}"

    def close(self) -> None:
        """Write what is queued, then stop."""
        self._queue.put(None)
        self.join()


class StatusLine:
    """One terminal line, rewritten in place; without a terminal, one line per event."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._last = 0.0

    def show(self, text: str, now: float) -> None:
        if self.tty and now - self._last >= 0.2:
            self._last = now
            self.stream.write("\r" + text + "\x1b[K")
            self.stream.flush()

    def event(self, text: str) -> None:
        self.stream.write(("\r\x1b[K" if self.tty else "") + text + "\n")
        self.stream.flush()


@dataclass
class Session:
    """A recording session: the bridge, its teleop source, the store, and what happened."""

    bridge: Bridge
    source: TeleopSource
    store: ReplayBuffer
    status: StatusLine = field(default_factory=StatusLine)
    max_episodes: int = 0   # stop after this many are saved (0: until quit)
    recorder: EpisodeRecorder = field(init=False)
    writer: EpisodeWriter = field(init=False)
    kept: int = 0
    discarded: int = 0
    quit: bool = False
    ticks: deque = field(default_factory=lambda: deque(maxlen=200_000))
    recent: deque = field(default_factory=lambda: deque(maxlen=256))
    skews: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        cfg = self.bridge.cfg
        cams = tuple(o.key for o in cfg.spec.observations if o.source == "camera")
        self.recorder = EpisodeRecorder(self.bridge.spec, cams)
        self.skews = {k: [] for k in cams}
        self.writer = EpisodeWriter(self.store)
        self.first = self.store.n_episodes + 1

    @property
    def episode(self) -> int:
        """Number of the episode in progress or next (1-based, counting the store's earlier ones)."""
        return self.first + self.kept

    def on_control(self, bridge: Bridge, step: ControlStep) -> None:
        self.ticks.append(step.t)
        rec = self.recorder
        events, self.source.events[:] = list(self.source.events), []
        if bridge.estop.latched and rec.recording:
            n = rec.discard()
            self.discarded += 1
            self.status.event(f"E-STOP: episode {self.episode} discarded ({n} steps); reset with 'r'")
        for ev in events:
            if ev == "start" and not rec.recording and not bridge.estop.latched:
                rec.start()
                self.status.event(f"episode {self.episode}: recording")
            elif ev == "keep" and rec.recording:
                self._keep()
            elif ev in ("discard", "home", "quit") and rec.recording:
                n = rec.discard()
                self.discarded += 1
                self.status.event(f"episode {self.episode}: discarded ({n} steps)")
            if ev == "quit":
                self.quit = True
        if rec.recording and not events:   # a step that carried an event is not part of the episode
            rec.add(step)
            self.recent.append(step.t)
        self.status.show(self._line(step.t), step.t)

    def _keep(self) -> None:
        n = len(self.recorder.rows)
        episode = self.recorder.finish()
        if episode is None:
            self.discarded += 1
            self.status.event(f"episode {self.episode}: empty, not saved")
            return
        for k in self.skews:
            self.skews[k].extend(episode[f"{k}_time"] - episode["state_time"])
        self.kept += 1
        self.status.event(f"episode {self.episode - 1}: kept ({n} steps, {episode['control_time'][-1]:.1f} s)")
        self.writer.put(episode)
        if self.max_episodes and self.kept >= self.max_episodes:
            self.quit = True

    def _line(self, now: float) -> str:
        rec = self.recorder
        rate = 0.0
        if len(self.recent) > 1 and rec.recording:
            window = [t for t in self.recent if t > now - 1.0]
            if len(window) > 1:
                rate = (len(window) - 1) / (window[-1] - window[0])
        state = "REC" if rec.recording else ("HOMING" if self.source.homing else "idle")
        if self.bridge.estop.latched:
            state = "E-STOP"
        n = len(rec.rows)
        return (f"episode {self.episode} {state:6s} {n:5d} steps {n / self.bridge.cfg.spec.control_hz:6.1f} s "
                f"{rate:5.1f} Hz | kept {self.kept} discarded {self.discarded}")

    def should_stop(self) -> bool:
        return self.quit or self.writer.error is not None

    def run(self, should_stop: Callable[[], bool] | None = None) -> dict:
        """Record until quit, `max_episodes`, `should_stop()` or a write failure; the
        episodes kept are all written before this returns (also on Ctrl-C)."""
        self.writer.start()
        try:
            summary = self.bridge.run(on_control=self.on_control,
                                      should_stop=lambda: self.should_stop() or bool(should_stop and should_stop()))
        finally:
            if self.recorder.recording:
                n = self.recorder.discard()
                self.discarded += 1
                self.status.event(f"episode {self.episode}: not kept, discarded ({n} steps)")
            self.writer.close()
        return {**summary, **self.figures()}

    def figures(self) -> dict:
        dt = 1.0 / self.bridge.cfg.spec.control_hz
        ticks = np.array(self.ticks)
        return {"episodes_kept": self.kept, "episodes_saved": self.writer.saved, "episodes_discarded": self.discarded,
                "store": str(self.store.path), "store_episodes": self.store.n_episodes,
                "control_period_error": summarize_ms(np.abs(np.diff(ticks) - dt) if ticks.size > 1 else [], scale=1e3),
                "camera_state_skew": {k: summarize_ms(np.abs(v), scale=1e3) for k, v in self.skews.items()},
                "write_error": self.writer.error}
