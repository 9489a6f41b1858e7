"""A TEST policy and a server entry point that serves it, for protocol and server
tests and for measuring the transport alone. Not a real policy: `EchoPolicy`
computes its chunk from the observation, its step counter and its seed with
plain numpy, so a test can predict every reply exactly.

    python tests/echo_server.py --bind tcp://127.0.0.1:* [--delay-ms 5]

prints the ready line {"ready": true, "endpoint": ...} once bound and serves
until SIGINT/SIGTERM.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import numpy as np

from dpstack.runtime.protocol import PolicyInfo
from dpstack.runtime.samplers import DenoiseRequest, DenoiseSteps, drive
from dpstack.runtime.server import PlainChunk
from dpstack.core.spec import ActionSpec, ArraySpec, RobotSpec

def echo_spec(image_hw: int = 8, cameras: int = 1) -> RobotSpec:
    """A state vector plus `cameras` uint8 images (the first is called "image")."""
    images = tuple(ArraySpec("image" if i == 0 else f"image{i}", (image_hw, image_hw, 3), "uint8") for i in range(cameras))
    return RobotSpec(task="echo", robot="testbot", control_hz=20.0, observations=(ArraySpec("state", (4,)), *images),
                     action=ActionSpec(shape=(3,), gripper_dims=(2,)))


ECHO_SPEC = echo_spec()
ECHO_CHUNK = 8


class SleepDenoiser:
    """A stand-in network that costs `seconds` per call whatever the batch (as a bandwidth-bound
    U-Net nearly does) and answers eps = 0; `calls` counts rows per call."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.calls: list[int] = []

    def __call__(self, x: np.ndarray, t: np.ndarray, cond: np.ndarray) -> np.ndarray:
        time.sleep(self.seconds)
        self.calls.append(len(x))
        return np.zeros_like(x)


class EchoPolicy:
    """actions[i] = 0.1 * state[:2] + 0.01 * (step + i) + bias(seed); gripper = sign(state[3]),
    where step counts the observations before this one in the episode."""

    def __init__(self, spec: RobotSpec = ECHO_SPEC, chunk: int = ECHO_CHUNK, delay_s: float = 0.0,
                 startup_s: float = 0.0, denoise: SleepDenoiser | None = None, evals: int = 1,
                 startup_evals: int = 0) -> None:
        self.spec = spec
        self.chunk = chunk
        self.delay_s = delay_s
        self.startup_s = startup_s  # extra time for an episode's first chunk, like streaming's start-up denoise
        # With a denoiser: each chunk also asks it `evals` times (an episode's first `startup_evals` more),
        # through act_gen, so a batched server interleaves them like a sampler's; the actions do not change.
        self.denoise = denoise
        self.max_batch = 0
        self.evals = evals
        self.startup_evals = startup_evals
        if denoise is None:
            self.act_gen = None  # computed whole with act()
        self.reset()

    def reset(self, seed: int | None = None) -> None:
        self.step = 0  # observations seen this episode (history-only ones included)
        self.bias = np.random.default_rng(seed if seed is not None else 0).uniform(-0.1, 0.1, size=2).astype(np.float32)

    def observe(self, obs: dict[str, np.ndarray]) -> None:
        self.step += 1

    def act_gen(self, obs: dict[str, np.ndarray]) -> DenoiseSteps[PlainChunk]:
        for _ in range(self.evals + (self.startup_evals if self.step == 0 else 0)):
            yield DenoiseRequest(np.zeros((1, 1, 1), np.float32), np.zeros((1, 1), np.int64), np.zeros((1, 1), np.float32))
        return self._chunk(obs)

    def act(self, obs: dict[str, np.ndarray]) -> PlainChunk:
        if self.denoise is not None:
            return drive(self.act_gen(obs), self.denoise)
        return self._chunk(obs)

    def _chunk(self, obs: dict[str, np.ndarray]) -> PlainChunk:
        first = self.step == 0
        self.observe(obs)
        if self.delay_s or (first and self.startup_s):
            time.sleep(self.delay_s + (self.startup_s if first else 0.0))
        state = obs["state"].astype(np.float32)
        i = np.arange(self.chunk, dtype=np.float32)[:, None]
        arm = 0.1 * state[:2] + 0.01 * (self.step - 1 + i) + self.bias
        grip = np.full((self.chunk, 1), 1.0 if state[3] >= 0 else -1.0, dtype=np.float32)
        return PlainChunk(np.concatenate([arm, grip], axis=1).astype(np.float32))


def echo_info(chunk: int = ECHO_CHUNK, startup_s: float | None = None) -> PolicyInfo:
    return PolicyInfo(name="echo-test-policy", sampler="echo", horizon=chunk, n_obs_steps=1,
                      n_action_steps=chunk, control_hz=ECHO_SPEC.control_hz, action=ECHO_SPEC.action,
                      startup_s=startup_s)


def echo_observation(rng: np.random.Generator, spec: RobotSpec = ECHO_SPEC) -> dict[str, np.ndarray]:
    obs = {"state": rng.uniform(-1, 1, size=4).astype(np.float32)}
    for o in spec.observations[1:]:
        obs[o.key] = rng.integers(0, 256, size=o.shape, dtype=np.uint8)
    return obs


def main(argv: list[str] | None = None) -> int:
    from dpstack.runtime.server import InsecureBind, PolicyServer, ServerConfig, run_until_signalled

    p = argparse.ArgumentParser(description="serve the TEST EchoPolicy (protocol/server tests only)")
    p.add_argument("--bind", default="tcp://127.0.0.1:*")
    p.add_argument("--delay-ms", type=float, default=0.0, help="simulated compute time per chunk")
    p.add_argument("--startup-ms", type=float, default=0.0, help="simulated start-up: extra time for an episode's first chunk")
    p.add_argument("--tell-startup", action="store_true", help="advertise --startup-ms in hello_ack (policy.startup_s)")
    p.add_argument("--session-timeout", type=float, default=30.0)
    p.add_argument("--insecure", action="store_true")
    p.add_argument("--image-hw", type=int, default=8, help="camera image height = width")
    p.add_argument("--cameras", type=int, default=1)
    p.add_argument("--denoise-ms", type=float, default=0.0, help="a SleepDenoiser of this cost per call (0: none)")
    p.add_argument("--evals", type=int, default=1, help="with --denoise-ms: denoiser calls per chunk")
    p.add_argument("--startup-evals", type=int, default=0, help="with --denoise-ms: more calls for an episode's first chunk")
    p.add_argument("--scheduling", default="batched", choices=("batched", "serial"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = ServerConfig(bind=args.bind, insecure=args.insecure, session_timeout_s=args.session_timeout,
                          scheduling=args.scheduling)
    denoise = SleepDenoiser(args.denoise_ms / 1e3) if args.denoise_ms else None
    try:
        spec = echo_spec(args.image_hw, args.cameras)
        startup_s = args.startup_ms / 1e3
        server = PolicyServer(lambda robot: EchoPolicy(spec, delay_s=args.delay_ms / 1e3, startup_s=startup_s,
                                                       denoise=denoise, evals=args.evals, startup_evals=args.startup_evals), spec,
                              echo_info(startup_s=startup_s if args.tell_startup else None), config)
    except InsecureBind as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = run_until_signalled(server)
    print("summary " + json.dumps(summary, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
