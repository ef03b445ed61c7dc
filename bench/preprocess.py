"""Preprocessing speed on one core: read + crop + bias + normalise, ms per chip, against a naive version.

The naive version is what a first script does: astropy's scaled read of the whole HDU to float, crop, bias from
the prescan, percentile clipping with np.percentile over all pixels, asinh stretch. The project's path is
`ray_hrc.chips.read_fits` (memory-mapped, only the chip's rows, uint16 kept) + `ray_hrc.preprocess.normalise`
(one lookup table per amp). Both run on the same files, already in the page cache, pinned to one core.

    python bench/preprocess.py [--files N] [--repeats R]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def pin_one_core() -> None:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})


def naive_chips(path: str) -> list[np.ndarray]:
    """The reference a first script would write: full scaled float read, np.percentile over all pixels."""
    from astropy.io import fits

    from ray_hrc.chips import _str
    from ray_hrc.layouts import find_layout

    out = []
    with fits.open(path, memmap=False) as hdul:
        primary = hdul[0].header
        for hdu in hdul[1:]:
            if hdu.header.get("EXTNAME") != "SCI":
                continue
            data = hdu.data.astype(np.float32)  # the whole HDU, scaled to float
            layout = find_layout(_str(primary, "INSTRUME"), _str(primary, "DETECTOR"), data.shape)
            geom = layout.chips[int(hdu.header["EXTVER"])]
            blocks = []
            for amp in geom.amps:
                block = data[geom.rows, amp.science] - np.median(data[geom.rows, amp.prescan])
                blocks.append(block)
            chip = np.concatenate(blocks, axis=1)
            lo, hi = np.percentile(chip, [0.5, 99.5])
            v = np.clip((chip - lo) / (hi - lo), 0, 1)
            out.append(np.arcsinh(10 * v) / np.arcsinh(10))
    return out


def fast_chips(path: str) -> list[np.ndarray]:
    from ray_hrc.chips import Chip, read_fits
    from ray_hrc.preprocess import NormConfig, normalise

    cfg = NormConfig()
    return [normalise(c.pixels, c.amp_bias, cfg) for c in read_fits(path) if isinstance(c, Chip)]


def time_per_chip(fn, files: list[str], repeats: int) -> tuple[float, list[float]]:
    """Median over `repeats` passes of (seconds per pass / chips per pass), in ms; plus every pass's figure."""
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = sum(len(fn(f)) for f in files)
        runs.append((time.perf_counter() - t0) * 1e3 / n)
    return statistics.median(runs), runs


def measure(files: list[str], repeats: int = 3) -> dict:
    for f in files:  # into the page cache
        Path(f).read_bytes()
    fast_chips(files[0])
    naive_chips(files[0])
    fast, fast_runs = time_per_chip(fast_chips, files, repeats)
    naive, naive_runs = time_per_chip(naive_chips, files, repeats)
    agree = max(float(np.abs(a.astype(np.float32) - b).max()) for a, b in zip(fast_chips(files[0]), naive_chips(files[0]), strict=True))
    return {
        "preprocess_ms_per_chip": fast,
        "preprocess_naive_ms_per_chip": naive,
        "preprocess_speedup": naive / fast,
        "preprocess_runs_ms": fast_runs,
        "preprocess_naive_runs_ms": naive_runs,
        "preprocess_max_abs_diff_vs_naive": agree,
        "files": len(files),
        "repeats": repeats,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    pin_one_core()
    from ray_hrc.synth import synthesize_archive

    with tempfile.TemporaryDirectory() as d:
        manifest = synthesize_archive(d, bodies=2, seed=3, files_per_body=(args.files // 2, args.files // 2), workers=1)
        files = sorted(str(p) for p in manifest.parent.glob("*_raw.fits"))[: args.files]
        print(json.dumps(measure(files, args.repeats), indent=2))


if __name__ == "__main__":
    main()
