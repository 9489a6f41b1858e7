"""A TEST policy server for the deploy closed-loop tests: the real PolicyServer (real
process, real sockets) serving `GoalPolicy`, a plain proportional controller that
emits robosuite-style delta actions toward a fixed goal. It stands in for a trained
policy so the tests can predict where the arm must go.

    python tests/deploy_goal_server.py --bind tcp://127.0.0.1:* --goal 0.55 0.1 0.2
prints "serving ... on ENDPOINT" once bound.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpstack.deploy.bridge import robot_spec  # noqa: E402
from dpstack.core.spec import ArraySpec  # noqa: E402
from dpstack.deploy.config import load_config, without_cameras  # noqa: E402
from dpstack.runtime.protocol import PolicyInfo  # noqa: E402
from dpstack.runtime.server import PlainChunk, PolicyServer, ServerConfig, run_until_signalled  # noqa: E402

CHUNK = 8


class GoalPolicy:
    def __init__(self, goal, gain: float, max_action: float, scale: float):
        self.goal = np.asarray(goal, dtype=np.float32)
        self.gain, self.max_action, self.scale = gain, max_action, scale

    def reset(self, seed=None) -> None:
        pass

    def act(self, obs):
        step = np.clip(self.gain * (self.goal - obs["robot0_eef_pos"]) / self.scale, -self.max_action, self.max_action)
        a = np.zeros((CHUNK, 7), dtype=np.float32)
        a[:, 0:3] = step
        a[:, 6] = -1.0   # gripper open
        return PlainChunk(a)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--bind", default="tcp://127.0.0.1:*")
    p.add_argument("--config", default="sim")
    p.add_argument("--goal", type=float, nargs=3, required=True)
    p.add_argument("--gain", type=float, default=0.5)
    p.add_argument("--max-action", type=float, default=0.25)
    p.add_argument("--needs", default=None, metavar="KEY",
                   help="the policy also reads this (10,) observation, which the robot config may not publish")
    args = p.parse_args(argv)
    cfg = without_cameras(load_config(args.config))   # the goal policy reads the arm's position only
    spec = robot_spec(cfg)
    if args.needs:
        spec = dataclasses.replace(spec, observations=(*spec.observations, ArraySpec(args.needs, (10,))))
    info = PolicyInfo(name="goal-test-policy", sampler="goal", horizon=CHUNK, n_obs_steps=1, n_action_steps=CHUNK,
                      control_hz=spec.control_hz, action=spec.action)
    server = PolicyServer(lambda s: GoalPolicy(args.goal, args.gain, args.max_action, cfg.action.position_scale),
                          spec, info, ServerConfig(bind=args.bind))
    summary = run_until_signalled(server)
    print("summary " + json.dumps(summary, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
