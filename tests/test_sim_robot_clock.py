"""RobotClock: robot time on a (fake) wall clock, scaled and pausable."""
from __future__ import annotations

import pytest
from fake_wall import FakeWall

from dpstack.sim.robot_clock import RobotClock


def clock(scale: float = 1.0) -> tuple[RobotClock, FakeWall]:
    wall = FakeWall()
    return RobotClock(scale, wall, wall.shared), wall


def test_robot_time_starts_at_zero_and_runs_scale_times_as_fast_as_the_wall():
    c, wall = clock(scale=0.5)  # a 20 Hz task run at 10 Hz: slow motion
    assert c.now() == 0.0
    wall.t += 1.0
    assert c.now() == pytest.approx(0.5)
    assert c.wall_s(0.5) == pytest.approx(1.0)


def test_the_time_a_paused_block_takes_is_not_robot_time():
    c, wall = clock(scale=2.0)
    wall.t += 0.25
    with c.paused():
        wall.t += 3.0  # a slow video frame
    assert c.now() == pytest.approx(0.5)
    wall.t += 0.25
    assert c.now() == pytest.approx(1.0)


def test_time_past_the_end_of_a_period_becomes_a_pause_and_time_short_of_it_does_not():
    c, wall = clock(scale=2.0)
    wall.t += 0.04  # robot 0.08: the step needed longer than its period, which ends at 0.05
    assert c.pause_past(0.05)
    assert c.now() == pytest.approx(0.05)
    wall.t += 0.01
    assert c.now() == pytest.approx(0.07)
    assert not c.pause_past(0.1)
    assert c.now() == pytest.approx(0.07)


def test_shared_instants_follow_scale_and_pauses():
    c, wall = clock(scale=2.0)
    assert c.shared_at(0.0) == pytest.approx(5100.0)
    assert c.shared_at(1.0) == pytest.approx(5100.5)  # one robot second is half a wall second
    wall.t += 1.0
    c.pause(1.0)
    assert c.shared_at(1.0) == pytest.approx(5101.5)  # robot time 1.0 comes a paused second later


@pytest.mark.parametrize("scale", [0.0, -1.0])
def test_a_scale_that_stops_or_reverses_time_is_refused(scale):
    with pytest.raises(ValueError, match="scale must be positive"):
        RobotClock(scale)
