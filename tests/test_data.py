"""Ray Data ingestion and `ray-hrc crop` on a real local Ray, from local disk and from a real S3-protocol server."""

from __future__ import annotations

import subprocess

import numpy as np
import pandas as pd
import pytest
import s3fs
from astropy.io import fits
from rawfits import science_pattern, write_file

from ray_hrc.crop import crop_archive
from ray_hrc.data import ReadConfig, error_rows, good_chips, read_chips, summarize
from ray_hrc.storage import OutputConfig

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def mixed_archive(tmp_path_factory):
    """Two good raw files (one per instrument), and one of each kind of bad file."""
    d = tmp_path_factory.mktemp("archive")
    write_file(d / "jgood001q_raw.fits", "ACS/WFC", rootname="jgood001q")
    write_file(d / "igood002q_raw.fits", "WFC3/UVIS", rootname="igood002q")
    (d / "jjunk003q_raw.fits").write_bytes(b"not fits" * 1000)
    full = (d / "jgood001q_raw.fits").read_bytes()
    (d / "jtrunc04q_raw.fits").write_bytes(full[: len(full) // 2])
    write_file(d / "iwfcir5q_raw.fits", instrument="WFC3", detector="IR", rootname="iwfcir5q")
    return d


def test_read_chips_keeps_good_chips_and_reports_every_bad_one(ray_session, mixed_archive):
    ds = read_chips(str(mixed_archive))
    good = good_chips(ds)
    batches = list(good.iter_batches(batch_size=2, batch_format="numpy"))
    pixels = np.concatenate([b["pixels"] for b in batches])
    assert pixels.dtype == np.uint16 and pixels.shape[1:] == (2048, 4096)  # chips travel as 16-bit
    files = sorted(u.rsplit("/", 1)[-1] for u in np.concatenate([b["uri"] for b in batches]))
    assert files == ["igood002q_raw.fits"] * 2 + ["jgood001q_raw.fits"] * 2 + ["jtrunc04q_raw.fits"]  # SCI,1 of the truncated file survives
    errors = error_rows(ds).to_pandas().astype({"uri": str, "error": str, "error_class": str})
    by_file = errors.groupby(errors["uri"].str.rsplit("/", n=1).str[-1])["error_class"].agg(set).to_dict()
    assert by_file == {
        "jjunk003q_raw.fits": {"not_fits"},
        "jtrunc04q_raw.fits": {"truncated"},
        "iwfcir5q_raw.fits": {"unsupported_instrument"},
    }
    assert all(name in msg for name, msg in zip(errors["uri"].str.rsplit("/", n=1).str[-1], errors["error"], strict=True))


def test_read_chips_keeps_its_retry_bound_without_a_deprecation_warning(ray_session, mixed_archive):
    """The read stage bounds its task retries through Ray's deprecated ``**ray_remote_args`` (Ray 2.60 has no named
    parameter for ``max_retries``): the bound still reaches the operator, and only that one warning is silenced."""
    import warnings

    from ray.util.annotations import RayDeprecationWarning

    from ray_hrc.runtime import retry_bounds_as_remote_args

    with warnings.catch_warnings():
        warnings.simplefilter("error", RayDeprecationWarning)
        ds = read_chips(str(mixed_archive), ReadConfig(max_retries=2))
        with retry_bounds_as_remote_args(), pytest.raises(RayDeprecationWarning, match="something else"):
            warnings.warn("something else is deprecated", RayDeprecationWarning, stacklevel=1)
    ops = [op for op in ds._logical_plan.dag.post_order_iter() if getattr(op, "ray_remote_args", None)]
    assert [op.ray_remote_args.get("max_retries") for op in ops] == [2], [op.ray_remote_args for op in ops]


def test_crop_to_s3_gives_byte_exact_science_areas(ray_session, mixed_archive, s3_bucket):
    bucket, opts = s3_bucket
    fs = s3fs.S3FileSystem(**opts)
    for name in ("jgood001q_raw.fits", "igood002q_raw.fits", "jjunk003q_raw.fits"):
        fs.put(str(mixed_archive / name), f"{bucket}/raw/{name}")
    manifest = pd.DataFrame(
        [
            {
                "ID": "B1",
                "Instrument": "ACS/WFC",
                "OBSID": "jgood001q",
                "Filter": "F606W",
                "RA": 0,
                "DEC": 0,
                "HDU Index": 4,
                "Label": "galaxy",
            },
            {
                "ID": "B2",
                "Instrument": "WFC3/UVIS",
                "OBSID": "igood002q",
                "Filter": "F336W",
                "RA": 0,
                "DEC": 0,
                "HDU Index": 1,
                "Label": "NSC",
            },
            {
                "ID": "B2",
                "Instrument": "WFC3/UVIS",
                "OBSID": "igood002q",
                "Filter": "F336W",
                "RA": 0,
                "DEC": 0,
                "HDU Index": 4,
                "Label": "NSC",
            },
            {
                "ID": "B3",
                "Instrument": "ACS/WFC",
                "OBSID": "jjunk003q",
                "Filter": "F606W",
                "RA": 0,
                "DEC": 0,
                "HDU Index": 1,
                "Label": "NSC",
            },
        ]
    )
    with fs.open(f"{bucket}/lists/test.csv", "w") as fh:
        manifest.to_csv(fh)  # the published layout: leading unnamed index column
    config = ReadConfig(template=f"{bucket}/raw/{{obsid}}_raw.fits", storage_options=opts)
    summary = crop_archive([f"{bucket}/lists/test.csv"], f"{bucket}/crops", config, OutputConfig(opts))
    assert summary["chips"] == 3 and summary["errors"] == 1 and summary["errors_by_class"] == {"not_fits": 1}
    with fs.open(f"{bucket}/crops/index.csv") as fh:
        index = pd.read_csv(fh)
    assert sorted(index["path"].str.rsplit("/", n=1).str[-1]) == ["igood002q_hdu1.fits", "igood002q_hdu4.fits", "jgood001q_hdu4.fits"]
    assert sorted(index["label_true"]) == ["NSC", "NSC", "galaxy"]
    for path, extver in (("jgood001q_hdu4.fits", 2), ("igood002q_hdu1.fits", 1), ("igood002q_hdu4.fits", 2)):
        with fs.open(f"{bucket}/crops/{path}") as fh, fits.open(fh) as hdul:
            data = hdul[0].data
            assert data.dtype == np.uint16 and data.shape == (2048, 4096)
            np.testing.assert_array_equal(data, science_pattern(extver))  # byte-exact science area, raw DN
            assert hdul[0].header["SRCEXTV"] == extver and "BIAS1" in hdul[0].header
    with fs.open(f"{bucket}/crops/errors.csv") as fh:
        errors = pd.read_csv(fh)
    assert errors["error_class"].tolist() == ["not_fits"] and "jjunk003q_raw.fits" in errors["error"][0]


def test_crop_cli_local(ray_session, mixed_archive, tmp_path):
    from ray_hrc.cli import main

    out = tmp_path / "crops"
    assert main(["crop", str(mixed_archive / "jgood001q_raw.fits"), str(mixed_archive / "jjunk003q_raw.fits"), "--out", str(out)]) == 0
    index = pd.read_csv(out / "index.csv")
    assert sorted(index["hdu"]) == [1, 4] and (out / "jgood001q_hdu1.fits").exists()
    assert len(pd.read_csv(out / "errors.csv")) == 1
    assert not list(out.glob("*.part-*"))
    chips = sorted(out.glob("*.fits"))  # every chip passes cfitsio's fitsverify: no error, no warning
    done = subprocess.run(["fitsverify", "-q", *map(str, chips)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.count("verification OK") == len(chips) == 2, done.stdout + done.stderr


def test_summarize_counts_both():
    rows = [{"uri": "a", "error_class": "", "label_true": "galaxy"}, {"uri": "a", "error_class": "truncated", "label_true": ""}]
    assert summarize(rows) == {"chips": 1, "errors": 1, "files": 1, "errors_by_class": {"truncated": 1}, "by_label": {"galaxy": 1}}


def test_shuffled_reads_give_every_chip_in_a_new_order_each_epoch(ray_session, tiny_archive):
    """shuffle_seed: a manifest lists a body's chips together; training must not see them in that order every epoch."""
    from ray_hrc.manifest import read_manifest

    def epochs(ds, n):
        return [[(r["uri"], int(r["hdu"])) for r in ds.select_columns(["uri", "hdu"]).iter_rows()] for _ in range(n)]

    listed = read_manifest(str(tiny_archive))
    first, second = epochs(read_chips(str(tiny_archive), shuffle_seed=0), 2)
    assert sorted(first) == sorted(second) == sorted(zip(listed["URI"], listed["HDU Index"].astype(int), strict=True))  # every chip once
    assert first != second  # reshuffled between executions
    assert epochs(read_chips(str(tiny_archive), shuffle_seed=0), 2) == [first, second]  # reproducible from the seed
