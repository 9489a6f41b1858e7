"""Transformer denoiser (Diffusion Policy's time-series transformer, per-position levels).

Action tokens attend causally to each other and fully to the observation tokens
(the memory). Each action token gets its own level embedding added, so the
ladder/committed-prefix regimes work as for the U-Net. The decoder layer is
written out in plain ops (no nn.TransformerDecoder): it exports to ONNX with the
dynamo exporter without special flags and the graph stays readable.
"""
from __future__ import annotations

import torch
from torch import nn

from .timestep import LevelEmbedding, broadcast_levels

TRANSFORMER_PRESETS: dict[str, dict] = {
    "test": {"n_layers": 2, "width": 64, "n_heads": 4},
    "small": {"n_layers": 4, "width": 128, "n_heads": 4},
    "dp": {"n_layers": 8, "width": 256, "n_heads": 4},
}


class Attention(nn.Module):
    def __init__(self, width: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        if width % n_heads:
            raise ValueError(f"width {width} not divisible by {n_heads} heads")
        self.n_heads, self.head_dim = n_heads, width // n_heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)
        self.drop = nn.Dropout(dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.reshape(B, T, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        B, T, W = x.shape
        q = self._heads(self.q(x))
        k, v = self.kv(memory).chunk(2, dim=-1)
        k, v = self._heads(k), self._heads(v)
        scores = q @ k.transpose(-1, -2) * (self.head_dim ** -0.5)
        if bias is not None:
            scores = scores + bias
        attn = self.drop(scores.softmax(dim=-1))
        return self.out((attn @ v).transpose(1, 2).reshape(B, T, W))


class DecoderLayer(nn.Module):
    """Pre-LayerNorm: causal self-attention, cross-attention to memory, GELU MLP."""

    def __init__(self, width: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.self_attn = Attention(width, n_heads, dropout)
        self.cross_attn = Attention(width, n_heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * width, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.drop(self.self_attn(h, h, causal))
        x = x + self.drop(self.cross_attn(self.norm2(x), memory))
        return x + self.drop(self.mlp(self.norm3(x)))


class TransformerDenoiser(nn.Module):
    def __init__(self, action_dim: int, cond_dim: int, n_cond_tokens: int, horizon: int,
                 n_layers: int = 8, width: int = 256, n_heads: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        if cond_dim % n_cond_tokens:
            raise ValueError(f"cond dim {cond_dim} is not {n_cond_tokens} equal tokens")
        self.n_cond_tokens = n_cond_tokens
        self.action_in = nn.Linear(action_dim, width)
        self.action_pos = nn.Parameter(torch.zeros(1, horizon, width))
        self.level_embed = LevelEmbedding(width)
        self.cond_in = nn.Linear(cond_dim // n_cond_tokens, width)
        self.cond_pos = nn.Parameter(torch.zeros(1, n_cond_tokens, width))
        self.cond_mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.Mish(), nn.Linear(4 * width, width))
        self.layers = nn.ModuleList([DecoderLayer(width, n_heads, dropout) for _ in range(n_layers)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, action_dim)
        causal = torch.full((horizon, horizon), float("-inf")).triu(1)
        self.register_buffer("causal", causal, persistent=False)
        nn.init.normal_(self.action_pos, std=0.02)
        nn.init.normal_(self.cond_pos, std=0.02)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x (B, Tp, A), t (B, Tp) | (B,) | () int levels, cond (B, C) -> eps (B, Tp, A).

        cond is time-major: To equal blocks, one per observation step (one memory token each).
        """
        B, Tp, _ = x.shape
        levels = broadcast_levels(t, B, Tp)
        h = self.action_in(x) + self.action_pos[:, :Tp] + self.level_embed(levels)
        tokens = self.cond_in(cond.reshape(B, self.n_cond_tokens, -1)) + self.cond_pos
        memory = tokens + self.cond_mlp(tokens)
        causal = self.causal[:Tp, :Tp]
        for layer in self.layers:
            h = layer(h, memory, causal)
        return self.head(self.norm(h))
