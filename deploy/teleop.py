"""Teleoperation: a person's device (or a scripted replay) as the bridge's action source.

A device is read once per control step and gives a DeviceInput: a motion (six
numbers in [-1, 1], robosuite OSC_POSE's delta channels: translation, then a
rotation vector), a gripper command, or a whole recorded action (replay), plus
episode events. TeleopSource turns that into actions in the robot YAML's
convention, and drives the arm back to its start pose on `home`.

Devices:
- KeyboardDevice: the terminal in cbreak mode (termios), keys in KEYS; no extra
  dependencies. It owns the terminal, so it also pulls and resets the e-stop.
- SpaceMouseDevice: a 3Dconnexion mouse through `pyspacemouse` (extra `spacemouse`),
  with the keyboard alongside for the episode keys when there is a terminal.
- ReplayDevice: plays back recorded action streams, one episode each (`load_replay`).
"""
from __future__ import annotations

import json
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Protocol, Sequence

import numpy as np

from dpstack.deploy import rotations
from dpstack.deploy.config import ActionConfig
from dpstack.deploy.drivers.base import ArmState, Pose
from dpstack.deploy.estop import EStop
from dpstack.deploy.sources import SourceAction

EVENTS = ("start", "keep", "discard", "home", "quit")

# key -> (what it does, argument). Motion keys add one speed step on one axis per press
# (the terminal's key repeat makes a held key a steady motion).
KEYS: dict[str, tuple[str, object]] = {
    "w": ("move", (0, +1)), "s": ("move", (0, -1)), "a": ("move", (1, +1)), "d": ("move", (1, -1)),
    "t": ("move", (2, +1)), "g": ("move", (2, -1)),
    "i": ("move", (3, +1)), "k": ("move", (3, -1)), "j": ("move", (4, +1)), "l": ("move", (4, -1)),
    "u": ("move", (5, +1)), "o": ("move", (5, -1)),
    "c": ("gripper", None), "+": ("speed", 1.25), "-": ("speed", 0.8),
    "n": ("event", "start"), "y": ("event", "keep"), "x": ("event", "discard"), "h": ("event", "home"),
    "Q": ("event", "quit"), " ": ("estop", None), "e": ("estop", None), "r": ("estop_reset", None),
}
KEY_HELP = ("keys: w/s a/d t/g move x/y/z, i/k j/l u/o rotate, c gripper, +/- speed | "
            "n start episode, y keep, x discard, h home | space/e E-STOP, r reset e-stop, Q quit")


class DeviceError(RuntimeError):
    """A device cannot be opened; the message names the fix."""


@dataclass
class DeviceInput:
    motion: np.ndarray | None = None    # (6,) in [-1, 1]: delta translation, delta rotation vector
    gripper: float | None = None        # +1 close, -1 open (robosuite's sign); None: as before
    action: np.ndarray | None = None    # a whole action in the YAML's convention (replay)
    events: tuple[str, ...] = ()


class Device(Protocol):
    name: str

    def start(self) -> None: ...
    def read(self) -> DeviceInput: ...
    def alive(self) -> bool: ...
    def close(self) -> None: ...


# ---------------------------------------------------------------- keyboard
class KeyboardDevice:
    """Keys from a terminal in cbreak mode: one character at a time, no echo, Ctrl-C still works."""

    name = "keyboard"

    def __init__(self, estop: EStop | None = None, stream=None, speed: float = 0.3):
        self.estop = estop
        self.stream = stream if stream is not None else sys.stdin
        self.speed = speed
        self._lock = threading.Lock()
        self._motion = np.zeros(6)
        self._gripper = -1.0   # open
        self._gripper_changed = False
        self._events: list[str] = []
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._saved = None

    def start(self) -> None:
        if self.stream is None or not self.stream.isatty():
            raise DeviceError("the keyboard device needs an interactive terminal; run `dpstack record` in one, "
                              "or use --device replay")
        import termios
        import tty

        fd = self.stream.fileno()
        self._saved = termios.tcgetattr(fd)
        tty.setcbreak(fd)
        self._thread = threading.Thread(target=self._run, daemon=True, name="teleop-keys")
        self._thread.start()

    def feed(self, chars: str) -> None:
        """Handle typed characters (the reader thread calls this)."""
        with self._lock:
            for ch in chars:
                what, arg = KEYS.get(ch, (None, None))
                if what == "move":
                    axis, sign = arg
                    self._motion[axis] += sign * self.speed
                elif what == "gripper":
                    self._gripper = -self._gripper
                    self._gripper_changed = True
                elif what == "speed":
                    self.speed = float(np.clip(self.speed * arg, 0.05, 1.0))
                elif what == "event":
                    self._events.append(arg)
                elif what == "estop" and self.estop is not None:
                    self.estop.trigger("key")
                elif what == "estop_reset" and self.estop is not None:
                    self.estop.request_reset()

    def _run(self) -> None:
        import select

        fd = self.stream.fileno()
        while not self._halt.is_set():
            ready, _, _ = select.select([fd], [], [], 0.05)
            if ready:
                data = os.read(fd, 64)
                if not data:
                    return   # the terminal is gone: alive() turns False and the watchdog holds the arm
                self.feed(data.decode(errors="ignore"))

    def read(self) -> DeviceInput:
        with self._lock:
            motion = np.clip(self._motion, -1.0, 1.0)
            self._motion = np.zeros(6)
            events, self._events = tuple(self._events), []
            changed, self._gripper_changed = self._gripper_changed, False
            return DeviceInput(motion=motion, gripper=self._gripper if changed else None, events=events)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def close(self) -> None:
        self._halt.set()
        if self._thread is not None:
            self._thread.join(1.0)
        if self._saved is not None:
            import termios
            termios.tcsetattr(self.stream.fileno(), termios.TCSADRAIN, self._saved)
            self._saved = None


# ---------------------------------------------------------------- 3D mouse
class SpaceMouseDevice:
    """A 3Dconnexion SpaceMouse: the six axes move, the left button toggles the gripper,
    the right one starts an episode and keeps it; the keyboard (when there is a terminal)
    does the rest."""

    name = "spacemouse"

    def __init__(self, estop: EStop | None = None, deadband: float = 0.05, keyboard: KeyboardDevice | None = None):
        self.deadband = deadband
        self.keyboard = keyboard
        self._mouse = None
        self._module = None
        self._buttons = [0, 0]
        self._gripper = -1.0
        self._recording = False
        self._ok = False

    def start(self) -> None:
        try:
            import pyspacemouse
        except ImportError:
            raise DeviceError("the spacemouse device needs pyspacemouse: pip install 'dpstack[spacemouse]' "
                              "(and the system's hidapi library, e.g. apt install libhidapi-dev)") from None
        self._module = pyspacemouse
        self._mouse = pyspacemouse.open()
        if not self._mouse:
            raise DeviceError("no SpaceMouse found: plug it in and give this user access to /dev/hidraw* "
                              "(a udev rule), or use --device keyboard")
        self._ok = True
        if self.keyboard is not None:
            self.keyboard.start()

    def read(self) -> DeviceInput:
        try:
            st = self._mouse.read() if hasattr(self._mouse, "read") else self._module.read()
        except Exception:
            self._ok = False   # unplugged: alive() turns False and the watchdog holds the arm
            return DeviceInput(motion=np.zeros(6))
        raw = np.array([st.x, st.y, st.z, st.roll, st.pitch, st.yaw], dtype=np.float64)
        motion = np.where(np.abs(raw) < self.deadband, 0.0, np.clip(raw, -1.0, 1.0))
        buttons = list(getattr(st, "buttons", getattr(st, "button", [0, 0]))) + [0, 0]
        pressed = [b and not was for b, was in zip(buttons[:2], self._buttons)]
        self._buttons = buttons[:2]
        gripper, events = None, []
        if pressed[0]:
            self._gripper = -self._gripper
            gripper = self._gripper
        if pressed[1]:
            events.append("keep" if self._recording else "start")
            self._recording = not self._recording
        if self.keyboard is not None:
            keys = self.keyboard.read()
            events += keys.events
            motion = np.clip(motion + keys.motion, -1.0, 1.0)
            if keys.gripper is not None:
                self._gripper = gripper = keys.gripper
            if any(e in ("keep", "discard", "home") for e in keys.events):
                self._recording = False
            if "start" in keys.events:
                self._recording = True
        return DeviceInput(motion=motion, gripper=gripper, events=tuple(events))

    def alive(self) -> bool:
        return self._ok

    def close(self) -> None:
        if self.keyboard is not None:
            self.keyboard.close()
        if self._mouse is not None:
            close = getattr(self._mouse, "close", None) or getattr(self._module, "close", None)
            if close is not None:
                close()
            self._mouse = None


# ---------------------------------------------------------------- replay
@dataclass
class ReplayEpisode:
    actions: np.ndarray        # (T, action_dim) in the YAML's convention
    keep: bool = True          # False: the episode is discarded at its end (tests, dry rehearsals)


class ReplayDevice:
    """Plays recorded episodes: home, start, one action per control step, keep (or
    discard), and quit after the last. Nothing else happens while it plays."""

    name = "replay"

    def __init__(self, episodes: Sequence[ReplayEpisode]):
        if not episodes:
            raise DeviceError("the replay stream holds no episodes")
        self.episodes = list(episodes)
        self._script = self._plan()

    def _plan(self) -> Iterable[DeviceInput]:
        for ep in self.episodes:
            yield DeviceInput(events=("home",))
            yield DeviceInput(events=("start",))
            for a in ep.actions:
                yield DeviceInput(action=np.asarray(a, dtype=np.float32))
            yield DeviceInput(events=("keep" if ep.keep else "discard",))
        while True:
            yield DeviceInput(events=("quit",))

    def start(self) -> None:
        pass

    def read(self) -> DeviceInput:
        return next(self._script)

    def alive(self) -> bool:
        return True

    def close(self) -> None:
        pass


def load_replay(path: str | Path, key: str = "action", action_dim: int | None = None) -> list[ReplayEpisode]:
    """Episodes of actions from a dpstack store (its `key`, episode by episode), a .npy
    file ((T, A): one episode; (E, T, A): E episodes) or a .json file (a list of episodes,
    each a list of actions or {"actions": [...], "keep": false})."""
    path = Path(path)
    if not path.exists():
        raise DeviceError(f"no replay stream at {path}")
    if path.suffix == ".npy":
        a = np.load(path)
        episodes = [ReplayEpisode(a)] if a.ndim == 2 else [ReplayEpisode(e) for e in a]
    elif path.suffix == ".json":
        raw = json.loads(path.read_text())
        episodes = [ReplayEpisode(np.asarray(e["actions"], dtype=np.float32), bool(e.get("keep", True)))
                    if isinstance(e, Mapping) else ReplayEpisode(np.asarray(e, dtype=np.float32)) for e in raw]
    else:
        from dpstack.data.replay_buffer import DatasetError, ReplayBuffer
        try:
            rb = ReplayBuffer.open(path)
        except DatasetError as e:
            raise DeviceError(f"replay stream: {e}") from None
        if key not in rb.keys:
            raise DeviceError(f"replay stream {path} has no key {key!r} (it has {list(rb.keys)}); pass --replay-key")
        episodes = [ReplayEpisode(rb.get_episode(i, [key])[key]) for i in range(rb.n_episodes)]
    for i, ep in enumerate(episodes):
        if ep.actions.ndim != 2 or (action_dim is not None and ep.actions.shape[1] != action_dim):
            raise DeviceError(f"replay stream {path}: episode {i} has actions of shape {ep.actions.shape}, "
                              f"the robot takes (T, {action_dim})")
    return episodes


# ---------------------------------------------------------------- the action source
@dataclass
class TeleopSource:
    """A device as the bridge's ActionSource. Events read at a control step wait in
    `events` for the recorder; `home` drives the arm back to where it started."""

    device: Device
    action: ActionConfig
    home_tolerance: tuple[float, float, float] = (0.005, 0.03, 0.01)   # m, rad, and at rest below m/s
    events: list[str] = field(default_factory=list)
    home_pose: Pose | None = None
    homing: bool = False
    _gripper: float = -1.0
    _last: tuple[float, np.ndarray] | None = None   # (time, position) of the last homing step

    def reset(self) -> None:
        self.homing = False

    def poll(self, now: float) -> bool:
        return self.device.alive()

    def act(self, now: float, observation, state: ArmState | None,
            observed_at: float | None = None) -> SourceAction | None:
        if state is None:
            return None
        if self.home_pose is None:
            self.home_pose = state.pose.copy()
        if self.homing:
            # Events wait until the arm is home: a scripted start must not begin mid-way.
            action = self._toward_home(now, state)
            return None if action is None else SourceAction(action)
        got = self.device.read()
        self.events.extend(got.events)
        if "home" in got.events:
            self.homing = True
        if got.action is not None:
            return SourceAction(np.asarray(got.action, dtype=np.float32))
        if got.gripper is not None:
            self._gripper = float(np.sign(got.gripper) or -1.0)
        motion = np.zeros(6) if got.motion is None else np.asarray(got.motion, dtype=np.float64)
        return SourceAction(self._from_motion(motion, state.pose))

    def _from_motion(self, motion: np.ndarray, pose: Pose) -> np.ndarray:
        a = np.zeros(self.action.dim, dtype=np.float32)
        a[self.action.gripper_dim] = self._gripper
        if self.action.mode == "delta":
            a[:6] = np.clip(motion, -1.0, 1.0)
        else:   # absolute: the device's motion from the measured pose, as a target
            a[:3] = pose.position + np.clip(motion[:3], -1, 1) * self.action.position_scale
            a[3:6] = rotations.to_rotvec(rotations.apply_rotvec(pose.quat, np.clip(motion[3:6], -1, 1)
                                                                * self.action.rotation_scale))
        return a

    def _toward_home(self, now: float, state: ArmState) -> np.ndarray | None:
        home, pose = self.home_pose, state.pose
        dpos = home.position - pose.position
        drot = rotations.error_rotvec(pose.quat, home.quat)
        last, self._last = self._last, (now, pose.position.copy())
        speed = np.inf if last is None or now <= last[0] else np.linalg.norm(pose.position - last[1]) / (now - last[0])
        close = np.linalg.norm(dpos) < self.home_tolerance[0] and np.linalg.norm(drot) < self.home_tolerance[1]
        if close and speed < self.home_tolerance[2]:   # home and at rest: the next episode starts still
            self.homing, self._last = False, None
            return None
        motion = np.concatenate([dpos / self.action.position_scale, drot / self.action.rotation_scale])
        return self._from_motion(np.clip(motion, -1.0, 1.0), pose)

    def ended(self) -> str | None:
        return None

    def summary(self) -> dict:
        return {"device": self.device.name}
