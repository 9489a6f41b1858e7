"""Batched serving: samplers as resumable steps, one denoiser call per round for every
robot, a start-up denoise interleaved with other robots' control steps."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import zmq

from dpstack.core.schedule import NoiseSchedule
from dpstack.runtime.package import DENOISER_FILE, MANIFEST, batch_limit, load_package, make_session, sha256_file
from dpstack.runtime.policy import PolicyRunner
from dpstack.runtime.protocol import ActionReply, Hello, HelloAck, Observation, decode, encode
from dpstack.runtime.samplers import SamplerConfig, TrainedRegimes, build_sampler, denoise_requests
from dpstack.runtime.serve_cli import build_factory
from dpstack.runtime.server import PolicyServer, ServerConfig
from runtime_tiny_package import write_tiny_package


def nonlinear_denoiser(x, t, cond):
    """Row-independent, so a row's eps is the same in any batch."""
    return (np.tanh(0.7 * x + 0.002 * t[..., None]) + 0.1 * cond[:, None, :2]).astype(np.float32)


TRAINED = TrainedRegimes(horizon=16, n_obs_steps=2, n_action_steps=8, gripper_dims=(1,))
# sha256[:16] of 4 calls' actions, trajectories, indices, nfe and replan_after per sampler, recorded
# with main's code before samplers became resumable (commit 00b4c7c), seed 7, the denoiser above.
# ("rti-renoise-20,8,0" was then the default "rti".)
RECORDED = {"ddpm-20": "9564c38ee65af784", "ddim-10": "cb25ee82e8708a68", "rti-renoise-20,8,0": "f603d1978bd73841",
            "rti-3,1,0": "08caf7b88725ced6", "streaming-1": "1fc67f68bd907059", "streaming-2": "93e0cb856fb7fa21"}


def cond_for(k: int) -> np.ndarray:
    return np.linspace(-1, 1, 4).astype(np.float32) * (k + 1)


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_a_batch_of_one_gives_the_numbers_the_old_samplers_gave(name):
    s = build_sampler(SamplerConfig.parse(name, seed=7), nonlinear_denoiser, NoiseSchedule(), 2, TRAINED)
    h = hashlib.sha256()
    for k in range(4):
        step = s.step(cond_for(k), None)
        h.update(step.actions.astype(np.float32).tobytes())
        h.update(step.trajectory.astype(np.float32).tobytes())
        h.update(str((step.indices.tolist(), step.nfe, step.replan_after)).encode())
    assert h.hexdigest()[:16] == RECORDED[name]


def test_samplers_at_different_stages_batched_together_give_their_own_numbers():
    names = ["streaming-1", "streaming-2", "rti", "ddim-10", "rti-3,1,0"]
    make = lambda: [build_sampler(SamplerConfig.parse(n, seed=i), nonlinear_denoiser, NoiseSchedule(), 2, TRAINED)  # noqa: E731
                    for i, n in enumerate(names)]
    alone, together = make(), make()
    for s in alone[:3] + together[:3]:  # streaming and rti past their start-up, the others not
        s.step(cond_for(0))
    expected = [s.step(cond_for(1)) for s in alone]

    calls = []

    def counting(x, t, cond):
        calls.append(len(x))
        return nonlinear_denoiser(x, t, cond)

    gens = [s.step_gen(cond_for(1)) for s in together]
    pending = {i: next(g) for i, g in enumerate(gens)}
    results = {}
    while pending:
        answers = denoise_requests(counting, list(pending.values()))
        for (i, _), eps in zip(list(pending.items()), answers):
            try:
                pending[i] = gens[i].send(eps)
            except StopIteration as done:
                results[i] = done.value
                del pending[i]
    for i, e in enumerate(expected):
        np.testing.assert_array_equal(results[i].actions, e.actions)
        np.testing.assert_array_equal(results[i].trajectory, e.trajectory)
    # one call per round, not one per evaluation: as many as the longest (rti-3,1,0's start-up)
    assert len(calls) == max(e.nfe for e in expected) == 100
    assert calls[0] == len(names) and calls[-1] == 1


def test_denoise_requests_respects_a_fixed_batch():
    s = build_sampler(SamplerConfig.parse("ddim-3"), nonlinear_denoiser, NoiseSchedule(), 2, TRAINED)
    requests = [next(s.step_gen(cond_for(k))) for k in range(5)]
    sizes = []
    out = denoise_requests(lambda x, t, c: sizes.append(len(x)) or nonlinear_denoiser(x, t, c), requests, max_batch=2)
    assert sizes == [2, 2, 1]
    for r, eps in zip(requests, out):
        np.testing.assert_array_equal(eps, nonlinear_denoiser(r.x, r.t, r.cond))


def test_a_denoiser_exported_at_batch_one_is_served_one_row_at_a_time(tmp_path):
    pkg = write_tiny_package(tmp_path / "pkg")
    assert load_package(pkg).max_batch == 0   # dynamic batch axis
    model = onnx.load(pkg / DENOISER_FILE)
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(model, pkg / DENOISER_FILE)
    manifest = json.loads((pkg / MANIFEST).read_text())
    manifest["files"][DENOISER_FILE]["sha256"] = sha256_file(pkg / DENOISER_FILE)
    (pkg / MANIFEST).write_text(json.dumps(manifest))
    assert batch_limit(make_session(pkg / DENOISER_FILE)) == 1 and load_package(pkg).max_batch == 1

    factory, spec, info = build_factory(str(pkg), "streaming", threads=1)
    server = PolicyServer(factory, spec, info, ServerConfig(bind="tcp://127.0.0.1:*"))
    try:
        robots = [Robot(server.endpoint, f"r{i}", spec, seed=i) for i in range(2)]
        for r in robots:
            r.observe()
        for r in robots:
            reply, _ = until_reply(server, r)
            assert isinstance(reply, ActionReply)
        batch = server.stats()["batch"]
        assert batch["max"] == 1 and batch["n"] >= 2 * 101   # both start-ups, one row per call
    finally:
        server.close()


# -- the server, driven round by round -----------------------------------------------------

class Robot:
    def __init__(self, endpoint: str, name: str, spec, seed: int) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.spec, self.seq, self.rng = spec, 0, np.random.default_rng(seed)
        self.sock.send_multipart(encode(Hello(name, spec, seed=seed)))

    def observe(self) -> dict:
        obs = {o.key: self.rng.uniform(-1, 1, o.shape).astype(np.float32) for o in self.spec.observations}
        self.seq += 1
        self.sock.send_multipart(encode(Observation(self.seq, float(self.seq), obs)))
        return obs

    def replies(self) -> list:
        out = []
        while self.sock.poll(0):
            out.append(decode(self.sock.recv_multipart()))
        return out


def until_reply(server: PolicyServer, robot: Robot, max_rounds: int = 1000) -> tuple[object, int]:
    for rounds in range(1, max_rounds + 1):
        server.process(timeout_ms=50)
        got = [m for m in robot.replies() if not isinstance(m, HelloAck)]
        if got:
            return got[0], rounds
    raise AssertionError("no reply")


@pytest.fixture
def tiny(tmp_path):
    return write_tiny_package(tmp_path / "pkg")


def counting_server(tiny: Path, scheduling: str) -> tuple[PolicyServer, list[int]]:
    """A streaming server whose sessions share one denoiser that records its batch sizes."""
    _, spec, info = build_factory(str(tiny), "streaming", threads=1)
    package = load_package(tiny)
    calls: list[int] = []

    def denoise(x, t, c):
        calls.append(len(x))
        return package.denoise(x, t, c)
    counted = package.with_backend(package.encode, denoise)
    return PolicyServer(lambda robot: PolicyRunner(counted, "streaming"), spec, info,
                        ServerConfig(bind="tcp://127.0.0.1:*", scheduling=scheduling)), calls


def test_a_start_up_denoise_does_not_hold_back_another_robots_control_step(tiny):
    server, calls = counting_server(tiny, "batched")
    try:
        spec = server.policy_spec
        a = Robot(server.endpoint, "a", spec, seed=1)
        a.observe()
        reply, _ = until_reply(server, a)   # a's own start-up: 100 evaluations + 1
        assert isinstance(reply, ActionReply) and reply.nfe == 101
        b = Robot(server.endpoint, "b", spec, seed=2)
        server.process(timeout_ms=50)        # b's hello
        b.observe()                          # b starts its start-up denoise ...
        server.process(timeout_ms=50)
        a.observe()                          # ... while a asks for its next control step
        calls.clear()
        reply, rounds = until_reply(server, a)
        assert isinstance(reply, ActionReply) and reply.nfe == 1
        # a's evaluation rides in the same denoiser call as b's start-up step. (How many rounds
        # that took is not asserted: a round can pass while the observation or the reply is
        # still crossing the loopback.)
        assert 2 in calls and max(calls) == 2, (rounds, calls)
        assert not [m for m in b.replies() if isinstance(m, ActionReply)]   # b is still starting up
        batch = server.stats()["batch"]
        assert batch["max"] == 2 and batch["n"] >= 102
    finally:
        server.close()


def test_batched_robots_get_the_chunks_they_would_get_alone(tiny):
    factory, spec, info = build_factory(str(tiny), "rti-renoise-20,8,0", threads=1)
    server = PolicyServer(factory, spec, info, ServerConfig(bind="tcp://127.0.0.1:*"))
    try:
        robots = [Robot(server.endpoint, f"r{i}", spec, seed=10 + i) for i in range(3)]
        local = [PolicyRunner(load_package(tiny), "rti-renoise-20,8,0") for _ in robots]
        for i, runner in enumerate(local):
            runner.reset(10 + i)
        for _ in range(4):
            sent = [r.observe() for r in robots]
            got = {}
            while len(got) < len(robots):
                server.process(timeout_ms=50)
                for i, r in enumerate(robots):
                    got.update({i: m for m in r.replies() if isinstance(m, ActionReply)})
            for i, runner in enumerate(local):
                np.testing.assert_allclose(got[i].actions, runner.act(sent[i]).actions, atol=1e-5)
        assert server.stats()["batch"]["max"] == 3
    finally:
        server.close()
