"""What each tick of a realtime arm episode did, booked into its EpisodeRecord.

A tick misses its deadline when it has no valid action at its action deadline (it
holds) or its action goes out after that deadline (late: the loop lost its core
while waiting); each miss keeps its window, from the tick's start to its command,
on the clock every process shares. Not misses, counted apart: a tick run from the
previous chunk's look-ahead because the chunk asked for at that tick was late, and
an overrun (a physics step longer than the period; the world stood still for it).
Per tick the computer's stalls (stolen and run-queue time) are kept too.
"""
from __future__ import annotations

import collections
import math

from dpstack.runtime.protocol import ActionReply
from dpstack.sim.eval_report import EpisodeRecord
from dpstack.sim.robot_clock import RobotClock

RECENT_CHUNKS = 20  # latencies the request lead looks back on


class TickLedger:
    def __init__(self, record: EpisodeRecord, clock: RobotClock) -> None:
        self.record = record
        self.clock = clock
        self._in_flight: dict[int, float] = {}  # seq -> wall time sent
        self._recent: collections.deque[float] = collections.deque(maxlen=RECENT_CHUNKS)  # robot seconds

    # ------------------------------------------------------------------ chunks
    def asked(self, seq: int, sent: float) -> None:
        """Observation `seq` asked for a chunk at wall time `sent` (earlier requests are forgotten)."""
        self._in_flight = {seq: sent}

    def answered(self, reply: ActionReply) -> None:
        sent = self._in_flight.pop(reply.seq, None)
        if sent is not None:
            latency = self.clock.wall() - sent
            self.record.chunk_latency_ms.append(latency * 1e3)
            self.record.chunk_compute_ms.append(reply.compute_ms)
            self._recent.append(latency * self.clock.scale)
        self.record.evaluations += reply.nfe

    def lead(self, period: float) -> int:
        """Ticks ahead to ask for the next chunk: the slowest recent answer, in periods."""
        return math.ceil(max(self._recent, default=0.0) / period)

    # ------------------------------------------------------------------ ticks
    def commanded(self, step: int, tick: float, deadline: float, hold: bool, lookahead: bool) -> None:
        """Tick `step` (robot time `tick`, action deadline `deadline`) sends its command now."""
        r = self.record
        now = self.clock.now()
        r.step_latency_ms.append(self.clock.wall_s(max(0.0, now - tick)) * 1e3)
        late = now > deadline
        r.lookahead_steps += int(lookahead)
        r.held_steps += int(hold)
        r.late_steps += int(late and not hold)
        if hold or late:
            r.deadline_misses += 1
            r.misses.append([step, self.clock.shared_at(tick), self.clock.shared_at(now)])

    def finished(self, steal_ms: float, runqueue_ms: float, overrun: bool) -> None:
        """The tick's step is done: the computer's stalls since the tick, and whether it overran."""
        self.record.steal_ms.append(steal_ms)
        self.record.runqueue_ms.append(runqueue_ms)
        self.record.overruns += int(overrun)
