"""Manifests in the published LCID format, URI templates, the split by body, and source resolution. No Ray."""

from __future__ import annotations

import pandas as pd
import pytest

from ray_hrc.manifest import (
    DEFAULT_TEMPLATE,
    ManifestError,
    read_manifest,
    render_template,
    resolve_sources,
    split_manifest,
    split_three,
    write_manifest,
)

# Rows as the authors published them (Table A1 + a Label column), with the leading unnamed index column.
PUBLISHED = """,ID,Instrument,OBSID,Filter,RA,DEC,HDU Index,Label
0,NGC628,ACS/WFC,j96r23b7q,F435W,24.152604,15.76988,1,galaxy
1,NGC628,ACS/WFC,j96r23b7q,F435W,24.179654,15.782398,4,galaxy
2,NGC6302,WFC3/UVIS,ie3o05ywq,F673N,258.422912,-37.091733,1,NSC
3,NGC6302,WFC3/UVIS,ie3o05ywq,F673N,258.441272,-37.10934,4,NSC
4,M101,ACS/WFC,jc1373esq,F555W,210.893431,54.374057,1,galaxy
5,RMC136,ACS/WFC,jb6wd6evq,F814W,84.805574,-69.207164,1,NSC
"""


@pytest.fixture
def published(tmp_path):
    path = tmp_path / "lcid_test.csv"
    path.write_text(PUBLISHED)
    return path


def test_reads_the_published_format_and_resolves_to_mast(published):
    df = read_manifest(str(published))
    assert list(df.columns[:8]) == ["ID", "Instrument", "OBSID", "Filter", "RA", "DEC", "HDU Index", "Label"]
    assert len(df) == 6 and df["HDU Index"].tolist() == [1, 4, 1, 4, 1, 1]
    assert df["URI"][0] == "s3://stpubdata/hst/public/j96r/j96r23b7q/j96r23b7q_raw.fits"
    assert df["URI"][2] == "s3://stpubdata/hst/public/ie3o/ie3o05ywq/ie3o05ywq_raw.fits"


def test_templates_and_uri_column(published, tmp_path):
    assert render_template("/data/{obsid}_raw.fits", obsid="abc") == "/data/abc_raw.fits"
    assert render_template("/data/raw", obsid="abc") == "/data/raw/abc_raw.fits"
    assert render_template(DEFAULT_TEMPLATE, obsid="icwb1iu5q").endswith("icwb/icwb1iu5q/icwb1iu5q_raw.fits")
    with pytest.raises(ManifestError, match="known fields"):
        render_template("{nope}", obsid="x")
    df = pd.read_csv(published, index_col=0)
    df["URI"] = ["a_raw.fits", "", "/abs/b_raw.fits", "s3://b/c_raw.fits", "", ""]
    path = tmp_path / "with_uri.csv"
    write_manifest(df, path)
    out = read_manifest(str(path), template="/mirror")
    assert out["URI"].tolist()[:4] == [str(tmp_path / "a_raw.fits"), "/mirror/j96r23b7q_raw.fits", "/abs/b_raw.fits", "s3://b/c_raw.fits"]


def test_bad_manifests_say_what_was_expected(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("ID,OBSID,Label\nX,j1,galaxy\n")
    with pytest.raises(ManifestError, match=r"bad.csv lacks the column\(s\) \['Instrument'"):
        read_manifest(str(path))
    path.write_text(PUBLISHED.replace("galaxy", "star", 1))
    with pytest.raises(ManifestError, match=r"\['star'\] are not known"):
        read_manifest(str(path))


def _many_bodies(n_gal=10, n_nsc=8):
    rows = []
    for kind, n in (("galaxy", n_gal), ("NSC", n_nsc)):
        for b in range(n):
            for k in range(2 + b % 4):
                rows.append(
                    {
                        "ID": f"{kind}-{b}",
                        "Instrument": "ACS/WFC",
                        "OBSID": f"j{kind[:1]}{b:03d}{k:03d}q",
                        "Filter": "F814W",
                        "RA": 1.0,
                        "DEC": 2.0,
                        "HDU Index": 1 + 3 * (k % 2),
                        "Label": kind,
                    }
                )
    return pd.DataFrame(rows)


def test_split_by_body_stratified_and_reproducible():
    df = _many_bodies()
    train, test = split_manifest(df, test_fraction=0.2, seed=0)
    assert not set(train["ID"]) & set(test["ID"])  # no leakage: a body is on one side only
    assert len(train) + len(test) == len(df)
    for label in ("galaxy", "NSC"):
        share = (test["Label"] == label).sum() / (df["Label"] == label).sum()
        assert 0.1 <= share <= 0.32, (label, share)
        assert (train["Label"] == label).any() and (test["Label"] == label).any()
    again, _ = split_manifest(df, test_fraction=0.2, seed=0)
    pd.testing.assert_frame_equal(train, again)
    other, _ = split_manifest(df, test_fraction=0.2, seed=1)
    assert set(other["ID"]) != set(train["ID"])


def test_split_cli_keeps_columns_and_adds_uri(published, tmp_path):
    from ray_hrc.cli import main

    big = _many_bodies()
    path = tmp_path / "m.csv"
    write_manifest(big, path)
    assert main(["split", str(path), "--out", str(tmp_path / "split"), "--seed", "3"]) == 0
    train = read_manifest(str(tmp_path / "split" / "train.csv"))
    raw = pd.read_csv(tmp_path / "split" / "test.csv", index_col=0)
    assert list(raw.columns) == ["ID", "Instrument", "OBSID", "Filter", "RA", "DEC", "HDU Index", "Label", "URI"]
    assert not set(train["ID"]) & set(raw["ID"])
    val = read_manifest(str(tmp_path / "split" / "val.csv"))
    assert not set(val["ID"]) & (set(train["ID"]) | set(raw["ID"]))
    assert len(train) + len(val) + len(raw) == len(big)


def test_three_way_split_by_body_stratified_validation_from_training_bodies():
    df = _many_bodies()
    train, val, test = split_three(df, val_fraction=0.25, test_fraction=0.2, seed=0)
    parts = {"train": set(train["ID"]), "val": set(val["ID"]), "test": set(test["ID"])}
    assert not parts["train"] & parts["val"] and not parts["train"] & parts["test"] and not parts["val"] & parts["test"]
    assert len(train) + len(val) + len(test) == len(df)
    trained_on, _ = split_manifest(df, test_fraction=0.2, seed=0)
    pd.testing.assert_frame_equal(pd.concat([train, val]).sort_values(["ID", "OBSID", "HDU Index"]).reset_index(drop=True),
                                  trained_on.sort_values(["ID", "OBSID", "HDU Index"]).reset_index(drop=True))  # fmt: skip
    for label in ("galaxy", "NSC"):
        assert (train["Label"] == label).any() and (val["Label"] == label).any() and (test["Label"] == label).any()
        share = (val["Label"] == label).sum() / (trained_on["Label"] == label).sum()
        assert 0.1 <= share <= 0.4, (label, share)
    only_val = split_three(df, val_fraction=0.25, test_fraction=None, seed=0)
    assert only_val[2] is None and len(only_val[0]) + len(only_val[1]) == len(df)


def test_resolve_sources_groups_chips_per_file(published, tmp_path):
    files = resolve_sources([str(published)])
    assert len(files) == 4  # 6 chips in 4 files
    first = files.iloc[0]
    assert first["hdus"] == [1, 4] and first["labels"] == ["galaxy", "galaxy"] and first["bodies"] == ["NGC628", "NGC628"]
    for name in ("a_raw.fits", "b_raw.fits", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.rsplit("/", 1)[-1] for p in resolve_sources(str(tmp_path))["uri"]] == ["a_raw.fits", "b_raw.fits"]
    assert len(resolve_sources(str(tmp_path / "a_*.fits"))) == 1
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_sources(str(tmp_path / "nothing_here"))
