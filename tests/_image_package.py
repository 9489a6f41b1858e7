"""A random-weight image policy package for Lift (agentview camera + proprioception):
what the closed-loop tests need to drive a simulated arm that renders a camera, without
collecting or training. Built with the real model and the real export."""
from __future__ import annotations

from pathlib import Path

import numpy as np

IMAGE_HW = (64, 72)  # not the task's default size, so a test sees that the spec's size is rendered
PROPRIO = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos")


def lift_image_spec(camera: str = "agentview", image_hw: tuple[int, int] = IMAGE_HW):
    from dpstack.core.spec import ArraySpec
    from dpstack.sim.env import SimEnv, image_key

    with SimEnv("lift") as env:  # the task's own proprioception and action, as a collected dataset stores them
        spec = env.spec
    return spec.__class__(spec.task, spec.robot, spec.control_hz,
                          (ArraySpec(image_key(camera), (*image_hw, 3), "uint8"), *(spec.obs(k) for k in PROPRIO)),
                          spec.action, spec.extra)


def write_image_package(out: Path, camera: str = "agentview", seed: int = 0) -> Path:
    import torch

    from dpstack.core.normalizer import Normalizer
    from dpstack.policy.config import PolicyConfig
    from dpstack.policy.export import export_model
    from dpstack.policy.model import DiffusionPolicyModel
    from dpstack.sim.env import image_key

    torch.manual_seed(seed)
    spec = lift_image_spec(camera)
    rng = np.random.default_rng(seed)
    data = {o.key: rng.uniform(-1, 1, (64, *o.shape)) for o in spec.observations}
    data["action"] = np.concatenate([rng.uniform(-1, 1, (64, 6)), rng.choice([-1.0, 1.0], (64, 1))], axis=1)
    config = PolicyConfig(obs_keys=(image_key(camera), *PROPRIO), image_keys=(image_key(camera),), preset="test",
                          image_width=8, image_keypoints=8, image_feature_dim=16, ladder_rungs=4, regime_ladder=0.5,
                          regime_plain=0.5)
    model = DiffusionPolicyModel(config, spec, Normalizer.fit(data, image_keys=config.image_keys)).eval()
    export_model(model, out, {"dataset": {"fingerprint": "random-weights"}}, force=True)
    return out
