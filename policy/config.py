"""Typed training configuration, loaded from YAML plus `--set section.key=value`
overrides by the shared loader (dpstack.core.typed_yaml: safe_load only, unknown
keys refused, every error names the key).

A config file has two sections, `policy:` (what the network is; saved with the
checkpoint and needed to rebuild it) and `train:` (how it is optimised).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, get_args

from dpstack.core.typed_yaml import ConfigError, apply_overrides, find_config, from_data, load_yaml, to_data

CONFIG_DIR = Path(__file__).parent / "configs"
Model = Literal["unet", "transformer"]
Device = Literal["auto", "cpu", "cuda"]
Track = Literal["none", "wandb", "tensorboard"]
ImageBackbone = Literal["resnet18", "small"]


@dataclass
class PolicyConfig:
    # Observation keys fed to the encoder; empty = every low-dimensional key of the dataset's spec.
    obs_keys: tuple[str, ...] = ()
    # Keys among obs_keys that are camera images (H, W, C) uint8.
    image_keys: tuple[str, ...] = ()
    horizon: int = 16           # Tp
    n_obs_steps: int = 2        # To
    n_action_steps: int = 8     # Ta
    model: Model = "unet"
    preset: str = "small"       # unet: test | small | dp; transformer: test | small | dp
    # Camera encoder (one per camera): resnet18 (ResNet-18 layout, GroupNorm) or small (four
    # convolutions, for CPU training); base width (64 = ResNet-18; small: 32) and keypoints.
    image_encoder: ImageBackbone = "resnet18"
    image_width: int = 64
    image_keypoints: int = 32
    image_feature_dim: int = 64
    # Diffusion Policy's augmentation: a random crop of this fraction of each side in training
    # (84 -> 76 at 0.905), the centre crop at inference; 1 = off (what older checkpoints had).
    image_crop: float = 1.0
    # Colour jitter strength in training (brightness, contrast, saturation in [1 - s, 1 + s]); 0 = off.
    image_color_jitter: float = 0.0
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
        # YAML is checked against the Literal while loading; this catches a config built in code.
        if self.model not in get_args(Model):
            raise ConfigError(f"policy.model must be one of {list(get_args(Model))}, got {self.model!r}")
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
        if self.image_encoder not in get_args(ImageBackbone):
            raise ConfigError(f"policy.image_encoder must be one of {list(get_args(ImageBackbone))}, got {self.image_encoder!r}")
        if not 0 < self.image_crop <= 1 or not 0 <= self.image_color_jitter < 1:
            raise ConfigError("policy.image_crop must be in (0, 1] and policy.image_color_jitter in [0, 1)")
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
    device: Device = "auto"
    # CPU threads for torch (0 = torch's default). 1 is much faster on an oversubscribed machine.
    cpu_threads: int = 0
    # Experiment tracking next to metrics.jsonl (policy/tracking.py); needs the extra of that name.
    track: Track = "none"
    track_project: str = "dpstack"  # the W&B project

    def validate(self) -> None:
        for name in ("steps", "batch_size", "ckpt_every", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.warmup_steps < 0 or self.grad_clip <= 0:
            raise ConfigError("train.lr and train.grad_clip must be > 0, train.warmup_steps >= 0")
        if len(self.betas) != 2:
            raise ConfigError(f"train.betas must have 2 values, got {self.betas}")
        if self.device not in get_args(Device):
            raise ConfigError(f"train.device must be one of {list(get_args(Device))}, got {self.device!r}")
        if self.track not in get_args(Track):
            raise ConfigError(f"train.track must be one of {list(get_args(Track))}, got {self.track!r}")


@dataclass
class DataConfig:
    """For a store without dpstack attrs (Diffusion Policy's zarr, directory or .zip): what its
    arrays cannot tell. The observation keys are policy.obs_keys. Unused when the store has attrs."""
    control_hz: float = 0.0     # the rate the actions were recorded at; 0 = take it from the attrs
    action_key: str = "action"
    task: str = ""              # "" = the store's name
    robot: str = ""             # "" = "unknown"

    def validate(self) -> None:
        if self.control_hz < 0:
            raise ConfigError(f"data.control_hz must be >= 0, got {self.control_hz}")


@dataclass
class Config:
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        self.policy.validate()
        self.train.validate()
        self.data.validate()

    def to_dict(self) -> dict[str, Any]:
        return to_data(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Config":
        return from_data(cls, d)


def load_config(name_or_path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A shipped config name (`lift_state_small`) or a YAML path (None: the defaults), plus overrides."""
    path = find_config(name_or_path, CONFIG_DIR) if name_or_path is not None else None
    return load_yaml(Config, path, overrides)


__all__ = ["CONFIG_DIR", "Config", "ConfigError", "DataConfig", "PolicyConfig", "TrainConfig", "apply_overrides", "load_config"]
