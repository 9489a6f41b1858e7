"""Synthetic datasets for the policy tests (real zarr stores through data.ReplayBuffer)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from dpstack.data.replay_buffer import DatasetAttrs, ReplayBuffer
from dpstack.core.spec import ActionSpec, ArraySpec, RobotSpec


def toy_spec(with_image: bool = False) -> RobotSpec:
    obs = [ArraySpec("pos", (2,), names=("x", "y"))]
    if with_image:
        obs.append(ArraySpec("cam_image", (64, 64, 3), dtype="uint8"))
    return RobotSpec(task="toy", robot="ToyArm", control_hz=10.0, observations=tuple(obs),
                     action=ActionSpec(key="action", shape=(3,), names=("dx", "dy", "gripper"), gripper_dims=(2,),
                                       low=(-1.0,) * 3, high=(1.0,) * 3))


def bimodal_dataset(path: Path, n_episodes: int = 16, length: int = 24, seed: int = 0,
                    with_image: bool = False) -> Path:
    """Same observations in every episode; half the demos go left (dx = -0.8, dy = -0.5),
    half right (dx = +0.8, dy = +0.5). dy also drifts slowly and the gripper closes
    halfway through (both readable from the observation's time ramp)."""
    rng = np.random.default_rng(seed)
    spec = toy_spec(with_image)
    rb = ReplayBuffer.create(path, DatasetAttrs(task="toy", control_hz=10.0, spec=spec, source="scripted_expert"))
    t = np.arange(length, dtype=np.float32)
    for e in range(n_episodes):
        side = -0.8 if e % 2 == 0 else 0.8
        action = np.stack([side + 0.01 * rng.standard_normal(length),
                           np.sign(side) * 0.5 + 0.2 * t / length,
                           np.where(t < length // 2, -1.0, 1.0)], axis=1).astype(np.float32)
        pos = np.stack([0.1 * t / length, np.full(length, 0.3)], axis=1).astype(np.float32)
        ep = {"pos": pos, "action": action}
        if with_image:
            ep["cam_image"] = rng.integers(0, 255, size=(length, 64, 64, 3), dtype=np.uint8)
        rb.add_episode(ep)
    return path


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=False)
def one_thread():
    """Run torch single-threaded: on a shared 2-core CI box OpenMP spin-waiting makes
    two threads 5-10x slower than one. Restores the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
