"""Resume planning and consolidation at survey scale (issue 14): synthetic part rows, no pixels, 10k / 100k / 1M chips.

For each size N the parent writes a run folder as `ray-hrc classify` leaves it: N chip rows (every catalog column,
1% error rows) in parts of ``part_rows`` rows under ``_parts`` with the driver's index segments (one per 50,000
rows). Then a fresh Python process per size, which imports `ray_hrc.classify` as the classify driver does, times

- resume planning: `ray_hrc.parts.load_index` + `best_rows` + `done_rows` + `ray_hrc.classify.plan_resume` against
  the run's N/2 files (every file done: nothing to plan, every key checked);
- consolidation: `ray_hrc.classify.consolidate` into ``catalog.parquet`` and ``errors.parquet``;

and reports its peak resident memory (``ru_maxrss``) and its resident memory after the imports. For comparison, at
10k and 100k chips only, the same process shape for the path this replaced: every part read into pandas and
concatenated (once; the old driver did it three times per run).

    python bench/consolidate.py --sizes 10000,100000,1000000 [--workdir DIR]     # prints JSON
    python bench/run.py --sections consolidate --merge-into bench/results.json  # the bench's section
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIZES = (10_000, 100_000, 1_000_000)
LEGACY_UP_TO = 100_000


def write_run(root: Path, n_chips: int, part_rows: int = 256, seed: int = 0) -> None:
    """A run folder of `n_chips` synthetic rows (2 chips a file, 1% error rows), parts and index as a run writes them."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ray_hrc.parts import PARTS, index_of, write_index_segment

    rng = np.random.default_rng(seed)
    parts_root = root / PARTS
    parts_root.mkdir(parents=True, exist_ok=True)
    files = np.arange(n_chips) // 2
    obsid = np.char.add("j", np.char.zfill(files.astype(str), 8))
    prefix = np.char.add(np.char.add("s3://stpubdata/hst/public/", np.char.add(np.char.add(obsid, "/"), obsid)), "_raw.fits")
    error = rng.random(n_chips) < 0.01
    p = rng.random(n_chips)
    columns = {
        "uri": prefix,
        "obsid": obsid,
        "hdu": np.where(np.arange(n_chips) % 2 == 0, 1, 4),
        "extver": np.where(np.arange(n_chips) % 2 == 0, 1, 2),
        "ccdchip": np.where(np.arange(n_chips) % 2 == 0, 2, 1),
        "instrument": np.where(error, "", "ACS/WFC"),
        "detector": np.where(error, "", "WFC"),
        "product": np.where(error, "", "raw"),
        "filter": np.where(error, "", "F814W"),
        "exptime": np.where(error, np.nan, 507.0),
        "targname": np.where(error, "", "NGC-1234"),
        "date_obs": np.where(error, "", "2010-05-01T12:00:00"),
        "ra": np.where(error, np.nan, rng.uniform(0, 360, n_chips)),
        "dec": np.where(error, np.nan, rng.uniform(-90, 90, n_chips)),
        "radec_from_targ": np.zeros(n_chips, bool),
        "body": np.where(error, "", "NGC 1234"),
        "label_true": np.where(error, "", "galaxy"),
        "error_class": np.where(error, "truncated", ""),
        "error": np.where(error, "SCI,2 (HDU 4): the file ends early (truncated)", ""),
        "n_in_file": np.full(n_chips, 2),
        "label": np.where(error, "", np.where(p > 0.5, "galaxy", "NSC")),
        "p_galaxy": np.where(error, np.nan, p),
        "p_nsc": np.where(error, np.nan, 1 - p),
        "model": np.where(error, "", "hrcelestialnet"),
        "checkpoint": np.full(n_chips, "0123456789abcdef"),
        "preprocess_ms": rng.uniform(5, 10, n_chips),
        "classify_ms": rng.uniform(100, 200, n_chips),
        "checkpoint_id": np.full(n_chips, "0123456789abcdef-01234567"),
    }
    table = pa.table(columns)
    segment = []
    for i, start in enumerate(range(0, n_chips, part_rows)):
        name = f"part-bench-{i:07d}.parquet"
        part = table.slice(start, part_rows)
        pq.write_table(part, parts_root / name)
        segment.append(index_of(part, name))
        if sum(t.num_rows for t in segment) >= 50_000:
            write_index_segment(_fs(), str(parts_root), pa.concat_tables(segment), f"bench-{i:07d}.parquet")
            segment = []
    if segment:
        write_index_segment(_fs(), str(parts_root), pa.concat_tables(segment), "bench-last.parquet")


def _fs():
    import fsspec

    return fsspec.filesystem("file")


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(root: Path, n_chips: int, legacy: bool) -> dict:
    """One measurement in this (fresh) process: resume planning and consolidation, or the old pandas path."""
    import pandas as pd

    import ray_hrc.classify as classify
    from ray_hrc.parts import PARTS, best_rows, done_rows, load_index

    files = pd.DataFrame({"uri": [f"s3://stpubdata/hst/public/j{i:08d}/j{i:08d}_raw.fits" for i in range(n_chips // 2)]})
    files = files.assign(hdus=[[1, 4]] * len(files))
    after_imports = _current_rss_mib()
    if legacy:
        t0 = time.perf_counter()
        frames = [pd.read_parquet(p) for p in sorted((root / PARTS).glob("part-*.parquet"))]
        rows = pd.concat(frames, ignore_index=True).drop_duplicates(["uri", "hdu"])
        rows[rows["error_class"] == ""].sort_values(["uri", "hdu"]).to_parquet(root / "legacy_catalog.parquet", index=False)
        return {"legacy_one_pass_s": time.perf_counter() - t0, "rss_after_imports_mib": after_imports, "peak_rss_mib": _rss_mib()}
    t0 = time.perf_counter()
    index = load_index(_fs(), str(root / PARTS))
    planned = classify.plan_resume(files, done_rows(best_rows(index)))
    t1 = time.perf_counter()
    summary = classify.consolidate(index, str(root), "parquet")
    t2 = time.perf_counter()
    return {
        "resume_planning_s": t1 - t0,
        "consolidate_s": t2 - t1,
        "files_left_to_plan": len(planned),
        "catalog_rows": summary["chips"],
        "error_rows": summary["failed"],
        "parts": int(index["part"].nunique()),
        "rss_after_imports_mib": after_imports,
        "peak_rss_mib": _rss_mib(),
    }


def measure(workdir: Path, sizes=SIZES, part_rows: int = 256) -> dict:
    """Every size, each measured in its own process; returns the section's result (figures at the largest size)."""
    out: dict = {"sizes": {}, "part_rows": part_rows}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    for n in sizes:
        root = workdir / f"consolidate_{n}"
        t0 = time.perf_counter()
        write_run(root, n, part_rows)
        row: dict = {"write_s": time.perf_counter() - t0}
        kinds = ["new", "legacy"] if n <= LEGACY_UP_TO else ["new"]
        for kind in kinds:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(root), "--chips", str(n)] + (
                ["--legacy"] if kind == "legacy" else []
            )
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"{kind} measurement at {n} chips failed: {proc.stderr[-2000:]}")
            row[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
        out["sizes"][str(n)] = row
    largest = out["sizes"][str(max(sizes))]["new"]
    out["consolidate_1m_s"] = largest["resume_planning_s"] + largest["consolidate_s"] if max(sizes) == 1_000_000 else None
    out["consolidate_1m_driver_rss_mib"] = largest["peak_rss_mib"] if max(sizes) == 1_000_000 else None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--part-rows", type=int, default=256)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--chips", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--legacy", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(Path(args.child), args.chips, args.legacy)))
        return 0
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ray_hrc_consolidate_") as tmp:
        result = measure(Path(args.workdir or tmp), tuple(int(s) for s in args.sizes.split(",")), args.part_rows)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
