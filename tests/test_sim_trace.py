"""A step-by-step episode trace (sim/trace.py): its summary, file and plot, from a
hand-made approach, grasp and lift whose answers are known."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dpstack.sim.trace import EpisodeTrace, distances, read_trace


def _grasp_and_lift() -> EpisodeTrace:
    """The gripper comes down 1 cm beside a cube at (0, 0, 0.82) over 10 steps, closes at step 6
    (a first flick at step 2 opens again), and lifts it 5 cm from step 10."""
    trace = EpisodeTrace("lift", "ddim-10", 10014, gripper_dims=(6,))
    for t in range(15):
        eef = np.array([0.1 - 0.009 * min(t, 10), 0.0, 0.92 - 0.01 * min(t, 10) + 0.01 * max(0, t - 10)])
        cube = np.array([0.0, 0.0, 0.82 + 0.01 * max(0, t - 10)])
        grip = 1.0 if t == 2 or t >= 6 else -1.0
        action = np.array([-0.5, 0, -0.5, 0, 0, 0, grip])
        trace.add(eef, np.array([0.04, -0.04]) * (0.5 if t >= 7 else 1.0),
                  {"cube_pos": cube, "cube_quat": np.array([0, 0, 0, 1.0]), "gripper_to_cube_pos": cube - eef},
                  action, asked=t % 8 == 0, held=t in (9,))
    trace.success = True
    return trace


def test_the_summary_finds_the_closest_approach_the_closes_and_the_lift():
    s = _grasp_and_lift().summary()
    assert (s["steps"], s["success"], s["chunks_asked"], s["held_steps"]) == (15, True, 2, 1)
    assert s["closest_cm"] == {"cube": {"cm": pytest.approx(1.0), "step": 10}}  # lands 1 cm off
    assert s["gripper_closes_at"] == [2, 6]
    assert s["lifted_cm"] == {"cube": pytest.approx(4.0)}  # object positions only: offsets are not objects
    d = distances(_grasp_and_lift())["cube"]
    assert d[0] == pytest.approx(np.hypot(0.1, 0.1)) and d.argmin() == 10


def test_a_trace_writes_json_and_a_plot_and_reads_back(tmp_path: Path):
    trace = _grasp_and_lift()
    path = trace.write(tmp_path / "traces")
    assert path.name == "ddim-10_seed10014.json"
    assert path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = read_trace(path)
    assert again.summary() == trace.summary() and again.steps[3]["action"][6] == -1.0
    delayed = EpisodeTrace("can", "rti-renoise-40,15,0", 7, (6,), extra_latency_ms=100.0, steps=trace.steps)
    assert delayed.write(tmp_path).name == "rti-renoise-40_15_0_delay100ms_seed7.json"  # delays do not overwrite
