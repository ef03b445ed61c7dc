"""A fast CPU path for convolutions that read a single-channel image: HR-CelestialNet's conv1 (and the baselines' stems).

oneDNN picks poor kernels for a convolution with one input channel and few output channels over a 2048 x 4096 chip:
a narrow model's conv1 (1 -> 2 channels, 7 x 7) runs at about 4 GFLOP/s forward and 1.5 GFLOP/s for the weight
gradient, which is most of a CPU training step. Here each output row is a sum of K x K shifted input rows scaled by
one weight: the rows stay in L1 cache and the inner loop is a vectorised multiply-add (forward) or dot product
(weight gradient), compiled by numba.

`StemConv2d` is an `nn.Conv2d` (same parameters, same state_dict keys) that takes this path when it pays: CPU,
float32, one input channel, stride 1, no padding, dilation 1, groups 1, at most `MAX_OUT_CHANNELS` output channels, and
an input that does not need its gradient (a model's first layer). Anything else goes to `F.conv2d` unchanged.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ray_hrc.kernels import jit

MAX_OUT_CHANNELS = 8
"""Above this many output channels oneDNN's own kernels are as fast (width-1 conv1 has 32)."""


@jit(fastmath=True)
def _forward(x: np.ndarray, w: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
    """out[n, c, y, :] = b[c] + sum_{ky, kx} w[c, ky, kx] * x[n, y + ky, kx : kx + Wo]."""
    n_images, channels, rows, cols = out.shape
    k = w.shape[1]
    for n in range(n_images):
        for y in range(rows):
            for c in range(channels):
                o = out[n, c, y]
                bias = b[c]
                for i in range(cols):
                    o[i] = bias
                for ky in range(k):
                    row = x[n, y + ky]
                    for kx in range(k):
                        wv = w[c, ky, kx]
                        for i in range(cols):
                            o[i] += wv * row[i + kx]


@jit(fastmath=True)
def _weight_grad(x: np.ndarray, g: np.ndarray, k: int) -> np.ndarray:  # pragma: no cover - compiled
    """dL/dw[c, ky, kx] = sum_{n, y, i} g[n, c, y, i] * x[n, y + ky, i + kx]; float32 dot per row, float64 across rows."""
    n_images, channels, rows, cols = g.shape
    acc = np.zeros((channels, k, k), np.float64)
    for n in range(n_images):
        for y in range(rows):
            for c in range(channels):
                grow = g[n, c, y]
                for ky in range(k):
                    row = x[n, y + ky]
                    for kx in range(k):
                        s = np.float32(0.0)
                        for i in range(cols):
                            s += grow[i] * row[i + kx]
                        acc[c, ky, kx] += s
    return acc.astype(np.float32)


class _StemConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        n, _, rows, cols = x.shape
        channels, _, k, _ = weight.shape
        xs = x.detach().reshape(n, rows, cols).contiguous()
        out = torch.empty((n, channels, rows - k + 1, cols - k + 1), dtype=torch.float32)
        _forward(xs.numpy(), weight.detach().reshape(channels, k, k).contiguous().numpy(), bias.detach().contiguous().numpy(), out.numpy())
        ctx.save_for_backward(xs)
        ctx.k = k
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (xs,) = ctx.saved_tensors
        grad = grad.contiguous()
        grad_w = torch.from_numpy(_weight_grad(xs.numpy(), grad.numpy(), ctx.k)).unsqueeze(1) if ctx.needs_input_grad[1] else None
        grad_b = grad.sum((0, 2, 3)) if ctx.needs_input_grad[2] else None
        return None, grad_w, grad_b


def fast_path_applies(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether `conv(x)` can take the compiled single-channel path (see the module docstring)."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and conv.weight.dtype == torch.float32
        and x.dim() == 4
        and conv.in_channels == 1
        and conv.out_channels <= MAX_OUT_CHANNELS
        and conv.bias is not None
        and conv.stride == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding in ((0, 0), "valid")
        and conv.kernel_size[0] == conv.kernel_size[1]
        and not x.requires_grad
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


class StemConv2d(nn.Conv2d):
    """`nn.Conv2d` with the compiled single-channel CPU path; identical parameters and state_dict keys."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fast_path_applies(self, x):
            return _StemConv.apply(x, self.weight, self.bias)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
