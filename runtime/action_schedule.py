"""Which action a robot executes now, given the chunks a policy server sent.

Pure logic (no sockets, no clock of its own) so it can be tested exactly: the
robot calls `offer(reply)` for every chunk it receives and `next(now)` once per
control tick with its own clock (the clock its observation timestamps use).

Action i of a chunk is meant for robot time start_time + i * dt. At each tick:
- the newest chunk (highest seq) is the one executed; a newer chunk replaces the
  current one at once, skipping any slot already commanded;
- actions whose time has passed (t_i < now - tolerance) are dropped as stale;
- with no fresh chunk the current one simply continues (for a chunk with a
  `replan_after`, its look-ahead past that point is what runs while the next
  chunk is late);
- a fresh chunk whose actions are ALL stale on arrival, but whose last action is
  at most `late_periods` control periods late, executes that last action once at
  this slot (the Diffusion Policy / UMI real-stack rule): a one-action chunk
  (streaming) timed for its observation always arrives after that time, and
  dropping it would hold the robot forever;
- when it is exhausted (or everything is older than that) the decision is a Hold.

Hold means "do not move": for a robot commanded in deltas (robosuite OSC_POSE,
DROID-style velocity) it is a ZERO motion command with the gripper channels
kept at their last commanded value; for a robot commanded in absolute targets
it is the last commanded target repeated. Before any action was commanded it
is `initial` if given, else zeros (delta) or None (absolute: nothing is known,
the robot bridge keeps its current state).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from dpstack.runtime.protocol import ActionReply, check_actions
from dpstack.core.spec import ActionSpec


class ActionMode(str, enum.Enum):
    DELTA = "delta"        # actions are motions relative to the current pose
    ABSOLUTE = "absolute"  # actions are target poses / joint positions


@dataclass(frozen=True)
class Decision:
    """What to command this tick. `hold` is True when no scheduled action applies."""

    action: np.ndarray | None
    hold: bool
    seq: int | None = None          # chunk the action came from
    index: int | None = None        # index in that chunk
    target_time: float | None = None
    dropped: int = 0                # stale actions skipped this tick


class ActionSchedule:
    def __init__(self, action: ActionSpec, mode: ActionMode | str = ActionMode.DELTA,
                 tolerance_s: float = 0.01, initial: np.ndarray | None = None,
                 late_periods: float = 1.5) -> None:
        self.spec = action
        self.mode = ActionMode(mode)
        self.tolerance_s = float(tolerance_s)
        self.late_periods = float(late_periods)
        self._initial = None if initial is None else np.asarray(initial, dtype=np.float32).reshape(action.shape)
        self.reset()

    def reset(self) -> None:
        """Forget chunks and the last command (new episode)."""
        self._chunk: ActionReply | None = None
        self._cursor = 0
        self._fresh = False  # no action of the current chunk executed yet
        self._last_action: np.ndarray | None = None if self._initial is None else self._initial.copy()
        self._last_time = -np.inf
        self.n_executed = 0
        self.n_stale = 0
        self.n_hold = 0

    @property
    def current_seq(self) -> int | None:
        return None if self._chunk is None else self._chunk.seq

    def offer(self, reply: ActionReply) -> bool:
        """Adopt `reply` if it is newer than the current chunk. Raises ProtocolError
        if its actions do not fit the action spec (nothing is adopted then)."""
        check_actions(reply, self.spec)
        if not np.isfinite(reply.actions).all():  # decode already refuses these; belt and braces
            return False
        if self._chunk is not None and reply.seq <= self._chunk.seq:
            return False
        self._chunk = reply
        self._cursor = 0
        self._fresh = True
        return True

    def remaining(self, now: float, before_replan: bool = False) -> int:
        """Actions of the current chunk still usable at `now`; with before_replan, only
        those before the chunk's replan point (the rest is look-ahead)."""
        if self._chunk is None:
            return 0
        c = self._chunk
        end = len(c.actions) if not before_replan or c.replan_after is None else min(c.replan_after, len(c.actions))
        times = c.start_time + np.arange(self._cursor, end) * c.dt
        return int(np.count_nonzero((times >= now - self.tolerance_s) & (times > self._last_time + 0.5 * c.dt)))

    def next(self, now: float) -> Decision:
        """The command for robot time `now`; call once per control tick."""
        dropped = 0
        c = self._chunk
        if c is not None:
            while self._cursor < len(c.actions):
                t = c.start_time + self._cursor * c.dt
                if t <= self._last_time + 0.5 * c.dt:   # slot already commanded from an older chunk
                    self._cursor += 1
                elif t < now - self.tolerance_s:        # its time has passed
                    self._cursor += 1
                    dropped += 1
                else:
                    break
            late_last = self._late_last_index(c, now) if self._cursor == len(c.actions) and dropped else None
            if late_last is not None:
                dropped -= 1
            self.n_stale += dropped
            if self._cursor < len(c.actions) or late_last is not None:
                i = self._cursor if late_last is None else late_last
                self._cursor = i + 1
                self._fresh = False
                t = c.start_time + i * c.dt
                action = c.actions[i].astype(np.float32, copy=True)
                self._last_action = action
                self._last_time = t
                self.n_executed += 1
                return Decision(action.copy(), hold=False, seq=c.seq, index=i, target_time=t, dropped=dropped)
        self.n_hold += 1
        return Decision(self.hold_action(), hold=True, dropped=dropped)

    def _late_last_index(self, c: ActionReply, now: float) -> int | None:
        """Index of a fresh chunk's last action if it may still run one slot late."""
        i = len(c.actions) - 1
        t = c.start_time + i * c.dt
        if self._fresh and t > self._last_time + 0.5 * c.dt and now - t <= self.late_periods * c.dt:
            return i
        return None

    def hold_action(self) -> np.ndarray | None:
        """The "do not move" command for this robot's action mode (see module doc)."""
        if self.mode is ActionMode.ABSOLUTE:
            return None if self._last_action is None else self._last_action.copy()
        hold = np.zeros(self.spec.shape, dtype=np.float32)
        if self._last_action is not None:
            dims = list(self.spec.gripper_dims)
            hold[dims] = self._last_action[dims]
        return hold
