"""`ray-hrc crop`: raw files -> the paper's LCID samples, one 2048 x 4096 uint16 FITS image per chip.

Each chip is written as ``<obsid>_hdu<k>.fits``: the cropped raw DN exactly (no bias subtraction, no scaling),
with the chip's metadata in the header. ``index.csv`` lists the chips written and ``errors.csv`` every file or
chip that could not be read, with the reason. Runs on Ray Data: reading, cropping and writing happen in parallel
tasks, and only small metadata rows come back to the driver.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import fsspec
import numpy as np
import pandas as pd
from astropy.io import fits

from ray_hrc.chips import META_FIELDS
from ray_hrc.data import ERROR_COLUMNS, LABEL_COLUMNS, ReadConfig, read_chips, summarize
from ray_hrc.storage import OutputConfig, open_uri

logger = logging.getLogger(__name__)

_HEADER_KEYS = {  # row column -> (FITS keyword, comment)
    "obsid": ("ROOTNAME", "dataset name of the source raw file"),
    "hdu": ("SRCHDU", "HDU index of the SCI extension in the source file"),
    "extver": ("SRCEXTV", "EXTVER of the SCI extension in the source file"),
    "ccdchip": ("CCDCHIP", "CCD chip"),
    "instrument": ("INSTRUME", "instrument/detector"),
    "detector": ("DETECTOR", "detector"),
    "product": ("SRCPROD", "source product: raw or calibrated"),
    "filter": ("FILTER", "filter"),
    "exptime": ("EXPTIME", "[s] exposure time"),
    "targname": ("TARGNAME", "proposer's target name"),
    "date_obs": ("DATE-OBS", "UTC start of the exposure"),
    "ra": ("RA_CEN", "[deg] RA of the chip centre"),
    "dec": ("DEC_CEN", "[deg] Dec of the chip centre"),
    "radec_from_targ": ("RADECTRG", "centre from RA_TARG/DEC_TARG (no usable WCS)"),
    "body": ("BODY", "celestial body (manifest ID)"),
    "label_true": ("LABEL", "manifest label: galaxy or NSC"),
}


def chip_filename(obsid: str, hdu: int) -> str:
    return f"{obsid}_hdu{hdu}.fits"


def chip_hdu(row: dict[str, Any]) -> fits.PrimaryHDU:
    """The LCID sample for one chip row: pixels as they are (uint16 DN stays uint16) plus metadata keywords."""
    hdu = fits.PrimaryHDU(data=np.asarray(row["pixels"]))
    header = hdu.header
    for column, (key, comment) in _HEADER_KEYS.items():
        value = row.get(column)
        if value is None or (isinstance(value, float) and not np.isfinite(value)) or value == "":
            continue
        header[key] = (value.item() if hasattr(value, "item") else value, comment)
    header["BUNIT"] = ("DN" if np.asarray(row["pixels"]).dtype == np.uint16 else "ELECTRONS", "cropped raw counts, not bias-subtracted")
    for i, bias in enumerate(np.asarray(row["amp_bias"]).tolist()):
        header[f"BIAS{i + 1}"] = (round(float(bias), 2), f"[DN] bias of amp block {i + 1} (left to right), from its prescan")
    header["SRCURI"] = (row["uri"], "source file")
    header["ORIGIN"] = ("ray_hrc", "cropped as Zhang et al. (2023), section 2.2")
    return hdu


def write_chip(row: dict[str, Any], out_dir: str, storage_options: dict | None = None) -> dict[str, Any]:
    """Write one chip row as FITS under `out_dir` (local or remote); return the row without pixels, plus ``path``."""
    meta = {k: row[k] for k in META_FIELDS + LABEL_COLUMNS + ERROR_COLUMNS}
    if row["error_class"]:
        return {**meta, "path": ""}
    path = f"{out_dir.rstrip('/')}/{chip_filename(row['obsid'], row['hdu'])}"
    hdu = chip_hdu(row)
    if "://" in path:
        with fsspec.open(path, "wb", **(storage_options or {})) as fh:
            hdu.writeto(fh)
    else:
        tmp = f"{path}.part-{os.getpid()}"
        hdu.writeto(tmp, overwrite=True)
        os.replace(tmp, path)  # a reader never sees half a chip
    return {**meta, "path": path}


def crop_archive(
    sources: list[str], out_dir: str, config: ReadConfig = ReadConfig(), output: OutputConfig = OutputConfig()
) -> dict[str, Any]:
    """Crop every chip of `sources` into `out_dir`; write ``index.csv`` and ``errors.csv``; return the run summary.

    `config` reads the sources (input side); `output` writes `out_dir` (output side).
    """
    start = time.perf_counter()
    if "://" not in out_dir:
        os.makedirs(out_dir, exist_ok=True)
    ds = read_chips(sources, config).map(
        write_chip,
        fn_kwargs={"out_dir": out_dir, "storage_options": output.storage_options or None},
        num_cpus=config.num_cpus,
        max_retries=config.max_retries,
    )
    rows = ds.to_pandas()
    summary = summarize(rows)
    good = rows[rows["error_class"] == ""].sort_values(["uri", "hdu"])
    bad = rows[rows["error_class"] != ""].sort_values(["uri", "hdu"])
    index_cols = ["path"] + META_FIELDS + LABEL_COLUMNS
    error_cols = ["uri", "hdu", "error_class", "error"]
    _write_csv(good[index_cols] if len(good) else pd.DataFrame(columns=index_cols), f"{out_dir.rstrip('/')}/index.csv", output)
    _write_csv(bad[error_cols] if len(bad) else pd.DataFrame(columns=error_cols), f"{out_dir.rstrip('/')}/errors.csv", output)
    summary["wall_s"] = round(time.perf_counter() - start, 2)
    summary["out"] = out_dir
    return summary


def _write_csv(df: pd.DataFrame, path: str, output: OutputConfig) -> None:
    with open_uri(path, "w", output.storage_options) as fh:
        df.to_csv(fh, index=False)
