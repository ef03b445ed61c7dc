"""The paper's baselines (section 3.2): torchvision AlexNet, VGG16-BN and ResNet-18, adapted, not rewritten.

Each is built with weights=None (nothing is downloaded) and adapted the same way:
- the first convolution takes `in_channels` (1 for a chip), with the original kernel, stride and padding;
- an adaptive average pool before the classifier fixes the feature map at the size the network produces for a
  224 x 448 LCID-Resize input, so one set of weights serves LCID (2048 x 4096) and LCID-Resize alike:
  AlexNet 256 x 6 x 13, VGG 512 x 7 x 14, ResNet 512 x 1 x 2 (ResNet's last map is 7 x 14 at 224 x 448; the paper's
  pool makes it 1 x 2);
- the classifier's first Linear is sized for that map and the last one has `num_classes` outputs.

Parameters as float32 (Table 3): AlexNet 101,036,738 = 385.42 MiB, VGG 237,036,482 = 904.22 MiB,
ResNet 11,172,290 = 42.62 MiB.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torchvision import models as tv

from ray_hrc.models import register_model


def _single_channel(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """A new Conv2d like `conv` but reading `in_channels` channels (freshly initialised by PyTorch's default)."""
    return nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )


def _args(in_channels: int, num_classes: int, input_shape: Sequence[int]) -> dict:
    return {"in_channels": in_channels, "num_classes": num_classes, "input_shape": tuple(int(v) for v in input_shape)}


@register_model
def alexnet(in_channels: int = 1, num_classes: int = 2, input_shape: Sequence[int] = (2048, 4096)) -> nn.Module:
    """AlexNet: (B, in_channels, H, W) -> logits (B, num_classes); any H, W >= 63. `input_shape` is recorded only."""
    model = tv.alexnet(weights=None, num_classes=num_classes)
    model.features[0] = _single_channel(model.features[0], in_channels)
    model.avgpool = nn.AdaptiveAvgPool2d((6, 13))
    model.classifier[1] = nn.Linear(256 * 6 * 13, model.classifier[1].out_features)  # classifier: Dropout, Linear, ...
    model.model_args = _args(in_channels, num_classes, input_shape)
    return model


@register_model
def vgg(in_channels: int = 1, num_classes: int = 2, input_shape: Sequence[int] = (2048, 4096)) -> nn.Module:
    """VGG16 with BatchNorm: (B, in_channels, H, W) -> logits (B, num_classes); any H, W >= 32. `input_shape` is recorded only."""
    model = tv.vgg16_bn(weights=None, num_classes=num_classes)
    model.features[0] = _single_channel(model.features[0], in_channels)
    model.avgpool = nn.AdaptiveAvgPool2d((7, 14))
    model.classifier[0] = nn.Linear(512 * 7 * 14, model.classifier[0].out_features)
    # torchvision's VGG initialisation, for the two layers replaced above
    nn.init.kaiming_normal_(model.features[0].weight, mode="fan_out", nonlinearity="relu")
    nn.init.zeros_(model.features[0].bias)
    nn.init.normal_(model.classifier[0].weight, 0, 0.01)
    nn.init.zeros_(model.classifier[0].bias)
    model.model_args = _args(in_channels, num_classes, input_shape)
    return model


@register_model
def resnet(in_channels: int = 1, num_classes: int = 2, input_shape: Sequence[int] = (2048, 4096)) -> nn.Module:
    """ResNet-18: (B, in_channels, H, W) -> logits (B, num_classes) for any H, W. `input_shape` is recorded only."""
    model = tv.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = _single_channel(model.conv1, in_channels)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision's ResNet
    model.avgpool = nn.AdaptiveAvgPool2d((1, 2))
    model.fc = nn.Linear(model.fc.in_features * 1 * 2, num_classes)
    model.model_args = _args(in_channels, num_classes, input_shape)
    return model
