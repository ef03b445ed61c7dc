"""Chip -> normalised model input. One function, used by training, batch classification and Serve.

Raw chips arrive as uint16 DN with one bias level per amplifier. Normalisation subtracts each amp's bias, clips
to robust percentiles estimated on a strided subsample, and applies an asinh stretch (astronomical images span
five decades; a linear scale leaves faint structure at zero). For uint16 input all of that is one 65,536-entry
lookup table per amp, so the cost is one gather over the chip whatever the stretch: a compiled loop
(`ray_hrc.kernels.gather_lut`) that indexes with the uint16 values themselves and writes the output dtype's bit
patterns. The percentiles of a uint16 chip come from per-amp histograms of the subsample (exact order statistics,
interpolated as `np.percentile` does), so no sort is needed either.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import cv2
import numpy as np

from ray_hrc import kernels

RESIZE_SHAPE = (224, 448)
"""LCID-Resize input: rows x columns, as the paper's cv2.resize to 224 x 448."""


@dataclass(frozen=True)
class NormConfig:
    """How a chip becomes a float32 image in [0, 1]."""

    lo_percentile: float = 0.5  # pixels at or below this percentile of the bias-subtracted chip map to 0
    hi_percentile: float = 99.5  # pixels at or above this percentile map to 1
    stretch: str = "asinh"  # "asinh" or "linear"
    asinh_softening: float = 10.0  # a in asinh(a*v)/asinh(a): larger lifts faint structure more
    sample_step: int = 8  # percentiles are estimated on every n-th row and column (n*n fewer pixels)
    resize: tuple[int, int] | None = None  # (rows, cols) to resize to with cv2 INTER_AREA, e.g. (224, 448); None keeps full resolution
    dtype: str = "float16"  # output dtype: float16 halves memory traffic and object-store bytes (the model computes in float32/bf16)

    def __post_init__(self) -> None:
        if self.stretch not in ("asinh", "linear"):
            raise ValueError(f"stretch is {self.stretch!r}; expected 'asinh' or 'linear'")
        if not 0 <= self.lo_percentile < self.hi_percentile <= 100:
            raise ValueError(f"percentiles ({self.lo_percentile}, {self.hi_percentile}) must satisfy 0 <= lo < hi <= 100")
        if self.resize is not None:
            object.__setattr__(self, "resize", tuple(int(v) for v in self.resize))
        if self.dtype not in ("float16", "float32"):
            raise ValueError(f"dtype is {self.dtype!r}; expected 'float16' or 'float32'")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> NormConfig:
        return cls(**(d or {}))


def _stretch(v: np.ndarray, cfg: NormConfig) -> np.ndarray:
    np.clip(v, 0.0, 1.0, out=v)
    if cfg.stretch == "asinh":
        a = np.float32(cfg.asinh_softening)
        np.multiply(v, a, out=v)
        np.arcsinh(v, out=v)
        np.multiply(v, np.float32(1.0 / np.arcsinh(a)), out=v)
    return v


def _amp_blocks(width: int, n_amps: int) -> list[slice]:
    if n_amps < 1 or width % n_amps:
        raise ValueError(f"chip of width {width} cannot be split into {n_amps} equal amps")
    w = width // n_amps
    return [slice(i * w, (i + 1) * w) for i in range(n_amps)]


def clip_levels(pixels: np.ndarray, amp_bias: np.ndarray, cfg: NormConfig) -> tuple[float, float]:
    """(lo, hi) in bias-subtracted DN (or electrons): the clipping percentiles, from a strided subsample.

    The subsample is ``pixels[::step, ::step]`` as float32 minus each amp's bias; the percentiles are numpy's
    default (linear) ones of it. uint16 chips get them from per-amp histograms, the same numbers without a sort.
    """
    step = max(1, cfg.sample_step)
    blocks = _amp_blocks(pixels.shape[1], len(amp_bias))
    if pixels.dtype == np.uint16:
        hist = kernels.sample_histograms(pixels, step, len(amp_bias))
        n = int(hist.sum())
        if n == 0:
            return 0.0, 1.0
        at = [q / 100 * (n - 1) for q in (cfg.lo_percentile, cfg.hi_percentile)]  # np.percentile's fractional ranks
        below = [int(np.floor(r)) for r in at]
        ranks = sorted({r for b in below for r in (b, min(b + 1, n - 1))})
        value = dict(zip(ranks, kernels.order_statistics(hist, np.asarray(amp_bias, np.float32), ranks), strict=True))
        lo, hi = (_lerp(value[b], value[min(b + 1, n - 1)], r - b) for r, b in zip(at, below, strict=True))
    else:
        sample = pixels[::step, ::step].astype(np.float32)
        for block, bias in zip(blocks, amp_bias, strict=True):
            cols = slice(-(-block.start // step), -(-block.stop // step))
            sample[:, cols] -= bias
        sample = sample[np.isfinite(sample)]
        if sample.size == 0:
            return 0.0, 1.0
        lo, hi = np.percentile(sample, [cfg.lo_percentile, cfg.hi_percentile])
    if not hi > lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def _lerp(a: np.float32, b: np.float32, t: float) -> float:
    """`np.percentile`'s interpolation between neighbouring float32 order statistics, with its rounding."""
    diff = float(b - a)  # in float32, as numpy takes it
    return float(b) - diff * (1 - t) if t >= 0.5 else float(a) + diff * t


def _luts(amp_bias: np.ndarray, lo: float, hi: float, cfg: NormConfig) -> np.ndarray:
    """One 65,536-entry table per amp, shape (n_amps, 65536) of `cfg.dtype`: the normalised value of each uint16 DN.

    Only the levels between an amp's clip points are stretched; the rest are the stretch of 0 below and of 1 above
    (the levels computed include a margin on each side, so the table equals the formula at every level).
    """
    scale = np.float32(1.0 / (hi - lo))
    dtype = np.dtype(cfg.dtype)
    ends = _stretch(np.array([0.0, 1.0], np.float32), cfg).astype(dtype)
    luts = np.empty((len(amp_bias), kernels.N_LEVELS), dtype)
    for lut, bias in zip(luts, amp_bias, strict=True):
        offset = np.float32(bias + lo)
        first = int(min(max(np.floor(offset) - 1, 0), kernels.N_LEVELS))
        last = int(min(max(np.ceil(offset + 1.0 / scale) + 2, first), kernels.N_LEVELS))
        lut[:first] = ends[0]
        lut[first:last] = _stretch((np.arange(first, last, dtype=np.float32) - offset) * scale, cfg).astype(dtype)
        lut[last:] = ends[1]
    return luts


def normalise(
    pixels: np.ndarray, amp_bias: np.ndarray | None = None, cfg: NormConfig = NormConfig(), *, out: np.ndarray | None = None
) -> np.ndarray:
    """Bias-subtract, clip and stretch one chip.

    pixels: uint16 DN or float32, shape (H, W) (2048, 4096 for LCID). amp_bias: DN per equal-width column block,
    shape (n_amps,); None or zeros for calibrated chips. Returns values in [0, 1], shape (H, W), or `cfg.resize`
    when set; dtype `cfg.dtype`. NaNs (calibrated products) become 0.
    out: optional array for the full-resolution result, shape (H, W), dtype `cfg.dtype`. For uint16 pixels it may
    be their own buffer (``pixels.view(np.float16)``): each pixel is read before its result is written.
    """
    if pixels.ndim != 2:
        raise ValueError(f"chip has shape {pixels.shape}; expected (rows, cols)")
    if out is not None and (out.shape != pixels.shape or out.dtype != np.dtype(cfg.dtype)):
        raise ValueError(f"out is {out.dtype} {out.shape}; expected {cfg.dtype} {pixels.shape}")
    if out is not None and pixels.dtype != np.uint16 and np.shares_memory(out, pixels):
        raise ValueError(f"out shares memory with {pixels.dtype} pixels; only uint16 pixels can be normalised in place")
    amp_bias = np.zeros(1, np.float32) if amp_bias is None or len(amp_bias) == 0 else np.asarray(amp_bias, np.float32)
    if pixels.dtype.kind == "u" and pixels.dtype.itemsize == 2 and not pixels.dtype.isnative:
        pixels = pixels.astype(np.uint16)  # the compiled loops read native byte order
    lo, hi = clip_levels(pixels, amp_bias, cfg)
    scale = np.float32(1.0 / (hi - lo))
    dtype = np.dtype(cfg.dtype)
    blocks = _amp_blocks(pixels.shape[1], len(amp_bias))
    if pixels.dtype == np.uint16:
        bits = np.dtype(f"u{dtype.itemsize}")  # the kernel moves bit patterns: numba has no float16 arithmetic
        image = np.empty(pixels.shape, dtype) if out is None else out
        kernels.gather_lut(pixels, _luts(amp_bias, lo, hi, cfg).view(bits), image.view(bits))
    else:
        image = np.empty(pixels.shape, np.float32)
        for block, bias in zip(blocks, amp_bias, strict=True):
            np.subtract(pixels[:, block], np.float32(bias + lo), out=image[:, block], casting="unsafe")
        np.nan_to_num(image, copy=False, nan=0.0, posinf=hi - lo, neginf=0.0)
        image *= scale
        image = _stretch(image, cfg).astype(dtype, copy=False)
        if out is not None:
            out[...] = image
            image = out
    if cfg.resize is not None:
        image = resize(image.astype(np.float32, copy=False), cfg.resize).astype(dtype, copy=False)
    return image


def resize(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """LCID-Resize: cv2.resize with INTER_AREA to `shape` = (rows, cols), e.g. (224, 448)."""
    rows, cols = shape
    return cv2.resize(image, (cols, rows), interpolation=cv2.INTER_AREA)


def normalise_batch(pixels: np.ndarray, amp_bias: np.ndarray, cfg: NormConfig = NormConfig()) -> np.ndarray:
    """`normalise` over a batch: pixels (B, H, W), amp_bias (B, n_amps) -> (B, 1, H', W') of `cfg.dtype`."""
    return np.stack([normalise(p, b, cfg) for p, b in zip(pixels, amp_bias, strict=True)])[:, None]


def preprocess_row(row: dict, cfg: NormConfig) -> dict:
    """A chip row -> the same row with ``image`` (normalised, `cfg.dtype`) in place of ``pixels``/``amp_bias``.

    Adds ``preprocess_ms`` (normalisation time, plus the row's ``read_ms`` when it has one). Error rows (non-empty
    ``error_class``) get an empty image. Batch classification runs this in its CPU read tasks, Serve per request.
    The row is consumed: writable uint16 ``pixels`` become the float16 image in their own buffer (no second
    16 MiB array per chip), so they must not be used afterwards.
    """
    out = {k: v for k, v in row.items() if k not in ("pixels", "amp_bias")}
    if row.get("error_class"):
        out["image"] = np.zeros((0, 0), np.dtype(cfg.dtype))
        out["preprocess_ms"] = 0.0
        return out
    t0 = time.perf_counter()
    pixels = row["pixels"]
    in_place = pixels.dtype == np.uint16 and pixels.flags.writeable and np.dtype(cfg.dtype).itemsize == pixels.itemsize
    out["image"] = normalise(pixels, row["amp_bias"], cfg, out=pixels.view(cfg.dtype) if in_place else None)
    out["preprocess_ms"] = (time.perf_counter() - t0) * 1e3 + float(row.get("read_ms", 0.0))
    return out
