"""No silent failures: a poisoned file, a model actor that dies on one chip, a model stage that raises, exit codes.

A poisoned file is one whose read task kills its worker process on every attempt.

A Python exception while reading already becomes an error row (`ray_hrc.chips.read_fits` never raises). What kills
the process instead is a segfault in native code, the kernel's OOM killer or a SIGBUS on a memory-mapped file that
shrinks under the reader; none of those can be produced on demand by a file's contents on a shared test machine.
So the test replaces the read task's function for the duration of the test (monkeypatch, nothing in the package):
on the poisoned file it records the attempt in a marker file and calls ``os._exit(1)``, which Ray sees exactly as a
crashed worker; every other file is read by the real `ray_hrc.data.chip_rows`. Everything else is the real pipeline
on the session's local Ray: Ray's task retries bounded by ``ReadConfig.max_retries``, Ray Data going on past the
failed block, the parts on disk and `ray_hrc.parts.lost_rows` turning the missing chips into ``lost`` rows, which a
rerun retries. A model actor that dies on one chip is made the same way (a subclass of the model stage's actor).
A model stage that raises needs no such help: a checkpoint whose model is sized for another input raises in its
forward pass on every chip, as a bad checkpoint does, and the real CLI must exit 1 naming it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import ray_hrc.classify
import ray_hrc.data
from ray_hrc.classify import ClassifyConfig, _ModelStage, classify_archive
from ray_hrc.data import ReadConfig
from ray_hrc.manifest import read_manifest, write_manifest
from ray_hrc.parts import load_index

ROOT = Path(__file__).resolve().parents[1]

POISONED = "jpois01q_raw.fits"


def _read_or_die(attempts_dir: str):
    """The read task's function: `chip_rows` for every file, a worker crash (after a marker file) for the poisoned one."""
    real_chip_rows = ray_hrc.data.chip_rows

    def read_or_die(file, storage_options=None, norm=None, data=None, fetch=None):
        if file["uri"].endswith(POISONED):
            Path(attempts_dir, f"{os.getpid()}-{uuid.uuid4().hex}").touch()
            os._exit(1)  # the process dies mid-task: no exception, no error row, as a segfault or the OOM killer would
        return real_chip_rows(file, storage_options, norm, data, fetch)

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
    assert (errors["error_class"] == "lost").all()
    assert errors["error"].str.contains(f"died {read.max_retries + 1} times").all()
    assert summary["chips"] == len(good) and summary["failed"] == len(bad) and summary["to_retry"] == len(bad)

    monkeypatch.undo()  # the worker no longer dies: a rerun retries the lost chips (transient) and nothing else
    again = classify_archive([str(path)], random_checkpoint, str(tmp_path / "cat"), read=read, config=ClassifyConfig(max_actors=1))
    assert again["files_planned"] == 1 and again["new_chips"] == len(bad) and again["failed"] == 0
    catalog = pd.read_parquet(tmp_path / "cat" / "catalog.parquet")
    assert len(catalog) == len(good) + len(bad) and not catalog.duplicated(["uri", "hdu"]).any()
    assert len(pd.read_parquet(tmp_path / "cat" / "errors.parquet")) == 0


def _dies_on_hdu4() -> type:
    """The model stage's actor, except that its process dies on any batch holding HDU 4 of the poisoned file.

    Made in a function so that Ray pickles the class by value: workers cannot import this test module.
    """

    class DiesOnHdu4(_ModelStage):
        def __call__(self, batch):
            if any(str(u).endswith(POISONED) and int(h) == 4 for u, h in zip(batch["uri"], batch["hdu"], strict=True)):
                os._exit(1)
            return super().__call__(batch)

    return DiesOnHdu4


@pytest.mark.timeout(300)
def test_a_chip_lost_in_the_model_stage_beside_a_written_one_gets_its_own_row(
    ray_session, tiny_archive, random_checkpoint, tmp_path, monkeypatch
):
    manifest = read_manifest(str(tiny_archive))
    first = manifest[manifest["URI"] == manifest["URI"].iloc[0]]
    assert sorted(first["HDU Index"]) == [1, 4]
    poisoned = tmp_path / POISONED
    shutil.copy(first["URI"].iloc[0], poisoned)
    path = tmp_path / "manifest.csv"
    write_manifest(first.assign(URI=str(poisoned)), path)
    monkeypatch.setattr(ray_hrc.classify, "_ModelStage", _dies_on_hdu4())
    # Blocks of about one chip (Ray Data splits what its reads yield at this size), so the file's two chips reach the
    # model stage in different tasks, as they do when Ray Data splits large blocks or a model batch straddles files.
    monkeypatch.setattr(ray_session.data.DataContext.get_current(), "target_max_block_size", 2**20)
    summary = classify_archive(
        [str(path)], random_checkpoint, str(tmp_path / "cat"), read=ReadConfig(max_retries=1), config=ClassifyConfig(batch_size=1, max_actors=1, max_retries=3)
    )  # fmt: skip
    catalog = pd.read_parquet(tmp_path / "cat" / "catalog.parquet")
    errors = pd.read_parquet(tmp_path / "cat" / "errors.parquet")
    assert list(catalog["hdu"]) == [1]  # the chip beside it is catalogued ...
    assert list(zip(errors["hdu"], errors["error_class"], strict=True)) == [(4, "lost")]  # ... and the lost one has its row
    assert summary["lost"] == 1 and summary["failed"] == 1


@pytest.fixture(scope="module")
def mismatched_checkpoint(tmp_path_factory):
    """A checkpoint whose model is sized for 1536 x 3072 inputs while its preprocessing keeps full 2048 x 4096 chips:
    it loads (strict), and its forward pass raises on every chip."""
    import torch

    from ray_hrc.checkpoint import save_checkpoint
    from ray_hrc.models import build_model
    from ray_hrc.preprocess import NormConfig

    torch.manual_seed(1)
    args = {"width": 0.0625, "input_shape": [1536, 3072]}
    directory = tmp_path_factory.mktemp("mismatched_checkpoint")
    save_checkpoint(str(directory), {"model_name": "hrcelestialnet", "model_args": args, "model_state": build_model("hrcelestialnet", **args).state_dict(),
                                     "epoch": 0, "preprocess": NormConfig().to_dict()})  # fmt: skip
    return str(directory)


def _cli(ray_session, *args: str) -> subprocess.CompletedProcess:
    """`ray-hrc classify ...` in a subprocess joined to the session's Ray (this worktree's package first on the path)."""
    address = ray_session.get_runtime_context().gcs_address
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "RAY_ADDRESS": ""}
    cmd = [sys.executable, "-m", "ray_hrc.cli", "classify", "--address", address, "--max-actors", "1", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.timeout(600)
def test_exit_codes_of_the_real_cli(ray_session, tiny_archive, random_checkpoint, mismatched_checkpoint, tmp_path):
    """0: every chip catalogued; 3: some inputs in the errors table; 2: another checkpoint's parts; 1: the model stage raised."""
    manifest = read_manifest(str(tiny_archive))
    one = manifest[manifest["URI"] == manifest["URI"].iloc[0]]
    good = tmp_path / "good.csv"
    write_manifest(one, good)
    junk = tmp_path / "jjunk009q_raw.fits"
    junk.write_bytes(b"not a FITS file" * 300)
    out = tmp_path / "cat"

    ok = _cli(ray_session, "--checkpoint", random_checkpoint, "--input", str(good), "--out", str(out))
    assert ok.returncode == 0, ok.stderr[-3000:]
    some = _cli(ray_session, "--checkpoint", random_checkpoint, "--input", str(good), str(junk), "--out", str(out))
    assert some.returncode == 3, some.stderr[-3000:]
    assert pd.read_parquet(out / "errors.parquet")["error_class"].tolist() == ["not_fits"]
    assert len(pd.read_parquet(out / "catalog.parquet")) == len(one)

    other = _cli(ray_session, "--checkpoint", mismatched_checkpoint, "--input", str(good), "--out", str(out))
    assert other.returncode == 2, other.stderr[-3000:]
    assert "--overwrite" in other.stderr and "another --out" in other.stderr and mismatched_checkpoint in other.stderr

    failed = _cli(ray_session, "--checkpoint", mismatched_checkpoint, "--input", str(good), "--out", str(tmp_path / "failed"))
    assert failed.returncode == 1, failed.stderr[-3000:]
    message = [line for line in failed.stderr.splitlines() if "the model stage failed on" in line]
    assert message, failed.stderr[-3000:]
    assert mismatched_checkpoint in message[0] and "ValueError" in message[0] and "expected (B, 1, 1536, 3072)" in message[0]
    assert f"{one['URI'].iloc[0]} HDU " in message[0]  # the first chip it failed on
    assert not (tmp_path / "failed" / "catalog.parquet").exists()
    index = load_index(__import__("fsspec").filesystem("file"), str(tmp_path / "failed" / "_parts"))
    assert index.empty  # no row at all, least of all one that looks like a bad file
    assert np.isin(["catalog.parquet", "errors.parquet", "summary.json"], os.listdir(out)).all()
