"""`dpstack bench train --image`: loader samples/s next to trainer samples/s."""
import json

import numpy as np

from dpstack.core.spec import ActionSpec, ArraySpec, RobotSpec
from dpstack.data.replay_buffer import DatasetAttrs, ReplayBuffer
from dpstack.policy.bench_train import main

SMALL = ["--set", "policy.image_width=8", "policy.image_keypoints=4", "policy.image_feature_dim=8", "policy.preset=test"]
FAST = ["--steps", "1", "--warmup", "0", "--loader-batches", "3", "--batch", "4"]


def _store(path, size=64, episodes=2, steps=20):
    cams = ("agentview_image", "robot0_eye_in_hand_image")
    spec = RobotSpec("lift", "Panda", 20.0,
                     tuple(ArraySpec(k, (size, size, 3), "uint8") for k in cams) +
                     (ArraySpec("robot0_eef_pos", (3,)), ArraySpec("robot0_eef_quat", (4,)),
                      ArraySpec("robot0_gripper_qpos", (2,))),
                     ActionSpec(shape=(7,), gripper_dims=(6,)))
    rb = ReplayBuffer.create(path, DatasetAttrs("lift", 20.0, spec, "scripted_expert"))
    rng = np.random.default_rng(0)
    for _ in range(episodes):
        ep = {k: rng.integers(0, 256, (steps, size, size, 3), dtype=np.uint8) for k in cams}
        ep.update(robot0_eef_pos=rng.normal(size=(steps, 3)), robot0_eef_quat=rng.normal(size=(steps, 4)),
                  robot0_gripper_qpos=rng.normal(size=(steps, 2)), action=rng.uniform(-1, 1, (steps, 7)))
        rb.add_episode(ep)
    return steps * episodes


def _check(out, capsys):
    text = capsys.readouterr().out
    assert "loader" in text and "trainer" in text and "loader / trainer" in text
    r = json.loads(out.read_text())["results"][0]
    assert r["mode"] == "image" and r["batch"] == 4 and r["n_obs_steps"] == 2
    assert r["loader_samples_per_s"] > 0 and r["trainer_samples_per_s"] > 0
    assert r["loader_over_trainer"] == r["loader_samples_per_s"] / r["trainer_samples_per_s"]
    return r


def test_image_mode_on_synthetic_frames_reports_both_figures(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["--image", "--episodes", "3", "--image-size", "64", *FAST, *SMALL, "--out", str(out)]) == 0
    r = _check(out, capsys)
    assert r["images"] == {"agentview_image": [64, 64, 3], "robot0_eye_in_hand_image": [64, 64, 3]}
    assert r["n_steps"] == 150


def test_image_mode_on_a_store_loads_it_as_training_does(tmp_path, capsys):
    steps = _store(tmp_path / "img.zarr")
    out = tmp_path / "bench.json"
    assert main(["--image", "--dataset", str(tmp_path / "img.zarr"), *FAST, *SMALL, "--out", str(out)]) == 0
    r = _check(out, capsys)
    assert r["n_steps"] == steps and r["source"].endswith("img.zarr")


def test_image_mode_names_a_camera_the_store_lacks(tmp_path, capsys):
    _store(tmp_path / "img.zarr")
    assert main(["--image", "--dataset", str(tmp_path / "img.zarr"), "--cameras", "frontview", *FAST, *SMALL,
                 "--out", str(tmp_path / "b.json")]) == 2
    assert "frontview_image" in capsys.readouterr().err
