"""ActionSchedule: stale actions dropped, chunks continued, holds explicit."""
from __future__ import annotations

import numpy as np
import pytest

from dpstack.runtime.action_schedule import ActionMode, ActionSchedule
from dpstack.runtime.protocol import ActionReply, ProtocolError
from dpstack.core.spec import ActionSpec

SPEC = ActionSpec(shape=(3,), gripper_dims=(2,))
DT = 0.1


def chunk(seq: int, start: float, n: int = 4, base: float = 0.0) -> ActionReply:
    # action i = (base + i, base + i, +1 gripper): easy to tell which chunk/index ran
    a = np.stack([np.full(3, base + i, np.float32) for i in range(n)])
    a[:, 2] = 1.0
    return ActionReply(seq=seq, start_time=start, dt=DT, actions=a)


def test_executes_in_order_then_holds_with_zero_motion_and_gripper_kept() -> None:
    s = ActionSchedule(SPEC, ActionMode.DELTA)
    assert s.offer(chunk(1, start=1.0, n=3))
    got = [s.next(1.0 + k * DT) for k in range(5)]
    assert [d.index for d in got[:3]] == [0, 1, 2] and not any(d.hold for d in got[:3])
    np.testing.assert_array_equal(got[2].action, [2, 2, 1])
    for d in got[3:]:
        assert d.hold and d.seq is None
        np.testing.assert_array_equal(d.action, [0, 0, 1])  # no motion, gripper stays closed
    assert (s.n_executed, s.n_hold) == (3, 2)


def test_hold_for_absolute_robots_repeats_last_target() -> None:
    s = ActionSchedule(SPEC, "absolute")
    assert s.next(0.0).hold and s.next(0.0).action is None  # nothing known yet: robot keeps its state
    s.offer(chunk(1, start=0.0, n=2, base=5.0))
    s.next(0.0), s.next(DT)
    d = s.next(2 * DT)
    assert d.hold
    np.testing.assert_array_equal(d.action, [6, 6, 1])


def test_hold_before_any_chunk_uses_initial_or_zeros() -> None:
    np.testing.assert_array_equal(ActionSchedule(SPEC).next(0.0).action, [0, 0, 0])
    s = ActionSchedule(SPEC, initial=np.array([0.0, 0.0, -1.0]))
    np.testing.assert_array_equal(s.next(0.0).action, [0, 0, -1])


def test_stale_actions_are_dropped_by_timestamp() -> None:
    s = ActionSchedule(SPEC, tolerance_s=0.01)
    s.offer(chunk(1, start=1.0, n=6))
    d = s.next(1.25)  # actions for 1.0, 1.1, 1.2 are past (1.2 < 1.25 - 0.01)
    assert (d.index, d.dropped) == (3, 3)
    assert d.target_time == pytest.approx(1.3)
    assert s.next(1.3).index == 4  # next slot
    assert s.n_stale == 3


def test_tolerance_keeps_an_action_that_is_only_slightly_late() -> None:
    s = ActionSchedule(SPEC, tolerance_s=0.01)
    s.offer(chunk(1, start=1.0))
    assert s.next(1.005).index == 0
    s2 = ActionSchedule(SPEC, tolerance_s=0.01)
    s2.offer(chunk(1, start=1.0))
    assert s2.next(1.02).index == 1


def test_all_stale_chunk_holds_rather_than_replaying() -> None:
    s = ActionSchedule(SPEC)
    s.offer(chunk(1, start=0.0, n=4))
    d = s.next(5.0)
    assert d.hold and d.dropped == 4


def test_newer_chunk_replaces_current_and_skips_already_commanded_slots() -> None:
    s = ActionSchedule(SPEC)
    s.offer(chunk(1, start=1.0, n=8, base=0.0))
    assert s.next(1.0).index == 0
    assert s.next(1.1).index == 1
    # chunk 2 was computed from the observation at 1.1: its first slot (1.1) was already commanded
    assert s.offer(chunk(2, start=1.1, n=8, base=100.0))
    d = s.next(1.2)
    assert (d.seq, d.index) == (2, 1)
    np.testing.assert_array_equal(d.action, [101, 101, 1])


def test_older_or_duplicate_chunks_are_ignored_and_current_continues() -> None:
    s = ActionSchedule(SPEC)
    s.offer(chunk(5, start=1.0, base=0.0))
    s.next(1.0)
    assert not s.offer(chunk(4, start=1.1, base=50.0))
    assert not s.offer(chunk(5, start=1.1, base=50.0))
    d = s.next(1.1)  # no fresh chunk: continue the last one
    assert (d.seq, d.index) == (5, 1)


def test_chunk_with_wrong_action_dim_is_refused_and_nothing_changes() -> None:
    s = ActionSchedule(SPEC)
    s.offer(chunk(1, start=0.0))
    bad = ActionReply(seq=2, start_time=0.0, dt=DT, actions=np.zeros((4, 7), np.float32))
    with pytest.raises(ProtocolError):
        s.offer(bad)
    assert s.current_seq == 1


def test_remaining_counts_usable_actions() -> None:
    s = ActionSchedule(SPEC)
    assert s.remaining(0.0) == 0
    s.offer(chunk(1, start=1.0, n=5))
    assert s.remaining(1.0) == 5
    assert s.remaining(1.25) == 2
    s.next(1.0)
    assert s.remaining(1.05) == 4


def test_reset_forgets_chunk_and_last_command() -> None:
    s = ActionSchedule(SPEC)
    s.offer(chunk(3, start=0.0))
    s.next(0.0)
    s.reset()
    d = s.next(0.0)
    assert d.hold
    np.testing.assert_array_equal(d.action, [0, 0, 0])
    assert s.offer(chunk(1, start=0.0))  # seq numbering may restart after a reset


def test_fresh_all_stale_chunk_runs_its_last_action_once_if_only_one_period_late() -> None:
    # A one-action chunk (streaming) is timed for its observation and always arrives
    # after that time; it runs at the next slot instead of holding the robot forever.
    s = ActionSchedule(SPEC, tolerance_s=0.01)
    for k in range(3):
        s.offer(chunk(k + 1, start=k * DT, n=1, base=float(k)))
        d = s.next((k + 1) * DT + 0.003)
        assert not d.hold and d.seq == k + 1 and d.index == 0
    assert s.next(4 * DT).hold  # no new chunk: the same action is not replayed
    s.offer(chunk(9, start=0.5, n=2))  # last action for 0.6, now 1.0: four periods late
    assert s.next(10 * DT).hold  # far too late: dropped, never replayed
    assert s.n_executed == 3


def test_a_chunk_with_replan_after_asks_early_and_its_look_ahead_covers_a_late_reply() -> None:
    s = ActionSchedule(SPEC, ActionMode.DELTA)
    c = chunk(1, start=0.0, n=5)
    s.offer(ActionReply(seq=1, start_time=0.0, dt=DT, actions=c.actions, replan_after=1))
    assert s.remaining(0.0, before_replan=True) == 1 and s.remaining(0.0) == 5
    assert s.next(0.0).index == 0
    assert s.remaining(DT, before_replan=True) == 0  # time to replan...
    assert s.remaining(DT) == 4                        # ...but the look-ahead is there
    late = [s.next(k * DT) for k in (1, 2)]            # the next chunk is late: the plan continues
    assert [d.index for d in late] == [1, 2] and not any(d.hold for d in late)
    s.offer(ActionReply(seq=2, start_time=2 * DT, dt=DT, actions=chunk(2, 0.0, n=5, base=10.0).actions, replan_after=1))
    d = s.next(3 * DT)  # the late chunk's action for this tick (its first is stale)
    assert (d.seq, d.index) == (2, 1) and d.action[0] == 11.0
