"""`dpstack serve` on real policy packages, in a real subprocess: the chunks a robot
receives over ZeroMQ equal what an in-process PolicyRunner computes."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from dpstack.runtime.client import PolicyClient
from dpstack.runtime.package import load_package
from dpstack.runtime.policy import PolicyRunner
from dpstack.runtime.protocol import ActionReply
from dpstack.core.spec import RobotSpec
from server_process import ServerProcess


def serve(policy_dir: Path, sampler: str) -> ServerProcess:
    return ServerProcess(command=[sys.executable, "-m", "dpstack.cli", "serve", str(policy_dir),
                                 "--bind", "tcp://127.0.0.1:*", "--sampler", sampler, "--threads", "1"])


def random_obs(spec: RobotSpec, rng: np.random.Generator) -> dict[str, np.ndarray]:
    out = {}
    for o in spec.observations:
        if np.dtype(o.dtype) == np.uint8:
            out[o.key] = rng.integers(0, 256, size=o.shape, dtype=np.uint8)
        else:
            out[o.key] = rng.uniform(-1, 1, size=o.shape).astype(o.dtype)
    return out


def check_served_equals_local(policy_dir: Path, sampler: str, seed: int, steps: int = 6,
                              history_only_every: int = 0, atol: float = 1e-5) -> None:
    package = load_package(policy_dir)
    local = PolicyRunner(package, sampler)
    local.reset(seed)
    robot_spec = package.spec  # the robot may publish more than the policy reads
    rng = np.random.default_rng(seed)
    with serve(policy_dir, sampler) as server:
        client = PolicyClient(server.endpoint, robot_spec, "arm", seed=seed, timeout_s=5.0)
        assert client.wait_ready(10.0), list(client.errors)
        assert client.policy.horizon == package.horizon and client.policy.n_obs_steps == package.n_obs_steps
        assert client.policy.startup_s > 0   # measured at load: a session's first chunk
        dt = 1.0 / robot_spec.control_hz
        for k in range(steps):
            obs = random_obs(robot_spec, rng)
            t = 100.0 + k * dt
            if history_only_every and k % history_only_every == 1:
                assert client.send_history(obs, t)  # what goes out while a chunk is in flight
                local.observe(obs)
                continue
            reply = client.request(obs, t, timeout_s=10.0)
            assert isinstance(reply, ActionReply), list(client.errors)
            expected = local.act(obs)
            np.testing.assert_allclose(reply.actions, expected.actions, atol=atol)
            assert reply.start_time == pytest.approx(t + expected.offsets[0] * dt)
            assert reply.nfe == expected.nfe and reply.sampler == expected.sampler
        stats = client.request_stats(2.0)
        assert not stats["errors"], stats
        client.close()


@pytest.mark.parametrize("sampler", ["ddim-10", "streaming-1"])
def test_serve_tiny_onnx_package(tmp_path, sampler) -> None:
    from runtime_tiny_package import write_tiny_package

    pkg = write_tiny_package(tmp_path / "tiny")
    check_served_equals_local(pkg, sampler, seed=3, history_only_every=3)


@pytest.mark.parametrize("typed", ["rti", "streaming-1", "ddim"])
def test_serve_shows_the_sampler_as_typed_with_what_it_resolved_to(tmp_path, typed) -> None:
    from runtime_tiny_package import write_tiny_package

    pkg = write_tiny_package(tmp_path / "tiny")
    resolved = PolicyRunner(load_package(pkg), typed).sampler.name
    with serve(pkg, typed) as server:
        assert (server.child.ready["sampler"], server.child.ready["sampler_resolved"]) == (typed, resolved)
        client = PolicyClient(server.endpoint, load_package(pkg).spec, "arm", timeout_s=5.0)
        assert client.wait_ready(10.0), list(client.errors)
        assert (client.policy.sampler, client.policy.sampler_resolved) == (typed, resolved)
        client.close()
    assert resolved == {"rti": "rti-renoise-40,15,0", "ddim": "ddim-10"}.get(typed, resolved)


def test_serve_refuses_a_package_that_is_not_one(tmp_path) -> None:
    import subprocess

    p = subprocess.run([sys.executable, "-m", "dpstack.cli", "serve", str(tmp_path), "--bind", "tcp://127.0.0.1:*"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "manifest.json" in p.stderr


@pytest.mark.slow  # torch export of a small model: ~30 s on 2 shared cores
def test_serve_a_torch_exported_package(tmp_path) -> None:
    pytest.importorskip("torch")
    export = pytest.importorskip("dpstack.policy.export", reason="policy export not available")
    import torch

    from dpstack.policy.config import PolicyConfig
    from dpstack.policy.model import DiffusionPolicyModel
    from dpstack.core.normalizer import Normalizer
    from dpstack.core.spec import ActionSpec, ArraySpec

    spec = RobotSpec("lift", "Panda", 20.0, (ArraySpec("eef_pos", (3,)), ArraySpec("object", (5,))),
                     ActionSpec(shape=(7,), gripper_dims=(6,), low=(-1,) * 7, high=(1,) * 7))
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    norm = Normalizer.fit({"eef_pos": rng.normal(size=(64, 3)), "object": rng.normal(size=(64, 5)),
                           "action": np.concatenate([rng.uniform(-1, 1, (64, 6)), rng.choice([-1.0, 1.0], (64, 1))], 1)})
    model = DiffusionPolicyModel(PolicyConfig(preset="test", n_action_steps=4), spec, norm).eval()
    out = export.export_model(model, tmp_path / "policy")
    check_served_equals_local(out, "ddim-10", seed=1, steps=4)
