"""`dpstack collect` end to end: real workers, real zarr dataset, resume without repeats."""
import numpy as np
import pytest

pytest.importorskip("robosuite")

from dpstack.data.replay_buffer import ReplayBuffer  # noqa: E402
from dpstack.cli import main  # noqa: E402
from dpstack.sim.env import SimEnv  # noqa: E402


def _seeds_per_episode(rb):
    d = rb.load(["seed"])["seed"]
    starts = np.concatenate([[0], rb.episode_ends[:-1]])
    per = [d[s:e] for s, e in zip(starts, rb.episode_ends)]
    assert all(np.all(p == p[0]) for p in per), "an episode holds more than one seed"
    return [int(p[0]) for p in per]


@pytest.mark.slow
def test_collect_with_workers_then_resume(tmp_path, capsys):
    out = tmp_path / "lift.zarr"
    assert main(["collect", "--task", "lift", "--episodes", "3", "--out", str(out), "--workers", "2",
                 "--seed", "40", "--no-progress"]) == 0
    assert "kept 3 of 3" in capsys.readouterr().out
    rb = ReplayBuffer.open(out)
    assert rb.n_episodes == 3 and rb.attrs.source == "scripted_expert" and rb.attrs.task == "lift"
    assert rb.attrs.extra["expert"] == "LiftExpert" and rb.attrs.extra["next_seed"] == 43
    assert _seeds_per_episode(rb) == [40, 41, 42]  # seed order whatever the worker timing

    # Resume: "--episodes 5" means until the dataset holds 5; --seed is ignored now.
    assert main(["collect", "--task", "lift", "--episodes", "5", "--out", str(out), "--seed", "0",
                 "--no-progress"]) == 0
    rb = ReplayBuffer.open(out)
    seeds = _seeds_per_episode(rb)
    assert rb.n_episodes == 5 and len(set(seeds)) == 5 and seeds[:3] == [40, 41, 42] and min(seeds[3:]) >= 43
    spec = rb.attrs.spec
    data = rb.load()
    assert set(data) == {*spec.obs_keys, "action", "reward", "seed"}
    for s in spec.observations:
        assert data[s.key].dtype == np.float32 and data[s.key].shape[1:] == s.shape
    assert data["action"].shape == (rb.n_steps, 7)

    # The stored episode is exactly what the env + expert produce for that seed.
    from dpstack.sim.experts import run_expert_episode
    env = SimEnv("lift", seed=None)
    try:
        ep = run_expert_episode(env, seeds[3])
    finally:
        env.close()
    stored = rb.get_episode(3)
    for k in (*spec.obs_keys, "action"):
        np.testing.assert_array_equal(stored[k], ep.steps[k], err_msg=k)

    # Already full: nothing to do, nothing changes.
    assert main(["collect", "--task", "lift", "--episodes", "4", "--out", str(out), "--no-progress"]) == 0
    assert ReplayBuffer.open(out).n_episodes == 5


def test_collect_refuses_a_dataset_of_another_task_and_keeps_it(tmp_path, capsys):
    out = tmp_path / "lift.zarr"
    assert main(["collect", "--task", "lift", "--episodes", "1", "--out", str(out), "--no-progress"]) == 0
    assert main(["collect", "--task", "stack", "--episodes", "2", "--out", str(out), "--no-progress"]) == 2
    assert "holds task 'lift'" in capsys.readouterr().err
    assert main(["collect", "--task", "lift", "--episodes", "2", "--out", str(out), "--cameras", "agentview",
                 "--no-progress"]) == 2
    assert "cameras" in capsys.readouterr().err
    assert ReplayBuffer.open(out).n_episodes == 1


@pytest.mark.slow
def test_collect_with_cameras_stores_upright_uint8_images(tmp_path):
    out = tmp_path / "cam.zarr"
    assert main(["collect", "--task", "lift", "--episodes", "1", "--out", str(out), "--workers", "1",
                 "--cameras", "agentview,robot0_eye_in_hand", "--image-size", "32", "--no-progress"]) == 0
    rb = ReplayBuffer.open(out)
    ep = rb.get_episode(0)
    for key in ("agentview_image", "robot0_eye_in_hand_image"):
        img = ep[key]
        assert img.dtype == np.uint8 and img.shape == (len(ep["action"]), 32, 32, 3)
        assert rb.attrs.spec.obs(key).shape == (32, 32, 3)
    # Upright: compare the first frame with a fresh render of the same seed.
    env = SimEnv("lift", seed=int(ep["seed"][0]), cameras=("agentview",), image_size=32)
    try:
        first = env.reset()["agentview_image"]
    finally:
        env.close()
    np.testing.assert_array_equal(ep["agentview_image"][0], first)
    gray = first.astype(np.float32).mean(-1)
    assert gray[:4].mean() + 40 < gray[-8:].mean()  # back wall on top, table below


def test_collect_records_its_recovery_fraction_and_refuses_another(tmp_path, capsys):
    out = tmp_path / "lift.zarr"
    assert main(["collect", "--task", "lift", "--episodes", "1", "--out", str(out), "--recovery", "1",
                 "--no-progress"]) == 0
    assert "1 kept show a retry after a missed grasp" in capsys.readouterr().out
    rb = ReplayBuffer.open(out)
    assert rb.attrs.extra["recovery"] == 1.0
    assert rb.get_episode(0)["action"][0, 6] == -1.0  # opens at once: the missed grasp before is not stored
    assert main(["collect", "--task", "lift", "--episodes", "2", "--out", str(out), "--no-progress"]) == 2
    assert "--recovery 1" in capsys.readouterr().err
    assert main(["collect", "--task", "lift", "--episodes", "2", "--out", str(tmp_path / "x.zarr"), "--recovery", "nan",
                 "--no-progress"]) == 2
    assert "fraction" in capsys.readouterr().err
    assert ReplayBuffer.open(out).n_episodes == 1
