"""Conv1d rewritten as im2col + one MatMul, for the exported graph only.

On a CPU at batch 1 a denoiser's convolutions see 4-16 time steps, so they read
their weights once and do little arithmetic. onnxruntime's Conv kernel is ~6x
slower there than its MatMul over the same weights (1024 -> 1024 channels,
kernel 5, 4 steps: 6.3 ms vs 1.1 ms on one core), so the export swaps every
Conv1d for this equivalent. Training keeps nn.Conv1d (torch is fast with it);
the export's parity check compares the two forms.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class MatMulConv1d(nn.Module):
    """The same function as `conv` (zero padding, no groups or dilation) as one MatMul."""

    def __init__(self, conv: nn.Conv1d) -> None:
        super().__init__()
        if conv.groups != 1 or conv.dilation != (1,) or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"MatMulConv1d handles plain Conv1d only, got {conv}")
        c_out, c_in, k = conv.weight.shape
        self.kernel, self.stride, self.padding = k, conv.stride[0], conv.padding[0]
        # (C_out, C_in, k) -> (C_in * k, C_out), rows in the order im2col lays out the taps.
        self.weight = nn.Parameter(conv.weight.detach().reshape(c_out, c_in * k).t().contiguous())
        self.bias = nn.Parameter(conv.bias.detach().clone()) if conv.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (B, C_in, T) -> (B, C_out, T_out)
        B, C, T = x.shape
        if self.padding:
            x = F.pad(x, (self.padding, self.padding))
        t_out = (T + 2 * self.padding - self.kernel) // self.stride + 1
        span = self.stride * (t_out - 1) + 1
        taps = torch.stack([x[:, :, j: j + span: self.stride] for j in range(self.kernel)], dim=-1)  # (B, C, T_out, k)
        cols = taps.permute(0, 2, 1, 3).reshape(B, t_out, C * self.kernel)
        y = cols @ self.weight
        if self.bias is not None:
            y = y + self.bias
        return y.transpose(1, 2)


def convs_as_matmul(module: nn.Module) -> nn.Module:
    """A copy of `module` with every plain nn.Conv1d replaced by MatMulConv1d."""
    module = copy.deepcopy(module)
    for name, child in list(module.named_modules()):
        for attr, sub in list(child.named_children()):
            if type(sub) is nn.Conv1d:
                setattr(child, attr, MatMulConv1d(sub))
    return module
