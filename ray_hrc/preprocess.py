"""Chip -> normalised model input. One function, used by training, batch classification and Serve.

Raw chips arrive as uint16 DN with one bias level per amplifier. Normalisation subtracts each amp's bias, clips
to robust percentiles estimated on a strided subsample, and applies an asinh stretch (astronomical images span
five decades; a linear scale leaves faint structure at zero). For uint16 input all of that is one 65,536-entry
lookup table per amp, so the cost is one gather over the chip whatever the stretch.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import cv2
import numpy as np

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
    """(lo, hi) in bias-subtracted DN (or electrons): the clipping percentiles, from a strided subsample."""
    step = max(1, cfg.sample_step)
    sample = pixels[::step, ::step].astype(np.float32)
    for block, bias in zip(_amp_blocks(pixels.shape[1], len(amp_bias)), amp_bias, strict=True):
        cols = slice(-(-block.start // step), -(-block.stop // step))
        sample[:, cols] -= bias
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(sample, [cfg.lo_percentile, cfg.hi_percentile])
    if not hi > lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def normalise(pixels: np.ndarray, amp_bias: np.ndarray | None = None, cfg: NormConfig = NormConfig()) -> np.ndarray:
    """Bias-subtract, clip and stretch one chip.

    pixels: uint16 DN or float32, shape (H, W) (2048, 4096 for LCID). amp_bias: DN per equal-width column block,
    shape (n_amps,); None or zeros for calibrated chips. Returns float32 in [0, 1], shape (H, W), or
    `cfg.resize` when set; dtype `cfg.dtype`. NaNs (calibrated products) become 0.
    """
    if pixels.ndim != 2:
        raise ValueError(f"chip has shape {pixels.shape}; expected (rows, cols)")
    amp_bias = np.zeros(1, np.float32) if amp_bias is None or len(amp_bias) == 0 else np.asarray(amp_bias, np.float32)
    lo, hi = clip_levels(pixels, amp_bias, cfg)
    scale = np.float32(1.0 / (hi - lo))
    dtype = np.dtype(cfg.dtype)
    blocks = _amp_blocks(pixels.shape[1], len(amp_bias))
    if pixels.dtype == np.uint16:
        out = np.empty(pixels.shape, dtype)
        levels = np.arange(65536, dtype=np.float32)
        for block, bias in zip(blocks, amp_bias, strict=True):
            lut = _stretch((levels - np.float32(bias + lo)) * scale, cfg).astype(dtype)
            out[:, block] = lut[pixels[:, block]]
    else:
        out = np.empty(pixels.shape, np.float32)
        for block, bias in zip(blocks, amp_bias, strict=True):
            np.subtract(pixels[:, block], np.float32(bias + lo), out=out[:, block], casting="unsafe")
        np.nan_to_num(out, copy=False, nan=0.0, posinf=hi - lo, neginf=0.0)
        out *= scale
        out = _stretch(out, cfg).astype(dtype, copy=False)
    if cfg.resize is not None:
        out = resize(out.astype(np.float32, copy=False), cfg.resize).astype(dtype, copy=False)
    return out


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
    """
    out = {k: v for k, v in row.items() if k not in ("pixels", "amp_bias")}
    if row.get("error_class"):
        out["image"] = np.zeros((0, 0), np.dtype(cfg.dtype))
        out["preprocess_ms"] = 0.0
        return out
    t0 = time.perf_counter()
    out["image"] = normalise(row["pixels"], row["amp_bias"], cfg)
    out["preprocess_ms"] = (time.perf_counter() - t0) * 1e3 + float(row.get("read_ms", 0.0))
    return out
