"""Preprocessing speed on one core: read + crop + bias + normalise, ms per chip, against a naive version.

The naive version is what a first script does: astropy's scaled read of the whole HDU to float, crop, bias from
the prescan, percentile clipping with np.percentile over all pixels, asinh stretch. The project's path is
`ray_hrc.chips.read_fits` (memory-mapped, only the chip's rows, uint16 kept) + `ray_hrc.preprocess.normalise`
(one lookup table per amp). Both run on the same files, already in the page cache, pinned to one core, one pass
of each after the other in every repeat.

Each pass is timed twice: by the process's CPU time (user + system) and by the wall clock. On a machine other
people use, the wall clock of a single-threaded process pinned to one core counts the time it waited for that
core; the CPU time does not, so it is the per-chip figure reported. Both are in the output.

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


def fast_chips(path: str, split: dict[str, float] | None = None) -> list[np.ndarray]:
    """The project's path. With `split`, adds the CPU seconds of reading (``read``) and normalising (``normalise``)."""
    from ray_hrc.chips import Chip, read_fits
    from ray_hrc.preprocess import NormConfig, normalise

    cfg = NormConfig()
    t0 = time.process_time()
    chips = [c for c in read_fits(path) if isinstance(c, Chip)]
    t1 = time.process_time()
    out = [normalise(c.pixels, c.amp_bias, cfg) for c in chips]
    if split is not None:
        split["read"] = split.get("read", 0.0) + t1 - t0
        split["normalise"] = split.get("normalise", 0.0) + time.process_time() - t1
    return out


def time_pass(fn, files: list[str], **kwargs) -> tuple[float, float, int]:
    """One pass of `fn` over `files`: (CPU ms per chip, wall ms per chip, chips)."""
    c0, w0 = time.process_time(), time.perf_counter()
    n = sum(len(fn(f, **kwargs)) for f in files)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    return cpu * 1e3 / n, wall * 1e3 / n, n


def profile_fast(files: list[str], top: int = 8) -> list[dict]:
    """The functions the project's path spends its CPU time in (cProfile on the CPU clock), largest first."""
    import cProfile
    import pstats

    profiler = cProfile.Profile(time.process_time)
    profiler.enable()
    chips = sum(len(fast_chips(f)) for f in files)
    profiler.disable()
    stats = pstats.Stats(profiler).stats
    rows = []
    for (filename, line, name), (_, calls, tottime, cumtime, _) in stats.items():
        where = f"{Path(filename).parent.name}/{Path(filename).name}:{line}({name})" if filename != "~" else name
        rows.append(
            {"function": where, "calls": calls, "self_ms_per_chip": tottime * 1e3 / chips, "cum_ms_per_chip": cumtime * 1e3 / chips}
        )
    rows.sort(key=lambda r: r["self_ms_per_chip"], reverse=True)
    return rows[:top]


def breakdown(path: str, repeats: int = 5) -> dict[str, float]:
    """CPU ms of the pieces of the project's path on the first chip of `path` (median of `repeats`).

    ``read_fits`` (open and parse the headers; ``crop_sci``: the chip's rows, the amps' columns joined, uint16
    conversion, prescan medians; the WCS of the chip centre) and, inside ``normalise``: the clip levels (percentiles
    of the strided subsample), the lookup tables, the gather ``lut[pixels]``, and for comparison the widening of the
    uint16 pixels to the platform's index type that a numpy gather with uint16 indices starts with.
    """
    from ray_hrc.chips import Chip, chip_centre_radec, read_fits
    from ray_hrc.preprocess import NormConfig, _stretch, clip_levels, normalise

    cfg = NormConfig()
    chip = next(c for c in read_fits(path) if isinstance(c, Chip))
    pixels, bias = chip.pixels, chip.amp_bias
    lut = _stretch(np.arange(65536, dtype=np.float32) / 65536, cfg).astype(cfg.dtype)

    def cpu_ms(fn) -> float:
        runs = []
        for _ in range(repeats):
            t0 = time.process_time()
            fn()
            runs.append((time.process_time() - t0) * 1e3)
        return statistics.median(runs)

    from ray_hrc.chips import crop_sci, open_fits
    from ray_hrc.layouts import find_layout

    def headers() -> None:
        with open_fits(path) as hdul:
            for hdu in hdul:
                hdu.header.get("EXTNAME")

    with open_fits(path) as hdul:
        hdu, primary = hdul[1], hdul[0].header
        sci = hdu.header
        layout = find_layout(primary["INSTRUME"], primary["DETECTOR"], (sci["NAXIS2"], sci["NAXIS1"]))
        extver = int(sci.get("EXTVER", 1))
        wcs_ms = cpu_ms(lambda: chip_centre_radec(sci, layout, extver, primary))
        crop_ms = cpu_ms(lambda: crop_sci(hdu, layout, extver, where=path))
    n_chips = sum(isinstance(c, Chip) for c in read_fits(path))
    return {
        "read_fits_per_chip": cpu_ms(lambda: read_fits(path)) / n_chips,
        "open_and_parse_headers_per_chip": cpu_ms(headers) / n_chips,
        "crop_sci": crop_ms,
        "wcs_centre": wcs_ms,
        "normalise": cpu_ms(lambda: normalise(pixels, bias, cfg)),
        "clip_levels": cpu_ms(lambda: clip_levels(pixels, bias, cfg)),
        "lut_build_per_amp": cpu_ms(lambda: _stretch(np.arange(65536, dtype=np.float32) / 65536, cfg).astype(cfg.dtype)),
        "gather_lut[pixels]": cpu_ms(lambda: lut[pixels]),
        "widen_uint16_to_intp": cpu_ms(lambda: pixels.astype(np.intp)),
    }


def measure(files: list[str], repeats: int = 3, profile: bool = True) -> dict:
    """Both paths over `files` (already in the page cache after the first touch), `repeats` interleaved passes each."""
    for f in files:  # into the page cache
        Path(f).read_bytes()
    fast_chips(files[0])
    naive_chips(files[0])
    fast_cpu, fast_wall, naive_cpu, naive_wall, splits = [], [], [], [], []
    for _ in range(repeats):
        split: dict[str, float] = {}
        cpu, wall, n = time_pass(fast_chips, files, split=split)
        fast_cpu.append(cpu)
        fast_wall.append(wall)
        splits.append({k: v * 1e3 / n for k, v in split.items()})
        cpu, wall, _ = time_pass(naive_chips, files)
        naive_cpu.append(cpu)
        naive_wall.append(wall)
    agree = max(float(np.abs(a.astype(np.float32) - b).max()) for a, b in zip(fast_chips(files[0]), naive_chips(files[0]), strict=True))
    fast, naive = statistics.median(fast_cpu), statistics.median(naive_cpu)
    return {
        "preprocess_ms_per_chip": fast,
        "preprocess_naive_ms_per_chip": naive,
        "preprocess_speedup": naive / fast,
        "preprocess_wall_ms_per_chip": statistics.median(fast_wall),
        "preprocess_naive_wall_ms_per_chip": statistics.median(naive_wall),
        "preprocess_wall_speedup": statistics.median(naive_wall) / statistics.median(fast_wall),
        "preprocess_runs_ms": fast_cpu,
        "preprocess_naive_runs_ms": naive_cpu,
        "preprocess_wall_runs_ms": fast_wall,
        "preprocess_naive_wall_runs_ms": naive_wall,
        "preprocess_read_ms_per_chip": statistics.median(s["read"] for s in splits),
        "preprocess_normalise_ms_per_chip": statistics.median(s["normalise"] for s in splits),
        "preprocess_max_abs_diff_vs_naive": agree,
        "preprocess_profile": profile_fast(files) if profile else [],
        "preprocess_breakdown_ms": breakdown(files[0]) if profile else {},
        "files": len(files),
        "chips": n,
        "repeats": repeats,
        "clock": "process CPU time (user + system), one core",
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
