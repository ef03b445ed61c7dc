"""Preprocessing speed on one core: read + crop + bias + normalise, ms per chip, against a naive version.

The naive version is what a first script does: astropy's scaled read of the whole HDU to float, crop, bias from
the prescan, percentile clipping with np.percentile over all pixels, asinh stretch. The project's path is what
batch classification and Serve run per file (`ray_hrc.data.chip_rows`): `ray_hrc.chips.read_fits` (headers walked
without astropy's per-HDU objects, the chip's rows memory-mapped, amps joined as uint16 in one compiled pass) +
`ray_hrc.preprocess.preprocess_row` (`normalise`: percentiles from per-amp histograms, one lookup table per amp
applied by a compiled loop, written over the chip's own buffer). Both run on the same files, already in the page
cache, pinned to one core, one pass of each after the other in every repeat. The compiled loops are compiled (or
loaded from numba's cache) before timing; `jit_cost` measures that once-per-process cost on its own.

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
    from ray_hrc.preprocess import NormConfig, preprocess_row

    cfg = NormConfig()
    t0 = time.process_time()
    chips = [c for c in read_fits(path) if isinstance(c, Chip)]
    t1 = time.process_time()
    out = [preprocess_row(c.to_row(), cfg)["image"] for c in chips]
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

    ``read_fits`` per chip, and inside it: ``map_fits`` (walk the headers, parse the primary and SCI ones, map the
    data), ``crop_sci`` (the chip's rows, amps joined as uint16 by ``crop_kernel``, prescan medians) and the WCS of
    the chip centre. ``normalise`` (into a new array), and inside it: the clip levels (histograms of the strided
    subsample), the lookup tables of all amps, and the compiled gather. For comparison, the numpy gather
    ``lut[pixels]`` the project used before, and the widening of the uint16 indices that numpy starts it with.
    """
    from ray_hrc import kernels
    from ray_hrc.chips import Chip, chip_centre_radec, crop_sci, map_fits, read_fits
    from ray_hrc.layouts import find_layout
    from ray_hrc.preprocess import NormConfig, _luts, clip_levels, normalise

    cfg = NormConfig()
    chip = next(c for c in read_fits(path) if isinstance(c, Chip))
    pixels, bias = chip.pixels, chip.amp_bias
    lo, hi = clip_levels(pixels, bias, cfg)
    luts = _luts(bias, lo, hi, cfg)
    bits = luts.view(np.uint16)

    def cpu_ms(fn) -> float:
        runs = []
        for _ in range(repeats):
            t0 = time.process_time()
            fn()
            runs.append((time.process_time() - t0) * 1e3)
        return statistics.median(runs)

    primary, scis = map_fits(path)
    index, hdu = scis[0]
    sci = hdu.header
    layout = find_layout(primary["INSTRUME"], primary["DETECTOR"], (sci["NAXIS2"], sci["NAXIS1"]))
    extver = int(sci.get("EXTVER", 1))
    geom = layout.chips[extver]
    rows = hdu.section[geom.rows, :]
    starts = [a.science.start for a in geom.amps]
    width = geom.amps[0].science.stop - starts[0]
    n_chips = sum(isinstance(c, Chip) for c in read_fits(path))
    return {
        "read_fits_per_chip": cpu_ms(lambda: read_fits(path)) / n_chips,
        "map_fits_per_chip": cpu_ms(lambda: map_fits(path)) / n_chips,
        "crop_sci": cpu_ms(lambda: crop_sci(hdu, layout, extver, where=path)),
        "crop_kernel": cpu_ms(lambda: kernels.crop_offset_uint16(rows, starts, width)),
        "wcs_centre": cpu_ms(lambda: chip_centre_radec(sci, layout, extver, primary)),
        "normalise": cpu_ms(lambda: normalise(pixels, bias, cfg)),
        "clip_levels": cpu_ms(lambda: clip_levels(pixels, bias, cfg)),
        "luts_all_amps": cpu_ms(lambda: _luts(bias, lo, hi, cfg)),
        "gather_kernel": cpu_ms(lambda: kernels.gather_lut(pixels, bits, np.empty(pixels.shape, np.uint16))),
        "numpy_gather_lut[pixels]": cpu_ms(lambda: luts[0][pixels]),
        "numpy_widen_uint16_to_intp": cpu_ms(lambda: pixels.astype(np.intp)),
    }


JIT_PROBE = """
import json, sys, time
c0 = time.process_time()
import ray_hrc.chips, ray_hrc.preprocess
from bench.preprocess import fast_chips
c1 = time.process_time()
fast_chips(sys.argv[1])
c2 = time.process_time()
fast_chips(sys.argv[1])
c3 = time.process_time()
print(json.dumps({"import_s": c1 - c0, "first_s": c2 - c1, "warm_s": c3 - c2}))
"""


def jit_cost(path: str) -> dict[str, float]:
    """CPU seconds a fresh process pays once for the compiled loops: compiling them (empty numba cache), and loading
    them from the cache (the usual case: a second process with the same cache). Each is the first call on `path`
    minus a warm call; ``import_s`` is importing the package (astropy and numba included) in the second process."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    runs = []
    with tempfile.TemporaryDirectory(prefix="numba_cache_") as cache:
        env = {
            **os.environ,
            "NUMBA_CACHE_DIR": cache,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
        }
        for _ in range(2):
            proc = subprocess.run([sys.executable, "-c", JIT_PROBE, path], env=env, cwd=root, capture_output=True, text=True, check=True)
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return {
        "compile_s": runs[0]["first_s"] - runs[0]["warm_s"],
        "cache_load_s": runs[1]["first_s"] - runs[1]["warm_s"],
        "import_s": runs[1]["import_s"],
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
        "preprocess_jit": jit_cost(files[0]) if profile else {},
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
