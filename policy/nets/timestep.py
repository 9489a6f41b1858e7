"""Per-position diffusion-level embedding shared by both denoisers."""
from __future__ import annotations

import math

import torch
from torch import nn


def broadcast_levels(t: torch.Tensor, batch: int, horizon: int) -> torch.Tensor:
    """Levels as (B, Tp): a scalar or (B,) is repeated along the horizon.

    Decided on tensor rank only (static at export), never on tensor values.
    """
    if t.dim() == 0:
        t = t.reshape(1, 1)
    elif t.dim() == 1:
        t = t.reshape(-1, 1)
    return t.expand(batch, horizon)


class SinusoidalEmbedding(nn.Module):
    """Transformer-style sin/cos features of a (float) level; works for any shape."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"embedding dim must be even, got {dim}")
        half = dim // 2
        freqs = torch.exp(torch.arange(half, dtype=torch.float32) * (-math.log(10000.0) / (half - 1)))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = t.to(torch.float32).unsqueeze(-1) * self.freqs
        return torch.cat([args.sin(), args.cos()], dim=-1)


class LevelEmbedding(nn.Module):
    """(B, Tp) int levels -> (B, Tp, dim): sinusoidal features then an MLP, per position.

    Level -1 (a clean, committed position) is a valid input.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(SinusoidalEmbedding(dim), nn.Linear(dim, dim * 4), nn.Mish(), nn.Linear(dim * 4, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.net(t)
