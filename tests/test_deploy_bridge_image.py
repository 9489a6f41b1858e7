"""An image policy through the bridge, end to end, from the simulated arm's rendered camera.

The package is made the way a user would make one for this robot: `dpstack record` drives
MujocoArm (sim/arm_process.py) through the bridge with replayed motions and stores the
frames its `agentview` camera renders (deploy/configs/sim.yaml as shipped: 84x84, rendered
in the arm's process); `dpstack train --config lift_image_small` trains a few steps on
them (a test-sized U-Net and encoder: skill is not asserted); `dpstack export`. A real
`dpstack serve` process serves it with the shipped sampler (streaming) to a bridge built
as `dpstack bridge` builds it (the YAML's timeout, the client's defaults). Asserted: the
rendered frames fed the policy, its chunks drove the arm, every command stayed inside
the YAML's limits, bad actions never reached the arm, and after the server is SIGKILLed
the arm holds within watchdog_s + one servo period of the last chunk.
"""
from __future__ import annotations

import io
import json
import sys
from contextlib import redirect_stdout

import numpy as np
import pytest
import yaml

from dpstack import cli
from dpstack.data.replay_buffer import ReplayBuffer
from dpstack.deploy.bridge import Bridge, robot_spec
from dpstack.deploy.cameras import start_cameras
from dpstack.deploy.config import CONFIG_DIR, load_config
from dpstack.deploy.drivers.mujoco_arm import MujocoArm
from dpstack.deploy.sources import SourceAction
from dpstack.runtime.client import PolicyClient
from server_process import ServerProcess
from test_deploy_bridge import Trace, assert_held_by_the_watchdog_deadline, assert_within_limits, record_sent
from test_deploy_bridge_package import free_port

SERVO_HZ = 125   # as the other bridge tests: the 2-core machine's load stays bounded


def sim_yaml(tmp) -> str:
    """sim.yaml as shipped (its rendered camera included), at the tests' servo rate."""
    config = yaml.safe_load((CONFIG_DIR / "sim.yaml").read_text())
    config["driver"]["servo_hz"] = SERVO_HZ
    config["safety"].update(estop_endpoint="", estop_keys=False)
    path = tmp / "sim.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture(scope="module")
def image_package(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bridge_image_package")
    config = sim_yaml(tmp)
    rng = np.random.default_rng(0)
    motions = []
    for _ in range(3):   # short wandering motions, gripper open or closed
        a = np.zeros((16, 7), np.float32)
        a[:, :3] = rng.uniform(-0.3, 0.3, 3)
        a[:, 6] = rng.choice([-1.0, 1.0])
        motions.append(a.tolist())
    (tmp / "replay.json").write_text(json.dumps(motions))
    with redirect_stdout(io.StringIO()):
        assert cli.main(["record", "--config", config, "--out", str(tmp / "frames.zarr"), "--device", "replay",
                         "--replay", str(tmp / "replay.json")]) == 0
    rb = ReplayBuffer.open(tmp / "frames.zarr")
    spec = robot_spec(load_config(config))
    assert rb.attrs.spec == spec and rb.n_episodes == 3
    frames = rb.get_episode(0)["agentview_image"]
    assert frames.shape[1:] == (84, 84, 3) and frames.dtype == np.uint8 and np.ptp(frames) > 50   # a rendered scene
    obs_keys = "[" + ",".join(o.key for o in spec.observations) + "]"
    assert cli.main(["train", "--config", "lift_image_small", "--dataset", str(tmp / "frames.zarr"),
                     "--out", str(tmp / "train"), "--no-progress", "--set", f"policy.obs_keys={obs_keys}",
                     "policy.image_keys=[agentview_image]", "policy.preset=test", "policy.image_width=8",
                     "policy.image_keypoints=8", "policy.image_feature_dim=16", "train.steps=3", "train.batch_size=8",
                     "train.ckpt_every=3", "train.warmup_steps=1", "train.log_every=3", "train.eval_every=0",
                     "train.device=cpu"]) == 0
    assert cli.main(["export", str(tmp / "train" / "last.pt"), "--out", str(tmp / "policy")]) == 0
    return tmp / "policy"


def serve(package) -> ServerProcess:
    """`dpstack serve PACKAGE` with its shipped sampler."""
    return ServerProcess(command=[sys.executable, "-m", "dpstack.cli", "serve", str(package),
                                  "--bind", f"tcp://127.0.0.1:{free_port()}"], ready_timeout_s=120.0).start()


def camera_bridge(tmp, endpoint):
    """The bridge as `dpstack bridge --config sim` builds it, with the arm's rendered camera."""
    cfg = load_config(sim_yaml(tmp))
    arm = MujocoArm(cfg.driver, cfg.cameras)
    cameras = start_cameras(cfg.cameras, arm)
    client = PolicyClient(endpoint, robot_spec(cfg), cfg.name, timeout_s=cfg.policy.timeout_s)
    bridge = Bridge(cfg, arm, client, cameras=cameras, install_handlers=False)
    bridge.start()
    return cfg, bridge, client


def run_and_close(bridge, client, server, **run) -> dict:
    try:
        return bridge.run(**run)
    finally:
        bridge.close()
        client.close()
        server.kill()
        for cam in bridge.cameras.values():
            cam.stop()


def test_an_image_policy_drives_the_arm_from_its_rendered_camera_and_holds_when_its_server_dies(image_package, tmp_path):
    server = serve(image_package)
    cfg, bridge, client = camera_bridge(tmp_path, server.endpoint)
    sent = record_sent(bridge.driver)
    trace = Trace()
    fed = []   # (control step, capture time, frame) of every observation the bridge built
    events = {}

    def on_control(b, step):
        if step.observation is not None:
            fed.append((step.t, step.observation.times["agentview_image"], step.observation.arrays["agentview_image"]))

    def on_tick(b, now):
        trace(b, now)
        if "killed" not in events and b.source.chunks >= 20:
            server.kill()   # SIGKILL: no Bye, the link just goes silent
            events["killed"] = now
            events["chunks_at_kill"] = b.source.chunks

    summary = run_and_close(bridge, client, server, duration_s=40.0, on_tick=on_tick, on_control=on_control,
                            should_stop=lambda: "killed" in events and bridge.clock() - events["killed"] > 1.5)
    assert "killed" in events, summary
    # The rendered frames fed the policy: at the spec's size, advancing as the arm moved, each
    # one younger than max_age_s when fed (a loaded machine renders late: then the arm holds).
    at, captured = np.array([f[0] for f in fed]), np.array([f[1] for f in fed])
    assert len(fed) >= 20 and np.all(np.diff(captured) >= 0) and len(np.unique(captured)) >= 10
    assert np.all(at - captured <= cfg.cameras[0].max_age_s)
    assert all(f[2].shape == (84, 84, 3) and f[2].dtype == np.uint8 for f in fed)
    assert not np.array_equal(fed[0][2], fed[-1][2]), "the arm moved in view"
    cams = summary["cameras"]
    assert cams["frame_state_skew"]["p50_ms"] < 10.0, cams   # the state sample nearest the rendered instant
    # The package's chunks drove the arm, commanded every cycle, inside every limit.
    assert events["chunks_at_kill"] >= 20 and summary["commands_sent"] == summary["ticks"]
    assert summary["actions_executed"] >= 10, summary
    assert summary["chunks"] == events["chunks_at_kill"]   # nothing arrives from a dead server
    assert np.ptp(np.array(sent["pos"]), axis=0).max() > 1e-4, summary
    assert_within_limits(sent, cfg)
    assert_held_by_the_watchdog_deadline(trace, events["killed"], cfg)


def test_bad_actions_from_an_image_policy_never_reach_the_arm(image_package, tmp_path):
    """Every third action the image policy's chunks carry is replaced by a bad one (NaN,
    Inf, far out of range, a reversal): none reaches the driver as such."""
    server = serve(image_package)
    cfg, bridge, client = camera_bridge(tmp_path, server.endpoint)
    sent = record_sent(bridge.driver)
    act = bridge.source.act
    bad = [np.full(7, np.nan), np.array([np.inf, 0, 0, 0, 0, 0, 1]), np.array([50.0, -50, 50, 9, 9, 9, 5]),
           np.array([-1.0, -1, -1, 1, 1, 1, -1])]
    n = {"actions": 0, "bad": 0}

    def corrupting(now, observation, state, observed_at=None):
        action = act(now, observation, state, observed_at)
        if action is None:
            return None
        n["actions"] += 1
        if n["actions"] % 3:
            return action
        n["bad"] += 1
        return SourceAction(bad[n["bad"] % len(bad)].astype(np.float32), action.t_obs)

    bridge.source.act = corrupting
    summary = run_and_close(bridge, client, server, duration_s=40.0, should_stop=lambda: n["bad"] >= 8)
    assert n["bad"] >= 8, summary   # two of each kind
    # The arm was commanded every cycle, never with a non-finite value, always inside the limits.
    # (A NaN target is refused by the safety layer when a servo cycle samples it: rejected_nan.)
    assert summary["commands_sent"] == summary["ticks"] and len(sent["pos"]) == summary["commands_sent"]
    assert_within_limits(sent, cfg)
