"""Hostile files beside a good one through `ray-hrc crop` and `ray-hrc classify` on a real local Ray: each hostile
file becomes error rows of its class, in the same run as the good file's chips, and none stalls the run."""

from __future__ import annotations

import os
import shutil
import time

import pandas as pd
import pytest
from hostile import hostile_files

from ray_hrc.classify import ClassifyConfig, classify_archive
from ray_hrc.crop import crop_archive
from ray_hrc.data import ReadConfig, chip_rows
from ray_hrc.manifest import read_manifest

pytestmark = pytest.mark.timeout(600)
HOSTILE = hostile_files()


@pytest.fixture(scope="module")
def folder(tiny_archive, tmp_path_factory):
    """One good raw file (2 chips) and every hostile file, as ``<case>_raw.fits`` in one folder."""
    d = tmp_path_factory.mktemp("hostile_folder")
    good = read_manifest(str(tiny_archive))["URI"].iloc[0]
    shutil.copy(good, d / "jgood001q_raw.fits")
    for case, (data, _) in HOSTILE.items():
        (d / f"{case}_raw.fits").write_bytes(data)
    return d


def _check_errors(errors: pd.DataFrame, folder) -> None:
    for case, (_, expected) in HOSTILE.items():
        rows = errors[errors["uri"].str.endswith(f"/{case}_raw.fits")]
        assert len(rows), f"no error row for {case}"
        classes = set(rows["error_class"])
        assert expected in classes and classes <= {expected, "missing_sci"}, (case, rows[["error_class", "error"]].values.tolist())
        assert rows["error"].str.contains(f"{case}_raw.fits", regex=False).all(), case


def test_each_hostile_file_reads_to_error_rows_within_a_second(folder):
    for case in HOSTILE:
        start = time.perf_counter()
        rows = chip_rows({"uri": str(folder / f"{case}_raw.fits")})
        assert time.perf_counter() - start < 1.0, case
        assert rows and all(r["error_class"] for r in rows), case


def test_crop_writes_the_good_chips_and_an_error_row_per_hostile_file(ray_session, folder, tmp_path):
    start = time.monotonic()
    summary = crop_archive([str(folder)], str(tmp_path / "crop"), ReadConfig(num_cpus=0.5))
    assert time.monotonic() - start < 240
    index = pd.read_csv(tmp_path / "crop" / "index.csv")
    assert sorted(index["hdu"]) == [1, 4] and index["uri"].str.endswith("jgood001q_raw.fits").all()
    assert all(os.path.exists(path) for path in index["path"])
    _check_errors(pd.read_csv(tmp_path / "crop" / "errors.csv"), folder)
    assert summary["chips"] == 2


def test_classify_catalogs_the_good_chips_and_an_error_row_per_hostile_file(ray_session, folder, random_checkpoint, tmp_path):
    read, model_stage = ReadConfig(num_cpus=0.5), ClassifyConfig(cpus_per_actor=0.5, max_actors=1)
    summary = classify_archive([str(folder)], random_checkpoint, str(tmp_path / "cat"), read=read, config=model_stage)
    catalog = pd.read_parquet(tmp_path / "cat" / "catalog.parquet")
    assert sorted(catalog["hdu"]) == [1, 4] and catalog["uri"].str.endswith("jgood001q_raw.fits").all()
    _check_errors(pd.read_parquet(tmp_path / "cat" / "errors.parquet"), folder)
    assert summary["chips"] == 2
