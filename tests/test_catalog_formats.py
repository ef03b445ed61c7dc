"""Catalogs checked by astronomers' own tools: fitsverify (cfitsio), astropy's strict VOTable parser, LSDB for HATS."""

from __future__ import annotations

import shutil
import subprocess
import warnings

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from astropy.io import fits
from astropy.io.fits.verify import VerifyWarning
from astropy.io.votable import parse
from astropy.io.votable.ucd import check_ucd

from ray_hrc.catalog_formats import COLUMNS, NO_POSITION, read_table, write_table
from ray_hrc.classify import ERROR_TABLE_COLUMNS, ClassifyConfig
from ray_hrc.predict import CATALOG_COLUMNS


def fitsverify(*paths) -> None:
    """Fail unless cfitsio's fitsverify finds no error and no warning in every file."""
    assert shutil.which("fitsverify"), "fitsverify is not installed: `make test-deps` (Debian package fitsverify)"
    done = subprocess.run(["fitsverify", "-q", *map(str, paths)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.count("verification OK") == len(paths), done.stdout + done.stderr


def synthetic_catalog(n: int = 40, seed: int = 0) -> pd.DataFrame:
    """Catalog rows with every column `consolidate` writes (and a bool column), at random sky positions."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "uri": [f"s3://archive/raw/j{i:05d}q_raw.fits" for i in range(n)],
            "obsid": [f"j{i:05d}q" for i in range(n)],
            "hdu": rng.choice([1, 4], n),
            "ccdchip": rng.choice([1, 2], n),
            "instrument": "ACS/WFC",
            "detector": "WFC",
            "filter": rng.choice(["F606W", "F814W"], n),
            "exptime": rng.uniform(100, 2000, n),
            "targname": rng.choice(["NGC-4449", "M31-DISK", "ÉTOILE-1"], n),
            "date_obs": "2014-12-24T11:11:32",
            "ra": rng.uniform(0, 360, n),
            "dec": np.degrees(np.arcsin(rng.uniform(-1, 1, n))),
            "label": rng.choice(["galaxy", "NSC"], n),
            "p_galaxy": rng.random(n),
            "p_nsc": rng.random(n),
            "model": "hrcelestialnet",
            "checkpoint": "0123456789abcdef",
            "label_true": rng.choice(["galaxy", "NSC", ""], n),
            "body": rng.choice(["SYN-G001", ""], n),
            "preprocess_ms": rng.uniform(10, 20, n),
            "classify_ms": rng.uniform(1, 5, n),
            "radec_from_targ": rng.random(n) < 0.2,
        }
    )


def error_table() -> pd.DataFrame:
    """An error row whose message holds a newline and a NUL, as messages quoting a broken file's bytes can."""
    return pd.DataFrame(
        [
            {
                "uri": "x.fits",
                "hdu": 1,
                "obsid": "",
                "error_class": "not_fits",
                "error": "x.fits: expected SIMPLE  =  T,\nfound 'SIMPL\x00' instead",
            }
        ]
    )


def test_every_catalog_and_error_column_has_a_valid_ucd():
    for name in [*CATALOG_COLUMNS, "label_true", "body", "preprocess_ms", "classify_ms", *ERROR_TABLE_COLUMNS]:
        assert name in COLUMNS, f"{name} has no unit/UCD/description in catalog_formats.COLUMNS"
    for name, (_, ucd, _) in COLUMNS.items():
        assert check_ucd(ucd, check_controlled_vocabulary=True), f"{name}: {ucd} is not a valid UCD1+ string"


def test_fits_catalog_and_empty_error_table_pass_fitsverify(tmp_path):
    catalog = synthetic_catalog()
    write_table(catalog, str(tmp_path / "catalog.fits"), "fits")
    write_table(pd.DataFrame(columns=ERROR_TABLE_COLUMNS), str(tmp_path / "errors.fits"), "fits")
    write_table(error_table(), str(tmp_path / "errors_2.fits"), "fits")
    fitsverify(tmp_path / "catalog.fits", tmp_path / "errors.fits", tmp_path / "errors_2.fits")
    with fits.open(tmp_path / "catalog.fits") as hdul:
        header = hdul["CATALOG"].header
        units = {header[f"TTYPE{i}"]: (header.get(f"TUNIT{i}"), header.get(f"TUCD{i}")) for i in range(1, header["TFIELDS"] + 1)}
        assert hdul["CATALOG"].columns["radec_from_targ"].format == "L"  # FITS logical: every FITS reader takes it
    assert units["ra"] == ("deg", "pos.eq.ra;meta.main") and units["dec"] == ("deg", "pos.eq.dec;meta.main")
    assert units["exptime"] == ("s", "time.duration;obs.exposure") and units["p_galaxy"] == (None, "stat.probability")
    with fits.open(tmp_path / "errors.fits") as hdul:
        assert hdul["ERRORS"].columns["hdu"].format == "K"  # an empty error table keeps its integer column
    back = read_table(str(tmp_path / "catalog.fits"), "fits")
    np.testing.assert_allclose(back["ra"], catalog["ra"])
    assert list(back["targname"]) == [t.replace("É", "\\xc9") for t in catalog["targname"]]
    assert read_table(str(tmp_path / "errors_2.fits"), "fits")["error"][0] == "x.fits: expected SIMPLE  =  T, found 'SIMPL ' instead"


def test_votable_parses_strictly_with_units_and_ucds(tmp_path):
    catalog = synthetic_catalog()
    write_table(catalog, str(tmp_path / "catalog.vot"), "votable")
    write_table(pd.DataFrame(columns=ERROR_TABLE_COLUMNS), str(tmp_path / "errors.vot"), "votable")
    parse(str(tmp_path / "errors.vot"), verify="exception")
    write_table(error_table(), str(tmp_path / "errors_2.vot"), "votable")
    assert read_table(str(tmp_path / "errors_2.vot"), "votable")["error"][0] == "x.fits: expected SIMPLE  =  T,\nfound 'SIMPL ' instead"
    fields = {f.name: f for f in parse(str(tmp_path / "catalog.vot"), verify="exception").get_first_table().fields}
    assert (str(fields["ra"].unit), fields["ra"].ucd) == ("deg", "pos.eq.ra;meta.main")
    assert (str(fields["dec"].unit), fields["dec"].ucd) == ("deg", "pos.eq.dec;meta.main")
    assert str(fields["exptime"].unit) == "s" and fields["p_nsc"].ucd == "stat.probability"
    assert fields["radec_from_targ"].datatype == "short"  # not astropy's "bit", which not every reader takes
    back = read_table(str(tmp_path / "catalog.vot"), "votable")
    assert list(back["radec_from_targ"]) == list(catalog["radec_from_targ"].astype(int))


def test_parquet_fields_carry_unit_and_ucd(tmp_path):
    write_table(synthetic_catalog(), str(tmp_path / "catalog.parquet"), "parquet")
    schema = pq.read_schema(tmp_path / "catalog.parquet")
    assert schema.field("ra").metadata == {b"unit": b"deg", b"ucd": b"pos.eq.ra;meta.main", b"description": COLUMNS["ra"][2].encode()}
    assert not list(tmp_path.glob("*.tmp"))


def test_cropped_chips_pass_fitsverify(tiny_archive, tmp_path):
    """The LCID samples `ray-hrc crop` writes (`crop.write_chip`), for both instruments, and a chip from a long URI."""
    from ray_hrc.crop import chip_hdu, write_chip
    from ray_hrc.data import chip_rows
    from ray_hrc.manifest import read_manifest

    manifest = read_manifest(str(tiny_archive))
    uris = manifest.groupby("Instrument")["URI"].first()
    assert len(uris) == 2
    rows = [row for uri in uris for row in chip_rows({"uri": uri})]
    long_row = {**rows[0], "uri": "s3://a-bucket-with-a-long-name/hst/archive/mast/public/acs/wfc/raw/" + rows[0]["uri"].rsplit("/", 1)[1]}
    with warnings.catch_warnings():
        warnings.simplefilter("error", VerifyWarning)  # no card truncated on the way
        paths = [write_chip(row, str(tmp_path))["path"] for row in rows]
        chip_hdu(long_row).writeto(tmp_path / "long_uri.fits")
    fitsverify(*paths, tmp_path / "long_uri.fits")
    assert fits.getheader(tmp_path / "long_uri.fits")["SRCURI"] == long_row["uri"]


def test_hats_catalog_opens_in_lsdb_and_crossmatches_known_positions(tmp_path):
    import astropy.units as u
    import lsdb
    from mocpy import MOC

    catalog = synthetic_catalog(n=200, seed=1)
    catalog.loc[7, ["ra", "dec"]] = np.nan  # no position: kept apart, not dropped
    write_table(catalog, str(tmp_path / "catalog.hats"), "hats")
    chips = lsdb.open_catalog(tmp_path / "catalog.hats")
    assert chips.hc_structure.moc is not None and chips.margin is not None
    moc = MOC.from_fits(tmp_path / "catalog.hats" / "moc.fits")  # the coverage map, as Aladin loads it
    assert moc.contains_lonlat(
        placed_ra := catalog["ra"].drop(index=7).to_numpy() * u.deg, catalog["dec"].drop(index=7).to_numpy() * u.deg
    ).all()
    assert moc.sky_fraction < 0.5 and len(placed_ra) == 199
    placed = catalog.drop(index=7)
    back = chips.compute().sort_values("obsid")
    assert list(back["obsid"]) == sorted(placed["obsid"]) and set(catalog.columns) <= set(back.columns)
    np.testing.assert_allclose(back["p_galaxy"], placed.sort_values("obsid")["p_galaxy"])
    assert list(pd.read_parquet(tmp_path / "catalog.hats" / NO_POSITION)["obsid"]) == [catalog["obsid"][7]]

    # Known sources 3 arcsec from five chip centres, and one far from every chip.
    picks = placed.iloc[[0, 5, 50, 100, 150]]
    known = pd.DataFrame(
        {
            "name": ["s0", "s1", "s2", "s3", "s4"],
            "ra": picks["ra"].to_numpy() + 3 / 3600 / np.cos(np.radians(picks["dec"].to_numpy())),
            "dec": picks["dec"].to_numpy(),
        }
    )
    known.loc[5] = ["far", 0.0, -89.99]
    matched = (
        lsdb.from_dataframe(known, catalog_name="known", margin_threshold=None)
        .crossmatch(chips, radius_arcsec=10, suffixes=("_known", "_chip"), suffix_method="all_columns")
        .compute()
    )
    assert sorted(zip(matched["name_known"], matched["obsid_chip"], strict=True)) == list(
        zip(known["name"][:5], picks["obsid"], strict=True)
    )
    np.testing.assert_allclose(matched["_dist_arcsec"], 3.0, atol=0.01)
    again = read_table(str(tmp_path / "catalog.hats"), "hats")
    assert len(again) == len(placed)


@pytest.mark.timeout(600)
def test_classify_cli_writes_hats_that_lsdb_crossmatches_and_fits_votable_that_verify(
    ray_session, tiny_archive, random_checkpoint, tmp_path
):
    """`ray-hrc classify --format hats` on a real local Ray; then the same parts consolidated as FITS and VOTable."""
    import lsdb

    from ray_hrc.classify import classify_archive
    from ray_hrc.cli import main
    from ray_hrc.manifest import read_manifest

    out = tmp_path / "run"
    assert main(["classify", "--input", str(tiny_archive), "--checkpoint", random_checkpoint, "--out", str(out), "--format", "hats"]) == 0
    manifest = read_manifest(str(tiny_archive))
    chips = lsdb.open_catalog(out / "catalog.hats")
    assert chips.hc_structure.catalog_info.total_rows == len(manifest) and (out / "errors.parquet").exists()

    # Known positions: each body's coordinates in the manifest; every chip matches its own body within 5 arcmin.
    bodies = manifest.groupby("ID").agg(ra=("RA", "first"), dec=("DEC", "first")).reset_index()
    known = lsdb.from_dataframe(bodies, catalog_name="bodies", margin_threshold=300)
    matched = chips.crossmatch(known, radius_arcsec=300, suffixes=("", "_body"), suffix_method="overlapping_columns").compute()
    assert len(matched) == len(manifest) and (matched["body"] == matched["ID"]).all()

    for fmt in ("fits", "votable"):  # resume: nothing left to classify, the parts are consolidated again in `fmt`
        summary = classify_archive([str(tiny_archive)], random_checkpoint, str(out), config=ClassifyConfig(format=fmt))
        assert summary["new_chips"] == 0 and summary["chips"] == len(manifest)
        if fmt == "fits":
            fitsverify(summary["catalog"], summary["errors_table"])
        else:
            table = parse(summary["catalog"], verify="exception").get_first_table()
            assert len(table.array) == len(manifest) and table.get_field_by_id("ra").ucd == "pos.eq.ra;meta.main"
            parse(summary["errors_table"], verify="exception")


def test_sky_report_draws_the_chips_and_summarises_each_target(tmp_path):
    from matplotlib.image import imread

    from ray_hrc.evaluate import sky_report

    catalog = pd.DataFrame(
        {
            "targname": ["NGC-1", "NGC-1", "NGC-1", "M31", ""],
            "ra": [179.9, 180.1, 180.0, 10.7, np.nan],  # a cell across RA 180 deg, and a chip without a position
            "dec": [0.0, 0.1, -0.1, 41.3, np.nan],
            "label": ["galaxy", "NSC", "galaxy", "NSC", "galaxy"],
            "p_galaxy": [0.9, 0.2, 0.7, 0.1, 0.6],
        }
    )
    targets = sky_report(catalog, tmp_path, title="test")
    assert targets.to_dict("list") == {
        "targname": ["NGC-1", "(none)", "M31"],
        "chips": [3, 1, 1],
        "share_galaxy": [2 / 3, 1.0, 0.0],
        "mean_p_galaxy": pytest.approx([0.6, 0.6, 0.1]),
    }
    assert pd.read_csv(tmp_path / "targets.csv", keep_default_na=False)["targname"].tolist() == ["NGC-1", "(none)", "M31"]
    assert "| NGC-1 | 3 | 66.7% | 0.600 |" in (tmp_path / "targets.md").read_text()
    image = imread(tmp_path / "sky.png")
    assert image.shape[0] > 400 and image[..., :3].std() > 0.05  # drawn, not blank


def test_hats_and_fits_catalogs_on_s3(s3_bucket):
    """The same writers against an S3-protocol server (moto): a HATS folder and a FITS file, each renamed into place."""
    import lsdb
    import s3fs
    from upath import UPath

    bucket, opts = s3_bucket
    catalog = synthetic_catalog(n=30, seed=2)
    write_table(catalog, f"{bucket}/run/catalog.hats", "hats", opts)
    write_table(catalog, f"{bucket}/run/catalog.fits", "fits", opts)
    listing = s3fs.S3FileSystem(**opts).ls(f"{bucket}/run")
    assert sorted(p.rsplit("/", 1)[1] for p in listing) == ["catalog.fits", "catalog.hats"]
    chips = lsdb.open_catalog(UPath(f"{bucket}/run/catalog.hats", **opts))
    assert (
        sorted(chips.compute()["obsid"])
        == sorted(read_table(f"{bucket}/run/catalog.hats", "hats", opts)["obsid"])
        == sorted(catalog["obsid"])
    )
    assert list(read_table(f"{bucket}/run/catalog.fits", "fits", opts)["obsid"]) == list(catalog["obsid"])


def test_evaluate_scores_a_hats_catalog_and_writes_the_sky_report(tiny_archive, random_checkpoint, tmp_path):
    """`ray-hrc evaluate --catalog OUT/catalog.hats` (no classification, so no Ray): the report gains sky.png and targets."""
    from ray_hrc.checkpoint import load_checkpoint
    from ray_hrc.chips import read_fits
    from ray_hrc.evaluate import evaluate_checkpoint
    from ray_hrc.manifest import read_manifest

    manifest = read_manifest(str(tiny_archive))
    rows = []
    for i, (_, r) in enumerate(manifest.iterrows()):
        (chip,) = read_fits(r["URI"], hdus=[int(r["HDU Index"])])
        right = i % 3 != 0  # two chips in three labelled right
        label = r["Label"] if right else ("NSC" if r["Label"] == "galaxy" else "galaxy")
        meta = {k: getattr(chip.meta, k) for k in ("uri", "obsid", "hdu", "targname", "ra", "dec")}
        rows.append({**meta, "label": label, "p_galaxy": 0.8 if label == "galaxy" else 0.2, "p_nsc": 0.2 if label == "galaxy" else 0.8,
                     "checkpoint": load_checkpoint(random_checkpoint)["weights_hash"], "label_true": r["Label"], "body": r["ID"],
                     "preprocess_ms": 1.0, "classify_ms": 1.0})  # fmt: skip
    write_table(pd.DataFrame(rows), str(tmp_path / "run" / "catalog.hats"), "hats")
    metrics = evaluate_checkpoint(
        random_checkpoint, str(tiny_archive), str(tmp_path / "report"), catalog=str(tmp_path / "run" / "catalog.hats")
    )
    assert metrics["chips"] == len(manifest) and metrics["accuracy"] == pytest.approx(
        sum(i % 3 != 0 for i in range(len(manifest))) / len(manifest)
    )
    targets = pd.read_csv(tmp_path / "report" / "targets.csv")
    assert targets["chips"].sum() == len(manifest) and (tmp_path / "report" / "sky.png").stat().st_size > 10_000
