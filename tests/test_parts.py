"""`ray_hrc.parts` without Ray: the compact index, which row wins, lost chips per (uri, hdu), streaming consolidation,
resume bound to its checkpoint and a safe ``--overwrite`` (locally and at the root of a bucket on the local S3 server)."""

from __future__ import annotations

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import s3fs

from ray_hrc.classify import FORMATS, classify_archive, write_table
from ray_hrc.data import ReadConfig
from ray_hrc.parts import (
    ResumeRefusedError,
    best_rows,
    check_checkpoint,
    consolidate,
    done_rows,
    index_of,
    load_index,
    lost_rows,
    write_index_segment,
    write_part,
)
from ray_hrc.storage import OutputConfig

COLUMNS = ["uri", "hdu", "obsid", "label", "p_galaxy"]


def _part(rows: list[tuple[str, int, str]], ckpt: str = "w-1") -> pa.Table:
    """Part rows (uri, hdu, error_class), the other columns filled in."""
    n = len(rows)
    return pa.table(
        {
            "uri": [r[0] for r in rows],
            "hdu": pa.array([r[1] for r in rows], pa.int64()),
            "obsid": [r[0].split("/")[-1][:9] for r in rows],
            "error_class": [r[2] for r in rows],
            "error": [f"{r[0]}: {r[2]}" if r[2] else "" for r in rows],
            "label": ["galaxy" if not r[2] else "" for r in rows],
            "p_galaxy": [0.7 if not r[2] else np.nan for r in rows],
            "n_in_file": pa.array([2] * n, pa.int64()),
            "label_true": [""] * n,
            "checkpoint_id": [ckpt] * n,
            "preprocess_ms": [1.0] * n,
            "classify_ms": [2.0] * n,
        }
    )


def _write(fs, root: str, name: str, table: pa.Table, indexed: bool = True) -> None:
    write_part(fs, f"{root}/_parts", name, table)
    if indexed:
        write_index_segment(fs, f"{root}/_parts", index_of(table, name), f"seg-{name}")


def test_best_row_wins_and_transient_failures_are_retried(tmp_path):
    fs, root = fsspec.filesystem("file"), str(tmp_path)
    _write(
        fs,
        root,
        "part-a.parquet",
        _part([("a.fits", 1, ""), ("a.fits", 4, "lost"), ("b.fits", -1, "unreadable"), ("c.fits", 1, "not_fits")]),
    )
    _write(fs, root, "part-b.parquet", _part([("a.fits", 4, ""), ("b.fits", 1, ""), ("b.fits", 4, "")]))
    index = load_index(fs, f"{root}/_parts")
    best = best_rows(index)
    got = {(u, h): c for u, h, c in zip(best["uri"], best["hdu"], best["error_class"], strict=True)}
    # the retried lost chip is catalogued; the unreadable file's whole-file row goes once its chips are all in
    assert got == {("a.fits", 1): "", ("a.fits", 4): "", ("b.fits", 1): "", ("b.fits", 4): "", ("c.fits", 1): "not_fits"}
    assert set(zip(done_rows(best)["uri"], done_rows(best)["hdu"], strict=True)) == set(got)

    only_first = best_rows(index[index["part"] == "part-a.parquet"])
    retried = set(only_first["uri"]) - set(done_rows(only_first)["uri"])
    assert retried == {"b.fits"}  # unreadable: retried; lost a.fits HDU 4 too, but a.fits HDU 1 is done
    assert ("a.fits", 4) not in set(zip(done_rows(only_first)["uri"], done_rows(only_first)["hdu"], strict=True))
    assert ("c.fits", 1) in set(zip(done_rows(only_first)["uri"], done_rows(only_first)["hdu"], strict=True))  # not FITS: not retried


def test_index_repairs_itself(tmp_path):
    fs, root = fsspec.filesystem("file"), str(tmp_path)
    _write(fs, root, "part-a.parquet", _part([("a.fits", 1, "")]))
    _write(fs, root, "part-b.parquet", _part([("b.fits", 1, "")]), indexed=False)  # killed before the driver indexed it
    (tmp_path / "_parts" / "part-c.parquet").write_bytes(b"PAR1 killed mid-write")
    _write(fs, root, "part-d.parquet", _part([("d.fits", 1, "")]))
    (tmp_path / "_parts" / "part-d.parquet").unlink()  # indexed, then removed: its index rows must go
    index = load_index(fs, f"{root}/_parts")
    assert sorted(index["uri"]) == ["a.fits", "b.fits"]
    assert not (tmp_path / "_parts" / "part-c.parquet").exists()
    assert len(list((tmp_path / "_parts" / "_index").glob("repair-*.parquet"))) == 1  # b is indexed from now on
    assert sorted(load_index(fs, f"{root}/_parts")["uri"]) == ["a.fits", "b.fits"]


def test_lost_chips_are_accounted_per_uri_and_hdu():
    files = pd.DataFrame(
        {
            "uri": ["a.fits", "b.fits", "c.fits", "d.fits"],
            "hdus": [[1, 4], [1, 4], None, None],
            "skip_hdus": [[], [1], [], []],
        }
    )
    run = pd.DataFrame({"uri": ["a.fits", "c.fits"], "hdu": [1, 1], "n_in_file": [2, 2]})
    lost = lost_rows(files, run, 3, "w-1", "run")
    got = sorted(zip(lost["uri"], lost["hdu"], strict=True))
    # a: HDU 4 lost beside a written HDU 1; b: HDU 4 (1 was done before); c: one of two chips of a file read whole; d: all
    assert got == [("a.fits", 4), ("b.fits", 4), ("c.fits", -1), ("d.fits", -1)]
    assert (lost["error_class"] == "lost").all() and lost["error"].str.contains("died 4 times").all()
    assert "1 of the 2 chips of c.fits" in lost.loc[lost["uri"] == "c.fits", "error"].iloc[0]


@pytest.mark.parametrize("fmt", ["parquet", "csv", "fits"])
def test_streaming_consolidation_keeps_one_row_per_chip(tmp_path, fmt):
    fs, root = fsspec.filesystem("file"), str(tmp_path)
    _write(fs, root, "part-a.parquet", _part([("a.fits", 1, ""), ("a.fits", 4, "lost"), ("c.fits", 1, "not_fits")]))
    _write(fs, root, "part-b.parquet", _part([("a.fits", 4, ""), ("b.fits", 1, "")]))
    index = load_index(fs, f"{root}/_parts")
    summary = consolidate(fs, root, root, index, fmt, FORMATS[fmt], COLUMNS, None, write_table)
    if fmt == "fits":
        from astropy.table import Table

        catalog, errors = (Table.read(p).to_pandas() for p in (summary["catalog"], summary["errors_table"]))
        for table in (catalog, errors):  # FITS strings come back as bytes
            for name in ("uri", "error_class"):
                if name in table:
                    table[name] = table[name].map(lambda v: v.decode() if isinstance(v, bytes) else v)
    else:
        catalog, errors = (
            pd.read_parquet(p) if fmt == "parquet" else pd.read_csv(p) for p in (summary["catalog"], summary["errors_table"])
        )
    assert sorted(zip(catalog["uri"], catalog["hdu"], strict=True)) == [("a.fits", 1), ("a.fits", 4), ("b.fits", 1)]
    assert list(catalog.columns) == [*COLUMNS, "preprocess_ms", "classify_ms"]
    assert list(zip(errors["uri"], errors["error_class"], strict=True)) == [("c.fits", "not_fits")]
    assert summary["chips"] == 3 and summary["failed"] == 1 and summary["by_label"] == {"galaxy": 3}
    assert summary["mean_classify_ms"] == pytest.approx(2.0)


def test_resume_with_another_checkpoint_is_refused(tmp_path, random_checkpoint):
    fs, root = fsspec.filesystem("file"), str(tmp_path / "cat")
    _write(fs, root, "part-a.parquet", _part([("a.fits", 1, "")], ckpt="0123456789abcdef-00000000"))
    with pytest.raises(ResumeRefusedError, match=r"not .* \(.*checkpoint.*\).*Use --overwrite .* or another --out"):
        classify_archive([str(tmp_path / "none.fits")], random_checkpoint, root)
    legacy = _part([("a.fits", 1, "")]).drop_columns(["checkpoint_id"])  # parts written before ids were recorded
    fs.rm(f"{root}/_parts", recursive=True)
    _write(fs, root, "legacy.parquet", legacy, indexed=False)
    with pytest.raises(ResumeRefusedError, match=r"\(none recorded\)"):
        check_checkpoint(load_index(fs, f"{root}/_parts"), "w-1", "ckpt", root)


def test_overwrite_refuses_a_folder_holding_other_files(tmp_path, random_checkpoint):
    out = tmp_path / "cat"
    fs = fsspec.filesystem("file")
    _write(fs, str(out), "part-a.parquet", _part([("a.fits", 1, "")]))
    (out / "catalog.parquet").write_bytes(b"old catalog")
    (out / "my_notes.txt").write_text("not a run's file")
    with pytest.raises(ResumeRefusedError, match=r"--overwrite refused: .*my_notes.txt"):
        classify_archive([str(tmp_path / "none.fits")], random_checkpoint, str(out), overwrite=True)
    assert (out / "my_notes.txt").exists() and (out / "catalog.parquet").exists() and (out / "_parts" / "part-a.parquet").exists()


def test_overwrite_refuses_a_bucket_root_with_other_objects(s3_bucket, random_checkpoint):
    bucket, opts = s3_bucket
    fs = s3fs.S3FileSystem(**opts)
    fs.pipe(f"{bucket}/archive/jabc01abq_raw.fits", b"someone's data")
    fs.pipe(f"{bucket}/catalog.parquet", b"an old catalog")
    with pytest.raises(ResumeRefusedError, match=r"--overwrite refused: .*archive"):
        classify_archive(
            [f"{bucket}/none.fits"],
            random_checkpoint,
            bucket,
            read=ReadConfig(storage_options=opts),
            output=OutputConfig(opts),
            overwrite=True,
        )
    assert fs.exists(f"{bucket}/archive/jabc01abq_raw.fits") and fs.exists(f"{bucket}/catalog.parquet")
