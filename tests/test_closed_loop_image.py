"""An image policy in closed loop with real processes: `dpstack eval` renders the cameras
the package's spec reads, at its size, with nothing typed twice; a package that needs a
camera the task lacks is refused in one sentence; and an extra latency delays every answer
on the robot clock, in realtime and, exactly, in lockstep. The package has random weights (no collection or
training): what ran is asserted, not success."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow
pytest.importorskip("robosuite")
pytest.importorskip("torch")

DELAY_MS = 200.0
PERIOD_MS = 50.0  # Lift's 20 Hz


def dpstack(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "MUJOCO_GL": "egl", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "dpstack.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    from _image_package import write_image_package
    return write_image_package(tmp_path_factory.mktemp("image") / "policy")


def test_eval_renders_the_cameras_the_package_reads(package, tmp_path):
    from _image_package import IMAGE_HW

    out = tmp_path / "eval"
    result = dpstack("eval", str(package), "--task", "lift", "--episodes", "1", "--samplers", "ddim-2",
                     "--max-steps", "8", "--workers", "1", "--out", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (episode,) = json.loads((out / "raw" / "ddim-2.json").read_text())["episodes"]
    assert episode["steps"] == 8 and episode["render_ms"] > 0
    assert len(episode["chunk_latency_ms"]) >= 1
    # the arm's spec carried the camera at the package's size (the server checked it at Hello)
    assert IMAGE_HW != (84, 84)


@pytest.fixture()
def wristcam_package(package, tmp_path) -> Path:
    """The same package reading a camera Lift's scene does not have."""
    broken = tmp_path / "policy"
    shutil.copytree(package, broken)
    manifest = broken / "manifest.json"
    manifest.write_text(manifest.read_text().replace("agentview_image", "wristcam_image"))
    return broken


def test_a_package_needing_a_camera_the_task_lacks_is_refused_in_one_sentence(wristcam_package, tmp_path):
    broken = wristcam_package
    result = dpstack("eval", str(broken), "--task", "lift", "--episodes", "1", "--samplers", "ddim-2",
                     "--out", str(tmp_path / "eval"), timeout=300)
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert "camera 'wristcam'" in line and "cannot render" in line and "Traceback" not in result.stderr
    assert not (tmp_path / "eval" / "logs").exists() or not list((tmp_path / "eval" / "logs").iterdir())  # no server


def test_an_extra_latency_delays_every_answer_and_the_arm_holds_meanwhile(package, tmp_path):
    out = tmp_path / "delay"
    result = dpstack("eval", str(package), "--task", "lift", "--episodes", "1", "--samplers", "ddim-2",
                     "--max-steps", "30", "--workers", "1", "--mode", "realtime",
                     "--extra-latency-ms", f"0,{DELAY_MS:g}", "--trace", "--out", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["extra_latency_ms"] == [0.0, DELAY_MS]
    assert [(r["sampler"], r["extra_latency_ms"]) for r in results["results"]] == [("ddim-2", 0.0), ("ddim-2", DELAY_MS)]
    (delayed,) = json.loads((out / "raw" / "ddim-2_delay_200ms.json").read_text())["episodes"]
    assert delayed["extra_latency_ms"] == DELAY_MS and delayed["chunk_latency_ms"]
    # Robot time never runs ahead of the wall clock, so every answer took at least the delay.
    assert min(delayed["chunk_latency_ms"]) >= DELAY_MS
    # DDIM's chunk has no look-ahead: at its first replan (the lead has no latency to go on
    # yet) the arm holds until the delayed answer comes, at least delay / period ticks less one.
    assert delayed["held_steps"] >= DELAY_MS // PERIOD_MS - 1
    # Rendering the camera pauses the world: were it counted as physics, a render slower
    # than the period (software rendering on a busy CPU) would make every step overrun.
    (undelayed,) = json.loads((out / "raw" / "ddim-2.json").read_text())["episodes"]
    assert undelayed["render_ms"] > 0 and undelayed["overruns"] < undelayed["steps"]
    assert (out / "success_vs_delay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Success against extra latency" in (out / "results.md").read_text()
    # a realtime trace: one row per step, its holds the record's, every answered ask marked
    from dpstack.sim.trace import read_trace

    trace = read_trace(out / "traces" / "ddim-2_delay200ms_seed10000.json")
    assert len(trace.steps) == delayed["steps"] and sum(s["held"] for s in trace.steps) == delayed["held_steps"]
    asked = sum(s["asked"] for s in trace.steps)
    # the first chunk (waited for at rest: start latency, not a chunk latency), each answered
    # chunk, and the last ask, which may still be on its way when the episode ends
    assert len(delayed["chunk_latency_ms"]) + 1 <= asked <= len(delayed["chunk_latency_ms"]) + 2


def test_a_lockstep_delay_is_exact_ticks_of_holding_then_asking_ahead(package, tmp_path):
    out = tmp_path / "lockstep_delay"
    result = dpstack("eval", str(package), "--task", "lift", "--episodes", "1", "--samplers", "ddim-2",
                     "--max-steps", "30", "--workers", "1", "--extra-latency-ms", f"0,{DELAY_MS:g}", "--out", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (plain,) = json.loads((out / "raw" / "ddim-2.json").read_text())["episodes"]
    (delayed,) = json.loads((out / "raw" / "ddim-2_delay_200ms.json").read_text())["episodes"]
    assert plain["steps"] == delayed["steps"] == 30
    # Ta = 8 without a delay: chunks asked at ticks 0, 8, 16, 24 and never a hold.
    assert (len(plain["chunk_latency_ms"]), plain["held_steps"]) == (4, 0)
    # With 4 ticks of delay: the first chunk is waited for at rest; the one asked at tick 8
    # arrives at 12 (4 holds); from then on the arm asks 4 ticks ahead, at 12, 16, 20, 24, 28,
    # and executes the second half of each chunk without holding again.
    d = int(DELAY_MS // PERIOD_MS)
    assert delayed["held_steps"] == d
    assert len(delayed["chunk_latency_ms"]) == 2 + len(range(8 + d, 30, d))
    assert "## Success against extra latency" in (out / "results.md").read_text()


def test_a_trace_follows_the_episode_step_by_step(package, tmp_path):
    """`dpstack eval --trace`: the arm writes what it did at every step, and it agrees with
    the episode record (steps, chunks asked, the delay's holds)."""
    from dpstack.sim.trace import read_trace

    out = tmp_path / "traced"
    result = dpstack("eval", str(package), "--task", "lift", "--episodes", "1", "--samplers", "ddim-2", "--seed", "10007",
                     "--max-steps", "30", "--workers", "1", "--extra-latency-ms", f"{DELAY_MS:g}", "--trace",
                     "--out", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (episode,) = json.loads((out / "raw" / "ddim-2_delay_200ms.json").read_text())["episodes"]
    trace = read_trace(out / "traces" / "ddim-2_delay200ms_seed10007.json")
    assert (out / "traces" / "ddim-2_delay200ms_seed10007.png").stat().st_size > 0
    assert len(trace.steps) == episode["steps"] == 30 and trace.success == episode["success"]
    assert sum(s["asked"] for s in trace.steps) == len(episode["chunk_latency_ms"])
    d = int(DELAY_MS // PERIOD_MS)
    assert [i for i, s in enumerate(trace.steps) if s["held"]] == list(range(8, 8 + d))  # the chunk asked at 8 is late
    assert all(len(s["action"]) == 7 and np.all(np.isfinite(s["action"])) for s in trace.steps)
    cube = np.array([s["objects"]["cube_pos"] for s in trace.steps])
    assert abs(cube[0, 2] - 0.82) < 0.05  # the cube on the table, where robosuite's Lift puts it
    assert set(trace.summary()["closest_cm"]) == {"cube"}
    eef = np.array([s["eef_pos"] for s in trace.steps])
    assert np.linalg.norm(np.diff(eef, axis=0), axis=1).max() > 0  # the arm moved under the policy's actions


def test_sim_takes_its_cameras_from_the_package_and_names_one_the_task_lacks(package, wristcam_package, tmp_path):
    result = dpstack("sim", "--task", "lift", "--policy", str(wristcam_package), "--connect", "tcp://127.0.0.1:9",
                     "--out", str(tmp_path / "x.json"), timeout=300)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "camera 'wristcam'" in line and "agentview" in line  # the ones it has
    both = dpstack("sim", "--task", "lift", "--policy", str(package), "--cameras", "agentview", timeout=120)
    assert both.returncode == 2 and "not both" in both.stderr
