"""Compiled loops over whole chips (numba): the passes that numpy can only do with temporary copies.

- `crop_offset_uint16`: stored FITS int16 rows (BZERO = 32768) -> the amps' science columns joined, as uint16 DN,
  in one pass (byte swap, sign-bit flip and join together).
- `gather_lut`: one lookup table per amp applied to uint16 pixels, indexing with the uint16 values themselves
  (numpy's ``lut[pixels]`` first widens every index to 64 bits, a copy four times the chip's size).
- `sample_histograms` + `order_statistics`: exact order statistics of a strided, per-amp bias-subtracted
  subsample of a uint16 chip, from one histogram per amp instead of a sort.

Kernels are compiled on first use in each process and cached on disk next to this module (numba's cache); where
no cache directory is writable they are compiled in memory instead, once per process. Nothing here knows about
FITS headers or configs: callers pass arrays and numbers.
"""

from __future__ import annotations

import logging

import numba
import numpy as np

logger = logging.getLogger(__name__)

N_LEVELS = 65536
"""Distinct uint16 values: the length of each amp's lookup table and histogram."""


def jit(fn=None, /, **options):
    """`numba.njit` with the on-disk cache where one can be written, without it otherwise; never holds the GIL.

    Use as ``@jit`` or ``@jit(fastmath=True)``; `options` go to `numba.njit`.
    """
    if fn is None:
        return lambda f: jit(f, **options)
    try:
        return numba.njit(cache=True, nogil=True, **options)(fn)
    except RuntimeError as exc:  # numba found no writable cache directory (read-only install and no usable home)
        logger.info("numba cache unavailable for %s (%s); compiling in memory, once per process", fn.__name__, exc)
        return numba.njit(nogil=True, **options)(fn)


@jit
def _crop_offset_uint16(stored: np.ndarray, starts: np.ndarray, width: int, swap: bool, out: np.ndarray) -> None:
    for i in range(out.shape[0]):
        src = stored[i]
        dst = out[i]
        for a in range(starts.shape[0]):
            s = src[starts[a] : starts[a] + width]
            d = dst[a * width : (a + 1) * width]
            if swap:
                for j in range(width):
                    v = s[j]
                    d[j] = ((v >> np.uint16(8)) | (v << np.uint16(8))) ^ np.uint16(0x8000)
            else:
                for j in range(width):
                    d[j] = s[j] ^ np.uint16(0x8000)


def crop_offset_uint16(stored: np.ndarray, starts: list[int], width: int) -> np.ndarray:
    """Join column blocks of stored FITS int16 values and convert them to uint16 DN (value + 32768, BZERO = 32768).

    stored: int16, either byte order (a memory-mapped FITS array is big-endian), shape (rows, raw columns).
    starts: first raw column of each block, left to right; every block is `width` columns.
    Returns uint16 DN, shape (rows, len(starts) * width). Exact: v + 32768 (mod 2**16) flips the sign bit.
    """
    if stored.dtype.kind != "i" or stored.dtype.itemsize != 2 or stored.ndim != 2:
        raise ValueError(f"stored values are {stored.dtype} with shape {stored.shape}; expected 2-D int16")
    if any(s < 0 or s + width > stored.shape[1] for s in starts):
        raise ValueError(f"column blocks {starts} of width {width} do not fit in {stored.shape[1]} columns")
    out = np.empty((stored.shape[0], len(starts) * width), np.uint16)
    swap = not stored.dtype.isnative
    _crop_offset_uint16(stored.view(np.uint16), np.asarray(starts, np.int64), width, swap, out)
    return out


@jit
def _offset_uint16_median(stored: np.ndarray, start: int, stop: int, swap: bool) -> float:
    lowest, highest = 65535, 0
    for i in range(stored.shape[0]):  # the range of levels first, so that the histogram is as small as the data
        for j in range(start, stop):
            v = np.int64(stored[i, j])
            if swap:
                v = ((v >> 8) | (v << 8)) & 0xFFFF
            v ^= 0x8000
            lowest, highest = min(lowest, v), max(highest, v)
    hist = np.zeros(highest - lowest + 1, np.int64)
    for i in range(stored.shape[0]):
        for j in range(start, stop):
            v = np.int64(stored[i, j])
            if swap:
                v = ((v >> 8) | (v << 8)) & 0xFFFF
            hist[(v ^ 0x8000) - lowest] += 1
    n = stored.shape[0] * (stop - start)
    below, low = 0, -1
    for level in range(hist.shape[0]):  # the middle value, or the mean of the middle two (as np.median)
        below += hist[level]
        if low < 0 and below > (n - 1) // 2:
            low = level
        if below > n // 2:
            return (low + level) / 2 + lowest
    return np.nan


def offset_uint16_median(stored: np.ndarray, start: int, stop: int) -> float:
    """Median (DN, as `np.median` gives it) of columns start:stop of stored FITS int16 values with BZERO = 32768.

    stored: int16, either byte order, shape (rows, raw columns), e.g. the rows of a chip whose prescan is
    columns 0:24. Counts the levels instead of copying, converting and partitioning the block.
    """
    if stored.dtype.kind != "i" or stored.dtype.itemsize != 2 or stored.ndim != 2:
        raise ValueError(f"stored values are {stored.dtype} with shape {stored.shape}; expected 2-D int16")
    if not 0 <= start < stop <= stored.shape[1] or stored.shape[0] == 0:
        raise ValueError(f"columns {start}:{stop} of {stored.shape[0]} rows are not inside {stored.shape[1]} columns")
    return float(_offset_uint16_median(stored.view(np.uint16), start, stop, not stored.dtype.isnative))


@jit
def _gather_lut(pixels: np.ndarray, luts: np.ndarray, out: np.ndarray) -> None:
    n_amps = luts.shape[0]
    width = pixels.shape[1] // n_amps
    for i in range(pixels.shape[0]):
        for a in range(n_amps):
            lut = luts[a]
            s = pixels[i, a * width : (a + 1) * width]
            d = out[i, a * width : (a + 1) * width]
            for j in range(width):
                d[j] = lut[s[j]]


def gather_lut(pixels: np.ndarray, luts: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out[:, block a] = luts[a][pixels[:, block a]]`` for equal-width column blocks, one per amp.

    pixels: uint16, shape (H, W) with W divisible by n_amps. luts: shape (n_amps, 65536), any 2- or 4-byte dtype
    (pass float16 tables as their uint16 bit patterns). out: shape (H, W), same dtype as `luts`. Returns `out`.
    """
    if pixels.dtype != np.uint16 or pixels.ndim != 2:
        raise ValueError(f"pixels are {pixels.dtype} with shape {pixels.shape}; expected 2-D uint16")
    if luts.ndim != 2 or luts.shape[1] != N_LEVELS or pixels.shape[1] % luts.shape[0]:
        raise ValueError(f"lookup tables of shape {luts.shape} do not fit pixels of shape {pixels.shape}")
    if out.shape != pixels.shape or out.dtype != luts.dtype:
        raise ValueError(f"out is {out.dtype} {out.shape}; expected {luts.dtype} {pixels.shape}")
    _gather_lut(pixels, luts, out)
    return out


@jit
def _sample_histograms(pixels: np.ndarray, step: int, n_amps: int) -> np.ndarray:
    width = pixels.shape[1] // n_amps
    hist = np.zeros((n_amps, 65536), np.int64)
    for i in range(0, pixels.shape[0], step):
        row = pixels[i]
        for a in range(n_amps):
            h = hist[a]
            first = -(-a * width // step) * step  # the first sampled column inside this amp's block
            for j in range(first, (a + 1) * width, step):
                h[row[j]] += 1
    return hist


def sample_histograms(pixels: np.ndarray, step: int, n_amps: int) -> np.ndarray:
    """Histograms of ``pixels[::step, ::step]``, one per equal-width column block: int64, shape (n_amps, 65536)."""
    if pixels.dtype != np.uint16 or pixels.ndim != 2 or pixels.shape[1] % n_amps:
        raise ValueError(f"pixels are {pixels.dtype} with shape {pixels.shape}; expected 2-D uint16 in {n_amps} equal amps")
    return _sample_histograms(pixels, max(1, int(step)), n_amps)


@jit
def _order_statistics(hist: np.ndarray, offsets: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    n_amps = hist.shape[0]
    values = np.empty(ranks.shape[0], np.float32)
    pos = np.zeros(n_amps, np.int64)  # next level to visit, per amp
    seen = 0  # sample values below the current one
    r = 0
    while r < ranks.shape[0]:
        best, best_value = -1, np.float32(0)
        for a in range(n_amps):  # the amp whose next non-empty level has the smallest bias-subtracted value
            while pos[a] < hist.shape[1] and hist[a, pos[a]] == 0:
                pos[a] += 1
            if pos[a] < hist.shape[1]:
                v = np.float32(pos[a]) - offsets[a]
                if best < 0 or v < best_value:
                    best, best_value = a, v
        if best < 0:
            break
        seen += hist[best, pos[best]]
        while r < ranks.shape[0] and ranks[r] < seen:
            values[r] = best_value
            r += 1
        pos[best] += 1
    return values


def order_statistics(hist: np.ndarray, offsets: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """The values at 0-based `ranks` (ascending) of the sorted union of ``level - offsets[a]`` over every amp's histogram.

    hist: int64 (n_amps, 65536) counts per uint16 level; offsets: float32 (n_amps,), subtracted in float32 (as a
    float32 sample minus its amp's bias would be). Returns float32 (len(ranks),).
    """
    ranks = np.asarray(ranks, np.int64)
    total = int(hist.sum())
    if ranks.size and (ranks[0] < 0 or ranks[-1] >= total or np.any(np.diff(ranks) < 0)):
        raise ValueError(f"ranks {ranks.tolist()} must be ascending and within 0..{total - 1}")
    return _order_statistics(hist, np.asarray(offsets, np.float32), ranks)
