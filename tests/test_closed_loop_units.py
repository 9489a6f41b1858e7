"""The closed-loop pieces that need no processes: statistics, job splitting, sampler
lists and the demo's resumable stage logic."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpstack.sim.eval_report import EpisodeRecord, load_records, summarize, wilson_interval
from dpstack.sim.evaluate import split_jobs
from dpstack.demo.stages import Stage, StageFailed, run_stages


def test_wilson_interval_matches_known_values_and_stays_in_range():
    lo, hi = wilson_interval(0, 2)
    assert lo == 0.0 and hi == pytest.approx(0.6576, abs=1e-3)
    lo, hi = wilson_interval(10, 10)
    assert lo == pytest.approx(0.7225, abs=1e-3) and hi == pytest.approx(1.0)
    lo, hi = wilson_interval(45, 50)
    assert lo == pytest.approx(0.7864, abs=1e-3) and hi == pytest.approx(0.9565, abs=1e-3)
    assert wilson_interval(5, 20) == pytest.approx(tuple(1 - x for x in reversed(wilson_interval(15, 20))))
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_summary_pools_episodes():
    records = [EpisodeRecord(0, 10_000, True, 40, step_latency_ms=[1.0] * 40, chunk_latency_ms=[10.0] * 5,
                             evaluations=50, deadline_misses=2, held_steps=1, late_steps=1, lookahead_steps=4,
                             physics_ms=[5.0] * 39 + [31.0], misses=[[3, 100.15, 100.2], [8, 100.4, 100.45]],
                             steal_ms=[0.0] * 3 + [10.0] + [0.0] * 36, runqueue_ms=[0.0] * 7 + [6.0] + [0.0] * 32),
               EpisodeRecord(1, 10_001, False, 60, step_latency_ms=[3.0] * 60, chunk_latency_ms=[30.0] * 8,
                             evaluations=80, deadline_misses=2, late_steps=2, overruns=3, lookahead_steps=1,
                             misses=[[0, 200.0, 200.05], [5, 200.25, 200.3]],
                             steal_ms=[0.0] * 60, runqueue_ms=[4.9] + [0.0] * 59)]
    s = summarize("ddim", records, "realtime", 20.0)
    assert (s.episodes, s.successes, s.success_rate) == (2, 1, 0.5)
    assert s.mean_episode_steps == 50.0
    assert s.step_latency["p50_ms"] == 3.0 and s.chunk_latency["p99_ms"] == pytest.approx(30.0)
    assert s.chunk_latency["n"] == s.chunks and s.start_latency == {"n": 2, "mean_ms": 0.0, "p50_ms": 0.0,
                                                                     "p99_ms": 0.0, "max_ms": 0.0}
    assert s.chunks == 13 and s.deadline_misses == 4
    assert (s.held_steps, s.late_steps, s.overruns, s.lookahead_steps) == (1, 3, 3, 5)
    assert s.physics["p50_ms"] == 5.0 and s.physics["max_ms"] == 31.0 and s.physics["n"] == 40
    # A stall is >= 10% of the 50 ms period stolen or queued: steps 3 and 7 of the first
    # episode; 4.9 ms of queueing is not one. The miss at 3 is the computer's; the one at 8,
    # after the stalled step 7, is not (a slow step pauses the simulated world, it does not
    # make the next tick late).
    assert (s.stalled_steps, s.stall_misses) == (2, 1)
    # A witness saw the machine stop for 30 ms from t = 200.27: the miss at step 5 is its too.
    assert summarize("ddim", records, "realtime", 20.0, witness_stalls=[(200.27, 30.0)]).stall_misses == 2
    assert summarize("ddim", records, "realtime", 20.0, witness_stalls=[(200.31, 30.0), (200.27, 4.0)]).stall_misses == 1
    assert s.evaluations_per_step == pytest.approx(130 / 100)


def test_results_show_the_sampler_as_typed_with_what_it_resolved_to():
    from dpstack.sim.eval_report import markdown_table

    records = [EpisodeRecord(i, 10_000 + i, True, 10, sampler="rti", sampler_resolved="rti-renoise-20,8,0")
               for i in range(2)]
    s = summarize("rti", records, "lockstep", 20.0)
    assert (s.sampler, s.sampler_resolved) == ("rti", "rti-renoise-20,8,0")
    assert s.to_dict()["sampler_resolved"] == "rti-renoise-20,8,0"
    header, _, row = markdown_table([s]).splitlines()
    assert header.startswith("| sampler | resolved |") and row.startswith("| rti | rti-renoise-20,8,0 |")
    # records from before the field (a resumed evaluation): the column stays empty
    assert summarize("rti", [EpisodeRecord(0, 1, True, 3)], "lockstep", 20.0).sampler_resolved == ""


def test_records_round_trip_and_bad_records_are_named(tmp_path: Path):
    r = EpisodeRecord(3, 10_003, True, 12, step_latency_ms=[0.5])
    (tmp_path / "a.json").write_text(json.dumps({"episodes": [r.to_dict()]}))
    assert load_records([tmp_path / "a.json"]) == [r]
    (tmp_path / "b.json").write_text(json.dumps({"episodes": [{"episode": 1, "seed": 2}]}))
    with pytest.raises(ValueError, match="success"):
        load_records([tmp_path / "b.json"])


def test_jobs_cover_every_episode_once_per_sampler(tmp_path: Path):
    jobs = split_jobs(("ddpm", "rti-3,1,0"), episodes=7, workers=3, video=2, raw_dir=tmp_path)
    for sampler in ("ddpm", "rti-3,1,0"):
        mine = [j for j in jobs if j.sampler == sampler]
        covered = sorted(i for j in mine for i in range(j.first, j.first + j.count))
        assert covered == list(range(7))
        assert sum(j.video for j in mine) == 2 and mine[0].first == 0 and mine[0].video == 2
    assert len({j.out for j in jobs}) == len(jobs)
    assert all("," not in j.out.parent.name for j in jobs)  # file names stay plain
    assert {j.sampler for j in jobs[:3]} == {"ddpm"}  # the arms running at once share one (batched) server


class _Outputs:
    """Stages whose output is a file; `fail_at` makes one stage crash like an interrupted run."""

    def __init__(self, root: Path, names: list[str]) -> None:
        self.root, self.names, self.ran, self.fail_at = root, names, [], None

    def stages(self) -> list[Stage]:
        def make(name: str) -> Stage:
            def run() -> None:
                self.ran.append(name)
                if name == self.fail_at:
                    raise KeyboardInterrupt
                (self.root / name).write_text("done")
            return Stage(name, name, lambda: (self.root / name).exists(), run)
        return [make(n) for n in self.names]


def test_an_interrupted_pipeline_resumes_at_the_stage_that_did_not_finish(tmp_path: Path):
    p = _Outputs(tmp_path, ["collect", "train", "export"])
    p.fail_at = "train"
    with pytest.raises(KeyboardInterrupt):
        run_stages(p.stages(), log=lambda s: None)
    assert p.ran == ["collect", "train"]
    p.fail_at, p.ran = None, []
    outcomes = run_stages(p.stages(), log=lambda s: None)
    assert p.ran == ["train", "export"]
    assert [o.status for o in outcomes] == ["skipped", "ran", "ran"]
    p.ran = []
    assert [o.status for o in run_stages(p.stages(), log=lambda s: None)] == ["skipped"] * 3 and p.ran == []
    run_stages(p.stages(), log=lambda s: None, force=True)
    assert p.ran == ["collect", "train", "export"]


def test_a_stage_that_leaves_no_complete_output_fails(tmp_path: Path):
    stage = Stage("train", "train", done=lambda: False, run=lambda: None)
    with pytest.raises(StageFailed, match="train"):
        run_stages([stage], log=lambda s: None)


def test_evaluation_seeds_start_above_every_seed_the_collection_tried(tmp_path: Path):
    import numpy as np

    from dpstack.data.replay_buffer import DatasetAttrs, ReplayBuffer
    from dpstack.core.spec import ActionSpec, ArraySpec, RobotSpec
    from dpstack.runtime.package import MANIFEST
    from dpstack.sim.evaluate import training_dataset, unseen_seed_base

    spec = RobotSpec("lift", "Panda", 20.0, (ArraySpec("state", (2,)),), ActionSpec(shape=(7,)))
    rb = ReplayBuffer.create(tmp_path / "d.zarr", DatasetAttrs("lift", 20.0, spec, "scripted_expert",
                                                               extra={"seed_start": 0, "next_seed": 12_345}))
    rb.add_episode({"state": np.zeros((3, 2), np.float32), "action": np.zeros((3, 7), np.float32)})
    assert unseen_seed_base(tmp_path / "d.zarr") == 12_345
    assert unseen_seed_base(tmp_path / "d.zarr", default=20_000) == 20_000
    assert unseen_seed_base(None) == 10_000
    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / MANIFEST).write_text(json.dumps({"dataset": {"source": str(tmp_path / "d.zarr")}}))
    assert training_dataset(tmp_path / "policy") == tmp_path / "d.zarr"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak memory reads /proc (Linux)")
def test_a_stage_reports_the_peak_memory_of_its_subprocesses(tmp_path: Path):
    import subprocess
    import sys

    # A child holding ~300 MB for a second: the stage's peak must include it (the parent alone is far smaller).
    hold = "import numpy as np, time; a = np.ones(300 * 2**20 // 8); time.sleep(1.0)"
    done = tmp_path / "done"

    def run() -> None:
        subprocess.run([sys.executable, "-c", hold], check=True)
        done.touch()

    (outcome,) = run_stages([Stage("hold", "hold memory", done=done.exists, run=run)], log=lambda s: None)
    assert outcome.peak_mb is not None and outcome.peak_mb > 300


def test_realtime_servers_leave_the_arms_their_cores(tmp_path: Path):
    from dpstack.sim.evaluate import EvalConfig, server_threads

    cpus = tuple(range(8))
    cfg = lambda **kw: EvalConfig(policy_dir=tmp_path, out=tmp_path, **kw)  # noqa: E731
    assert server_threads(cfg(mode="realtime", workers=3), cpus) == 5
    assert server_threads(cfg(mode="realtime", workers=8), cpus) == 1  # never zero
    assert server_threads(cfg(mode="lockstep", workers=3), cpus) == 2
    assert server_threads(cfg(mode="realtime", workers=3, server_threads=4), cpus) == 4
    with pytest.raises(ValueError, match="server_threads"):
        cfg(server_threads=-1)


def test_realtime_eval_gives_each_arm_a_core_and_the_servers_the_rest(tmp_path: Path):
    from dpstack.sim.evaluate import EvalConfig, arm_argv, plan_cpus, split_jobs

    cfg = lambda **kw: EvalConfig(policy_dir=tmp_path, out=tmp_path, **kw)  # noqa: E731
    plan = plan_cpus(cfg(mode="realtime", workers=2), (0, 1, 4, 5))
    assert [a.cpus for a in plan.arms] == [(0,), (1,)] and plan.server.cpus == (4, 5)
    assert plan.server.priority == 0 and not plan.server.lock_memory
    # Not more cores than arms, pinning off, or lockstep: nothing is pinned.
    for kw, cpus in ((dict(mode="realtime", workers=2), (0, 1)), (dict(mode="realtime", workers=1, pin=False), (0, 1)),
                     (dict(mode="lockstep", workers=1), (0, 1))):
        plan = plan_cpus(cfg(**kw), cpus)
        assert all(not a.cpus for a in plan.arms) and not plan.server.cpus
    # Real-time priority goes with locked memory, to arms and servers alike, in realtime only.
    plan = plan_cpus(cfg(mode="realtime", workers=1, rt_priority=40), (0, 1))
    assert plan.arms[0].argv() == ["--cpus", "0", "--rt-priority", "40", "--lock-memory"]
    assert plan.server.argv() == ["--cpus", "1", "--rt-priority", "40", "--lock-memory"]
    assert plan_cpus(cfg(mode="lockstep", workers=1, rt_priority=40), (0, 1)).server.argv() == []
    job = split_jobs(["ddim"], 2, 1, 0, tmp_path)[0]
    argv = arm_argv(cfg(mode="realtime", workers=1), job, "tcp://127.0.0.1:1", tmp_path, plan.arms[0])
    assert argv[argv.index("--cpus") + 1] == "0"
    with pytest.raises(ValueError, match="rt_priority"):
        cfg(rt_priority=100)


def test_the_demo_summarises_again_results_an_older_version_wrote(tmp_path: Path):
    from types import SimpleNamespace

    from dpstack.demo.pipeline import Demo

    demo = Demo(tmp_path, SimpleNamespace(samplers=["ddim"], eval_episodes=1))
    demo.policy.mkdir()
    (demo.policy / "manifest.json").write_text("{}")
    demo.eval_dir.mkdir()
    summary = summarize("ddim", [EpisodeRecord(0, 10_000, True, 3, step_latency_ms=[1.0] * 3)], "lockstep", 20.0)
    results = {"package_sha256": demo.package_id(), "mode": "lockstep", "results": [summary.to_dict()]}
    (demo.eval_dir / "results.json").write_text(json.dumps(results))
    assert demo.eval_done()
    old = {k: v for k, v in summary.to_dict().items() if k != "step_latency"} | {"step_latency_p50_ms": 1.0}
    (demo.eval_dir / "results.json").write_text(json.dumps(results | {"results": [old]}))
    assert not demo.eval_done()  # its report could not be built from these fields
