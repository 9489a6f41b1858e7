"""Observation encoders: normalised observation dict -> condition vector (B, C).

Input: {key: (B, To, *shape)} already normalised (images in [-1, 1], HWC).
Output is time-major: C = To * per_step_dim, the features of step 0 first. The
transformer denoiser relies on this to cut the condition into To memory tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class StateEncoder(nn.Module):
    """Concatenate the low-dimensional keys of the last To steps and flatten."""

    def __init__(self, low_dim_keys: tuple[str, ...], key_dims: dict[str, int], n_obs_steps: int) -> None:
        super().__init__()
        self.keys = tuple(low_dim_keys)
        self.step_dim = sum(key_dims[k] for k in self.keys)
        self.out_dim = n_obs_steps * self.step_dim

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        x = torch.cat([obs[k] for k in self.keys], dim=-1)  # (B, To, D)
        return x.reshape(x.shape[0], -1)


class BasicBlock(nn.Module):
    """ResNet basic block with GroupNorm (never BatchNorm: EMA weights + tiny batches)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        groups = lambda c: max(1, c // 16)  # noqa: E731  (DP's replacement: 16 channels per group)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(groups(c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(groups(c_out), c_out)
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.GroupNorm(groups(c_out), c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(h)) + self.shortcut(x))


class SpatialSoftmax(nn.Module):
    """Feature map -> K expected (x, y) keypoint coordinates in [-1, 1]."""

    def __init__(self, channels: int, n_keypoints: int) -> None:
        super().__init__()
        self.to_kp = nn.Conv2d(channels, n_keypoints, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.to_kp(x)                                  # (N, K, h, w)
        N, K, h, w = logits.shape
        ys = torch.linspace(-1.0, 1.0, h, device=x.device, dtype=x.dtype)
        xs = torch.linspace(-1.0, 1.0, w, device=x.device, dtype=x.dtype)
        attn = logits.reshape(N, K, h * w).softmax(-1).reshape(N, K, h, w)
        ex = (attn.sum(2) * xs).sum(-1)
        ey = (attn.sum(3) * ys).sum(-1)
        return torch.stack([ex, ey], dim=-1).reshape(N, 2 * K)


class ResNetKeypoints(nn.Module):
    """ResNet-18 layout (stem + 4 stages x 2 basic blocks), GroupNorm, spatial-softmax head."""

    def __init__(self, in_channels: int = 3, width: int = 64, n_keypoints: int = 32, out_dim: int = 64) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(in_channels, w, 7, 2, 3, bias=False), nn.GroupNorm(max(1, w // 16), w),
                                  nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        stages, c = [], w
        for i, c_out in enumerate((w, 2 * w, 4 * w, 8 * w)):
            stages += [BasicBlock(c, c_out, 1 if i == 0 else 2), BasicBlock(c_out, c_out, 1)]
            c = c_out
        self.stages = nn.Sequential(*stages)
        self.keypoints = SpatialSoftmax(c, n_keypoints)
        self.proj = nn.Linear(2 * n_keypoints, out_dim)
        self.out_dim = out_dim

    def forward(self, img: torch.Tensor) -> torch.Tensor:   # (N, C, H, W) -> (N, out_dim)
        return self.proj(self.keypoints(self.stages(self.stem(img))))


class ImageEncoder(nn.Module):
    """One ResNetKeypoints per camera; per step [camera features..., low-dim keys...]."""

    def __init__(self, image_keys: tuple[str, ...], image_channels: dict[str, int], low_dim_keys: tuple[str, ...],
                 key_dims: dict[str, int], n_obs_steps: int, width: int = 64, n_keypoints: int = 32,
                 feature_dim: int = 64) -> None:
        super().__init__()
        self.image_keys, self.low_dim_keys = tuple(image_keys), tuple(low_dim_keys)
        self.cameras = nn.ModuleDict({k: ResNetKeypoints(image_channels[k], width, n_keypoints, feature_dim)
                                      for k in self.image_keys})
        self.step_dim = feature_dim * len(self.image_keys) + sum(key_dims[k] for k in self.low_dim_keys)
        self.out_dim = n_obs_steps * self.step_dim

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        feats = []
        for k in self.image_keys:
            img = obs[k]                                          # (B, To, H, W, C) in [-1, 1]
            B, To, H, W, C = img.shape
            flat = img.reshape(B * To, H, W, C).permute(0, 3, 1, 2)
            feats.append(self.cameras[k](flat).reshape(B, To, -1))
        feats += [obs[k] for k in self.low_dim_keys]
        x = torch.cat(feats, dim=-1)
        return x.reshape(x.shape[0], -1)
