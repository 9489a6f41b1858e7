"""A policy server whose policy always answers a zero-motion chunk, for
measuring the transport and the bridge without a model's compute in the figure.
`dpstack bench transport` and `dpstack bench servo` run it in its own process:

    python -m dpstack.runtime.zero_server --spec SPEC.json --bind tcp://127.0.0.1:*

SPEC.json is a `RobotSpec.to_dict()`. Prints the ready line, serves until SIGTERM.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from dpstack.core.process import ChildProcess
from dpstack.core.spec import RobotSpec
from dpstack.runtime.server import PlainChunk

CHUNK = 8


class ZeroPolicy:
    """Zero motion, grippers open (-1): safe to send to any arm."""

    def __init__(self, spec: RobotSpec, chunk: int = CHUNK) -> None:
        self.actions = np.zeros((chunk, spec.action.dim), dtype=np.float32)
        self.actions[:, list(spec.action.gripper_dims)] = -1.0

    def reset(self, seed: int | None = None) -> None:
        pass

    def act(self, obs: dict[str, np.ndarray]) -> PlainChunk:
        return PlainChunk(self.actions)


def start(spec: RobotSpec, spec_path: Path, timeout_s: float = 30.0) -> tuple[ChildProcess, str]:
    """Write `spec` to `spec_path`, start the server in its own process; (process, endpoint)."""
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(spec.to_dict()))
    proc = ChildProcess.python("dpstack.runtime.zero_server", "--spec", str(spec_path), name="zero-action server")
    return proc, proc.wait_ready(timeout_s)["endpoint"]


def main(argv: list[str] | None = None) -> int:
    from dpstack.runtime.protocol import PolicyInfo
    from dpstack.runtime.server import PolicyServer, ServerConfig, run_until_signalled

    p = argparse.ArgumentParser(prog="python -m dpstack.runtime.zero_server", description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", required=True, help="RobotSpec as JSON (the robot this server pretends to serve)")
    p.add_argument("--bind", default="tcp://127.0.0.1:*", help="loopback endpoint (default: a free port)")
    args = p.parse_args(argv)
    spec = RobotSpec.from_dict(json.loads(Path(args.spec).read_text()))
    info = PolicyInfo("zero-action-policy", "zero", CHUNK, 1, CHUNK, spec.control_hz, spec.action)
    server = PolicyServer(lambda robot: ZeroPolicy(spec), spec, info, ServerConfig(bind=args.bind))
    run_until_signalled(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
