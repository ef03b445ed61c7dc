"""A poisoned file: one whose read task kills its worker process on every attempt.

A Python exception while reading already becomes an error row (`ray_hrc.chips.read_fits` never raises). What kills
the process instead is a segfault in native code, the kernel's OOM killer or a SIGBUS on a memory-mapped file that
shrinks under the reader; none of those can be produced on demand by a file's contents on a shared test machine.
So the test replaces the read task's function for the duration of the test (monkeypatch, nothing in the package):
on the poisoned file it records the attempt in a marker file and calls ``os._exit(1)``, which Ray sees exactly as a
crashed worker; every other file is read by the real `ray_hrc.data.chip_rows`. Everything else is the real pipeline
on the session's local Ray: Ray's task retries bounded by ``ReadConfig.max_retries``, Ray Data going on past the
failed block, the parts on disk and `_record_lost_files` turning the missing file into error rows.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest

import ray_hrc.data
from ray_hrc.classify import ClassifyConfig, classify_archive
from ray_hrc.data import ReadConfig
from ray_hrc.manifest import read_manifest, write_manifest

POISONED = "jpois01q_raw.fits"


def _read_or_die(attempts_dir: str):
    """The read task's function: `chip_rows` for every file, a worker crash (after a marker file) for the poisoned one."""
    real_chip_rows = ray_hrc.data.chip_rows

    def read_or_die(file, storage_options=None, norm=None, data=None):
        if file["uri"].endswith(POISONED):
            Path(attempts_dir, f"{os.getpid()}-{uuid.uuid4().hex}").touch()
            os._exit(1)  # the process dies mid-task: no exception, no error row, as a segfault or the OOM killer would
        return real_chip_rows(file, storage_options, norm, data)

    return read_or_die


@pytest.mark.timeout(300)
def test_a_file_that_kills_its_worker_becomes_an_error_row_after_bounded_retries(
    ray_session, tiny_archive, random_checkpoint, tmp_path, monkeypatch
):
    manifest = read_manifest(str(tiny_archive))
    good = manifest[manifest["URI"].isin(manifest["URI"].drop_duplicates().iloc[:2])]  # two files, both chips of each
    poisoned = tmp_path / POISONED
    shutil.copy(good["URI"].iloc[0], poisoned)  # a valid raw file: only the crash keeps it out of the catalog
    bad = good[good["URI"] == good["URI"].iloc[0]].assign(OBSID="jpois01q", URI=str(poisoned), ID="SYN-POISON")
    path = tmp_path / "manifest.csv"
    write_manifest(pd.concat([good, bad], ignore_index=True), path)
    attempts = tmp_path / "attempts"
    attempts.mkdir()
    monkeypatch.setattr(ray_hrc.data, "chip_rows", _read_or_die(str(attempts)))

    read = ReadConfig(max_retries=2)
    start = time.monotonic()
    summary = classify_archive([str(path)], random_checkpoint, str(tmp_path / "cat"), read=read, config=ClassifyConfig(max_actors=1))
    wall = time.monotonic() - start

    n_attempts = len(list(attempts.iterdir()))
    assert n_attempts == read.max_retries + 1, f"{n_attempts} attempts on the poisoned file; expected 1 + max_retries"
    assert wall < 240  # finished, not looping on the poisoned file
    catalog = pd.read_parquet(tmp_path / "cat" / "catalog.parquet")
    assert not catalog.duplicated(["uri", "hdu"]).any()
    expected = set(zip(good["URI"], good["HDU Index"], strict=True))
    assert set(zip(catalog["uri"], catalog["hdu"], strict=True)) == expected  # every other chip, exactly once
    errors = pd.read_parquet(tmp_path / "cat" / "errors.parquet")
    assert set(errors["uri"]) == {str(poisoned)}
    assert sorted(errors["hdu"]) == sorted(bad["HDU Index"])  # one error row per chip the manifest asked for
    assert errors["error"].str.contains(f"failed {read.max_retries + 1} times").all()
    assert summary["chips"] == len(good) and summary["failed"] == len(bad)
