"""`ray-hrc classify` and `ray-hrc evaluate` on a real local Ray: catalogs, error tables, resume, formats, S3."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import s3fs
from astropy.table import Table

from ray_hrc.classify import ClassifyConfig, classify_archive
from ray_hrc.data import ReadConfig
from ray_hrc.manifest import read_manifest, write_manifest
from ray_hrc.storage import OutputConfig

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def archive_with_corrupt_files(tiny_archive, tmp_path_factory):
    """The tiny synthetic archive plus a truncated raw file, a file that is not FITS and a missing file, in one manifest."""
    d = tmp_path_factory.mktemp("corrupt")
    manifest = read_manifest(str(tiny_archive))
    good_uri = manifest["URI"].iloc[0]
    data = open(good_uri, "rb").read()
    (d / "jtrunc01q_raw.fits").write_bytes(data[: len(data) // 2])
    (d / "jjunk002q_raw.fits").write_bytes(b"SIMPLE? no." * 5000)
    extra = []
    for obsid, uri, hdu in (
        ("jtrunc01q", d / "jtrunc01q_raw.fits", 4),
        ("jjunk002q", d / "jjunk002q_raw.fits", 1),
        ("jgone003q", d / "jgone003q_raw.fits", 1),
    ):
        extra.append({**manifest.iloc[0].to_dict(), "OBSID": obsid, "URI": str(uri), "HDU Index": hdu, "ID": "SYN-BAD"})
    full = pd.concat([manifest, pd.DataFrame(extra)], ignore_index=True)
    path = d / "manifest.csv"
    write_manifest(full, path)
    n_good = len(manifest)
    return path, n_good


def test_catalog_has_one_row_per_good_chip_and_a_rerun_adds_nothing(ray_session, archive_with_corrupt_files, random_checkpoint, tmp_path):
    manifest, n_good = archive_with_corrupt_files
    out = tmp_path / "cat"
    summary = classify_archive([str(manifest)], random_checkpoint, str(out))
    catalog = pd.read_parquet(out / "catalog.parquet")
    errors = pd.read_parquet(out / "errors.parquet")
    assert len(catalog) == n_good and summary["chips"] == n_good
    assert not catalog.duplicated(["uri", "hdu"]).any()
    assert sorted(errors["error_class"]) == ["not_fits", "truncated", "unreadable"]
    for column in ("uri", "obsid", "hdu", "ccdchip", "instrument", "detector", "filter", "exptime", "targname", "date_obs", "ra", "dec",
                   "label", "p_galaxy", "p_nsc", "model", "checkpoint", "label_true"):  # fmt: skip
        assert column in catalog, column
    assert set(catalog["label"]) <= {"galaxy", "NSC"} and np.allclose(catalog["p_galaxy"] + catalog["p_nsc"], 1.0)
    assert catalog["checkpoint"].nunique() == 1 and len(catalog["checkpoint"][0]) == 16

    again = classify_archive([str(manifest)], random_checkpoint, str(out))
    assert again["new_chips"] == 0 and again["chips"] == n_good and again["failed"] == 3
    pd.testing.assert_frame_equal(pd.read_parquet(out / "catalog.parquet"), catalog)


def test_interrupted_run_resumes_without_duplicates(ray_session, tiny_archive, random_checkpoint, tmp_path):
    manifest = read_manifest(str(tiny_archive))
    half = tmp_path / "half.csv"
    write_manifest(manifest.iloc[: len(manifest) // 2], half)
    out = tmp_path / "cat"
    classify_archive([str(half)], random_checkpoint, str(out))
    (out / "catalog.parquet").unlink()  # as if the run died before writing the catalog
    (out / "_parts" / "zz_half_written.parquet").write_bytes(b"PAR1 killed mid-write")
    summary = classify_archive([str(tiny_archive)], random_checkpoint, str(out))
    catalog = pd.read_parquet(out / "catalog.parquet")
    assert len(catalog) == len(manifest) and not catalog.duplicated(["uri", "hdu"]).any()
    assert summary["new_chips"] == len(manifest) - len(manifest) // 2
    assert not (out / "_parts" / "zz_half_written.parquet").exists()
    fresh = classify_archive([str(tiny_archive)], random_checkpoint, str(out), overwrite=True)
    assert fresh["new_chips"] == len(manifest)


@pytest.mark.parametrize("fmt", ["csv", "fits", "votable"])
def test_formats_astronomers_open(ray_session, tiny_archive, random_checkpoint, tmp_path, fmt):
    first = read_manifest(str(tiny_archive)).iloc[:2]
    path = tmp_path / "two.csv"
    write_manifest(first, path)
    summary = classify_archive([str(path)], random_checkpoint, str(tmp_path / "cat"), config=ClassifyConfig(format=fmt))
    table = (
        pd.read_csv(summary["catalog"]) if fmt == "csv" else Table.read(summary["catalog"], format="fits" if fmt == "fits" else "votable")
    )
    assert len(table) == 2 and "p_galaxy" in table.columns if fmt == "csv" else "p_galaxy" in table.colnames


def test_classify_from_s3_with_checkpoint_on_s3(ray_session, tiny_archive, random_checkpoint, s3_bucket):
    bucket, opts = s3_bucket
    fs = s3fs.S3FileSystem(**opts)
    manifest = read_manifest(str(tiny_archive))
    files = sorted(set(manifest["URI"]))[:2]
    for uri in files:
        fs.put(uri, f"{bucket}/archive/{uri.rsplit('/', 1)[-1]}")
    fs.put(random_checkpoint, f"{bucket}/ckpt", recursive=True)
    read = ReadConfig(storage_options=opts)
    summary = classify_archive([f"{bucket}/archive/"], f"{bucket}/ckpt", f"{bucket}/catalog", read=read, output=OutputConfig(opts))
    assert summary["chips"] == 4 and summary["failed"] == 0  # every SCI of both files
    with fs.open(f"{bucket}/catalog/catalog.parquet", "rb") as fh:
        catalog = pd.read_parquet(fh)
    assert sorted(catalog["uri"].unique()) == sorted(f"{bucket}/archive/{u.rsplit('/', 1)[-1]}" for u in files)
    local = classify_archive(files, random_checkpoint, "/tmp/ray_hrc_s3_compare", overwrite=True)
    local_cat = pd.read_parquet(local["catalog"]).sort_values(["obsid", "hdu"]).reset_index(drop=True)
    np.testing.assert_allclose(catalog.sort_values(["obsid", "hdu"])["p_galaxy"].to_numpy(), local_cat["p_galaxy"].to_numpy(), rtol=1e-6)
    shutil.rmtree("/tmp/ray_hrc_s3_compare", ignore_errors=True)


def test_evaluate_writes_the_report(ray_session, tiny_archive, random_checkpoint, tmp_path):
    from ray_hrc.evaluate import evaluate_checkpoint

    blurry = tiny_archive.parent / "blurry.csv"
    metrics = evaluate_checkpoint(
        random_checkpoint, str(tiny_archive), str(tmp_path / "report"), blurry=str(blurry) if blurry.exists() else None
    )
    for name in ("metrics.json", "metrics.md", "confusion.png", "catalog/catalog.parquet"):
        assert (tmp_path / "report" / name).exists(), name
    assert metrics["chips"] == len(read_manifest(str(tiny_archive)))
    assert sum(map(sum, metrics["confusion"])) == metrics["chips"]
    assert metrics["preprocess_ms"] > 0 and metrics["classify_ms"] > 0
    if metrics["accuracy"] < 1:
        assert (tmp_path / "report" / "misclassified.png").exists()
    assert "| hrcelestialnet | LCID |" in (tmp_path / "report" / "metrics.md").read_text()


def test_evaluate_scores_an_existing_catalog_like_a_fresh_classification(ray_session, tiny_archive, random_checkpoint, tmp_path):
    """`catalog=`: the held-out chips' rows of a whole-archive catalog give the report that classifying them gives."""
    from ray_hrc.evaluate import evaluate_checkpoint

    full = read_manifest(str(tiny_archive))
    subset = tmp_path / "subset.csv"
    write_manifest(full[full["ID"] == full["ID"].iloc[0]], subset)
    archive = classify_archive([str(tiny_archive)], random_checkpoint, str(tmp_path / "archive_catalog"))
    fresh = evaluate_checkpoint(random_checkpoint, str(subset), str(tmp_path / "fresh"))
    reused = evaluate_checkpoint(random_checkpoint, str(subset), str(tmp_path / "reused"), catalog=archive["catalog"])
    assert reused["chips"] == fresh["chips"] == (full["ID"] == full["ID"].iloc[0]).sum()
    assert reused["confusion"] == fresh["confusion"]
    assert not (tmp_path / "reused" / "catalog").exists()  # nothing classified again

    with pytest.raises(ValueError, match=r"holds 0 of the \d+ chips of"):
        other = tmp_path / "other.csv"
        write_manifest(full.assign(URI=full["URI"].str.replace("_raw.fits", "_elsewhere.fits")), other)
        evaluate_checkpoint(random_checkpoint, str(other), str(tmp_path / "missing"), catalog=archive["catalog"])
