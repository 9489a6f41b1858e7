"""`dpstack demo --task T`: one row per task gives the shipped config, demonstrations,
evaluation episodes and seeds; the config gives the rest."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from dpstack.demo import tasks
from dpstack.demo.cli import DemoSettings, add_arguments, run, settings_from
from dpstack.demo.tasks import DEMO_TASKS, DemoTask, demo_task


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_each_task_trains_with_its_shipped_config():
    can = settings_from(_args("--task", "can"))
    assert (can.train_config, can.episodes, can.eval_episodes, can.seed_base) == ("can_state_small", 200, 50, 10_000)
    assert (can.train_steps, can.batch_size, can.lr, can.preset) == (6000, 256, 5e-4, "small")  # the config's
    stack = settings_from(_args("--task", "stack"))
    assert (stack.train_config, stack.train_steps, stack.eval_episodes) == ("stack_state_small", 2000, 50)
    lift = settings_from(_args())  # today's default demo, unchanged
    assert (lift.train_config, lift.episodes, lift.train_steps, lift.eval_episodes) == ("lift_state_small", 200, 1000, 20)
    assert lift.cameras == () and can.cameras == ()
    # Can's and Stack's policies failed by never retrying a missed grasp: their demos show retries.
    assert can.recovery == stack.recovery == 0.25 and lift.recovery == 0.0


def test_quick_and_explicit_sizes_apply_to_any_task():
    quick = settings_from(_args("--task", "can", "--quick"))
    assert quick.train_config == "can_state_small" and (quick.episodes, quick.train_steps, quick.preset) == (3, 30, "test")
    assert settings_from(_args("--task", "stack", "--eval-episodes", "7")).eval_episodes == 7


def test_an_image_config_collects_the_cameras_it_reads():
    from dpstack.policy.config import load_config

    s = DemoSettings.for_task(DemoTask("lift", "lift_image_small"))
    image_keys = load_config("lift_image_small").policy.image_keys
    assert s.cameras and [f"{c}_image" for c in s.cameras] == list(image_keys)  # e.g. agentview, robot0_eye_in_hand


@pytest.mark.parametrize("name, config, recovery", [("lift_image", "lift_image_small", 0.25),
                                                     ("can_image", "can_image_small", 0.25)])
def test_the_image_demos_collect_their_configs_cameras_and_train_in_full(name: str, config: str, recovery: float):
    s = settings_from(_args("--task", name))
    assert s.train_config == config and s.cameras == ("agentview", "robot0_eye_in_hand")
    assert (s.episodes, s.train_steps, s.batch_size, s.eval_episodes) == (200, 20000, 64, 50)
    assert s.recovery == recovery
    assert s.rti_default == {"lift_image": "rti-renoise-20,10,0"}.get(name, "rti-renoise-40,15,0")


def test_every_rows_rti_list_is_one_export_accepts():
    from dpstack.runtime.samplers import rti_list

    for name, row in tasks.DEMO_TASKS.items():
        assert rti_list(row.rti_default, 100) == row.rti_default, name  # canonical: export_done compares it


def test_a_demo_that_cannot_run_is_refused_in_one_sentence(monkeypatch, capsys, tmp_path: Path):
    with pytest.raises(ValueError, match="no demo for task 'pour'; demos: lift, can, stack"):
        demo_task("pour")
    monkeypatch.setitem(DEMO_TASKS, "later", DemoTask("lift", "lift_state_nonexistent"))
    assert run(_args("--task", "later", "--out", str(tmp_path / "demo"))) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no config 'lift_state_nonexistent'" in err
    assert not (tmp_path / "demo").exists()  # refused before any stage ran


def test_every_row_names_a_registered_task():
    from dpstack.sim.tasks import TASKS

    assert all(row.task in TASKS for row in tasks.DEMO_TASKS.values())
    for name in ("lift", "can", "stack", "square"):
        assert demo_task(name).task == name


@pytest.mark.slow
def test_a_quick_demo_of_another_task_collects_trains_and_evaluates_that_task(tmp_path: Path):
    import json
    import os
    import subprocess
    import sys

    from dpstack.data.replay_buffer import ReplayBuffer

    out = tmp_path / "demo"
    env = {**os.environ, "MUJOCO_GL": "egl", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, "-m", "dpstack.cli", "demo", "--task", "stack", "--quick", "--samplers",
                             "ddim-2", "--eval-episodes", "1", "--out", str(out)],
                            capture_output=True, text=True, timeout=1200, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "stack_state_small" in result.stdout
    rb = ReplayBuffer.open(out / "data" / "stack.zarr", mode="r")
    assert rb.attrs.task == "stack" and rb.n_episodes >= 3
    manifest = json.loads((out / "policy" / "manifest.json").read_text())
    assert manifest["spec"]["task"] == "stack"
    assert manifest["regimes"]["gripper_scale"] == 10.0  # stack_state_small's, not Lift's
    results = json.loads((out / "eval" / "results.json").read_text())
    assert results["task"] == "stack" and [r["sampler"] for r in results["results"]] == ["ddim-2"]
    assert (out / "report" / "report.md").read_text().startswith("# dpstack demo: stack")
