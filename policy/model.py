"""DiffusionPolicyModel: observation encoder + per-position-level denoiser + the
shared noise schedule, with the normaliser and RobotSpec it was trained for.

Public interface (the ONNX export and torch_callables build on it):
    model.config      PolicyConfig          model.spec        RobotSpec (obs keys used + action)
    model.normalizer  Normalizer (gripper scale already folded into the action stats)
    model.schedule    NoiseSchedule         model.horizon / n_obs_steps / n_action_steps / action_dim
    model.encoder(obs {key: (B, To, *shape)} NORMALISED float) -> cond (B, model.cond_dim)
    model.encoder.step_features(obs {key: (N, *shape)}) -> (N, model.encoder.step_dim): one step;
        cond is the time-major concatenation of To of these
    model.denoiser(x (B, Tp, A), t (B, Tp) int64 | (B,) | (), cond (B, C)) -> eps (B, Tp, A)
    model.compute_loss(obs, action, t, noise, loss_mask) -> scalar (forward() is the same,
        so DDP can wrap the model)
Levels: 0..N-1 noisy, -1 = clean (a committed prefix position).
"""
from __future__ import annotations

import torch
from torch import nn

from dpstack.core.normalizer import Normalizer
from dpstack.core.schedule import NoiseSchedule
from dpstack.core.spec import RobotSpec

from .config import ConfigError, PolicyConfig
from .nets.encoders import ImageEncoder, StateEncoder, crop_size
from .nets.transformer import TRANSFORMER_PRESETS, TransformerDenoiser
from .nets.unet import UNET_PRESETS, ConditionalUnet1D


def build_encoder(config: PolicyConfig, spec: RobotSpec) -> nn.Module:
    keys = tuple(spec.obs_keys)
    images = tuple(k for k in keys if spec.obs(k).is_image)
    if set(images) != set(config.image_keys):
        raise ConfigError(f"policy.image_keys {config.image_keys} do not match the image observations {images} of the spec")
    low = tuple(k for k in keys if k not in images)
    dims = {k: spec.obs(k).shape[0] for k in low}
    for k in low:
        if len(spec.obs(k).shape) != 1:
            raise ConfigError(f"observation {k!r} has shape {spec.obs(k).shape}: neither 1-D state nor an (H, W, C) image")
    for k in images:
        if min(spec.obs(k).shape[:2]) < 64:
            # The ResNet downsamples 32x; below 64 px the keypoint map is 1x1 and carries no position.
            raise ConfigError(f"image {k!r} is {spec.obs(k).shape[:2]}: the image encoder needs at least 64x64 pixels")
        if min(crop_size(spec.obs(k).shape[:2], config.image_crop)) < 56:
            raise ConfigError(f"policy.image_crop {config.image_crop} leaves less than 56 px of image {k!r} "
                              f"{spec.obs(k).shape[:2]}; use a larger fraction")
    if not images:
        if not low:
            raise ConfigError("the policy has no observation keys")
        return StateEncoder(low, dims, config.n_obs_steps)
    return ImageEncoder(images, {k: spec.obs(k).shape for k in images}, low, dims, config.n_obs_steps,
                        config.image_width, config.image_keypoints, config.image_feature_dim,
                        config.image_encoder, config.image_crop, config.image_color_jitter)


def build_denoiser(config: PolicyConfig, action_dim: int, cond_dim: int) -> nn.Module:
    presets = UNET_PRESETS if config.model == "unet" else TRANSFORMER_PRESETS
    if config.preset not in presets:
        raise ConfigError(f"policy.preset {config.preset!r} unknown for {config.model}; have {sorted(presets)}")
    if config.model == "unet":
        return ConditionalUnet1D(action_dim, cond_dim, **presets[config.preset])
    return TransformerDenoiser(action_dim, cond_dim, config.n_obs_steps, config.horizon,
                               dropout=config.transformer_dropout, **presets[config.preset])


class DiffusionPolicyModel(nn.Module):
    def __init__(self, config: PolicyConfig, spec: RobotSpec, normalizer: Normalizer,
                 schedule: NoiseSchedule | None = None) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.spec = spec
        self.normalizer = normalizer
        self.schedule = schedule or NoiseSchedule(num_train_steps=config.num_train_steps)
        if self.schedule.num_train_steps != config.num_train_steps:
            raise ConfigError(f"schedule has {self.schedule.num_train_steps} steps, config {config.num_train_steps}")
        self.horizon, self.n_obs_steps, self.n_action_steps = config.horizon, config.n_obs_steps, config.n_action_steps
        self.action_dim = spec.action.dim
        self.encoder = build_encoder(config, spec)
        self.cond_dim = self.encoder.out_dim
        self.denoiser = build_denoiser(config, self.action_dim, self.cond_dim)
        # alpha-bar indexed by level + 1 (index 0: level -1, clean). Derived from the
        # one numpy schedule, not a second schedule; not saved (rebuilt from schedule).
        ab = torch.cat([torch.ones(1, dtype=torch.float64), torch.from_numpy(self.schedule.alphas_cumprod)])
        self.register_buffer("alpha_bar", ab.to(torch.float32), persistent=False)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = self.alpha_bar[t + 1].unsqueeze(-1)  # (B, Tp, 1)
        return ab.sqrt() * x0 + (1.0 - ab).sqrt() * noise

    def compute_loss(self, obs: dict[str, torch.Tensor], action: torch.Tensor, t: torch.Tensor,
                     noise: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
        """Epsilon-prediction MSE over positions where loss_mask is 1 (obs/action normalised)."""
        cond = self.encoder(obs)
        eps = self.denoiser(self.add_noise(action, noise, t), t, cond)
        err = ((eps - noise) ** 2).mean(-1)
        return (err * loss_mask).sum() / loss_mask.sum().clamp_min(1.0)

    forward = compute_loss

    def num_parameters(self) -> dict[str, int]:
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        return {"encoder": count(self.encoder), "denoiser": count(self.denoiser), "total": count(self)}
