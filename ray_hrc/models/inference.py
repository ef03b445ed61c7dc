"""Inference helpers: fold BatchNorm into the preceding convolution, pool before ReLU, channels_last, bf16 weights where
the CPU multiplies bf16 natively, optional torch.compile; model size.

fold_batchnorm folds every Conv2d that is immediately followed by a BatchNorm2d inside an nn.Sequential. That is every
BatchNorm of HR-CelestialNet (12) and of torchvision's VGG16-BN (13). AlexNet has no BatchNorm. In torchvision's
ResNet only the downsample branches (3 of 20 BatchNorms in ResNet-18) are Sequentials; the others are attributes
(conv1/bn1 of a block) and are left as they are: folding them needs a traced graph
(torch.fx.experimental.optimization.fuse), which HR-CelestialNet's input-shape check does not allow.

pool_before_relu rewrites each ReLU -> MaxPool2d pair of an nn.Sequential as MaxPool2d -> ReLU (the same numbers: ReLU is
monotonic, so it commutes with a max) and an overlapping pool whose kernel is a multiple of its stride (HR-CelestialNet's
8/4 and 4/2) as a non-overlapping pool then a stride-1 one (also the same numbers). On a 2048 x 4096 chip this takes
the ReLU off conv1's full-resolution output (32 x 2042 x 4090 at width 1) and reads that output once instead of 16
times: those two operators took most of the bf16 forward's time before.

choose_precision picks the CPU forward's number format per machine: bf16 weights and activations where the CPU has
native bf16 matrix instructions (AMX or AVX-512 BF16, from the CPU flags), float32 elsewhere (AVX2-only CPUs such as
AMD EPYC before Zen 4 emulate bf16 and run slower than float32).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")
"""Forward precisions a predictor accepts: "auto" chooses per machine (`choose_precision`)."""
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
"""/proc/cpuinfo flags of native bf16 matrix instructions (Intel Sapphire Rapids and later: both; AMD Zen 4: the second)."""


@dataclass(frozen=True)
class Precision:
    """The forward's number format on one device and why it was chosen.

    name: "fp32" or "bf16". On CPU, bf16 means bf16 weights and activations (logits converted to float32); on CUDA,
    bf16 autocast. reason: the CPU features (or the setting) that decided it, for logs and run summaries.
    """

    name: str
    device: str
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the CPU model's weights and inputs (float32 on CUDA, where bf16 is autocast)."""
        return torch.bfloat16 if self.name == "bf16" and self.device == "cpu" else torch.float32

    @property
    def autocast(self) -> bool:
        return self.name == "bf16" and self.device != "cpu"

    def describe(self) -> str:
        return f"{self.name} on {self.device}: {self.reason}"


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where the file does not exist, e.g. macOS)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_bf16_features(flags: set[str] | None = None) -> list[str]:
    """The native bf16 matrix features this CPU has (from `cpu_flags`, else from PyTorch's own CPU checks)."""
    flags = cpu_flags() if flags is None else flags
    if flags:
        return [f for f in BF16_CPU_FLAGS if f in flags]
    found = []
    if torch.cpu._is_amx_tile_supported():
        found.append("amx_bf16")
    if torch.cpu._is_avx512_bf16_supported():
        found.append("avx512_bf16")
    return found


def choose_precision(requested: str = "auto", device: str | torch.device = "cpu", flags: set[str] | None = None) -> Precision:
    """The forward precision for `device`: `requested` unless it is "auto", which means bf16 on a CPU with native bf16
    matrix instructions (`BF16_CPU_FLAGS`) or a CUDA GPU that supports bf16, float32 elsewhere.

    flags: the CPU's flags (default: this machine's `cpu_flags`).
    """
    if requested not in PRECISIONS:
        raise ValueError(f"precision is {requested!r}; expected one of {list(PRECISIONS)}")
    kind = torch.device(device).type
    if kind == "cuda":
        if requested != "auto":
            return Precision(requested, kind, "set in the configuration")
        if torch.cuda.is_bf16_supported():
            return Precision("bf16", kind, f"{torch.cuda.get_device_name()} supports bf16 autocast")
        return Precision("fp32", kind, f"{torch.cuda.get_device_name()} does not support bf16")
    features = cpu_bf16_features(flags)
    found = f"native bf16: {', '.join(features)}" if features else f"no native bf16 ({' or '.join(BF16_CPU_FLAGS)} not in the CPU flags)"
    if requested != "auto":
        return Precision(requested, kind, f"set in the configuration; CPU has {found}")
    return Precision("bf16" if features else "fp32", kind, f"CPU has {found}")


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


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _split_pool(pool: nn.MaxPool2d) -> nn.Module:
    """An overlapping MaxPool2d (kernel a multiple of the stride) as a non-overlapping pool then a stride-1 pool.

    Window [s*i, s*i + m*s) is the union of the m stride-sized blocks i .. i+m-1, so max-pooling blocks (kernel s,
    stride s) and then m neighbouring blocks (kernel m, stride 1) gives the same maxima and the same output size
    (N - m*s) // s + 1 = N // s - m + 1. Any other pool is returned as it is.
    """
    kernel, stride = _pair(pool.kernel_size), _pair(pool.stride if pool.stride is not None else pool.kernel_size)
    plain = _pair(pool.padding) == (0, 0) and _pair(pool.dilation) == (1, 1) and not pool.ceil_mode and not pool.return_indices
    if not plain or kernel == stride or any(k % s for k, s in zip(kernel, stride, strict=True)):
        return pool
    return nn.Sequential(nn.MaxPool2d(stride, stride), ShiftMaxPool2d((kernel[0] // stride[0], kernel[1] // stride[1])))


class ShiftMaxPool2d(nn.MaxPool2d):
    """A stride-1 MaxPool2d as elementwise maxima of shifted views, rows then columns: the same numbers (NaN
    propagates in both), without the pool's int64 indices. Measured on bf16 channels_last (1, 32, 9, 1022), the
    stride-1 2 x 2 pool after HR-CelestialNet's conv1 strips: 0.15 ms against 0.46 ms for max_pool2d."""

    def __init__(self, kernel_size: int | tuple[int, int]) -> None:
        super().__init__(kernel_size, stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kh, kw = _pair(self.kernel_size)
        rows, cols = x.shape[-2] - kh + 1, x.shape[-1] - kw + 1
        if rows < 1 or cols < 1:
            return super().forward(x)  # max_pool2d's own error
        out = x[..., :rows, :]
        for i in range(1, kh):
            out = torch.maximum(out, x[..., i : i + rows, :])
        result = out[..., :cols]
        for j in range(1, kw):
            result = torch.maximum(result, out[..., j : j + cols])
        return result


def pool_before_relu(model: nn.Module) -> nn.Module:
    """`model` (changed in place and returned) with each ReLU -> MaxPool2d pair of an nn.Sequential swapped to
    MaxPool2d -> ReLU and overlapping pools split (`_split_pool`). The outputs are exactly the same."""
    count = 0
    for module in list(model.modules()):
        if not isinstance(module, nn.Sequential):
            continue
        for index in range(len(module) - 1):
            relu, pool = module[index], module[index + 1]
            if isinstance(relu, nn.ReLU) and isinstance(pool, nn.MaxPool2d):
                module[index], module[index + 1] = _split_pool(pool), relu
                count += 1
    logger.debug("moved %d ReLUs after their max-pools", count)
    return model


class SplitPrecision(nn.Module):
    """A one-channel float32 image as four channels in `dtype`: [hi, hi, lo, 1], with hi = dtype(x) and
    lo = dtype(x - hi), so that hi + lo holds x to about 16 bits of mantissa in bf16 (see `split_conv`)."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hi = x.to(self.dtype)
        lo = (x - hi.to(x.dtype)).to(self.dtype)
        # stacked along a last axis: written once, already channels_last (a cat along dim 1 writes NCHW, then a copy);
        # measured on the width-1 stem, medians of 25: 196 against 199 ms a chip, the same numbers
        return torch.stack([hi, hi, lo, torch.ones_like(hi)], dim=-1).squeeze(1).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return str(self.dtype)


def split_conv(conv: nn.Conv2d, dtype: torch.dtype) -> nn.Sequential:
    """A float32 convolution of a one-channel image as one convolution in `dtype` (bf16) with float32's accuracy:
    `SplitPrecision`, then a convolution of four input channels.

    Each float32 value v is split into v = hi + lo, hi = bf16(v) and lo = bf16(v - hi): together 16 bits of mantissa
    for 8. Then x * w = hi(x) hi(w) + hi(x) lo(w) + lo(x) hi(w), up to a term about 2^-16 of the product: one
    convolution of the channels [hi(x), hi(x), lo(x), 1] with the weights [hi(w), lo(w), hi(w), lo(b)], the last at
    the kernel's centre only, so the bias hi(b) + lo(b) keeps its float32 value too. Products and sums run in bf16
    matrix units with float32 accumulation, and the output is rounded to `dtype` once. So the chip's dynamic range (a
    faint source on a sky level that the filters cancel) meets float32 accuracy at bf16 speed. Measured on an Intel Xeon
    (AMX, 2 cores): HR-CelestialNet's width-1 conv1 in row strips ran at 300-340 GFLOP/s of the one channel's
    multiply-adds (1,210-1,360 executed) against 210 in float32; the whole bf16 forward took 0.42-0.44 s a chip in
    three bench runs, 0.51-0.54 in the runs before with a float32 stem (`bench/inference.py`). Against a float32 stem
    in one process (medians of 5): width 1/2 185 against 340 ms a chip, 1/4 126 against 492, 1/8 140 against 243; at
    1/16 (two filters, where `StemConv2d`'s compiled float32 kernel runs) 136 against 134 ms, medians of 20, a tie.
    The stem's output after its pools matched the float32 stem's rounded to bf16 on 99.8% of values, within one bf16
    step everywhere; the convolution's error is about 1e-6 of its terms' magnitude, against 1e-3 for plain bf16
    (`tests/test_precision.py`), and the demo's trained model moves p_galaxy as much either way (0.0060 at most).
    """
    if conv.in_channels != 1 or conv.groups != 1 or conv.padding_mode != "zeros":
        raise ValueError(f"split_conv takes a one-channel, ungrouped, zero-padded Conv2d, not {conv}")
    w = conv.weight.detach().float()
    b = conv.bias.detach().float() if conv.bias is not None else torch.zeros(conv.out_channels, device=w.device)
    w_hi, b_hi = w.to(dtype), b.to(dtype)
    w_lo, b_lo = (w - w_hi.float()).to(dtype), (b - b_hi.float()).to(dtype)
    bias_tap = torch.zeros_like(w_hi)  # the centre tap reads a real pixel wherever padding <= kernel // 2
    bias_tap[:, 0, conv.kernel_size[0] // 2, conv.kernel_size[1] // 2] = b_lo
    four = nn.Conv2d(4, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation, bias=True)
    four.to(device=w.device, dtype=dtype).requires_grad_(False)
    with torch.no_grad():
        four.weight.copy_(torch.cat([w_hi, w_lo, w_hi, bias_tap], dim=1))
        four.bias.copy_(b_hi)
    return nn.Sequential(SplitPrecision(dtype), four)


STRIP_BYTES = 16 * 2**20
"""Size of one strip of a block's convolution output in `RowStrips` (counted as float32 bytes). Measured on an Intel Xeon
(2 cores, AMX), HR-CelestialNet's float32 stem at width 1 on a 2048 x 4096 chip: 742-769 ms whole, 456 / 329 / 283 ms
in strips of 2 / 4 / 8 pooled rows (about 4.7 / 8.4 / 19 MB of conv1 output), bit-identical."""


def _row_geometry(block: nn.Sequential) -> tuple[int, int] | None:
    """(stride, span) of a block of unpadded stride-1 convolutions, max-pools and elementwise layers along the rows:
    output row i reads input rows [stride * i, stride * i + span). None for any other block."""
    layers = [m for m in block.modules() if not isinstance(m, nn.Sequential)]
    stride, span = 1, 1
    for m in layers:
        if isinstance(m, nn.Conv2d):
            if _pair(m.stride) != (1, 1) or _pair(m.dilation) != (1, 1) or m.padding not in (0, (0, 0), "valid"):
                return None
            kernel, step = _pair(m.kernel_size)[0], 1
        elif isinstance(m, nn.MaxPool2d):
            if _pair(m.padding) != (0, 0) or _pair(m.dilation) != (1, 1) or m.ceil_mode or m.return_indices:
                return None
            kernel, step = _pair(m.kernel_size)[0], _pair(m.stride if m.stride is not None else m.kernel_size)[0]
        elif isinstance(m, (nn.ReLU, nn.Identity, SplitPrecision)):
            continue
        else:
            return None
        span += (kernel - 1) * stride
        stride *= step
    return stride, span


class RowStrips(nn.Module):
    """Runs a block over horizontal strips of its input and stacks the results: the same numbers, in cache.

    The stem's full-resolution output (32 x 2042 x 4090 float32 at width 1: 1 GiB) goes to memory and back for the
    pool when computed whole; a strip of it (`STRIP_BYTES`) stays in cache between the convolution and the pool. The
    same holds, less, for conv2 (64 x 503 x 1015); measured at width 1 in bf16 on 2 cores: 0.57-0.58 s a chip with
    conv1 in strips, 0.47-0.51 s with conv2 too, the same again with every block (smaller ones run whole).
    Output row i of the block reads input rows [stride * i, stride * i + span) (`_row_geometry`), so each strip reads
    its own rows plus span - stride more.
    """

    def __init__(self, block: nn.Sequential, stride: int, span: int, out_channels: int) -> None:
        super().__init__()
        self.block, self.stride, self.span, self.out_channels = block, stride, span, out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows_out = (x.shape[2] - self.span) // self.stride + 1
        conv_bytes_per_out_row = self.stride * x.shape[0] * x.shape[3] * self.out_channels * 4
        per_strip = max(1, STRIP_BYTES // max(1, conv_bytes_per_out_row))
        if rows_out <= per_strip:
            return self.block(x)
        parts = [
            self.block(x[:, :, self.stride * r0 : self.stride * (min(rows_out, r0 + per_strip) - 1) + self.span])
            for r0 in range(0, rows_out, per_strip)
        ]
        return torch.cat(parts, dim=2)


def in_row_strips(block: nn.Module) -> nn.Module:
    """`block` wrapped in `RowStrips` when its geometry allows (`_row_geometry`), else `block` itself."""
    geometry = _row_geometry(block) if isinstance(block, nn.Sequential) else None
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    if geometry is None or not convs:
        return block
    return RowStrips(block, *geometry, out_channels=max(c.out_channels for c in convs))


def _split_stem_conv(model: nn.Module, dtype: torch.dtype) -> None:
    """Replaces the first Conv2d of `model` that reads one channel (HR-CelestialNet's conv1; a torchvision ResNet's
    conv1) by `split_conv`'s pair; a model without one is left as it is."""
    name = next((n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.in_channels == 1), None)
    if name is not None:
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, split_conv(model.get_submodule(name), dtype))


def prepare_for_inference(
    model: nn.Module,
    device: str | torch.device = "cpu",
    channels_last: bool = True,
    fold_bn: bool = True,
    compile: bool = False,
    dtype: torch.dtype = torch.float32,
    float32_stem: bool = True,
) -> nn.Module:
    """A copy of `model` ready for prediction: eval mode, BatchNorm folded, ReLUs after their pools (`pool_before_relu`),
    on `device` in `dtype` (bf16 weights on a CPU with native bf16, `choose_precision`), optionally channels_last and
    compiled.

    float32_stem: with a `dtype` other than float32, the convolution that reads the chip's pixels runs as
        `split_conv`: in `dtype` arithmetic, with float32 accuracy. The chip's dynamic range then
        meets float32 weights, and the one rounding to bf16 is that of the convolution's output. Measured on a model
        whose last layer separates float32 features of two kinds of chip, an all-bf16 forward moved p_galaxy by up to
        0.06 and most of that came from the stem (`tests/test_precision.py`); the cost is in `bench/inference.py`.

    Inputs keep their usual (B, C, H, W) shape and come in float32 (in `dtype` where the whole model runs in it: no
    float32 stem); with channels_last they are best passed in that memory format too
    (`x.to(memory_format=torch.channels_last)`; for one channel it is the same layout). `model` is untouched.
    """
    prepared = fold_batchnorm(model) if fold_bn else copy.deepcopy(model).eval()
    prepared = pool_before_relu(prepared).to(device=device)
    if float32_stem and dtype != torch.float32:
        _split_stem_conv(prepared, dtype)
    prepared = prepared.to(dtype=dtype)
    if torch.device(device).type == "cpu" and not compile:
        for name, child in list(prepared.named_children()):  # big conv outputs stay in cache (HR-CelestialNet's blocks)
            setattr(prepared, name, in_row_strips(child))
    if channels_last:
        prepared = prepared.to(memory_format=torch.channels_last)
    if compile:
        prepared = torch.compile(prepared)
    return prepared
