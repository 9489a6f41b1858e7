"""The exported form of the denoiser (Conv1d as MatMul, Mish through Exp) computes the same function."""
import pytest
import torch
from torch import nn

from dpstack.policy.nets.export_form import ExpMish, MatMulConv1d, export_form
from dpstack.policy.nets.unet import ConditionalUnet1D


@pytest.mark.parametrize("c_in,c_out,k,stride,pad,t", [
    (7, 16, 5, 1, 2, 16),    # the U-Net's blocks
    (32, 32, 3, 2, 1, 16),   # its stride-2 downsampling
    (8, 4, 1, 1, 0, 4),      # 1x1 residual / output projections
    (6, 10, 4, 1, 0, 9),     # even kernel, no padding, odd length
    (5, 5, 3, 3, 2, 11),     # stride that does not divide the length
])
def test_matches_conv1d(c_in, c_out, k, stride, pad, t):
    torch.manual_seed(0)
    conv = nn.Conv1d(c_in, c_out, k, stride=stride, padding=pad)
    x = torch.randn(3, c_in, t)
    y = MatMulConv1d(conv)(x)
    ref = conv(x)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_refuses_what_it_cannot_express():
    for conv in (nn.Conv1d(4, 4, 3, groups=2), nn.Conv1d(4, 4, 3, dilation=2), nn.Conv1d(4, 4, 3, padding="same"),
                 nn.Conv1d(4, 4, 3, padding=1, padding_mode="reflect")):
        with pytest.raises(ValueError):
            MatMulConv1d(conv)


def test_unet_copy_is_rewritten_and_equal():
    torch.manual_seed(0)
    net = ConditionalUnet1D(7, 12, (16, 32, 64), level_dim=32).eval()
    fast = export_form(net, matmul_min_conv_weights=0).eval()
    assert not any(type(m) in (nn.Conv1d, nn.Mish) for m in fast.modules())
    assert any(type(m) is nn.Conv1d for m in net.modules())  # the original is untouched
    x, t, c = torch.randn(2, 16, 7), torch.randint(-1, 100, (2, 16)), torch.randn(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(fast(x, t, c), net(x, t, c), rtol=1e-5, atol=1e-5)


def test_exp_mish_matches_mish_over_the_float32_range():
    x = torch.cat([torch.linspace(-100, 100, 20001), torch.tensor([-1e30, -88.0, 19.99, 20.0, 20.01, 1e30])])
    y, ref = ExpMish()(x), nn.functional.mish(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)


def test_convolutions_become_matmuls_only_in_a_large_net():
    net = ConditionalUnet1D(7, 12, (16, 32, 64), level_dim=32)
    total = sum(m.weight.numel() for m in net.modules() if type(m) is nn.Conv1d)
    kept = export_form(net, matmul_min_conv_weights=total + 1)
    assert any(type(m) is nn.Conv1d for m in kept.modules()) and not any(type(m) is MatMulConv1d for m in kept.modules())
    assert not any(type(m) is nn.Mish for m in kept.modules())  # Mish is rewritten at any size
    swapped = export_form(net, matmul_min_conv_weights=total)
    assert not any(type(m) is nn.Conv1d for m in swapped.modules())
