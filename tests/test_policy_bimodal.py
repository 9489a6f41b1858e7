"""The diffusion machinery is real: trained on demos that split left/right from the
same observation, sampling (runtime DDPM through the torch callables) reproduces
both modes instead of their average."""
from pathlib import Path

import numpy as np
import pytest

from _policy_data import bimodal_dataset, one_thread  # noqa: F401  (fixture)
from dpstack.policy.checkpoint import load_checkpoint
from dpstack.policy.config import load_config
from dpstack.policy.torch_callables import torch_callables
from dpstack.policy.train import train
from dpstack.policy.train_outputs import CHECKPOINT_FILE
from dpstack.runtime.samplers import sample_full

pytestmark = pytest.mark.usefixtures("one_thread")

# The `small` U-Net (the CPU default): the tiny `test` preset needs far more steps to
# separate the modes (it learns smooth, averaged chunks first).
STEPS = 600


@pytest.mark.slow
def test_sampling_reproduces_both_modes(tmp_path: Path):
    data = bimodal_dataset(tmp_path / "toy.zarr", n_episodes=16, length=24)
    cfg = load_config(None, ["policy.preset=small", f"train.steps={STEPS}", "train.batch_size=64", "train.lr=1e-3",
                             "train.warmup_steps=20", "train.log_every=50", "train.ckpt_every=100000"])
    result = train(cfg, data, tmp_path / "out", progress=False)
    assert result.step == STEPS

    model, _ = load_checkpoint(tmp_path / "out" / CHECKPOINT_FILE)
    fns = torch_callables(model)
    n = 200
    first_obs = np.array([[0.0, 0.3], [0.004, 0.3]], dtype=np.float32)          # the start of every episode
    cond = fns.encode_raw({"pos": np.repeat(first_obs[None], n, axis=0)})
    levels = model.schedule.inference_levels(100)                              # full DDPM-100
    x = sample_full(fns.denoise, cond, model.schedule, levels, (n, model.horizon, model.action_dim),
                    np.random.default_rng(0), method="ddpm")
    actions = model.normalizer.unnormalize("action", x)
    dx = actions[:, 1:9, 0].mean(axis=1)                                       # the executed part of each chunk
    left, right, middle = np.mean(dx < -0.5), np.mean(dx > 0.5), np.mean(np.abs(dx) < 0.4)
    assert left > 0.25 and right > 0.25, (left, right)                          # both modes, neither collapsed
    assert middle < 0.1, np.histogram(dx, bins=8, range=(-1, 1))                # not their average
    # The observation-dependent channels are learnt too: the gripper is open at the start.
    assert np.mean(actions[:, 1:9, 2] < 0) > 0.9
