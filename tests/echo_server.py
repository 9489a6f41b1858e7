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
from dpstack.runtime.server import PlainChunk
from dpstack.core.spec import ActionSpec, ArraySpec, RobotSpec

def echo_spec(image_hw: int = 8, cameras: int = 1) -> RobotSpec:
    """A state vector plus `cameras` uint8 images (the first is called "image")."""
    images = tuple(ArraySpec("image" if i == 0 else f"image{i}", (image_hw, image_hw, 3), "uint8") for i in range(cameras))
    return RobotSpec(task="echo", robot="testbot", control_hz=20.0, observations=(ArraySpec("state", (4,)), *images),
                     action=ActionSpec(shape=(3,), gripper_dims=(2,)))


ECHO_SPEC = echo_spec()
ECHO_CHUNK = 8


class EchoPolicy:
    """actions[i] = 0.1 * state[:2] + 0.01 * (step + i) + bias(seed); gripper = sign(state[3]),
    where step counts the observations before this one in the episode."""

    def __init__(self, spec: RobotSpec = ECHO_SPEC, chunk: int = ECHO_CHUNK, delay_s: float = 0.0,
                 startup_s: float = 0.0) -> None:
        self.spec = spec
        self.chunk = chunk
        self.delay_s = delay_s
        self.startup_s = startup_s  # extra time for an episode's first chunk, like streaming's start-up denoise
        self.reset()

    def reset(self, seed: int | None = None) -> None:
        self.step = 0  # observations seen this episode (history-only ones included)
        self.bias = np.random.default_rng(seed if seed is not None else 0).uniform(-0.1, 0.1, size=2).astype(np.float32)

    def observe(self, obs: dict[str, np.ndarray]) -> None:
        self.step += 1

    def act(self, obs: dict[str, np.ndarray]) -> PlainChunk:
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
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = ServerConfig(bind=args.bind, insecure=args.insecure, session_timeout_s=args.session_timeout)
    try:
        spec = echo_spec(args.image_hw, args.cameras)
        startup_s = args.startup_ms / 1e3
        server = PolicyServer(lambda robot: EchoPolicy(spec, delay_s=args.delay_ms / 1e3, startup_s=startup_s), spec,
                              echo_info(startup_s=startup_s if args.tell_startup else None), config)
    except InsecureBind as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = run_until_signalled(server)
    print("summary " + json.dumps(summary, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
