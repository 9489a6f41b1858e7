"""The one typed-YAML loader (dpstack.core.typed_yaml), and that the training config
and the robot YAML, both read by it, accept and refuse the same things."""
import re
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

import pytest

from dpstack.core.typed_yaml import ConfigError, apply_overrides, from_data, load_yaml, to_data
from dpstack.deploy import config as deploy_config
from dpstack.policy import config as policy_config


@dataclass
class Inner:
    gain: float = 1.0
    mode: Literal["a", "b"] = "a"


@dataclass
class Outer:
    name: str
    inner: Inner = field(default_factory=Inner)
    limit: Optional[float] = None
    size: Union[int, str] = 0
    pair: tuple[int, int] = (0, 0)
    items: list[Inner] = field(default_factory=list)


def test_nested_dataclasses_unions_and_tuples_are_built():
    o = from_data(Outer, {"name": "x", "inner": {"gain": "1e-4", "mode": "b"}, "limit": None, "size": "big",
                          "pair": [1, 2], "items": [{"gain": 2}, {}]})
    assert o == Outer("x", Inner(1e-4, "b"), None, "big", (1, 2), [Inner(2.0), Inner()])
    assert from_data(Outer, {"name": "x", "limit": 3, "size": 4}).limit == 3.0
    assert from_data(Outer, {"name": "x", "inner": None}).inner == Inner()   # an empty section means the defaults
    assert from_data(Outer, to_data(o)) == o


@pytest.mark.parametrize("data, match", [
    ({"name": "x", "limit": "fast"}, "limit: expected a number, got 'fast'"),
    ({"name": "x", "limit": "inf"}, "limit: expected a number, got 'inf'"),   # numerals only, not float()'s words
    ({"name": "x", "limit": True}, "limit: expected a number, got True"),
    ({"name": "x", "size": 1.5}, "size: expected an integer, got 1.5; size: expected a string, got 1.5"),
    ({"name": "x", "inner": {"mode": "c"}}, "inner.mode: must be one of ['a', 'b'], got 'c'"),
    ({"name": "x", "items": [{}, {"gain": 1, "colour": 2}]}, "unknown key(s) ['items[1].colour']"),
    ({"name": "x", "inner": {"gian": 1}}, "unknown key(s) ['inner.gian']; inner takes ['gain', 'mode']"),
    ({"name": "x", "pair": [1]}, "pair: expected 2 items, got 1"),
    ({"inner": {}}, "name: required key is missing"),
    (["x"], "config: expected a mapping, got list"),
])
def test_what_does_not_fit_is_refused_naming_the_key(data, match):
    with pytest.raises(ConfigError, match=re.escape(match)):
        from_data(Outer, data)


def test_literal_compares_types_too():
    @dataclass
    class Flag:
        level: Literal[0, 1] = 0

    assert from_data(Flag, {"level": 1}).level == 1
    with pytest.raises(ConfigError, match="level: must be one of"):
        from_data(Flag, {"level": True})   # True == 1 in Python, but it is not what the schema allows


def test_overrides_are_yaml_and_leave_the_input_alone(tmp_path):
    data = {"name": "x", "inner": {"gain": 1.0}}
    out = apply_overrides(data, ["inner.mode=b", "items=[{gain: 3e-2}]", "limit=25e-2", "name=", "new.deep.key=1"])
    assert data == {"name": "x", "inner": {"gain": 1.0}}
    assert out == {"name": "", "inner": {"gain": 1.0, "mode": "b"}, "items": [{"gain": "3e-2"}], "limit": "25e-2",
                   "new": {"deep": {"key": 1}}}
    p = tmp_path / "o.yaml"
    p.write_text("name: x\ninner:\n  gain: 1e-3\n")
    o = load_yaml(Outer, p, ["items=[{gain: 3e-2}]", "limit=25e-2"])
    assert (o.inner.gain, o.items[0].gain, o.limit) == (1e-3, 3e-2, 0.25)
    with pytest.raises(ConfigError, match=re.escape(f"{p}: limit: expected a number, got 'x'")):
        load_yaml(Outer, p, ["limit=x"])


def _policy(overrides):
    return policy_config.load_config("lift_state_small", overrides)


def _robot(overrides):
    return deploy_config.load_config("sim", overrides)


# The same kind of mistake, one key of each config: both loaders answer alike.
@pytest.mark.parametrize("load, override, match", [
    (_policy, "train.lr=true", "train.lr: expected a number, got True"),
    (_robot, "action.position_scale=true", "action.position_scale: expected a number, got True"),
    (_policy, "train.lr=inf", "train.lr: expected a number, got 'inf'"),
    (_robot, "action.position_scale=inf", "action.position_scale: expected a number, got 'inf'"),
    (_policy, "policy.model=lstm", "policy.model: must be one of ['unet', 'transformer'], got 'lstm'"),
    (_robot, "driver.kind=kuka", "driver.kind: must be one of ['ur_rtde', 'franky', 'mujoco'], got 'kuka'"),
    (_policy, "train.device=tpu", "train.device: must be one of ['auto', 'cpu', 'cuda'], got 'tpu'"),
    (_robot, "action.mode=velocity", "action.mode: must be one of ['delta', 'absolute'], got 'velocity'"),
    (_policy, "train.stepz=5", "unknown key(s) ['train.stepz']"),
    (_robot, "safety.max_speed=5", "unknown key(s) ['safety.max_speed']"),
    (_policy, "optim.lr=1", "unknown key(s) ['optim']"),
    (_robot, "optim.lr=1", "unknown key(s) ['optim']"),
    (_policy, "train.steps.x=1", "override 'train.steps.x=1': train.steps is a value, not a section"),
    (_robot, "name.x=1", "override 'name.x=1': name is a value, not a section"),
    (_policy, "train.steps", "must look like key=value or section.key=value"),
    (_robot, "dry_run", "must look like key=value or section.key=value"),
    (_policy, "train.betas=0.9", "train.betas: expected a list, got 0.9"),
    (_robot, "safety.workspace_low=0.3", "safety.workspace_low: expected a list, got 0.3"),
])
def test_policy_and_robot_configs_refuse_the_same_mistakes(load, override, match):
    with pytest.raises(ConfigError, match=re.escape(match)):
        load([override])


def test_policy_and_robot_configs_accept_the_same_spellings(tmp_path):
    cfg = _policy(["train.lr=1e-4", "train.betas=[0.9, 0.99]", "train.device=cpu"])
    assert (cfg.train.lr, cfg.train.betas, cfg.train.device) == (1e-4, (0.9, 0.99), "cpu")
    robot = _robot(["action.position_scale=1e-2", "safety.workspace_low=[0.3, -0.3, 1e-2]", "driver.kind=mujoco"])
    assert (robot.action.position_scale, robot.safety.workspace_low) == (1e-2, (0.3, -0.3, 1e-2))
    # In a file too: `1e-2` (a string to YAML 1.1) in a robot YAML float field.
    text = (deploy_config.CONFIG_DIR / "sim.yaml").read_text().replace("position_scale: 0.05", "position_scale: 5e-2")
    assert "5e-2" in text
    (tmp_path / "robot.yaml").write_text(text)
    assert deploy_config.load_config(tmp_path / "robot.yaml").action.position_scale == 0.05
    # An empty section means its defaults, in either config.
    (tmp_path / "train.yaml").write_text("policy:\ntrain:\n")
    assert policy_config.load_config(str(tmp_path / "train.yaml")) == policy_config.Config()
    (tmp_path / "robot.yaml").write_text(text.replace("policy:\n  endpoint:", "policy:\nunused:\n  endpoint:"))
    with pytest.raises(ConfigError, match=re.escape("unknown key(s) ['unused']")):
        deploy_config.load_config(tmp_path / "robot.yaml")


def test_both_configs_round_trip_through_plain_data():
    cfg = _policy(["policy.obs_keys=[a, b]"])
    assert policy_config.Config.from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["policy"]["obs_keys"] == ["a", "b"]
    robot = _robot([])
    assert from_data(deploy_config.BridgeConfig, to_data(robot)) == robot


def test_bridge_set_overrides_use_the_same_rules():
    """`dpstack bridge --set` goes through the loader: a mistake is one sentence naming the key, exit 2."""
    r = subprocess.run([sys.executable, "-m", "dpstack.cli", "bridge", "--config", "sim", "--dry-run",
                        "--set", "safety.max_speed=1"], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and "unknown key(s) ['safety.max_speed']" in r.stderr and "Traceback" not in r.stderr


def test_a_policy_config_built_in_code_is_checked_against_the_same_literal():
    with pytest.raises(ConfigError, match=re.escape("policy.model must be one of ['unet', 'transformer'], got 'lstm'")):
        policy_config.PolicyConfig(model="lstm").validate()
