"""Crop exactness for every layout, header parsing, and one error record per kind of bad input. No Ray."""

from __future__ import annotations

import gzip
import time

import numpy as np
import pytest
from astropy.io import fits
from hostile import hostile_files
from rawfits import PRESCAN_DN, layout_for, sci_header, science_pattern, write_file

from ray_hrc import chips
from ray_hrc.chips import BLOCK, Chip, ChipError, filter_name, read_fits
from ray_hrc.layouts import CHIP_SHAPE, LAYOUTS, UnsupportedLayoutError, find_layout


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: f"{lay.name}-{lay.product}")
def test_every_layout_crops_to_chip_shape(layout):
    for geom in layout.chips.values():
        rows = len(range(*geom.rows.indices(layout.shape[0])))
        cols = sum(len(range(*a.science.indices(layout.shape[1]))) for a in geom.amps)
        assert (rows, cols) == CHIP_SHAPE


@pytest.mark.parametrize("name", ["ACS/WFC", "WFC3/UVIS"])
def test_raw_crop_is_exact_and_bias_comes_from_each_prescan(tmp_path, name):
    path = write_file(tmp_path / "x_raw.fits", name)
    chips = read_fits(str(path))
    assert [c.meta.hdu for c in chips] == [1, 4]
    for chip in chips:
        assert isinstance(chip, Chip), chip
        assert chip.pixels.dtype == np.uint16 and chip.pixels.shape == CHIP_SHAPE
        np.testing.assert_array_equal(chip.pixels, science_pattern(chip.meta.extver))  # only science survives, same orientation
        np.testing.assert_array_equal(chip.amp_bias, np.array(PRESCAN_DN, np.float32))
        assert chip.meta.instrument == name and chip.meta.product == "raw"


def test_uvis_drops_the_three_rows_next_to_the_chip_gap():
    lay = layout_for("WFC3/UVIS")
    assert lay.chips[2].rows == slice(22, 2070)  # UVIS1: 19 virtual overscan rows + 3 science rows at the gap (top)
    assert lay.chips[1].rows == slice(0, 2048)  # UVIS2: the last 3 science rows (next to its overscan at the bottom)
    acs = layout_for("ACS/WFC")
    assert acs.chips[2].rows == slice(20, 2068) and acs.chips[1].rows == slice(0, 2048)


@pytest.mark.parametrize("name", ["ACS/WFC", "WFC3/UVIS"])
def test_calibrated_crop(tmp_path, name):
    path = write_file(tmp_path / "x_flt.fits", name, "calibrated")
    for chip in read_fits(str(path)):
        assert isinstance(chip, Chip), chip
        assert chip.pixels.dtype == np.float32 and chip.meta.product == "calibrated"
        np.testing.assert_array_equal(chip.pixels, science_pattern(chip.meta.extver).astype(np.float32))
        assert not chip.amp_bias.any()


def test_manifest_hdu_index_resolves_to_the_same_sci(tmp_path):
    path = write_file(tmp_path / "x_raw.fits")
    (chip,) = read_fits(str(path), hdus=[4])
    assert chip.meta.hdu == 4 and chip.meta.extver == 2 and chip.meta.ccdchip == 1
    (err,) = read_fits(str(path), hdus=[2])
    assert isinstance(err, ChipError) and err.error_class == "missing_sci" and "HDU 2" in err.message


def test_metadata_and_chip_centre(tmp_path):
    path = write_file(tmp_path / "x_raw.fits", rootname="J96R23B7Q")
    c1, c2 = read_fits(str(path))
    m = c1.meta
    assert (m.obsid, m.filter, m.exptime, m.targname, m.date_obs) == ("j96r23b7q", "F606W", 500.0, "NGC-TEST", "2019-03-04T05:06:07")
    assert not m.radec_from_targ and abs(m.ra - 150.0) < 0.1
    assert c2.meta.dec > c1.meta.dec  # the two chips' centres differ as their WCSs do


def test_radec_falls_back_to_target_when_no_wcs(tmp_path):
    path = tmp_path / "x_raw.fits"
    write_file(path)
    with fits.open(path, mode="update") as hdul:
        for key in ("CTYPE1", "CTYPE2", "CRVAL1", "CRVAL2", "CRPIX1", "CRPIX2", "CD1_1", "CD1_2", "CD2_1", "CD2_2"):
            del hdul[1].header[key]
    (chip,) = read_fits(str(path), hdus=[1])
    assert chip.meta.radec_from_targ and (chip.meta.ra, chip.meta.dec) == (150.0, 2.0)


def test_filter_name():
    assert filter_name(fits.Header({"FILTER1": "CLEAR1L", "FILTER2": "F814W"})) == "F814W"
    assert filter_name(fits.Header({"FILTER": "F275W"})) == "F275W"


def test_find_layout_errors_say_what_was_expected():
    with pytest.raises(UnsupportedLayoutError, match=r"expected \(2068, 4144\) \(raw\) or \(2048, 4096\) \(calibrated\)"):
        find_layout("ACS", "WFC", (10, 10), where="SCI,2 of x.fits")
    with pytest.raises(UnsupportedLayoutError, match="WFC3/IR.*expected one of ACS/WFC, WFC3/UVIS"):
        find_layout("WFC3", "IR", (1024, 1024))


# --- bad input: each becomes an error record naming the file, and good chips still come out ---------------------------


def _only_error(records, error_class):
    assert len(records) >= 1 and all(isinstance(r, ChipError) for r in records), records
    assert {r.error_class for r in records} == {error_class}, [(r.error_class, r.message) for r in records]
    return records[0]


def test_truncated_file(tmp_path):
    path = write_file(tmp_path / "t_raw.fits")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    records = read_fits(str(path))
    errs = [r for r in records if isinstance(r, ChipError)]
    assert errs and {e.error_class for e in errs} <= {"truncated"}, [(e.error_class, e.message) for e in errs]
    assert "t_raw.fits" in errs[0].message


def test_not_fits(tmp_path):
    path = tmp_path / "junk_raw.fits"
    path.write_bytes(b"this is not a FITS file\n" * 100)
    err = _only_error(read_fits(str(path)), "not_fits")
    assert "junk_raw.fits" in err.message


def test_empty_bytes():
    _only_error(read_fits(b"", uri="request"), "not_fits")


def test_other_instrument(tmp_path):
    path = write_file(tmp_path / "ir_raw.fits", instrument="WFC3", detector="IR")
    err = _only_error(read_fits(str(path)), "unsupported_instrument")
    assert "WFC3/IR" in err.message and "ACS/WFC" in err.message


def test_missing_sci(tmp_path):
    path = tmp_path / "nosci_raw.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(name="ERR", ver=1)]).writeto(path)
    err = _only_error(read_fits(str(path)), "missing_sci")
    assert "nosci_raw.fits" in err.message


def test_wrong_shape(tmp_path):
    path = write_file(tmp_path / "small_raw.fits", shape=(100, 200))
    err = _only_error(read_fits(str(path)), "bad_shape")  # a supported instrument, the wrong shape
    assert "(100, 200)" in err.message and "(2068, 4144)" in err.message


def test_all_nan(tmp_path):
    path = write_file(tmp_path / "nan_flt.fits", product="calibrated", data_fn=lambda lay, v: np.full(lay.shape, np.nan, np.float32))
    err = _only_error(read_fits(str(path)), "all_nan")
    assert "nan_flt.fits" in err.message


def test_unreadable_uri(tmp_path):
    err = _only_error(read_fits(str(tmp_path / "missing_raw.fits")), "unreadable")
    assert "missing_raw.fits" in err.message


def test_one_bad_chip_does_not_lose_the_other(tmp_path):
    def data(layout, extver):
        from rawfits import raw_array

        return raw_array(layout, extver) if extver == 1 else np.zeros((5, 5), np.uint16)

    records = read_fits(str(write_file(tmp_path / "half_raw.fits", data_fn=data)))
    assert isinstance(records[0], Chip) and isinstance(records[1], ChipError)


# --- the fast header walk (map_fits) and WCS against astropy's ---------------------------------------------------------


def _astropy_only(monkeypatch):
    monkeypatch.setattr(chips, "_map_fits", lambda source, name=None: None)


@pytest.mark.parametrize("name", ["ACS/WFC", "WFC3/UVIS"])
@pytest.mark.parametrize("product", ["raw", "calibrated"])
def test_fast_path_reads_what_astropy_reads(tmp_path, monkeypatch, name, product):
    path = write_file(tmp_path / f"x_{product}.fits", name, product, rootname="J96R23B7Q")
    assert chips.map_fits(str(path)) is not None and chips.map_fits(path.read_bytes()) is not None
    fast = [read_fits(str(path)), read_fits(path.read_bytes(), uri=str(path)), read_fits(str(path), hdus=[4, 2])]
    with monkeypatch.context() as m:
        _astropy_only(m)
        slow = [read_fits(str(path)), read_fits(path.read_bytes(), uri=str(path)), read_fits(str(path), hdus=[4, 2])]
    for got, want in zip(fast, slow, strict=True):
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert type(g) is type(w)
            if isinstance(w, Chip):
                assert g.meta == w.meta and g.pixels.dtype == w.pixels.dtype
                np.testing.assert_array_equal(g.pixels, w.pixels)
                np.testing.assert_array_equal(g.amp_bias, w.amp_bias)
            else:
                assert (g.error_class, g.message) == (w.error_class, w.message)


def test_fast_path_declines_what_it_does_not_expect(tmp_path):
    good = write_file(tmp_path / "x_raw.fits").read_bytes()
    assert chips.map_fits(good) is not None
    table = fits.BinTableHDU.from_columns([fits.Column(name="a", format="J", array=np.arange(3))], name="SCI")
    with_table = tmp_path / "table_raw.fits"
    fits.HDUList([fits.PrimaryHDU(), table]).writeto(with_table)
    for odd in [with_table.read_bytes(), str(tmp_path / "missing_raw.fits"), str(tmp_path)]:  # astropy's business
        assert chips.map_fits(odd) is None


def test_walker_refuses_invalid_structure_and_names_the_hdu(tmp_path):
    good = write_file(tmp_path / "x_raw.fits").read_bytes()
    for odd, error_class, text in [
        (good[: len(good) // 3], "truncated", "HDU 1 of"),  # truncated in the data
        (good[: 2880 + 1000], "truncated", "ends inside its header"),  # in the first extension's header
        (good.replace(b"SIMPLE  =", b"SIMPLX  =", 1), "not_fits", "SIMPLE"),
        (good.replace(b"END" + b" " * 77, b" " * 80), "bad_header", "BITPIX appears twice"),  # no END: runs into the next header
        (b"", "not_fits", "empty"),
    ]:
        with pytest.raises(chips.FitsStructureError, match=text) as caught:
            chips.map_fits(odd, "x_raw.fits")
        assert caught.value.error_class == error_class and "x_raw.fits" in str(caught.value)


def test_trailing_bytes_are_ignored_as_astropy_ignores_them(tmp_path, monkeypatch):
    good = write_file(tmp_path / "x_raw.fits").read_bytes() + b"\0" * 100
    fast = read_fits(good, uri="x_raw.fits")
    _astropy_only(monkeypatch)
    slow = read_fits(good, uri="x_raw.fits")
    assert [type(r) for r in fast] == [type(r) for r in slow] == [Chip, Chip]
    for f, s in zip(fast, slow, strict=True):
        np.testing.assert_array_equal(f.pixels, s.pixels)


# --- hostile files: each an error record naming the file and the HDU, within a second, never astropy's to open ----------

HOSTILE = hostile_files()
REFUSED_BY_THE_WALKER = {"bad_header", "over_limit", "truncated", "not_fits"}


def test_the_issue_file_is_5760_bytes():
    data, _ = HOSTILE["negative_naxis1"]
    assert len(data) == 5760 and b"NAXIS1  =                   -1" in data


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_file_is_an_error_record_within_a_second(tmp_path, monkeypatch, case):
    data, expected = HOSTILE[case]
    path = tmp_path / f"{case}_raw.fits"
    path.write_bytes(data)
    if expected in REFUSED_BY_THE_WALKER and case != "data_past_the_end":

        def no_astropy(*args, **kwargs):
            raise AssertionError("astropy was asked to open a file the walker refused")

        monkeypatch.setattr(chips, "open_fits", no_astropy)  # read_fits turns the AssertionError into an 'internal' record
    for source, hdus in [(data, None), (str(path), None), (str(path), [1, 4])]:
        start = time.perf_counter()
        records = read_fits(source, uri=str(path), hdus=hdus)
        assert time.perf_counter() - start < 1.0, case
        assert records and all(isinstance(r, ChipError) for r in records), records
        classes = [r.error_class for r in records]
        assert expected in classes and set(classes) <= {expected, "missing_sci"}, [(r.error_class, r.message) for r in records]
        assert all(f"{case}_raw.fits" in r.message for r in records)
        if hdus:
            assert [r.hdu for r in records] == hdus


def test_gzip_files_are_read_and_bombs_refused_within_a_second(tmp_path):
    path = write_file(tmp_path / "x_raw.fits")
    packed = tmp_path / "x_raw.fits.gz"
    packed.write_bytes(gzip.compress(path.read_bytes(), 1))
    assert [type(r) for r in read_fits(str(packed))] == [Chip, Chip]
    zeros = gzip.compress(b"\0" * (chips.MAX_DECOMPRESSED_BYTES + BLOCK), 9)
    header_and_zeros = gzip.compress(path.read_bytes()[:BLOCK] + b"\0" * (chips.MAX_DECOMPRESSED_BYTES + BLOCK), 9)
    assert len(zeros) < 1 << 20 and len(header_and_zeros) < 1 << 20
    for data, error_class, seconds in [
        (zeros, "not_fits", 0.1),  # refused after inflating one block
        (header_and_zeros, "over_limit", 2.0),  # inflated up to the cap, then refused
        (packed.read_bytes()[:5000], "truncated", 1.0),
        (gzip.compress(b"SIMPLE") + b"\0", "not_fits", 1.0),
    ]:
        start = time.perf_counter()
        (record,) = read_fits(data, uri="x_raw.fits.gz")
        assert time.perf_counter() - start < seconds and record.error_class == error_class, record


def test_bad_scaling_keywords_and_huge_sip_orders(tmp_path):
    path = write_file(tmp_path / "x_raw.fits")
    with fits.open(path, mode="update") as hdul:
        hdul[1].header["BSCALE"] = "abc"
        hdul[4].header.update({"CTYPE1": "RA---TAN-SIP", "CTYPE2": "DEC--TAN-SIP", "A_ORDER": 100000, "B_ORDER": 2})
    start = time.perf_counter()
    first, second = read_fits(str(path))
    assert time.perf_counter() - start < 2.0
    assert isinstance(first, ChipError) and first.error_class == "bad_header" and "BSCALE" in first.message
    assert isinstance(second, Chip) and second.meta.radec_from_targ  # the distortion is not evaluated; the chip still comes out


def test_sky_position_is_astropy_all_pix2world():
    from astropy.wcs import WCS

    headers = [sci_header(1, layout_for(name)) for name in ("ACS/WFC", "WFC3/UVIS")]
    h = fits.Header({"NAXIS": 2, "NAXIS1": 4144, "NAXIS2": 2068, "CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN"})
    h.update({"CRVAL1": 359.99, "CRVAL2": -89.5, "CRPIX1": 2000.5, "CRPIX2": 1000.25, "CDELT1": -1.4e-5, "CDELT2": 1.4e-5})
    headers.append(h.copy())
    h["CROTA2"] = 33.0
    headers.append(h.copy())
    pc = h.copy()
    del pc["CROTA2"]
    pc.update({"PC1_1": 0.9, "PC1_2": 0.1, "PC2_1": -0.1, "PC2_2": 0.9, "CTYPE1": "RA---SIN", "CTYPE2": "DEC--SIN", "LONPOLE": 180.0})
    headers.append(pc)
    sip = h.copy()
    sip.update({"CTYPE1": "RA---TAN-SIP", "CTYPE2": "DEC--TAN-SIP", "A_ORDER": 2, "B_ORDER": 2, "A_2_0": 1e-6, "B_0_2": -2e-6})
    headers.append(sip)  # SIP: astropy's own WCS
    galactic = h.copy()
    galactic.update({"CTYPE1": "GLON-CAR", "CTYPE2": "GLAT-CAR"})
    headers.append(galactic)
    for header in headers:
        want = WCS(header, naxis=2).all_pix2world([[2071.5, 1033.5]], 0)[0]
        assert chips.sky_position(header, 2071.5, 1033.5) == tuple(float(v) for v in want)
    linear = h.copy()
    linear.update({"CTYPE1": "LINEAR", "CTYPE2": "LINEAR"})
    assert chips.sky_position(linear, 1.0, 2.0) is None
    assert chips.sky_position(sci_header(1, layout_for("ACS/WFC"), with_wcs=False), 1.0, 2.0) is None
