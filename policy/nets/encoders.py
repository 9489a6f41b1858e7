"""Observation encoders: normalised observation dict -> condition vector (B, C).

Input: {key: (B, To, *shape)} already normalised (images in [-1, 1], HWC).
Output is time-major: C = To * step_dim, the features of step 0 first. The
transformer denoiser relies on this to cut the condition into To memory tokens.
Each step is encoded on its own (`step_features`), never mixed with the others, so
a runtime may keep the features of earlier steps and encode only the newest one.

Images follow Diffusion Policy's recipe: a random crop in training and the centre
crop at inference (CropRandomizer), optional colour jitter in training, GroupNorm,
one CNN per camera, proprioception concatenated.
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

    def step_features(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """{key: (N, D)} of single steps -> (N, step_dim)."""
        return torch.cat([obs[k] for k in self.keys], dim=-1)

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        return time_major(self, obs, self.keys)


def time_major(encoder: nn.Module, obs: dict[str, torch.Tensor], keys: tuple[str, ...]) -> torch.Tensor:
    """{key: (B, To, *shape)} -> (B, To * step_dim): every step through `encoder.step_features`."""
    B, To = obs[keys[0]].shape[:2]
    steps = {k: obs[k].reshape(B * To, *obs[k].shape[2:]) for k in keys}
    return encoder.step_features(steps).reshape(B, -1)


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


class SmallConvKeypoints(nn.Module):
    """A CPU-sized camera encoder: four 3x3 convolutions (w/2, w, w, 2w channels; stride 2, 2, 1, 2;
    GroupNorm), 8x downsampling, spatial-softmax head on a 10x10 map at 76 px."""

    def __init__(self, in_channels: int = 3, width: int = 32, n_keypoints: int = 32, out_dim: int = 64) -> None:
        super().__init__()
        w = width
        layers, c = [], in_channels
        for c_out, stride in ((w // 2, 2), (w, 2), (w, 1), (2 * w, 2)):
            layers += [nn.Conv2d(c, c_out, 3, stride, 1, bias=False), nn.GroupNorm(max(1, c_out // 16), c_out), nn.ReLU()]
            c = c_out
        self.convs = nn.Sequential(*layers)
        self.keypoints = SpatialSoftmax(c, n_keypoints)
        self.proj = nn.Linear(2 * n_keypoints, out_dim)
        self.out_dim = out_dim

    def forward(self, img: torch.Tensor) -> torch.Tensor:   # (N, C, H, W) -> (N, out_dim)
        return self.proj(self.keypoints(self.convs(img)))


CAMERA_ENCODERS = {"resnet18": ResNetKeypoints, "small": SmallConvKeypoints}


def crop_size(hw: tuple[int, int], ratio: float) -> tuple[int, int]:
    """The crop of an (H, W) frame at `ratio` of each side (DP: 84 -> 76 at 0.905)."""
    return max(1, round(hw[0] * ratio)), max(1, round(hw[1] * ratio))


class CropRandomizer(nn.Module):
    """(N, C, H, W) -> (N, C, h, w): an independent random crop per frame in train mode,
    the centre crop in eval mode (what the exported graph does)."""

    def __init__(self, hw: tuple[int, int], crop_hw: tuple[int, int]) -> None:
        super().__init__()
        self.hw, self.crop_hw = tuple(hw), tuple(crop_hw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (H, W), (h, w) = self.hw, self.crop_hw
        if (h, w) == (H, W):
            return x
        if not self.training:
            top, left = (H - h) // 2, (W - w) // 2
            return x[:, :, top:top + h, left:left + w]
        N = x.shape[0]
        top = torch.randint(0, H - h + 1, (N, 1, 1), device=x.device)
        left = torch.randint(0, W - w + 1, (N, 1, 1), device=x.device)
        rows = (top + torch.arange(h, device=x.device).view(1, h, 1)).expand(N, h, w)
        cols = (left + torch.arange(w, device=x.device).view(1, 1, w)).expand(N, h, w)
        flat = (rows * W + cols).reshape(N, 1, h * w).expand(N, x.shape[1], h * w)
        return x.reshape(N, x.shape[1], H * W).gather(2, flat).reshape(N, x.shape[1], h, w)


class ColorJitter(nn.Module):
    """Random brightness, contrast and saturation, each a factor in [1 - s, 1 + s] per frame,
    in train mode only; images in [-1, 1] (N, 3, H, W). s = 0: off."""

    def __init__(self, strength: float) -> None:
        super().__init__()
        self.strength = float(strength)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.strength <= 0 or x.shape[1] != 3:
            return x
        N, s = x.shape[0], self.strength
        factor = lambda: 1.0 + (torch.rand(N, 1, 1, 1, device=x.device) * 2 - 1) * s  # noqa: E731
        y = (x + 1) * 0.5 * factor()                                     # brightness, in [0, 1] units
        y = (y - y.mean(dim=(1, 2, 3), keepdim=True)) * factor() + y.mean(dim=(1, 2, 3), keepdim=True)
        gray = (0.299 * y[:, 0:1] + 0.587 * y[:, 1:2] + 0.114 * y[:, 2:3])
        y = (gray + (y - gray) * factor()).clamp(0, 1)
        return y * 2 - 1


class ImageEncoder(nn.Module):
    """One camera CNN per camera (crop, jitter, CNN); per step [camera features..., low-dim keys...]."""

    def __init__(self, image_keys: tuple[str, ...], image_shapes: dict[str, tuple[int, int, int]], low_dim_keys: tuple[str, ...],
                 key_dims: dict[str, int], n_obs_steps: int, width: int = 64, n_keypoints: int = 32,
                 feature_dim: int = 64, backbone: str = "resnet18", crop: float = 1.0, color_jitter: float = 0.0) -> None:
        super().__init__()
        self.image_keys, self.low_dim_keys = tuple(image_keys), tuple(low_dim_keys)
        self.crops = nn.ModuleDict({k: CropRandomizer(image_shapes[k][:2], crop_size(image_shapes[k][:2], crop))
                                    for k in self.image_keys})
        self.jitter = ColorJitter(color_jitter)
        net = CAMERA_ENCODERS[backbone]
        self.cameras = nn.ModuleDict({k: net(image_shapes[k][2], width, n_keypoints, feature_dim) for k in self.image_keys})
        self.step_dim = feature_dim * len(self.image_keys) + sum(key_dims[k] for k in self.low_dim_keys)
        self.out_dim = n_obs_steps * self.step_dim

    def step_features(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """{image key: (N, H, W, C) in [-1, 1], low-dim key: (N, D)} of single steps -> (N, step_dim)."""
        feats = []
        for k in self.image_keys:
            img = obs[k].permute(0, 3, 1, 2)                      # HWC -> CHW
            feats.append(self.cameras[k](self.jitter(self.crops[k](img))))
        feats += [obs[k] for k in self.low_dim_keys]
        return torch.cat(feats, dim=-1)

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        return time_major(self, obs, (*self.image_keys, *self.low_dim_keys))
