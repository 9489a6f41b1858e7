"""TickLedger: per-tick misses, look-ahead, stalls and overruns, and chunk latencies, on a fake clock."""
from __future__ import annotations

import numpy as np
import pytest
from fake_wall import FakeWall

from dpstack.runtime.protocol import ActionReply
from dpstack.sim.eval_report import EpisodeRecord
from dpstack.sim.robot_clock import RobotClock
from dpstack.sim.tick_ledger import RECENT_CHUNKS, TickLedger

PERIOD = 0.05


def ledger(scale: float = 1.0) -> tuple[TickLedger, FakeWall]:
    wall = FakeWall()
    record = EpisodeRecord(episode=0, seed=1, success=False, steps=0, mode="realtime")
    return TickLedger(record, RobotClock(scale, wall, wall.shared)), wall


def reply(seq: int, compute_ms: float = 1.0, nfe: int = 4) -> ActionReply:
    return ActionReply(seq, 0.0, PERIOD, np.zeros((8, 7), np.float32), "ddim", compute_ms, nfe)


def counts(r: EpisodeRecord) -> tuple[int, int, int, int, int]:
    return r.deadline_misses, r.held_steps, r.late_steps, r.lookahead_steps, len(r.misses)


def test_an_action_out_before_its_deadline_is_no_miss():
    book, wall = ledger(scale=0.5)
    wall.t += 0.02  # robot 0.01 into the tick
    book.commanded(0, 0.0, deadline=0.04, hold=False, lookahead=False)
    assert counts(book.record) == (0, 0, 0, 0, 0)
    assert book.record.step_latency_ms == [pytest.approx(20.0)]  # wall milliseconds


def test_a_held_tick_is_a_miss_with_its_window_on_the_shared_clock():
    book, wall = ledger()
    wall.t += 0.07
    book.commanded(1, 0.05, deadline=0.09, hold=True, lookahead=False)
    assert counts(book.record) == (1, 1, 0, 0, 1)
    step, t0, t1 = book.record.misses[0]
    assert step == 1 and (t0, t1) == (pytest.approx(5100.05), pytest.approx(5100.07))


def test_an_action_out_after_its_deadline_is_late_and_a_late_hold_counts_once_as_held():
    book, wall = ledger()
    wall.t += 0.045
    book.commanded(0, 0.0, deadline=0.04, hold=False, lookahead=False)
    assert counts(book.record) == (1, 0, 1, 0, 1)
    wall.t += 0.05
    book.commanded(1, 0.05, deadline=0.09, hold=True, lookahead=False)
    assert counts(book.record) == (2, 1, 1, 0, 2)
    assert book.record.deadline_misses == book.record.held_steps + book.record.late_steps


def test_a_look_ahead_step_is_counted_and_is_no_miss():
    book, wall = ledger()
    wall.t += 0.03
    book.commanded(0, 0.0, deadline=0.04, hold=False, lookahead=True)
    assert counts(book.record) == (0, 0, 0, 1, 0)


def test_a_finished_tick_keeps_its_stalls_and_whether_it_overran():
    book, _ = ledger()
    book.finished(10.0, 0.5, overrun=False)
    book.finished(0.0, 2.5, overrun=True)
    assert book.record.steal_ms == [10.0, 0.0] and book.record.runqueue_ms == [0.5, 2.5]
    assert book.record.overruns == 1


def test_an_answer_to_the_chunk_asked_for_books_its_latency_and_others_only_their_evaluations():
    book, wall = ledger(scale=0.5)
    book.asked(3, wall())
    wall.t += 0.1
    book.answered(reply(3, compute_ms=7.0, nfe=4))
    book.answered(reply(2, nfe=4))  # not asked for (or answered already): no latency of ours
    book.asked(4, wall())
    book.asked(5, wall())  # a newer request: the earlier one is forgotten
    book.answered(reply(4, nfe=1))
    r = book.record
    assert r.chunk_latency_ms == [pytest.approx(100.0)] and r.chunk_compute_ms == [7.0]
    assert r.evaluations == 9


def test_the_lead_is_the_slowest_recent_answer_in_periods():
    book, wall = ledger(scale=0.5)
    assert book.lead(PERIOD) == 0  # nothing answered yet: ask when the chunk is used up
    book.asked(1, wall())
    wall.t += 0.21  # 0.105 robot seconds: just over two periods
    book.answered(reply(1))
    assert book.lead(PERIOD) == 3
    for seq in range(2, 2 + RECENT_CHUNKS):  # the slow one drops out of the window
        book.asked(seq, wall())
        wall.t += 0.05
        book.answered(reply(seq))
    assert book.lead(PERIOD) == 1
