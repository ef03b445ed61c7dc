"""The compiled single-channel stem convolution equals F.conv2d, forward and gradients, and steps aside when it must."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ray_hrc.models import build_model
from ray_hrc.models.stem import StemConv2d, fast_path_applies

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize(("out_channels", "kernel", "batch"), [(2, 7, 2), (3, 5, 1), (8, 3, 3)])
def test_matches_conv2d_forward_and_gradients(out_channels, kernel, batch):
    torch.manual_seed(out_channels)
    stem = StemConv2d(1, out_channels, kernel)
    ref = torch.nn.Conv2d(1, out_channels, kernel)
    ref.load_state_dict(stem.state_dict())
    x = torch.rand(batch, 1, 61, 97)
    assert fast_path_applies(stem, x)
    grad = torch.randn(batch, out_channels, 61 - kernel + 1, 97 - kernel + 1)
    y, y_ref = stem(x), ref(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    (y * grad).sum().backward()
    (y_ref * grad).sum().backward()
    torch.testing.assert_close(stem.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(stem.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-3)


def test_falls_back_where_the_fast_path_does_not_apply():
    stem = StemConv2d(1, 2, 3)
    x = torch.rand(1, 1, 20, 30)
    assert not fast_path_applies(stem, x.clone().requires_grad_())  # an input gradient is not computed by the kernel
    assert not fast_path_applies(stem, x.double())
    assert not fast_path_applies(StemConv2d(1, 2, 3, stride=2), x)
    assert not fast_path_applies(StemConv2d(1, 32, 3), x)  # oneDNN is as fast for many output channels
    xg = x.clone().requires_grad_()
    stem(xg).sum().backward()  # the F.conv2d path gives the input gradient
    assert xg.grad is not None and xg.grad.shape == x.shape


def test_narrow_hrcelestialnet_uses_it_and_keeps_the_key_layout():
    model = build_model("hrcelestialnet", width=1 / 16, input_shape=(1400, 1400))
    assert type(model.conv1[0]) is StemConv2d and type(model.conv2[0]) is torch.nn.Conv2d
    assert "conv1.0.weight" in model.state_dict() and "conv1.0.bias" in model.state_dict()
    x = torch.rand(1, 1, 1400, 1400)
    ref = F.conv2d(x, model.conv1[0].weight, model.conv1[0].bias)
    torch.testing.assert_close(model.conv1[0](x), ref, rtol=1e-5, atol=1e-5)
