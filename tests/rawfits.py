"""Tiny hand-made FITS files with known values in every region, for exact crop tests (no synthesis involved)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.io import fits

from ray_hrc.layouts import LAYOUTS, Layout

OVERSCAN_DN = 7  # every pixel outside science and prescan
PRESCAN_DN = (1000, 1100)  # per amp, left to right


def layout_for(name: str, product: str = "raw") -> Layout:
    return next(lay for lay in LAYOUTS if lay.name == name and lay.product == product)


def science_pattern(extver: int, shape=(2048, 4096)) -> np.ndarray:
    """The values the crop must return for SCI,<extver>: unique per position and chip, never a bias or overscan value."""
    r, c = np.indices(shape, dtype=np.int64)
    return ((r * 4099 + c * 7 + extver * 13) % 50000 + 2000).astype(np.uint16)


def raw_array(layout: Layout, extver: int) -> np.ndarray:
    """A raw SCI array: overscan everywhere, prescans at their amp levels, the science pattern where the chip is."""
    a = np.full(layout.shape, OVERSCAN_DN, np.uint16)
    geom = layout.chips[extver]
    science = science_pattern(extver)
    offset = 0
    for amp, level in zip(geom.amps, PRESCAN_DN, strict=True):
        width = amp.science.stop - amp.science.start
        a[geom.rows, amp.science] = science[:, offset : offset + width]
        if amp.prescan is not None:
            a[:, amp.prescan] = level
        offset += width
    return a


def primary_header(instrument: str, detector: str, rootname: str = "jtest001q") -> fits.Header:
    h = fits.Header()
    h["ROOTNAME"] = rootname
    h["INSTRUME"] = instrument
    h["DETECTOR"] = detector
    if instrument == "ACS":
        h["FILTER1"] = "F606W"
        h["FILTER2"] = "CLEAR2L"
    else:
        h["FILTER"] = "F336W"
    h["EXPTIME"] = 500.0
    h["DATE-OBS"] = "2019-03-04"
    h["TIME-OBS"] = "05:06:07"
    h["TARGNAME"] = "NGC-TEST"
    h["RA_TARG"] = 150.0
    h["DEC_TARG"] = 2.0
    return h


def sci_header(extver: int, layout: Layout, with_wcs: bool = True) -> fits.Header:
    h = fits.Header()
    h["CCDCHIP"] = 2 if extver == 1 else 1
    if with_wcs:
        h["CTYPE1"], h["CTYPE2"] = "RA---TAN", "DEC--TAN"
        h["CRVAL1"], h["CRVAL2"] = 150.0, 2.0 + (0.03 if extver == 2 else -0.03)
        h["CRPIX1"], h["CRPIX2"] = layout.shape[1] / 2, layout.shape[0] / 2
        scale = 0.05 / 3600
        h["CD1_1"], h["CD1_2"], h["CD2_1"], h["CD2_2"] = -scale, 0.0, 0.0, scale
    return h


def write_file(
    path: Path,
    name: str = "ACS/WFC",
    product: str = "raw",
    *,
    rootname: str = "jtest001q",
    instrument: str | None = None,
    detector: str | None = None,
    shape: tuple[int, int] | None = None,
    data_fn=None,
    extvers=(1, 2),
) -> Path:
    """Write PRIMARY + (SCI, ERR, DQ) x len(extvers), like a real raw/flt file. `data_fn(layout, extver)` overrides SCI data."""
    layout = layout_for(name, product)
    inst, det = layout.instrument, layout.detector
    hdus: list = [fits.PrimaryHDU(header=primary_header(instrument or inst, detector or det, rootname))]
    for extver in extvers:
        if data_fn is not None:
            data = data_fn(layout, extver)
        elif product == "raw":
            data = raw_array(layout, extver) if shape is None else np.zeros(shape, np.uint16)
        else:
            data = np.zeros(shape or layout.shape, np.float32)
            rows = layout.chips[extver].rows
            data[rows, :] = science_pattern(extver).astype(np.float32)
        sci = fits.ImageHDU(data=data, header=sci_header(extver, layout), name="SCI", ver=extver)
        err = fits.ImageHDU(name="ERR", ver=extver)
        err.header["PIXVALUE"] = 0.0
        dq = fits.ImageHDU(name="DQ", ver=extver)
        dq.header["PIXVALUE"] = 0
        hdus += [sci, err, dq]
    fits.HDUList(hdus).writeto(path, overwrite=True)
    return path
