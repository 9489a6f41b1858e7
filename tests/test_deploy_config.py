"""Robot YAML loading (typed, validated, unknown keys refused) and deploy/'s import hygiene."""
import subprocess
import sys

import pytest
import yaml

from dpstack.deploy.bridge import robot_spec
from dpstack.deploy.config import CONFIG_DIR, ConfigError, load_config


@pytest.mark.parametrize("name", ["sim", "ur5e", "franka"])
def test_shipped_configs_load_and_publish_a_spec(name):
    cfg = load_config(name)
    spec = robot_spec(cfg)
    assert spec.control_hz == cfg.spec.control_hz and spec.action.gripper_dims == (cfg.action.gripper_dim,)
    assert cfg.safety.watchdog_s > cfg.safety.stop_time


def write(tmp_path, mutate):
    data = yaml.safe_load((CONFIG_DIR / "sim.yaml").read_text())
    mutate(data)
    p = tmp_path / "robot.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d["safety"].update(max_speed=1.0), r"unknown key\(s\) \['safety.max_speed'\]"),
    (lambda d: d["safety"].pop("watchdog_s"), r"safety.watchdog_s: required key is missing"),
    (lambda d: d["safety"].update(workspace_low=[0.3, "x", 0.0]), r"safety.workspace_low\[1\]: expected a number"),
    (lambda d: d["safety"].update(workspace_low=[0.3, 0.0]), r"safety.workspace_low: expected 3 items"),
    (lambda d: d["driver"].update(kind="kuka"), r"driver.kind: must be one of"),
    (lambda d: d["action"].update(mode="velocity"), r"action.mode: must be one of"),
    (lambda d: d["driver"].update(kind="ur_rtde"), r"driver.host is required"),
    (lambda d: d["spec"]["observations"].append({"key": "img", "source": "camera", "camera": "nope"}), r"camera 'nope'"),
    (lambda d: d.update(dry_run="yes"), r"dry_run: expected true/false"),
])
def test_bad_config_is_refused_naming_the_key(tmp_path, mutate, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, mutate))


def test_yaml_cannot_execute_code(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_deploy_never_imports_torch_mujoco_or_robosuite():
    code = ("import sys, dpstack.deploy.bridge, dpstack.deploy.bridge_cli, dpstack.deploy.keys_cli, dpstack.deploy.safety, "
            "dpstack.deploy.bench_servo, dpstack.deploy.drivers.ur_rtde, dpstack.deploy.drivers.franky, "
            "dpstack.deploy.drivers.mujoco_arm, dpstack.deploy.cameras, dpstack.runtime.auth; "
            "bad = [m for m in ('torch', 'mujoco', 'robosuite', 'cv2', 'rtde_control', 'franky') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_bridge_cli_dry_run_on_the_sim_config_end_to_end(tmp_path):
    """`dpstack bridge --config sim --dry-run` as a user runs it (no policy server: it holds)."""
    out = tmp_path / "summary.json"
    r = subprocess.run([sys.executable, "-m", "dpstack.cli", "bridge", "--config", "sim", "--dry-run", "--duration", "1.5",
                        "--connect", "tcp://127.0.0.1:1", "--out", str(out)],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    import json
    s = json.loads(out.read_text())
    assert s["dry_run"] and s["commands_sent"] == 0 and s["would_send"] > 100 and s["chunks"] == 0
