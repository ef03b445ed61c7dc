"""Inference helpers: fold BatchNorm into the preceding convolution, channels_last, optional torch.compile; model size.

fold_batchnorm folds every Conv2d that is immediately followed by a BatchNorm2d inside an nn.Sequential. That is every
BatchNorm of HR-CelestialNet (12) and of torchvision's VGG16-BN (13). AlexNet has no BatchNorm. In torchvision's
ResNet only the downsample branches (3 of 20 BatchNorms in ResNet-18) are Sequentials; the others are attributes
(conv1/bn1 of a block) and are left as they are: folding them needs a traced graph
(torch.fx.experimental.optimization.fuse), which HR-CelestialNet's input-shape check does not allow.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

logger = logging.getLogger(__name__)


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (shared parameters counted once; buffers such as BN running stats excluded)."""
    return sum(p.numel() for p in model.parameters())


def size_mib(model: nn.Module) -> float:
    """Parameter memory in MiB (bytes / 2**20) at the parameters' dtype: count * 4 / 2**20 for float32, as Table 3."""
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` with each Conv2d -> BatchNorm2d pair of an nn.Sequential folded into one Conv2d.

    The folded Conv2d (with a bias) takes the conv's place and nn.Identity the BatchNorm's, so the copy's state_dict
    lacks the BatchNorm keys. Its output equals the eval-mode original's up to float rounding; `model` is untouched.
    """
    folded = copy.deepcopy(model).eval()
    count = 0
    for module in folded.modules():
        if not isinstance(module, nn.Sequential):
            continue
        for index in range(len(module) - 1):
            conv, bn = module[index], module[index + 1]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                module[index] = fuse_conv_bn_eval(conv, bn)
                module[index + 1] = nn.Identity()
                count += 1
    remaining = sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    logger.debug("folded %d BatchNorm2d layers into their convolutions; %d left unfolded", count, remaining)
    return folded


def prepare_for_inference(
    model: nn.Module,
    device: str | torch.device = "cpu",
    channels_last: bool = True,
    fold_bn: bool = True,
    compile: bool = False,
) -> nn.Module:
    """A copy of `model` ready for prediction: eval mode, BatchNorm folded, on `device`, optionally channels_last and compiled.

    Inputs keep their usual (B, C, H, W) shape; with channels_last they are best passed in that memory format too
    (`x.to(memory_format=torch.channels_last)`; for one channel it is the same layout). `model` is untouched.
    """
    prepared = fold_batchnorm(model) if fold_bn else copy.deepcopy(model).eval()
    prepared = prepared.to(device)
    if channels_last:
        prepared = prepared.to(memory_format=torch.channels_last)
    if compile:
        prepared = torch.compile(prepared)
    return prepared
