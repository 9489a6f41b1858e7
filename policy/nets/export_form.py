"""The denoiser as it is exported: the same function, in ops onnxruntime runs fast.

Training keeps the plain torch modules (torch is fast with them); `export_form`
returns a copy with two rewrites, and the export's parity check compares that copy
with the original.

Conv1d -> im2col + one MatMul. On a CPU at batch 1 a denoiser's convolutions see 4-16 time steps, so they read
their weights once and do little arithmetic. onnxruntime's Conv kernel is ~6x
slower there than its MatMul over the same weights (1024 -> 1024 channels,
kernel 5, 4 steps: 6.3 ms vs 1.1 ms on one core).

Mish -> x * (n / (n + 2)) with n = e^x (e^x + 2), which is x * tanh(softplus(x))
rewritten. onnxruntime runs its Mish as Softplus + Tanh + Mul, and its Softplus
is slow: 65 us against 20 us for this chain on a (1, 1024, 4) tensor.
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


class ExpMish(nn.Module):
    """Mish through Exp: x * (n / (n + 2)), n = e^x (e^x + 2); e^x is capped at e^20, where n / (n + 2) is 1 in float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = torch.exp(torch.clamp(x, max=20.0))
        n = e * (e + 2.0)
        return x * (n / (n + 2.0))  # the ratio first: x * n overflows for huge x


def export_form(module: nn.Module) -> nn.Module:
    """A copy of `module` with every plain nn.Conv1d replaced by MatMulConv1d and every nn.Mish by ExpMish."""
    module = copy.deepcopy(module)
    for child in list(module.modules()):
        for attr, sub in list(child.named_children()):
            if type(sub) is nn.Conv1d:
                setattr(child, attr, MatMulConv1d(sub))
            elif type(sub) is nn.Mish:
                setattr(child, attr, ExpMish())
    return module
