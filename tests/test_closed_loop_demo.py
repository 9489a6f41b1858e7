"""End to end with real processes: `dpstack demo --quick` collects Lift demos with the
scripted expert, trains a tiny U-Net for a few dozen steps, exports it to ONNX,
starts `dpstack serve` per sampler and runs `dpstack sim` arms against them over
TCP on 127.0.0.1. Success is not asserted (the policy is tiny); what ran is.

The package the demo leaves is then reused for the realtime arm and the
spec-mismatch checks, so training happens once per test session.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from server_process import ServerProcess

pytestmark = pytest.mark.slow

SAMPLERS = ("ddpm", "ddim", "rti", "streaming")
STAGES = ("collect", "train", "export", "evaluate", "report")


def dpstack(*args: str, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "MUJOCO_GL": "egl", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "dpstack.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, **kw)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("demo")
    result = dpstack("demo", "--quick", "--out", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result


def test_demo_runs_every_stage(demo):
    out, result = demo
    for i, stage in enumerate(STAGES, start=1):
        assert f"[{i}/5] {stage}: done in" in result.stdout, stage
    assert (out / "data" / "lift.zarr").is_dir()
    assert (out / "train" / "last.pt").is_file()
    assert (out / "policy" / "manifest.json").is_file()


def test_results_cover_every_sampler_with_the_agreed_fields(demo):
    out, _ = demo
    results = json.loads((out / "eval" / "results.json").read_text())
    assert results["mode"] == "lockstep" and results["hz"] == 20.0
    assert results["seed_base"] >= 10_000  # never a training seed
    by_sampler = {r["sampler"]: r for r in results["results"]}
    assert set(by_sampler) == set(SAMPLERS)
    for name, r in by_sampler.items():
        for field in ("sampler", "episodes", "success_rate", "success_ci95", "mean_episode_steps",
                      "step_latency", "chunk_latency", "deadline_misses", "mode", "hz"):
            assert field in r, (name, field)
        assert r["episodes"] == 2
        lo, hi = r["success_ci95"]
        assert 0.0 <= lo <= r["success_rate"] <= hi <= 1.0
        assert 0 < r["mean_episode_steps"] <= 30  # --quick caps episodes at 30 steps
        assert r["chunks"] == r["chunk_latency"]["n"] > 0 and r["chunk_latency"]["p50_ms"] > 0
        assert r["step_latency"]["p50_ms"] <= r["step_latency"]["p99_ms"] <= r["step_latency"]["max_ms"]
        assert r["evaluations_per_step"] > 0
        assert r["deadline_misses"] == 0  # lockstep waits for every chunk
    # The names as typed, with what the server resolved them to beside them.
    assert by_sampler["rti"]["sampler_resolved"] == "rti-renoise-40,15,0"
    assert by_sampler["ddim"]["sampler_resolved"] == "ddim-10"
    assert by_sampler["streaming"]["sampler_resolved"].startswith("streaming-")
    # Full samplers replan every Ta steps; DDPM spends 100 evaluations per chunk, DDIM 10.
    assert by_sampler["ddpm"]["evaluations_per_step"] > by_sampler["ddim"]["evaluations_per_step"]
    # Every sampler's episodes ran on the same seeds (a paired comparison).
    seeds = {}
    for name in SAMPLERS:
        raw = json.loads((out / "eval" / "raw" / f"{name}.json").read_text())
        seeds[name] = sorted(e["seed"] for e in raw["episodes"])
        for e in raw["episodes"]:
            assert len(e["step_latency_ms"]) == e["steps"]
    assert len({tuple(v) for v in seeds.values()}) == 1


def test_report_folder_has_table_plots_and_a_rollout(demo):
    out, result = demo
    report = out / "report"
    text = (report / "report.md").read_text()
    assert re.search(r"^\| rti \| rti-renoise-40,15,0 \|", text, re.M)
    assert re.search(r"rollout\.mp4\): (ddpm|ddim|rti|streaming)_ep\d", text), text  # videos: the typed names too
    for name in SAMPLERS:
        assert re.search(rf"^\| {name} \|", text, re.M), name
        assert re.search(rf"^\| {name} \|", result.stdout, re.M), name  # the table is printed too
        assert re.search(rf"^- {name}: (none|\d+(, \d+)*)$", text, re.M), name  # its failing seeds, to trace
    pairs = re.findall(r"^\| (\w+) \| (\w+) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \|", text, re.M)
    assert len(pairs) == len(SAMPLERS) * (len(SAMPLERS) - 1) // 2  # every pair of samplers, seed by seed
    assert all(int(seeds) == sum(map(int, counts)) for _, _, seeds, *counts in pairs)
    for png in ("loss.png", "latency.png"):
        assert (report / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import imageio.v2 as imageio
    frames = imageio.mimread(report / "rollout.mp4")
    assert len(frames) > 5 and np.asarray(frames[0]).ndim == 3


def test_rerun_skips_every_done_stage(demo):
    out, _ = demo
    results = out / "eval" / "results.json"
    before = results.stat().st_mtime_ns
    again = dpstack("demo", "--quick", "--out", str(out), timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    for stage in STAGES:
        assert f"{stage}: already done, skipping" in again.stdout, stage
    assert results.stat().st_mtime_ns == before


def _serve(policy: Path, sampler: str) -> ServerProcess:
    return ServerProcess(command=[sys.executable, "-m", "dpstack.cli", "serve", str(policy), "--sampler", sampler,
                                  "--bind", "tcp://127.0.0.1:*"], ready_timeout_s=60.0).start()


@pytest.fixture()
def server(demo):
    out, _ = demo
    server = _serve(out / "policy", "ddim-4")
    yield server.endpoint
    server.stop()


def test_realtime_arm_counts_deadlines_and_latency(server, tmp_path):
    result = dpstack("sim", "--task", "lift", "--connect", server, "--mode", "realtime", "--episodes", "2",
                     "--max-steps", "20", "--seed", "20000", "--out", str(tmp_path / "rt.json"), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads((tmp_path / "rt.json").read_text())
    assert [e["seed"] for e in data["episodes"]] == [20000, 20001]
    for e in data["episodes"]:
        assert e["mode"] == "realtime" and 0 < e["steps"] <= 20
        assert len(e["step_latency_ms"]) == e["steps"] == len(e["physics_ms"]) and min(e["physics_ms"]) > 0
        # The episode's first chunk is waited for before the clock starts (the arm is at rest).
        assert e["start_latency_ms"] > 0 and e["evaluations"] > 0
        assert all(x > 0 for x in e["chunk_latency_ms"])
        if not e["chunk_latency_ms"]:
            # No chunk came back within the episode (a badly overloaded machine): every tick held.
            assert e["held_steps"] == e["steps"]
        # a miss is a tick that held or commanded after its deadline; a slow physics step
        # (overrun) is counted apart
        assert e["deadline_misses"] == e["held_steps"] + e["late_steps"] == len(e["misses"]) <= e["steps"]
        assert 0 <= e["overruns"] <= e["steps"]
        assert all(t0 < t1 for _, t0, t1 in e["misses"])
    assert sum(len(e["chunk_latency_ms"]) for e in data["episodes"]) > 0
    assert data["summary"]["sampler"].startswith("ddim")


def test_a_simulator_slower_than_the_period_pauses_the_world_instead_of_making_every_tick_late(server, tmp_path):
    # At 1000 Hz the period is 1 ms and one simulated step (robosuite's substeps for one
    # control period) always takes longer: every step overruns. (At 200 Hz a quiet machine
    # sometimes steps within the 5 ms.)
    # The world stands still for the excess, so the next tick is not late because of it
    # (counting from the wall-clock grid, nearly every tick would be).
    result = dpstack("sim", "--task", "lift", "--connect", server, "--mode", "realtime", "--hz", "1000",
                     "--episodes", "1", "--max-steps", "20", "--seed", "20000", "--out", str(tmp_path / "fast.json"),
                     timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    e = json.loads((tmp_path / "fast.json").read_text())["episodes"][0]
    assert e["overruns"] >= e["steps"] - 2, (e["overruns"], e["steps"])
    assert e["late_steps"] <= e["steps"] // 4, (e["late_steps"], e["steps"])


@pytest.mark.parametrize("sampler", ["rti", "streaming"])
def test_realtime_arm_replans_every_tick_and_keeps_the_look_ahead_for_late_answers(demo, tmp_path, sampler):
    out, _ = demo
    server = _serve(out / "policy", sampler)
    try:
        result = dpstack("sim", "--task", "lift", "--connect", server.endpoint, "--mode", "realtime", "--episodes", "1",
                         "--max-steps", "30", "--seed", "20000", "--out", str(tmp_path / "rt.json"), timeout=300)
    finally:
        server.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    e = json.loads((tmp_path / "rt.json").read_text())["episodes"][0]
    # Each chunk has the rest of the horizon but asks for a new observation after one: the arm asks
    # nearly every tick (a tick with an answer still in flight sends history only).
    assert len(e["chunk_latency_ms"]) >= e["steps"] // 2, (len(e["chunk_latency_ms"]), e["steps"])
    # A late answer runs the look-ahead; with 14 spare actions nothing short of a stall holds.
    assert 0 <= e["lookahead_steps"] <= e["steps"] and e["held_steps"] == 0
    # Every tick accounts for the time the computer took, and every miss names its step.
    assert len(e["steal_ms"]) == len(e["runqueue_ms"]) == e["steps"]
    assert len(e["chunk_compute_ms"]) == len(e["chunk_latency_ms"])
    bad = [(c, l) for c, l in zip(e["chunk_compute_ms"], e["chunk_latency_ms"]) if not 0 < c <= l]
    assert not bad, bad
    assert min(e["steal_ms"] + e["runqueue_ms"]) >= 0 and len(e["misses"]) == e["deadline_misses"]


def test_arm_with_another_robot_spec_is_refused_with_a_clear_error(server, tmp_path):
    # Can publishes a 14-D object state; the Lift policy needs 10-D: the server refuses the Hello.
    result = dpstack("sim", "--task", "can", "--connect", server, "--episodes", "1", "--max-steps", "5",
                     "--out", str(tmp_path / "x.json"), timeout=120)
    assert result.returncode == 1
    assert "object-state" in result.stderr and "spec" in result.stderr.lower()
    assert not (tmp_path / "x.json").exists()


def test_an_interrupted_evaluation_reruns_only_its_missing_episodes(demo):
    out, _ = demo
    (out / "eval" / "results.json").unlink()
    missing = out / "eval" / "raw" / "ddim" / "episodes_0001.json"
    missing.unlink()
    again = dpstack("demo", "--quick", "--out", str(out), timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming: 7 of 8 episodes already done" in again.stdout
    assert "servers up: ddim at" in again.stdout and "ddpm at" not in again.stdout
    for stage in ("collect", "train", "export"):
        assert f"{stage}: already done, skipping" in again.stdout
    results = json.loads((out / "eval" / "results.json").read_text())
    assert {r["sampler"]: r["episodes"] for r in results["results"]} == {s: 2 for s in SAMPLERS}
    assert missing.exists()


def test_an_evaluation_stopped_mid_job_resumes_at_the_episode_it_was_running(demo, tmp_path):
    out, _ = demo
    args = ("eval", str(out / "policy"), "--task", "lift", "--episodes", "3", "--samplers", "ddim", "--workers", "1",
            "--max-steps", "12", "--out", str(tmp_path / "ev"))
    assert dpstack(*args, timeout=300).returncode == 0
    job = tmp_path / "ev" / "raw" / "ddim" / "episodes_0000.json"
    full = json.loads(job.read_text())
    assert [e["episode"] for e in full["episodes"]] == [0, 1, 2]
    # What the arm leaves when it is stopped during episode 1: episode 0, rewritten as it ended.
    job.write_text(json.dumps({**full, "episodes": full["episodes"][:1]}))
    (tmp_path / "ev" / "results.json").unlink()
    again = dpstack(*args, timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "resuming: 1 of 3 episodes already done" in again.stdout
    resumed = json.loads(job.read_text())["episodes"]
    assert [(e["episode"], e["seed"]) for e in resumed] == [(e["episode"], e["seed"]) for e in full["episodes"]]
    assert resumed[0] == full["episodes"][0]  # kept, not run again: its latencies are the first run's
    assert resumed[1]["chunk_latency_ms"] != full["episodes"][1]["chunk_latency_ms"]  # run again
    assert json.loads((tmp_path / "ev" / "results.json").read_text())["results"][0]["episodes"] == 3


def test_realtime_eval_pins_arm_and_server_and_checks_misses_against_a_witness(demo, tmp_path):
    out, _ = demo
    result = dpstack("eval", str(out / "policy"), "--task", "lift", "--episodes", "1", "--samplers", "streaming",
                     "--mode", "realtime", "--workers", "1", "--max-steps", "15", "--witness",
                     "--out", str(tmp_path / "rt"), timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    results = json.loads((tmp_path / "rt" / "results.json").read_text())
    cpus = sorted(os.sched_getaffinity(0))
    sched = results["scheduling"]
    if len(cpus) > 1:  # a core for the arm, the rest for the server
        assert sched["arm_cpus"] == [str(cpus[0])] and sched["server_cpus"] == ",".join(map(str, cpus[1:]))
    raw = json.loads(next((tmp_path / "rt" / "raw").rglob("episodes_*.json")).read_text())
    assert raw["config"]["scheduling"]["cpus"] == (str(cpus[0]) if len(cpus) > 1 else ",".join(map(str, cpus)))
    # One witness per core watched the whole run at 1 kHz.
    assert [w["cpu"] for w in results["witness"]] == [str(c) for c in cpus]
    assert all(w["wakeups"] > 200 * w["seconds"] > 0 for w in results["witness"])
    r = results["results"][0]
    assert 0 <= r["stall_misses"] <= r["deadline_misses"]


def test_lockstep_eval_gives_the_same_episodes_with_serial_and_batched_servers(demo, tmp_path):
    out, _ = demo
    episodes = {}
    for scheduling in ("serial", "batched"):
        result = dpstack("eval", str(out / "policy"), "--task", "lift", "--episodes", "2", "--samplers", "ddim",
                         "--workers", "2", "--max-steps", "12", "--scheduling", scheduling,
                         "--out", str(tmp_path / scheduling), timeout=300)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        results = json.loads((tmp_path / scheduling / "results.json").read_text())
        assert results["scheduling"]["serve_args"] == ["--scheduling", scheduling]
        raw = sorted((tmp_path / scheduling / "raw").rglob("episodes_*.json"))
        episodes[scheduling] = [(e["seed"], e["success"], e["steps"], e["evaluations"])
                                for path in raw for e in json.loads(path.read_text())["episodes"]]
    assert len(episodes["serial"]) == 2
    assert episodes["serial"] == episodes["batched"]
