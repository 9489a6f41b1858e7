"""The denoiser as it is exported: the same function, in ops onnxruntime runs fast.

Training keeps the plain torch modules (torch is fast with them); `export_form`
returns a copy with two rewrites, and the export's parity check compares that copy
with the original.

Conv1d -> im2col + one MatMul, in a net too large for the cache. On a CPU at batch 1
a denoiser's convolutions see 4-16 time steps, so they read their weights once and
do little arithmetic. onnxruntime's Conv kernel is ~6x slower there than its MatMul
over the same weights (1024 -> 1024 channels, kernel 5, 4 steps: 6.3 ms vs 1.1 ms
on one core).

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
        # x (B, C_in, T) -> (B, C_out, T_out); T is static in the exported graph, so the
        # tap indices are a constant and im2col is one Gather (few ops: each costs ~us).
        t = x.shape[-1]
        if self.padding:
            x = F.pad(x, (self.padding, self.padding))
        t_out = (t + 2 * self.padding - self.kernel) // self.stride + 1
        if self.kernel == 1 and self.stride == 1:
            cols = x.transpose(1, 2)                                          # (B, T, C_in)
        else:
            taps = torch.arange(t_out)[:, None] * self.stride + torch.arange(self.kernel)[None, :]
            cols = x[:, :, taps].transpose(1, 2).flatten(2)                   # (B, T_out, C_in * k)
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


# Conv1d layers become MatMuls only in a denoiser whose convolution weights are at least
# this many (32 MB in float32): then every forward streams its weights from memory and
# MatMul reads them faster. A smaller net's weights sit in cache, its cost is per op, and
# im2col adds ops. Measured on 2 cores: the dp U-Net (65 M conv weights) went from
# 16-21 ms to 15-16 ms median rewritten; the small U-Net (5 M) from 1.8 to 2.3 ms, slower.
MATMUL_MIN_CONV_WEIGHTS = 2**23


def export_form(module: nn.Module, matmul_min_conv_weights: int = MATMUL_MIN_CONV_WEIGHTS) -> nn.Module:
    """A copy of `module` with every nn.Mish replaced by ExpMish and, when its Conv1d layers
    hold at least `matmul_min_conv_weights` weights in all, every plain nn.Conv1d by MatMulConv1d."""
    module = copy.deepcopy(module)
    convs = [m for m in module.modules() if type(m) is nn.Conv1d]
    as_matmul = sum(m.weight.numel() for m in convs) >= matmul_min_conv_weights
    for child in list(module.modules()):
        for attr, sub in list(child.named_children()):
            if type(sub) is nn.Conv1d and as_matmul:
                setattr(child, attr, MatMulConv1d(sub))
            elif type(sub) is nn.Mish:
                setattr(child, attr, ExpMish())
    return module
