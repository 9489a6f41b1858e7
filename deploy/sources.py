"""Where the bridge's actions come from: a policy server or a person's teleop device.

The bridge runs one loop (deploy/bridge.py) whatever drives it; an ActionSource is
the part that differs:
- `poll(now)` every servo cycle: take in what arrived; True when it was fresh input
  (a policy chunk, a live device), which is what feeds the safety watchdog;
- `act(now, observation, state)` every control step: the action to execute now, in
  the robot YAML's action convention, or None to hold;
- `reset()` after an e-stop reset; `ended()` says why no action can ever come (the
  loop stops); `summary()` adds the source's own figures to the bridge's.
PolicySource wraps the PolicyClient and its ActionSchedule; deploy/teleop.py has
TeleopSource, which turns a device (keyboard, 3D mouse, replay) into actions.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Mapping, Protocol

import numpy as np

from dpstack.core.spec import ActionSpec
from dpstack.core.stats import summarize_ms
from dpstack.deploy.drivers.base import ArmState


@dataclass
class SourceAction:
    action: np.ndarray
    t_obs: float | None = None   # the observation behind it, on a chunk's first action (latency figures)


class ActionSource(Protocol):
    def reset(self) -> None:
        """Forget what is in progress (the bridge restarts at rest after an e-stop reset)."""

    def poll(self, now: float) -> bool:
        """Every servo cycle; True when fresh input arrived (it feeds the watchdog)."""

    def act(self, now: float, observation: Mapping[str, np.ndarray] | None,
            state: ArmState | None, observed_at: float | None = None) -> SourceAction | None:
        """Every control step: the action to execute now (None: hold). `observed_at`: when
        the observation was sampled (its frames' capture time); None: `now`."""

    def ended(self) -> str | None:
        """Why no action can ever come (the loop stops), or None."""

    def summary(self) -> dict:
        """The source's figures, merged into the bridge's summary."""


class PolicySource:
    """A policy server through a runtime.client.PolicyClient: observations out, chunks in."""

    def __init__(self, client, action: ActionSpec, mode: str, action_latency_s: float,
                 clock: Callable[[], float]) -> None:
        from dpstack.runtime.action_schedule import ActionSchedule

        self.client = client
        self.schedule = ActionSchedule(action, mode=mode, tolerance_s=0.01)
        self.action_latency_s = action_latency_s
        self.clock = clock
        self.chunks = 0
        self.observations_sent = 0
        self.bad_chunks = 0
        self.obs_to_chunk_s: deque = deque(maxlen=100_000)
        self._obs_times: dict[int, float] = {}

    def reset(self) -> None:
        self.schedule.reset()
        self.client.reset()

    def poll(self, now: float) -> bool:
        reply = self.client.poll(0.0)
        if reply is None:
            return False
        t_obs = self._obs_times.get(reply.seq)
        if t_obs is not None:
            self.obs_to_chunk_s.append(now - t_obs)
        try:
            if self.schedule.offer(reply):
                self.chunks += 1
                return True
        except Exception as e:  # a malformed chunk is refused, never executed
            import logging
            self.bad_chunks += 1
            logging.getLogger("dpstack.deploy.bridge").warning("refused a chunk: %s", e)
        return False

    def act(self, now: float, observation, state, observed_at: float | None = None) -> SourceAction | None:
        # Every control step: while a chunk is in flight the client sends it history-only,
        # so a policy with To > 1 keeps its history at the control rate.
        if observation is not None:
            # Stamped with the capture time: the chunk's first action belongs to the moment the
            # camera saw, so the schedule counts the frame's age as latency already spent.
            t_obs = now if observed_at is None else observed_at
            seq = self.client.send_observation(observation, t_obs)
            if seq is not None:
                self.observations_sent += 1
                self._obs_times[seq] = t_obs
                for k in [k for k in self._obs_times if k < seq - 64]:   # answers that never came
                    del self._obs_times[k]
        # Actions due before a command could take effect are stale.
        decision = self.schedule.next(now + self.action_latency_s)
        if decision.hold or decision.action is None:
            return None
        t_obs = self._obs_times.pop(decision.seq, None) if decision.seq is not None else None
        return SourceAction(decision.action, t_obs)

    def ended(self) -> str | None:
        return None if self.client.fatal is None else self.client.fatal.message

    def summary(self) -> dict:
        c = self.client
        out = {"observations_sent": self.observations_sent, "chunks": self.chunks,
               "actions_executed": self.schedule.n_executed, "actions_stale": self.schedule.n_stale,
               "holds": self.schedule.n_hold, "obs_to_chunk": summarize_ms(self.obs_to_chunk_s, scale=1e3),
               "link": {"reconnects": c.n_reconnects, "errors": len(c.errors),
                        "fatal": None if c.fatal is None else c.fatal.message}}
        if self.bad_chunks:
            out["bad_chunks"] = self.bad_chunks
        return out
