"""HATS write time per 100k chips: `catalog_formats.write_table(..., "hats")` (lsdb: HEALPix partitioning, a margin
cache of 120 arcsec, the MOC) against Parquet and FITS writes of the same rows, in one process, repeats interleaved.

Rows are synthetic catalog rows (every column `classify` writes; no pixels), clustered like pointed observations:
chips within 0.05 deg of targets spread over the sky. The first HATS write (imports, numba compilation) is a warm-up
and not counted.

    flock /tmp/ray.lock python bench/hats_write.py --rows 100000,1000000 --repeats 3 --out bench/hats_write.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import contention, load_snapshot, machine_info, median  # noqa: E402
from ray_hrc.catalog_formats import write_table  # noqa: E402


def chip_rows(n: int, seed: int = 0, targets: int = 2000) -> pd.DataFrame:
    """`n` catalog rows of chips around `targets` pointings spread uniformly over the sky."""
    rng = np.random.default_rng(seed)
    t_ra = rng.uniform(0, 360, targets)
    t_dec = np.degrees(np.arcsin(rng.uniform(-1, 1, targets)))
    t = rng.integers(0, targets, n)
    p = rng.random(n)
    return pd.DataFrame(
        {
            "uri": [f"s3://archive/raw/j{i:08d}q_raw.fits" for i in range(n)],
            "obsid": [f"j{i:08d}q" for i in range(n)],
            "hdu": rng.choice([1, 4], n),
            "ccdchip": rng.choice([1, 2], n),
            "instrument": rng.choice(["ACS/WFC", "WFC3/UVIS"], n),
            "detector": rng.choice(["WFC", "UVIS"], n),
            "filter": rng.choice(["F435W", "F606W", "F814W"], n),
            "exptime": rng.uniform(100, 2000, n),
            "targname": np.char.add("TARGET-", t.astype(str)),
            "date_obs": "2014-12-24T11:11:32",
            "ra": (t_ra[t] + rng.normal(0, 0.05, n)) % 360,
            "dec": np.clip(t_dec[t] + rng.normal(0, 0.05, n), -90, 90),
            "label": np.where(p > 0.5, "galaxy", "NSC"),
            "p_galaxy": p,
            "p_nsc": 1 - p,
            "model": "hrcelestialnet",
            "checkpoint": "0123456789abcdef",
            "preprocess_ms": rng.uniform(10, 20, n),
            "classify_ms": rng.uniform(1, 5, n),
        }
    )


def timed_write(rows: pd.DataFrame, path: Path, fmt: str) -> float:
    t0 = time.perf_counter()
    write_table(rows, str(path), fmt)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="100000,1000000", help="comma-separated catalog sizes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "hats_write.json"))
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.rows.split(",")]
    work = Path(tempfile.mkdtemp(prefix="hats_bench_"))
    start = load_snapshot()
    try:
        timed_write(chip_rows(2000, seed=99), work / "warmup.hats", "hats")
        results = {}
        for n in sizes:
            rows = chip_rows(n)
            times: dict[str, list[float]] = {"hats": [], "parquet": [], "fits": []}
            for r in range(args.repeats):
                for fmt, ext in (("hats", "hats"), ("parquet", "parquet"), ("fits", "fits")):
                    times[fmt].append(timed_write(rows, work / f"c{n}_{r}.{ext}", fmt))
                shutil.rmtree(work / f"c{n}_{r}.hats", ignore_errors=True)
            hats = median(times["hats"])
            results[str(n)] = {
                "times_s": times,
                "hats_s": hats,
                "hats_s_per_100k": hats * 1e5 / n,
                "hats_over_parquet": hats / median(times["parquet"]),
                "hats_over_fits": hats / median(times["fits"]),
            }
            print(f"{n} rows: HATS {hats:.2f} s (runs {', '.join(f'{t:.2f}' for t in times['hats'])}), "
                  f"{hats * 1e5 / n:.2f} s per 100k chips; Parquet {median(times['parquet']):.2f} s, FITS {median(times['fits']):.2f} s")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    record = {
        "command": "flock /tmp/ray.lock python bench/hats_write.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(),
        "contention": contention(start, load_snapshot()),
        "repeats": args.repeats,
        "results": results,
        "hats_write_s_per_100k": median([v["hats_s_per_100k"] for v in results.values()]),
    }
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"HATS write: {record['hats_write_s_per_100k']:.2f} s per 100k chips (median over sizes) -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
