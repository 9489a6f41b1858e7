"""1-D conditional U-Net over the action sequence (Diffusion Policy's CNN denoiser),
with one diffusion level per horizon position.

How the per-position level enters (a design choice; SDP instead flattens all
levels and projects them to one global FiLM vector): every position gets its own
FiLM condition = [level embedding of that position, observation condition], and
each residual block maps it to a per-position (scale, bias). At lower
resolutions the per-position embedding is average-pooled along time like the
features themselves. Why: with equal levels this is exactly DP's global FiLM, so
one checkpoint serves plain DDPM/DDIM/RTI; a position's level acts directly on
that position's features (no need to decode it from a flattened code); and the
parameter count does not depend on the horizon.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .timestep import LevelEmbedding, broadcast_levels

UNET_PRESETS: dict[str, dict] = {
    "test": {"down_dims": (16, 32, 64), "level_dim": 32},
    "small": {"down_dims": (64, 128, 256), "level_dim": 128},
    "dp": {"down_dims": (256, 512, 1024), "level_dim": 256},
}


class ConvBlock(nn.Sequential):
    """Conv1d -> GroupNorm(8) -> Mish."""

    def __init__(self, c_in: int, c_out: int, kernel: int) -> None:
        super().__init__(nn.Conv1d(c_in, c_out, kernel, padding=kernel // 2), nn.GroupNorm(8, c_out), nn.Mish())


class FiLMResBlock(nn.Module):
    """Two ConvBlocks; between them a per-position FiLM (scale, bias) from the condition."""

    def __init__(self, c_in: int, c_out: int, cond_dim: int, kernel: int) -> None:
        super().__init__()
        self.block1 = ConvBlock(c_in, c_out, kernel)
        self.block2 = ConvBlock(c_out, c_out, kernel)
        self.film = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * c_out))
        self.residual = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.c_out = c_out

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        # x (B, C_in, T); cond (B, T, cond_dim) -> FiLM (B, 2*C_out, T)
        film = self.film(cond).transpose(1, 2)
        scale, bias = film[:, : self.c_out], film[:, self.c_out:]
        h = self.block1(x) * scale + bias
        return self.block2(h) + self.residual(x)


class ConditionalUnet1D(nn.Module):
    def __init__(self, action_dim: int, cond_dim: int, down_dims: tuple[int, ...] = (64, 128, 256),
                 level_dim: int = 128, kernel: int = 5) -> None:
        super().__init__()
        self.level_embed = LevelEmbedding(level_dim)
        film_dim = level_dim + cond_dim
        dims = [action_dim, *down_dims]
        stages = list(zip(dims[:-1], dims[1:]))
        self.down = nn.ModuleList()
        for i, (c_in, c_out) in enumerate(stages):
            last = i == len(stages) - 1
            self.down.append(nn.ModuleList([
                FiLMResBlock(c_in, c_out, film_dim, kernel), FiLMResBlock(c_out, c_out, film_dim, kernel),
                nn.Identity() if last else nn.Conv1d(c_out, c_out, 3, stride=2, padding=1)]))
        mid = down_dims[-1]
        self.mid = nn.ModuleList([FiLMResBlock(mid, mid, film_dim, kernel), FiLMResBlock(mid, mid, film_dim, kernel)])
        self.up = nn.ModuleList()
        # As in DP: every up stage upsamples, and the full-resolution skip is not reused.
        for c_in, c_out in reversed(stages[1:]):
            self.up.append(nn.ModuleList([
                FiLMResBlock(c_out * 2, c_in, film_dim, kernel), FiLMResBlock(c_in, c_in, film_dim, kernel),
                nn.ConvTranspose1d(c_in, c_in, 4, stride=2, padding=1)]))
        self.final = nn.Sequential(ConvBlock(down_dims[0], down_dims[0], kernel), nn.Conv1d(down_dims[0], action_dim, 1))
        self.n_down = len(stages) - 1

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x (B, Tp, A), t (B, Tp) | (B,) | () int levels, cond (B, C) -> eps (B, Tp, A)."""
        B, Tp, _ = x.shape
        levels = broadcast_levels(t, B, Tp)
        per_pos = torch.cat([self.level_embed(levels), cond.unsqueeze(1).expand(B, Tp, cond.shape[-1])], dim=-1)
        # Per-position condition at each resolution: average-pool along time like the features.
        conds = [per_pos]
        for _ in range(self.n_down):
            conds.append(F.avg_pool1d(conds[-1].transpose(1, 2), 2, 2).transpose(1, 2))
        h = x.transpose(1, 2)
        skips = []
        for level, (res1, res2, down) in enumerate(self.down):
            h = res2(res1(h, conds[level]), conds[level])
            skips.append(h)
            h = down(h)
        for res in self.mid:
            h = res(h, conds[self.n_down])
        for i, (res1, res2, up) in enumerate(self.up):
            level = self.n_down - i
            h = torch.cat([h, skips.pop()], dim=1)
            h = res2(res1(h, conds[level]), conds[level])
            h = up(h)
        return self.final(h).transpose(1, 2)
