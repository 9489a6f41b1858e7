"""Typed training configuration, loaded from YAML (safe_load only) plus
`--set section.key=value` overrides. Values are plain data; nothing is executed.

A config file has two sections, `policy:` (what the network is; saved with the
checkpoint and needed to rebuild it) and `train:` (how it is optimised).
Every key is checked against the dataclass field types; unknown keys are errors.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


@dataclass
class PolicyConfig:
    # Observation keys fed to the encoder; empty = every low-dimensional key of the dataset's spec.
    obs_keys: tuple[str, ...] = ()
    # Keys among obs_keys that are camera images (H, W, C) uint8.
    image_keys: tuple[str, ...] = ()
    horizon: int = 16           # Tp
    n_obs_steps: int = 2        # To
    n_action_steps: int = 8     # Ta
    model: str = "unet"         # "unet" | "transformer"
    preset: str = "small"       # unet: test | small | dp; transformer: test | small | dp
    # Encoder for images: base width of the ResNet-18-style CNN (64 = ResNet-18) and keypoints.
    image_width: int = 64
    image_keypoints: int = 32
    image_feature_dim: int = 64
    transformer_dropout: float = 0.0
    # Training regimes, mixed within each batch by these weights (need not sum to 1).
    regime_plain: float = 1.0   # DP: one uniform level for every position
    regime_ladder: float = 0.0  # SDP: the streaming ladder shifted by a random offset
    # Ladder rungs; 0 = one per Ta-chunk (runtime.ladder.rungs_for_action_steps).
    ladder_rungs: int = 0
    # Training-time real-time chunking: with this probability a clean committed prefix of
    # 1..prefix_max positions is given at level -1 (clean) and masked out of the loss.
    prefix_prob: float = 0.0
    prefix_max: int = 0
    # RTI-DP "scale": divide the normalised gripper channel(s) by this factor (1 = off).
    gripper_scale: float = 1.0
    num_train_steps: int = 100  # diffusion steps of runtime.schedule.NoiseSchedule

    def validate(self) -> None:
        if self.model not in ("unet", "transformer"):
            raise ConfigError(f"policy.model must be 'unet' or 'transformer', got {self.model!r}")
        if self.horizon % 4:
            raise ConfigError(f"policy.horizon must be divisible by 4 (two U-Net downsamplings), got {self.horizon}")
        if not 1 <= self.n_obs_steps <= self.horizon or not 1 <= self.n_action_steps <= self.horizon:
            raise ConfigError("policy.n_obs_steps and policy.n_action_steps must be in [1, horizon]")
        if min(self.regime_plain, self.regime_ladder) < 0 or self.regime_plain + self.regime_ladder <= 0:
            raise ConfigError("policy.regime_plain/regime_ladder must be >= 0 and not both 0")
        if not 0 <= self.prefix_prob <= 1 or not 0 <= self.prefix_max < self.horizon:
            raise ConfigError("policy.prefix_prob must be in [0, 1] and policy.prefix_max in [0, horizon)")
        if self.prefix_prob > 0 and self.prefix_max < 1:
            raise ConfigError("policy.prefix_prob > 0 needs policy.prefix_max >= 1")
        if self.gripper_scale <= 0:
            raise ConfigError(f"policy.gripper_scale must be > 0, got {self.gripper_scale}")
        if not set(self.image_keys) <= set(self.obs_keys):
            raise ConfigError(f"policy.image_keys {self.image_keys} must be among policy.obs_keys {self.obs_keys}")


@dataclass
class TrainConfig:
    steps: int = 3000
    batch_size: int = 256       # GLOBAL batch; split evenly over torchrun ranks
    lr: float = 1e-4
    betas: tuple[float, ...] = (0.95, 0.999)
    weight_decay: float = 1e-6
    warmup_steps: int = 500
    grad_clip: float = 1.0
    ema_power: float = 0.75
    ema_max_decay: float = 0.9999
    ckpt_every: int = 1000
    log_every: int = 50
    # Offline evaluation with the runtime sampler (action error vs. the data); 0 = off.
    eval_every: int = 0
    eval_samples: int = 32
    eval_ddim_steps: int = 10
    seed: int = 0
    device: str = "auto"        # auto | cpu | cuda
    # CPU threads for torch (0 = torch's default). 1 is much faster on an oversubscribed machine.
    cpu_threads: int = 0

    def validate(self) -> None:
        for name in ("steps", "batch_size", "ckpt_every", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.warmup_steps < 0 or self.grad_clip <= 0:
            raise ConfigError("train.lr and train.grad_clip must be > 0, train.warmup_steps >= 0")
        if len(self.betas) != 2:
            raise ConfigError(f"train.betas must have 2 values, got {self.betas}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"train.device must be auto, cpu or cuda, got {self.device!r}")


@dataclass
class Config:
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "Config":
        self.policy.validate()
        self.train.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"policy": section_to_dict(self.policy), "train": section_to_dict(self.train)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Config":
        if not isinstance(d, Mapping):
            raise ConfigError(f"config must be a mapping, got {type(d).__name__}")
        unknown = set(d) - {"policy", "train"}
        if unknown:
            raise ConfigError(f"unknown config section(s) {sorted(unknown)}; have 'policy', 'train'")
        return cls(policy=section_from_dict(PolicyConfig, d.get("policy") or {}, "policy"),
                   train=section_from_dict(TrainConfig, d.get("train") or {}, "train")).validate()


def section_to_dict(section: Any) -> dict[str, Any]:
    return {f.name: list(v) if isinstance(v := getattr(section, f.name), tuple) else v
            for f in dataclasses.fields(section)}


def section_from_dict(cls: type, d: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(d, Mapping):
        raise ConfigError(f"{prefix} must be a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(f'{prefix}.{k}' for k in unknown)}")
    return cls(**{k: coerce(v, hints[k], f"{prefix}.{k}") for k, v in d.items()})


def coerce(value: Any, typ: Any, key: str) -> Any:
    """Check `value` against a field type (int, float, bool, str, tuple[X, ...])."""
    origin = typing.get_origin(typ)
    if origin is tuple:
        (item,) = {a for a in typing.get_args(typ) if a is not Ellipsis}
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{key}: union types are not supported")
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads "1e-4" without a dot as a string; accept plain numerals.
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {typ}")


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings; values are parsed as YAML scalars/lists."""
    out = {k: dict(v or {}) for k, v in d.items()}
    for item in overrides:
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.steps=500)")
        if section not in ("policy", "train"):
            raise ConfigError(f"override {item!r}: unknown section {section!r}; have 'policy', 'train'")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: cannot parse value: {e}") from None
        out.setdefault(section, {})[name] = value
    return out


def resolve_config_path(name_or_path: str) -> Path:
    """A shipped config name (`lift_state_small`) or a path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if shipped.exists():
        return shipped
    have = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"no config {name_or_path!r}: not a YAML file and not one of the shipped configs {have}")


def load_config(name_or_path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    d: dict[str, Any] = {}
    if name_or_path is not None:
        path = resolve_config_path(name_or_path)
        with open(path) as f:
            try:
                d = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: top level must be a mapping with 'policy' and 'train'")
    return Config.from_dict(apply_overrides(d, list(overrides)))
