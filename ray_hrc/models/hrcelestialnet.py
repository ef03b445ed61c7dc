"""HR-CelestialNet (Zhang et al., section 3.1 and Table 2): a no-padding CNN that reads a full 2048 x 4096 chip.

Seven blocks `conv1`..`conv7`, each an `nn.Sequential` of [Conv2d, BatchNorm2d, ReLU] once (conv1, conv2) or twice
(conv3..conv7) followed by its MaxPool2d, then `fc1`, `fc2`, `fc3`. This is the key layout of the authors' reference
implementation, so their state_dicts load with strict=True. At width=1 and a 1 x 2048 x 4096 input:

    conv1  32 x 2042 x 4090 -> pool 8/4 ->  32 x 509 x 1021
    conv2  64 x  503 x 1015 -> pool 4/2 ->  64 x 250 x  506
    conv3 128 x  246 x  502, 128 x 242 x 498 -> pool 2/2 -> 128 x 121 x 249   (end of the "large-size learning component")
    conv4 256 x 119 x 247, 256 x 117 x 245 -> 256 x 58 x 122
    conv5 256 x  56 x 120, 256 x  54 x 118 -> 256 x 27 x  59
    conv6 512 x  25 x  57, 512 x  23 x  55 -> 512 x 11 x  27
    conv7 512 x   9 x  25, 512 x   7 x  23 -> 512 x  3 x  11
    fc1 16896 -> 4096, fc2 4096 -> 4096, fc3 4096 -> num_classes (logits; softmax is applied by the predictor)

Table 2 and section 3.1 print the conv3 pool output as 128 x 121 x 248; 498 columns pooled 2/2 give 249, and Table 2's
next layer (256 x 119 x 247 = 249 - 2) agrees, so 248 is a typo. Every other size is as printed.
97,048,130 parameters (BatchNorm weight and bias included) = 370.21 MiB as float32, as Table 3.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ray_hrc.models import register_model
from ray_hrc.models.stem import StemConv2d

BLOCKS: tuple[tuple[tuple[tuple[int, int], ...], tuple[int, int]], ...] = (
    # ((out_channels, kernel) per convolution, ...), (pool kernel, pool stride); stride 1 and no padding everywhere
    (((32, 7),), (8, 4)),
    (((64, 7),), (4, 2)),
    (((128, 5), (128, 5)), (2, 2)),
    (((256, 3), (256, 3)), (2, 2)),
    (((256, 3), (256, 3)), (2, 2)),
    (((512, 3), (512, 3)), (2, 2)),
    (((512, 3), (512, 3)), (2, 2)),
)
HIDDEN = 4096
"""Width of fc1 and fc2 at width=1."""
LARGE_BLOCKS = 3
"""conv1..conv3 form the paper's large-size learning component (1 x 2048 x 4096 -> 128 x 121 x 249)."""


def _min_side() -> int:
    """Smallest input side (pixels) for which conv7's pooled output is at least 1 x 1."""
    side = 1
    for convs, (pool_kernel, pool_stride) in reversed(BLOCKS):
        side = pool_stride * (side - 1) + pool_kernel
        side += sum(kernel - 1 for _, kernel in convs)
    return side


MIN_INPUT_SIDE = _min_side()
"""1322: each of the input's rows and columns must be at least this."""


def scaled(channels: int, width: float) -> int:
    """Channel count `channels` multiplied by `width`, rounded, at least 1."""
    return max(1, round(channels * width))


def feature_shape(input_shape: Sequence[int], width: float = 1.0) -> tuple[int, int, int]:
    """(channels, rows, cols) of conv7's output for an input of `input_shape` (rows, cols), by arithmetic only.

    (2048, 4096) at width 1 gives (512, 3, 11). Raises ValueError if a side is below MIN_INPUT_SIDE.
    """
    rows, cols = (int(v) for v in input_shape)
    if min(rows, cols) < MIN_INPUT_SIDE:
        raise ValueError(f"input_shape {(rows, cols)} is too small for HR-CelestialNet; each side must be at least {MIN_INPUT_SIDE} pixels")
    for convs, (pool_kernel, pool_stride) in BLOCKS:
        shrink = sum(kernel - 1 for _, kernel in convs)
        rows, cols = ((n - shrink - pool_kernel) // pool_stride + 1 for n in (rows, cols))
    return scaled(BLOCKS[-1][0][-1][0], width), rows, cols


def dct_filters(n: int, kernel: int, in_channels: int = 1) -> torch.Tensor:
    """The `n` lowest-frequency 2-D DCT-II basis functions of a kernel x kernel patch, (n, in_channels, kernel, kernel).

    Ordered by total frequency (u + v), the flat (DC) filter first. Each is scaled to norm 1/sqrt(3) (about 0.58), a
    filter's expected norm under PyTorch's default init (weights uniform in +-1/sqrt(fan_in)), and is repeated over
    the input channels divided by their count.
    """
    if not 0 < n <= kernel * kernel:
        raise ValueError(f"n is {n}; a {kernel} x {kernel} patch has 1 to {kernel * kernel} DCT basis functions")
    x = torch.arange(kernel, dtype=torch.float64)
    freqs = sorted(((u, v) for u in range(kernel) for v in range(kernel)), key=lambda uv: (uv[0] + uv[1], uv[0]))[:n]
    cos = [torch.cos(math.pi * (2 * x + 1) * f / (2 * kernel)) for f in range(kernel)]
    basis = torch.stack([torch.outer(cos[u], cos[v]) for u, v in freqs])
    basis = basis / basis.flatten(1).norm(dim=1)[:, None, None] / math.sqrt(3)
    return (basis[:, None] / in_channels).expand(n, in_channels, kernel, kernel).float().contiguous()


@contextlib.contextmanager
def _restore_buffers(module: nn.Module) -> Iterator[None]:
    """Undo buffer updates made inside the block: a recomputed BatchNorm would otherwise update its running stats twice."""
    saved = [buffer.clone() for buffer in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(module.buffers(), saved, strict=True):
                buffer.copy_(value)


def _checkpoint_contexts(module: nn.Module) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """Contexts for torch.utils.checkpoint: nothing on the forward pass, keep BatchNorm stats on the recomputation."""
    return contextlib.nullcontext(), _restore_buffers(module)


class HRCelestialNet(nn.Module):
    """HR-CelestialNet: chips (B, in_channels, *input_shape) float32 -> logits (B, num_classes).

    Args:
        in_channels: image channels; 1 for a single-filter chip.
        num_classes: 2 for galaxy vs nebula/star cluster.
        width: multiplies every conv's channels and the two hidden FC widths (rounded, at least 1); 1 is the paper's model.
        input_shape: (rows, cols) of the input, which fixes fc1's size; each side at least MIN_INPUT_SIDE (1322).
        checkpoint_large: in training, recompute conv1..conv3 in the backward pass instead of keeping their activations
            (torch.utils.checkpoint, non-reentrant). At 2048 x 4096 those blocks hold most of the activation memory
            (conv1 alone about 2 GiB per chip at width 1); the cost is one more forward of them. BatchNorm running
            stats are still updated once per step.
        stem_init: "default" (PyTorch's, as the reference implementation) or "dct": conv1's filters start as the
            lowest-frequency 2-D DCT basis functions (`dct_filters`), so the stem sees smooth light (the first filter
            is flat) and edges from the first step. With a narrow stem (two filters at width 1/16) random filters
            are sometimes all nearly zero-sum, blind to the diffuse light that tells galaxies from clusters, and
            training stalls at chance for epochs; the DCT start does not depend on the seed.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        width: float = 1.0,
        input_shape: Sequence[int] = (2048, 4096),
        checkpoint_large: bool = False,
        stem_init: str = "default",
    ) -> None:
        super().__init__()
        if stem_init not in ("default", "dct"):
            raise ValueError(f"stem_init is {stem_init!r}; expected 'default' or 'dct'")
        input_shape = tuple(int(v) for v in input_shape)
        if len(input_shape) != 2:
            raise ValueError(f"input_shape is {input_shape}; expected (rows, cols)")
        if not width > 0:
            raise ValueError(f"width is {width}; expected a positive multiplier (1 is the paper's model)")
        self.model_args = {
            "in_channels": in_channels,
            "num_classes": num_classes,
            "width": width,
            "input_shape": input_shape,
            "checkpoint_large": checkpoint_large,
            "stem_init": stem_init,
        }
        self.in_channels = in_channels
        self.input_shape = input_shape
        self.checkpoint_large = checkpoint_large
        self.feature_shape = feature_shape(input_shape, width)

        channels = in_channels
        for index, (convs, (pool_kernel, pool_stride)) in enumerate(BLOCKS, start=1):
            layers: list[nn.Module] = []
            for out_channels, kernel in convs:
                out_channels = scaled(out_channels, width)
                conv = StemConv2d if channels == 1 else nn.Conv2d  # an nn.Conv2d with a compiled CPU path for one input channel
                layers += [conv(channels, out_channels, kernel), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]
                channels = out_channels
            layers.append(nn.MaxPool2d(pool_kernel, pool_stride))
            setattr(self, f"conv{index}", nn.Sequential(*layers))  # conv1 .. conv7
        if stem_init == "dct":
            stem = self.conv1[0]
            n = min(stem.out_channels, stem.kernel_size[0] * stem.kernel_size[1])
            with torch.no_grad():
                stem.weight[:n] = dct_filters(n, stem.kernel_size[0], in_channels).to(stem.weight.dtype)
                stem.bias.zero_()

        hidden = scaled(HIDDEN, width)
        self.fc1 = nn.Linear(math.prod(self.feature_shape), hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, num_classes)

    @property
    def blocks(self) -> tuple[nn.Sequential, ...]:
        """conv1 .. conv7, in order."""
        return tuple(getattr(self, f"conv{index}") for index in range(1, len(BLOCKS) + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) for chips `x` of shape (B, in_channels, *input_shape)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels or tuple(x.shape[2:]) != self.input_shape:
            raise ValueError(
                f"HRCelestialNet got an input of shape {tuple(x.shape)}; expected (B, {self.in_channels}, {self.input_shape[0]}, "
                f"{self.input_shape[1]}). fc1 is sized for input_shape={self.input_shape}: build the model with the input's "
                f"(rows, cols) to use another size (each side at least {MIN_INPUT_SIDE})"
            )
        recompute = self.checkpoint_large and self.training and torch.is_grad_enabled()
        for index, block in enumerate(self.blocks):
            if recompute and index < LARGE_BLOCKS:
                x = checkpoint(block, x, use_reentrant=False, context_fn=partial(_checkpoint_contexts, block))
            else:
                x = block(x)
        x = torch.flatten(x, 1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


@register_model
def hrcelestialnet(**kwargs) -> HRCelestialNet:
    """HR-CelestialNet of the paper (Table 2); keyword arguments as HRCelestialNet."""
    return HRCelestialNet(**kwargs)
