"""A synthetic survey archive: Hubble raw files of galaxies and nebulae/star clusters, with an LCID manifest.

The files follow the real raw layouts (``shared/reference/hst-raw-format.md``, `ray_hrc.layouts`): a header-only
PRIMARY, then (SCI, ERR, DQ) per chip; SCI,1 is ACS WFC2 / WFC3 UVIS2 (CCDCHIP=2), SCI,2 is WFC1 / UVIS1
(CCDCHIP=1). SCI data are uint16 DN stored as BITPIX=16, BZERO=32768; ERR and DQ are empty (NAXIS=0, PIXVALUE).
Prescan columns, the UVIS serial virtual overscan and the virtual overscan rows next to the chip gap hold bias +
read noise only, at one bias level per amplifier; the science area is bias + electrons/gain + noise.

Each celestial body (a spiral, elliptical, irregular or edge-on galaxy; an open or globular cluster or an emission
nebula) is a fixed scene on the sky: its diffuse light, its point sources and the foreground stars and background
galaxies of its field. Every file of a body is one pointing of one detector at that scene, with its own filter,
exposure time, orientation, sky, PSF, cosmic rays, hot pixels and (sometimes) a satellite trail, so its chips show
different parts of the body, often only an edge (the paper's section 5.2). A share of files is "blurry" (broad PSF,
low S/N), like LCID-Blurry.

Everything is deterministic from the seed: body b draws from ``(seed, body stream, b)``, file i from
``(seed, file stream, i)``, so the files do not depend on how many worker processes write them.

Speed (about 0.4 s per raw file on one core): diffuse light is rendered on a grid 4x coarser than the chip and
upsampled with cv2.resize; point sources are deposited on a delta image and convolved with the PSF once; noise is one
float32 standard normal deviate per raw pixel, from a 16-bit inverse-CDF table (`standard_normal`). The pool of
`synthesize_archive` uses the "spawn" start method: a script that calls it with workers > 1 needs the usual
``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import math
import multiprocessing
import os
import statistics
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import pandas as pd
from astropy.io import fits

from ray_hrc.chips import chip_centre_radec
from ray_hrc.layouts import LAYOUTS, Layout

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.csv"
BLURRY_NAME = "blurry.csv"
MANIFEST_COLUMNS = ["ID", "Instrument", "OBSID", "Filter", "RA", "DEC", "HDU Index", "Label", "URI"]

GALAXY_KINDS = ("spiral", "elliptical", "irregular", "edge-on")
NSC_KINDS = ("open cluster", "globular cluster", "emission nebula")
_NSC_CYCLE = ("open cluster", "emission nebula", "globular cluster", "emission nebula")  # nebulae are half of LCID's NSC

SATURATED_DN = 65535
LOWRES = 4  # diffuse light is rendered on a grid LOWRES x coarser than the chip and upsampled

# Independent random streams, so that adding draws to one never shifts another.
_BODY_STREAM, _SOURCE_STREAM, _FILE_STREAM, _ARCHIVE_STREAM = 1, 2, 3, 4

_ARCSEC = 1.0 / 3600.0


# --------------------------------------------------------------------------------------------------------------------
# Detectors


@dataclass(frozen=True)
class Detector:
    """What a raw file of one instrument/detector looks like and how it responds to light.

    The chips sit in a focal plane in science-pixel units: x along the 4096 science columns, y up from the first
    science row of SCI,1 (WFC2/UVIS2) to the last of SCI,2 (WFC1/UVIS1), with `chip_gap` pixels between them.
    """

    name: str  # "ACS/WFC", "WFC3/UVIS"
    instrume: str  # INSTRUME keyword
    detector: str  # DETECTOR keyword
    obsid_prefix: str  # first letter of the dataset names: "j" ACS, "i" WFC3
    pixel_scale: float  # arcsec per pixel
    gain: float  # CCDGAIN, electrons per DN
    read_noise: tuple[float, float]  # electrons, range of the per-amp read noise
    full_well: float  # electrons; brighter pixels saturate and bleed along their column
    chip_gap: float  # science pixels between the two chips
    overscan_rows: int  # virtual overscan rows per chip, next to the chip gap
    psf_sigma: float  # pixels, Gaussian core of the in-focus PSF
    spike_angle: float  # degrees from the x axis, diffraction spikes (fixed in the detector frame)
    aperture: str  # APERTURE keyword
    mjd_range: tuple[float, float]  # EXPSTART range (the instrument's years in service)
    filters: tuple[str, ...]

    @functools.cached_property
    def layout(self) -> Layout:
        return next(lay for lay in LAYOUTS if lay.name == self.name and lay.product == "raw")

    @property
    def raw_shape(self) -> tuple[int, int]:
        return self.layout.shape

    @property
    def science_shape(self) -> tuple[int, int]:
        """(rows, cols) of a chip's whole science area: 2048 x 4096 for ACS, 2051 x 4096 for UVIS."""
        return self.raw_shape[0] - self.overscan_rows, 4096

    def science_rows(self, extver: int) -> slice:
        """Raw rows of the science area: the virtual overscan rows sit next to the chip gap."""
        n = self.science_shape[0]
        return slice(0, n) if extver == 1 else slice(self.overscan_rows, self.overscan_rows + n)

    def science_cols(self) -> list[tuple[slice, slice]]:
        """(raw columns, science columns) per amp, left to right."""
        out, start = [], 0
        for amp in self.layout.chips[1].amps:
            width = amp.science.stop - amp.science.start
            out.append((amp.science, slice(start, start + width)))
            start += width
        return out

    def amp_halves(self) -> list[slice]:
        """Raw columns read by each amp (left, right), prescan and overscan included."""
        half = self.raw_shape[1] // 2
        return [slice(0, half), slice(half, self.raw_shape[1])]

    def chip_y0(self, extver: int) -> float:
        """Focal-plane y of the first science row of SCI,<extver> (SCI,1 below the gap, SCI,2 above)."""
        return 0.0 if extver == 1 else self.science_shape[0] + self.chip_gap

    @property
    def centre(self) -> tuple[float, float]:
        """Focal-plane (x, y) of the detector centre, the pointing's reference point."""
        return (self.science_shape[1] - 1) / 2.0, self.science_shape[0] + self.chip_gap / 2.0 - 0.5

    def raw_to_science(self, raw_col: float, raw_row: float, extver: int) -> tuple[float, float]:
        """Raw-array (col, row) -> (science col, science row); columns in the UVIS serial overscan map to the
        physical boundary between the two amps."""
        (left_raw, left_sci), (right_raw, right_sci) = self.science_cols()
        if raw_col < left_raw.stop - 0.5:
            col = raw_col - left_raw.start + left_sci.start
        elif raw_col > right_raw.start - 0.5:
            col = raw_col - right_raw.start + right_sci.start
        else:
            col = left_sci.stop - 0.5
        return col, raw_row - self.science_rows(extver).start


ACS_FILTER1 = ("F475W", "F555W", "F606W", "F625W", "F775W", "F850LP", "F550M", "F502N", "F658N")
ACS_FILTER2 = ("F435W", "F814W", "F660N")
UVIS_FILTERS = ("F275W", "F336W", "F438W", "F475W", "F555W", "F606W", "F625W", "F814W", "F502N", "F656N", "F657N", "F658N", "F673N")

DETECTORS: dict[str, Detector] = {
    "ACS/WFC": Detector(
        name="ACS/WFC",
        instrume="ACS",
        detector="WFC",
        obsid_prefix="j",
        pixel_scale=0.05,
        gain=2.0,
        read_noise=(3.8, 5.2),
        full_well=84000.0,
        chip_gap=50.0,
        overscan_rows=20,
        psf_sigma=0.85,
        spike_angle=47.0,
        aperture="WFC",
        mjd_range=(52340.0, 60400.0),
        filters=ACS_FILTER1 + ACS_FILTER2,
    ),
    "WFC3/UVIS": Detector(
        name="WFC3/UVIS",
        instrume="WFC3",
        detector="UVIS",
        obsid_prefix="i",
        pixel_scale=0.04,
        gain=1.5,
        read_noise=(2.9, 3.4),
        full_well=63000.0,
        chip_gap=31.0,
        overscan_rows=19,
        psf_sigma=0.8,
        spike_angle=45.0,
        aperture="UVIS",
        mjd_range=(55000.0, 60400.0),
        filters=UVIS_FILTERS,
    ),
}

_EMISSION_LINES = {"F656N": 1.0, "F657N": 1.0, "F658N": 0.9, "F660N": 0.5, "F502N": 0.6, "F673N": 0.35}


def filter_band(name: str) -> tuple[float, str]:
    """(pivot wavelength in nm, width class 'W', 'LP', 'M' or 'N') from an HST filter name like F606W."""
    digits = "".join(ch for ch in name if ch.isdigit())
    width = name[1 + len(digits) :]
    return float(digits), width


def filter_throughput(name: str) -> float:
    """Relative continuum throughput of a filter (broad = 1), lower in the UV."""
    lam, width = filter_band(name)
    tp = {"W": 1.0, "LP": 0.6, "M": 0.3, "N": 0.045}[width]
    return tp * (0.3 if lam < 400 else 1.0)


def colour_factor(name: str, beta: float) -> float:
    """Continuum flux in this filter relative to a broad filter at 600 nm, for a spectral slope `beta` (red > 0)."""
    lam, _ = filter_band(name)
    return filter_throughput(name) * (lam / 600.0) ** beta


def line_factor(name: str) -> float:
    """Emission-line flux an ionised nebula puts in this filter (narrow bands on H-alpha/[OIII]/[SII], broad ones)."""
    if name in _EMISSION_LINES:
        return _EMISSION_LINES[name]
    lam, width = filter_band(name)
    if width in ("W", "LP") and 480 <= lam <= 700:
        return 0.35
    return 0.08


# --------------------------------------------------------------------------------------------------------------------
# Bodies: fixed scenes on the sky


@dataclass(frozen=True)
class Body:
    """One celestial body and its field, in arcsec offsets (xi east, eta north) from its centre.

    `params` hold the kind's shape parameters (see `make_body`); surface brightnesses are electrons/s/arcsec^2 and
    fluxes electrons/s through a broad filter at 600 nm.
    """

    seed: int
    index: int
    name: str  # e.g. "SYN-G007"
    label: str  # "galaxy" or "NSC"
    kind: str  # one of GALAXY_KINDS or NSC_KINDS
    ra: float  # degrees
    dec: float
    radius: float  # arcsec: pointings fall within about this distance of the centre
    pa: float  # degrees east of north, major axis
    beta: float  # spectral slope of the body's continuum
    params: dict = field(default_factory=dict)
    field_density: float = 0.02  # foreground stars per arcsec^2
    field_alpha: float = 0.7  # slope of their cumulative flux distribution, N(>F) ~ F^-alpha
    background_galaxy_density: float = 0.004  # per arcsec^2


def _loguniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def body_kind(index: int) -> tuple[str, str, int]:
    """(label, kind, number within the label) of body `index`: classes alternate, kinds cycle within a class."""
    number = index // 2
    if index % 2 == 0:
        return "galaxy", GALAXY_KINDS[number % len(GALAXY_KINDS)], number + 1
    return "NSC", _NSC_CYCLE[number % len(_NSC_CYCLE)], number + 1


def make_body(seed: int, index: int) -> Body:
    """Draw body `index` of the archive made from `seed`: kind, position, size and shape parameters."""
    rng = np.random.default_rng([seed, _BODY_STREAM, index])
    label, kind, number = body_kind(index)
    name = f"SYN-{'G' if label == 'galaxy' else 'N'}{number:03d}"
    ra = float(rng.uniform(0.0, 360.0))
    dec = float(np.degrees(np.arcsin(rng.uniform(-0.93, 0.93))))
    pa = float(rng.uniform(0.0, 180.0))
    p: dict = {}
    if kind == "spiral":
        h = _loguniform(rng, 18.0, 55.0)
        p.update(
            h=h,
            q=float(rng.uniform(0.45, 1.0)),
            sb0=_loguniform(rng, 150.0, 1500.0),
            arms=int(rng.choice([2, 2, 2, 3, 4])),
            pitch=float(np.radians(rng.uniform(12.0, 30.0))),
            arm_amp=float(rng.uniform(1.2, 3.5)),
            arm_sharp=float(rng.uniform(3.0, 8.0)),
            dust=float(rng.uniform(0.2, 0.7)),
            r_in=float(h * rng.uniform(0.25, 0.6)),
            phase=float(rng.uniform(0, 2 * np.pi)),
            bulge_re=float(h * rng.uniform(0.08, 0.25)),
            bulge_n=float(rng.uniform(1.5, 4.0)),
            bulge_sb=_loguniform(rng, 150.0, 4000.0),
            floc=float(rng.uniform(0.2, 0.6)),
            knots=int(_loguniform(rng, 100, 4000)),
        )
        radius = 3.2 * h
        beta = float(rng.uniform(0.5, 1.5))
    elif kind == "elliptical":
        re = _loguniform(rng, 25.0, 90.0)
        p.update(
            re=re,
            n=float(rng.uniform(2.5, 5.0)),
            q=float(rng.uniform(0.55, 1.0)),
            sbe=_loguniform(rng, 60.0, 400.0),
            gcs=int(_loguniform(rng, 200, 2000)),
        )
        radius = 2.8 * re
        beta = float(rng.uniform(1.2, 2.0))
    elif kind == "irregular":
        size = _loguniform(rng, 40.0, 110.0)
        n_clumps = int(rng.integers(3, 9))
        p.update(
            size=size,
            q=float(rng.uniform(0.5, 1.0)),
            sb0=_loguniform(rng, 100.0, 800.0),
            clumps=[
                (
                    float(rng.normal(0, 0.45 * size)),
                    float(rng.normal(0, 0.45 * size)),
                    float(size * rng.uniform(0.08, 0.35)),
                    float(rng.uniform(0.5, 3.0)),
                )
                for _ in range(n_clumps)
            ],
            patchy=float(rng.uniform(0.5, 1.1)),
            knots=int(_loguniform(rng, 100, 4000)),
        )
        radius = 1.5 * size
        beta = float(rng.uniform(-0.2, 0.8))
    elif kind == "edge-on":
        h = _loguniform(rng, 30.0, 80.0)
        p.update(
            h=h,
            z0=float(h * rng.uniform(0.08, 0.2)),
            sb0=_loguniform(rng, 300.0, 3000.0),
            lane=float(rng.uniform(0.5, 0.95)),
            lane_w=float(h * rng.uniform(0.02, 0.06)),
            lane_off=float(h * rng.uniform(-0.03, 0.03)),
            bulge_re=float(h * rng.uniform(0.1, 0.3)),
            bulge_sb=_loguniform(rng, 300.0, 4000.0),
            warp=float(rng.uniform(-0.04, 0.04)),
            knots=int(_loguniform(rng, 50, 1500)),
        )
        radius = 2.8 * h
        beta = float(rng.uniform(0.8, 1.6))
    elif kind == "open cluster":
        a = _loguniform(rng, 15.0, 45.0)
        p.update(
            a=a,
            stars=int(_loguniform(rng, 5000, 25000)),
            f_max=_loguniform(rng, 5e4, 1e6),
            alpha=float(rng.uniform(0.45, 0.8)),
            glow=_loguniform(rng, 100.0, 1500.0) * float(rng.random() < 0.75),  # wispy nebulosity of young clusters, e-/s/arcsec^2
            unresolved=_loguniform(rng, 10.0, 150.0) * float(rng.random() < 0.6),  # light of the unresolved faint members
            glow_size=float(a * rng.uniform(1.5, 3.0)),
        )
        radius = 2.2 * a
        beta = float(rng.uniform(-1.0, 0.2))
    elif kind == "globular cluster":
        a = _loguniform(rng, 10.0, 40.0)
        p.update(
            a=a,
            stars=int(_loguniform(rng, 40000, 200000)),
            f_max=_loguniform(rng, 1e4, 1e5),
            alpha=float(rng.uniform(0.6, 0.9)),
            unresolved=_loguniform(rng, 100.0, 3000.0),  # central surface brightness of the unresolved light
            r_t=float(a * rng.uniform(8.0, 14.0)),
        )
        radius = 3.0 * a
        beta = float(rng.uniform(0.3, 1.0))
    elif kind == "emission nebula":
        size = _loguniform(rng, 70.0, 220.0)
        p.update(
            size=size,
            sb0=_loguniform(rng, 150.0, 1500.0),
            filament_width=float(rng.uniform(0.05, 0.12)),
            filament_power=float(rng.uniform(1.2, 2.0)),
            diffuse=float(rng.uniform(0.05, 0.3)),
            dust=float(rng.uniform(0.6, 0.97)),
            dust_level=float(rng.uniform(0.3, 1.0)),
            rim=float(rng.uniform(0.4, 1.5)),
            cluster_stars=int(_loguniform(rng, 500, 5000)),
            cluster_a=float(size * rng.uniform(0.08, 0.3)),
            cluster_xy=(float(rng.normal(0, 0.2 * size)), float(rng.normal(0, 0.2 * size))),
            shell=float(rng.uniform(0.0, 1.0)),
        )
        radius = 1.1 * size
        beta = float(rng.uniform(-0.8, 0.3))
    else:  # pragma: no cover - body_kind only returns known kinds
        raise ValueError(f"unknown body kind {kind!r}")
    return Body(
        seed=seed,
        index=index,
        name=name,
        label=label,
        kind=kind,
        ra=ra,
        dec=dec,
        radius=radius,
        pa=pa,
        beta=beta,
        params=p,
        field_density=_loguniform(rng, 0.003, 0.04),
        field_alpha=float(rng.uniform(0.55, 0.8)),
        background_galaxy_density=_loguniform(rng, 0.001, 0.008),
    )


@dataclass
class Sources:
    """Point sources of one population, arcsec offsets from the body centre and fluxes in electrons/s."""

    xi: np.ndarray  # float32 (n,)
    eta: np.ndarray
    flux: np.ndarray
    beta: float  # spectral slope
    size: float = 0.0  # Gaussian sigma in arcsec for slightly extended sources (background galaxies); 0 = point


@dataclass
class BodyModel:
    """Everything drawn once per body: its point-source populations and the noise textures of its diffuse light."""

    body: Body
    body_sources: list[Sources]  # the body's own stars, clusters, HII knots, globular clusters
    field_sources: list[Sources]  # foreground stars and background galaxies of the field
    textures: dict[str, np.ndarray]  # float32 (n, n), zero mean, unit std, over [-extent, extent]^2 arcsec
    extent: float  # arcsec half-width of the textures


def noise_texture(rng: np.random.Generator, n: int, beta: float) -> np.ndarray:
    """Gaussian random field with power spectrum ~ k^-beta, float32 (n, n), zero mean and unit std."""
    white = rng.standard_normal((n, n), dtype=np.float32)
    spec = np.fft.rfft2(white)
    ky = np.fft.fftfreq(n)[:, None]
    kx = np.fft.rfftfreq(n)[None, :]
    k = np.sqrt(kx * kx + ky * ky)
    k[0, 0] = 1.0
    spec *= k ** (-beta / 2.0)
    spec[0, 0] = 0.0
    field_ = np.fft.irfft2(spec, s=(n, n)).astype(np.float32)
    field_ -= field_.mean()
    field_ /= field_.std() + 1e-12
    return field_


def _power_law(rng: np.random.Generator, n: int, f_min: float, f_max: float, alpha: float) -> np.ndarray:
    """Fluxes with N(>F) ~ F^-alpha between f_min and f_max, float32 (n,)."""
    u = rng.random(n)
    ratio = (f_min / f_max) ** alpha
    return (f_min * (1.0 - u * (1.0 - ratio)) ** (-1.0 / alpha)).astype(np.float32)


def _plummer(rng: np.random.Generator, n: int, a: float, r_max: float, centre=(0.0, 0.0), q: float = 1.0, pa: float = 0.0):
    """Positions (xi, eta) of n points from a projected Plummer profile of scale a (arcsec), cut at r_max."""
    u = rng.uniform(1e-6, 1.0, n)
    cut = (r_max / a) ** 2
    u_max = (cut / (1.0 + cut)) if np.isfinite(cut) else 1.0
    r = a * np.sqrt(u * u_max / (1.0 - u * u_max))  # inverse of the projected cumulative r^2/(a^2+r^2)
    return _scatter(rng, r, centre, q, pa)


def _scatter(rng, r, centre, q=1.0, pa=0.0):
    phi = rng.uniform(0, 2 * np.pi, len(r))
    u, v = r * np.cos(phi), q * r * np.sin(phi)
    return _from_body_frame(u, v, pa, centre)


def _from_body_frame(u, v, pa, centre=(0.0, 0.0)):
    """Body frame (u along the major axis at position angle pa, v across) -> (xi east, eta north), float32."""
    s, c = math.sin(math.radians(pa)), math.cos(math.radians(pa))
    xi = centre[0] + u * s + v * c
    eta = centre[1] + u * c - v * s
    return np.asarray(xi, np.float32), np.asarray(eta, np.float32)


def _to_body_frame(xi, eta, pa):
    s, c = np.float32(math.sin(math.radians(pa))), np.float32(math.cos(math.radians(pa)))
    return xi * s + eta * c, xi * c - eta * s


@functools.lru_cache(maxsize=6)
def body_model(seed: int, index: int) -> BodyModel:
    """The point sources and textures of body `index` (cached: every file of a body shares them)."""
    body = make_body(seed, index)
    rng = np.random.default_rng([seed, _SOURCE_STREAM, index])
    p, pa = body.params, body.pa
    own: list[Sources] = []
    if body.kind == "spiral":
        n = p["knots"]
        r = rng.exponential(p["h"] * 1.1, n) + p["r_in"] * 0.5
        psi = rng.normal(0.0, 0.35, n) + rng.integers(0, p["arms"], n) * 2 * np.pi
        phi = (psi - p["phase"]) / p["arms"] + np.log(np.maximum(r, p["r_in"]) / p["r_in"]) / math.tan(p["pitch"])
        xi, eta = _from_body_frame(r * np.cos(phi), p["q"] * r * np.sin(phi), pa)
        own.append(Sources(xi, eta, _power_law(rng, n, 1.0, 3e4, 0.8), beta=-0.8))
    elif body.kind == "elliptical":
        n = p["gcs"]
        xi, eta = _plummer(rng, n, 1.5 * p["re"], 6 * p["re"])
        own.append(Sources(xi, eta, _power_law(rng, n, 0.5, 500.0, 1.0), beta=0.8))
    elif body.kind == "irregular":
        n = p["knots"]
        weights = np.array([c[3] * c[2] ** 2 for c in p["clumps"]])
        pick = rng.choice(len(weights), n, p=weights / weights.sum())
        cx = np.array([c[0] for c in p["clumps"]])[pick]
        cy = np.array([c[1] for c in p["clumps"]])[pick]
        cs = np.array([c[2] for c in p["clumps"]])[pick]
        u, v = cx + rng.normal(0, 1, n) * cs * 1.3, cy + rng.normal(0, 1, n) * cs * 1.3
        xi, eta = _from_body_frame(u, p["q"] * v, pa)
        own.append(Sources(xi, eta, _power_law(rng, n, 1.0, 3e4, 0.8), beta=-0.6))
    elif body.kind == "edge-on":
        n = p["knots"]
        u = rng.laplace(0, p["h"], n)
        v = rng.normal(0, p["z0"] * 0.6, n) + p["warp"] * u * np.abs(u) / p["h"]
        xi, eta = _from_body_frame(u, v, pa)
        own.append(Sources(xi, eta, _power_law(rng, n, 1.0, 1e4, 0.9), beta=-0.5))
    elif body.kind == "open cluster":
        n = p["stars"]
        xi, eta = _plummer(rng, n, p["a"], 6 * p["a"])
        own.append(Sources(xi, eta, _power_law(rng, n, 1.0, p["f_max"], p["alpha"]), beta=body.beta))
    elif body.kind == "globular cluster":
        n = p["stars"]
        xi, eta = _plummer(rng, n, p["a"], p["r_t"])
        own.append(Sources(xi, eta, _power_law(rng, n, 1.5, p["f_max"], p["alpha"]), beta=body.beta))
    elif body.kind == "emission nebula":
        n = p["cluster_stars"]
        xi, eta = _plummer(rng, n, p["cluster_a"], 5 * p["cluster_a"], centre=p["cluster_xy"])
        own.append(Sources(xi, eta, _power_law(rng, n, 1.0, 1e6, 0.55), beta=-1.0))
        # a sprinkling of young stars over the whole nebula
        m = n
        xi2, eta2 = _plummer(rng, m, 0.6 * p["size"], 1.5 * p["size"])
        own.append(Sources(xi2, eta2, _power_law(rng, m, 1.0, 2e5, 0.6), beta=-0.8))

    # the field: foreground stars and background galaxies out to where any pointing can reach
    reach = 1.15 * body.radius + 160.0
    area = math.pi * reach**2
    n_stars = int(rng.poisson(body.field_density * area))
    r = reach * np.sqrt(rng.random(n_stars))
    xi, eta = _scatter(rng, r, (0.0, 0.0))
    stars = Sources(xi, eta, _power_law(rng, n_stars, 0.4, 3e6, body.field_alpha), beta=float(rng.uniform(-0.3, 1.2)))
    n_gal = int(rng.poisson(body.background_galaxy_density * area))
    r = reach * np.sqrt(rng.random(n_gal))
    xi, eta = _scatter(rng, r, (0.0, 0.0))
    galaxies = Sources(xi, eta, _power_law(rng, n_gal, 1.0, 300.0, 1.0), beta=1.0, size=float(rng.uniform(0.1, 0.2)))

    extent = 1.25 * body.radius
    textures: dict[str, np.ndarray] = {}
    if body.label == "galaxy":
        textures["floc"] = noise_texture(rng, 512, 3.0 if body.kind == "spiral" else 3.8)
    elif body.kind == "emission nebula":
        textures["ridge1"] = noise_texture(rng, 1024, 4.0)
        textures["ridge2"] = noise_texture(rng, 1024, 3.5)
        textures["diffuse"] = noise_texture(rng, 512, 3.6)
        textures["dust"] = noise_texture(rng, 1024, 3.8)
        textures["fine"] = noise_texture(rng, 1024, 2.2)
    elif body.kind == "open cluster":
        textures["ridge1"] = noise_texture(rng, 512, 2.8)
        textures["diffuse"] = noise_texture(rng, 512, 3.2)
    return BodyModel(body=body, body_sources=own, field_sources=[stars, galaxies], textures=textures, extent=extent)


def _sample(model: BodyModel, name: str, xi: np.ndarray, eta: np.ndarray) -> np.ndarray:
    """Bilinear samples of a body texture at arcsec offsets (xi, eta), float32 of their shape."""
    tex = model.textures[name]
    n = tex.shape[0]
    scale = np.float32(n / (2.0 * model.extent))
    mx = (xi + np.float32(model.extent)) * scale - np.float32(0.5)
    my = (eta + np.float32(model.extent)) * scale - np.float32(0.5)
    return cv2.remap(tex, mx.astype(np.float32), my.astype(np.float32), cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)


def _sersic(r: np.ndarray, re: float, n: float) -> np.ndarray:
    b = 2.0 * n - 1.0 / 3.0 + 0.009876 / n
    x = np.maximum(r, np.float32(0.02)) / np.float32(re)
    return np.exp(np.float32(-b) * (np.power(x, np.float32(1.0 / n)) - np.float32(1.0))).astype(np.float32)


def _ridges(t: np.ndarray, width: float, power: float) -> np.ndarray:
    """Thin bright filaments along the zero contours of a noise field."""
    return np.power(np.clip(1.0 - np.abs(t) / np.float32(width), 0.0, 1.0), np.float32(power))


def diffuse_light(model: BodyModel, xi: np.ndarray, eta: np.ndarray, filter_name: str) -> np.ndarray:
    """Surface brightness of the body's diffuse light in electrons/s/arcsec^2 through `filter_name`.

    xi, eta: float32 arcsec offsets east and north of the body centre, any shape; returns float32 of that shape.
    """
    body, p = model.body, model.body.params
    u, v = _to_body_frame(xi, eta, body.pa)
    colour = np.float32(colour_factor(filter_name, body.beta))
    if body.kind == "spiral":
        vq = v / np.float32(p["q"])
        r = np.sqrt(u * u + vq * vq)
        phi = np.arctan2(vq, u)
        ln_r = np.log(np.maximum(r, np.float32(p["r_in"])) / np.float32(p["r_in"]))
        psi = np.float32(p["arms"]) * (phi - ln_r / np.float32(math.tan(p["pitch"]))) + np.float32(p["phase"])
        inner = np.float32(1.0) - np.exp(-((r / np.float32(p["r_in"])) ** 2))
        arm = np.power((np.float32(1.0) + np.cos(psi)) * np.float32(0.5), np.float32(p["arm_sharp"])) * inner
        lane = np.power((np.float32(1.0) + np.cos(psi - np.float32(0.55))) * np.float32(0.5), np.float32(2 * p["arm_sharp"])) * inner
        floc = _sample(model, "floc", xi, eta)
        disc = np.exp(-r / np.float32(p["h"])) * (
            np.float32(1.0) + np.float32(p["arm_amp"]) * arm * (np.float32(1.0) + np.float32(p["floc"]) * floc)
        )
        disc *= np.clip(np.float32(1.0) - np.float32(p["dust"]) * lane * (np.float32(1.0) + np.float32(0.5) * floc), 0.05, 1.0)
        bulge = _sersic(np.sqrt(u * u + (vq * np.float32(0.85)) ** 2), p["bulge_re"], p["bulge_n"])
        sb = np.float32(p["sb0"]) * disc + np.float32(p["bulge_sb"]) * bulge
    elif body.kind == "elliptical":
        r = np.sqrt(u * u + (v / np.float32(p["q"])) ** 2)
        sb = np.float32(p["sbe"]) * _sersic(r, p["re"], p["n"])
    elif body.kind == "irregular":
        sb = np.zeros_like(xi)
        vq = v / np.float32(p["q"])
        for cx, cy, cs, amp in p["clumps"]:
            d2 = (u - np.float32(cx)) ** 2 + (vq - np.float32(cy)) ** 2
            sb += np.float32(amp) * np.exp(-d2 / np.float32(2 * cs * cs))
        r = np.sqrt(u * u + vq * vq)
        sb += np.float32(0.6) * np.exp(-r / np.float32(0.4 * p["size"]))
        sb *= np.exp(np.float32(p["patchy"]) * _sample(model, "floc", xi, eta) - np.float32(0.5 * p["patchy"] ** 2))
        sb *= np.float32(p["sb0"])
    elif body.kind == "edge-on":
        vw = v - np.float32(p["warp"]) * u * np.abs(u) / np.float32(p["h"])
        z = vw / np.float32(p["z0"])
        sech = np.float32(2.0) / (np.exp(np.clip(z, -30, 30)) + np.exp(-np.clip(z, -30, 30)))
        disc = np.exp(-np.abs(u) / np.float32(p["h"])) * sech * sech
        thick = np.float32(0.15) * np.exp(-np.abs(u) / np.float32(1.3 * p["h"]) - np.abs(vw) / np.float32(5 * p["z0"]))
        floc = _sample(model, "floc", xi, eta)
        lane = np.exp(-((vw - np.float32(p["lane_off"])) ** 2) / np.float32(2 * p["lane_w"] ** 2)) * np.exp(
            -np.abs(u) / np.float32(2.5 * p["h"])
        )
        absorb = np.clip(np.float32(1.0) - np.float32(p["lane"]) * lane * (np.float32(1.0) + np.float32(0.3) * floc), 0.02, 1.0)
        bulge = _sersic(np.sqrt(u * u + (vw / np.float32(0.6)) ** 2), p["bulge_re"], 2.0)
        sb = (np.float32(p["sb0"]) * (disc + thick) + np.float32(p["bulge_sb"]) * bulge) * absorb
    elif body.kind == "open cluster":
        r2 = (xi * xi + eta * eta) / np.float32(p["glow_size"] ** 2)
        ridges = _ridges(_sample(model, "ridge1", xi, eta), 0.25, 1.5)
        wisps = ridges + np.float32(0.5) * np.clip(_sample(model, "diffuse", xi, eta), 0, None)
        sb = np.float32(p["glow"]) * np.exp(-r2) * wisps
        sb += np.float32(p["unresolved"]) / (np.float32(1.0) + (xi * xi + eta * eta) / np.float32(p["a"] ** 2)) ** 2
    elif body.kind == "globular cluster":
        r2 = (xi * xi + eta * eta) / np.float32(p["a"] ** 2)
        sb = np.float32(p["unresolved"]) / (np.float32(1.0) + r2) ** 2
    elif body.kind == "emission nebula":
        size = np.float32(p["size"])
        r = np.sqrt(u * u + (v * np.float32(1.3)) ** 2) / size
        big = _sample(model, "diffuse", xi, eta)
        envelope = np.exp(-(r**2) * np.float32(1.6) + np.float32(0.8) * big)
        if p["shell"] > 0.5:  # a bubble: brighter rim
            envelope *= np.float32(0.4) + np.exp(-((r - np.float32(0.75)) ** 2) / np.float32(0.05))
        w, pw = p["filament_width"], p["filament_power"]
        fil = _ridges(_sample(model, "ridge1", xi, eta), w, pw) + np.float32(0.7) * _ridges(_sample(model, "ridge2", xi, eta), 0.8 * w, pw)
        # dark clouds with sharp edges and bright ionised rims (pillars, globules)
        edge = (_sample(model, "dust", xi, eta) - np.float32(p["dust_level"])) / np.float32(0.07)
        absorb = np.float32(1.0) - np.float32(p["dust"]) * np.clip(edge + np.float32(0.5), 0.0, 1.0)
        rim = np.float32(p["rim"]) * np.exp(-edge * edge)
        clumpy = np.exp(np.float32(0.7) * big + np.float32(0.9) * _sample(model, "fine", xi, eta))
        sb = np.float32(p["sb0"]) * envelope * ((fil + rim + np.float32(p["diffuse"]) * clumpy) * absorb)
        colour = np.float32(0.25 * colour_factor(filter_name, body.beta) + line_factor(filter_name))
    else:  # pragma: no cover
        raise ValueError(f"unknown body kind {body.kind!r}")
    return (sb * colour).astype(np.float32)


# --------------------------------------------------------------------------------------------------------------------
# Exposures


@dataclass(frozen=True)
class Exposure:
    """One raw file: a pointing of one detector at one body, with everything its pixels depend on."""

    seed: int
    file_index: int
    body_index: int
    visit: int  # file number within the body
    obsid: str
    instrument: str  # "ACS/WFC" or "WFC3/UVIS"
    filter: str
    exptime: float  # seconds
    expstart: float  # MJD
    xi: float  # arcsec east of the body centre: the detector centre
    eta: float  # arcsec north
    orientat: float  # degrees: position angle of the detector y axis, east of north
    sky: float  # electrons/s/pixel
    psf_sigma: float  # pixels
    brightness: float  # multiplies the body's light (distance/extinction/SED variation between files)
    blurry: bool
    bias: tuple[float, ...]  # DN per amp: SCI,1 (C, D) then SCI,2 (A, B)
    read_noise: tuple[float, ...]  # electrons per amp, same order
    cr_rate: float  # cosmic rays per second per chip
    trail: tuple[float, float, float, float, float] | None  # focal-plane line (x, y, angle deg), width px, electrons/px

    @property
    def det(self) -> Detector:
        return DETECTORS[self.instrument]


_B36 = "0123456789abcdefghijklmnopqrstuvwxyz"


def _base36(value: int, width: int) -> str:
    out = ""
    for _ in range(width):
        value, d = divmod(value, 36)
        out = _B36[d] + out
    return out


def program_code(seed: int, body_index: int) -> int:
    """A 3-character program code per body, as an int < 36^3: distinct bodies get distinct codes."""
    offset = int(np.random.default_rng([seed, _ARCHIVE_STREAM]).integers(36**3))
    return (offset + body_index * 7919) % 36**3


def make_obsid(det: Detector, seed: int, body_index: int, visit: int, rng: np.random.Generator) -> str:
    """A 9-character dataset name like real ones: instrument letter, program, visit, exposure, 'q' (lower case)."""
    exposure = _base36(int(rng.integers(10 * 36, 36**2)), 2)
    return det.obsid_prefix + _base36(program_code(seed, body_index), 3) + _base36(visit + 1, 2) + exposure + "q"


def plan_exposure(
    seed: int, file_index: int, body_index: int, visit: int, instruments: Sequence[str], blurry_fraction: float, attempt: int = 0
) -> Exposure:
    """Draw file `file_index` (the `visit`-th of body `body_index`) from its own random stream.

    `attempt` > 0 draws another instrument, filter, exposure time and pointing for the same file (the screening's
    retries, see `choose_exposure`); whether the file is blurry does not change with it.
    """
    rng = np.random.default_rng([seed, _FILE_STREAM, file_index, 0, attempt])
    body = make_body(seed, body_index)
    det = DETECTORS[instruments[int(rng.integers(len(instruments)))]]
    filt = det.filters[int(rng.integers(len(det.filters)))]
    lam, width = filter_band(filt)
    if width == "N":
        exptime = _loguniform(rng, 300.0, 2400.0)
    elif width == "M" or lam < 400:
        exptime = _loguniform(rng, 200.0, 1800.0)
    else:
        exptime = _loguniform(rng, 30.0, 1500.0)
    blurry = bool(np.random.default_rng([seed, _FILE_STREAM, file_index, 1]).random() < blurry_fraction)
    psf = det.psf_sigma * (float(rng.uniform(2.5, 5.0)) if blurry else float(rng.uniform(0.95, 1.15)))
    brightness = _loguniform(rng, 0.5, 2.0) * (_loguniform(rng, 0.15, 0.5) if blurry else 1.0)
    pix_area = det.pixel_scale**2
    sky = _loguniform(rng, 15.0, 60.0) * filter_throughput(filt) * (lam / 600.0) ** 0.5 * pix_area + 0.004
    if blurry:
        sky *= _loguniform(rng, 1.2, 3.0)
    r = body.radius * math.sqrt(rng.random()) * 1.1
    phi = rng.uniform(0, 2 * np.pi)
    trail = None
    if rng.random() < 0.07:
        cx, cy = det.centre
        trail = (
            float(cx + rng.normal(0, 1200)),
            float(cy + rng.normal(0, 1200)),
            float(rng.uniform(0, 180)),
            float(rng.uniform(2.0, 7.0)),
            _loguniform(rng, 80.0, 2500.0),
        )
    return Exposure(
        seed=seed,
        file_index=file_index,
        body_index=body_index,
        visit=visit,
        obsid=make_obsid(det, seed, body_index, visit, rng),
        instrument=det.name,
        filter=filt,
        exptime=round(exptime, 1),
        expstart=float(rng.uniform(*det.mjd_range)),
        xi=float(r * math.cos(phi)),
        eta=float(r * math.sin(phi)),
        orientat=float(rng.uniform(-180.0, 180.0)),
        sky=float(sky),
        psf_sigma=psf,
        brightness=brightness,
        blurry=blurry,
        bias=tuple(float(b) for b in 2000 + rng.choice(2000, 4, replace=False)),  # distinct whole DN: a prescan median recovers them
        read_noise=tuple(float(x) for x in rng.uniform(*det.read_noise, 4)),
        cr_rate=float(rng.uniform(8.0, 20.0)),
        trail=trail,
    )


def _cd_matrix(det: Detector, orientat: float) -> np.ndarray:
    """CD matrix in degrees per pixel: y axis at position angle `orientat`, east to the left (det < 0)."""
    s = det.pixel_scale * _ARCSEC
    c, n = math.cos(math.radians(orientat)), math.sin(math.radians(orientat))
    return np.array([[-s * c, s * n], [s * n, s * c]])


def focal_to_offset(exp: Exposure, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Focal-plane pixels (x, y) -> arcsec offsets (xi east, eta north) from the body centre."""
    det = exp.det
    cx, cy = det.centre
    cd = _cd_matrix(det, exp.orientat) * 3600.0
    dx, dy = x - np.float32(cx), y - np.float32(cy)
    xi = np.float32(exp.xi) + np.float32(cd[0, 0]) * dx + np.float32(cd[0, 1]) * dy
    eta = np.float32(exp.eta) + np.float32(cd[1, 0]) * dx + np.float32(cd[1, 1]) * dy
    return xi, eta


def offset_to_focal(exp: Exposure, xi: np.ndarray, eta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `focal_to_offset`."""
    det = exp.det
    cx, cy = det.centre
    inv = np.linalg.inv(_cd_matrix(det, exp.orientat) * 3600.0)
    dxi, deta = xi - np.float32(exp.xi), eta - np.float32(exp.eta)
    x = np.float32(cx) + np.float32(inv[0, 0]) * dxi + np.float32(inv[0, 1]) * deta
    y = np.float32(cy) + np.float32(inv[1, 0]) * dxi + np.float32(inv[1, 1]) * deta
    return x, y


def offset_to_radec(ra0: float, dec0: float, xi: float, eta: float) -> tuple[float, float]:
    """Gnomonic deprojection: arcsec offsets (xi east, eta north) on the tangent plane at (ra0, dec0) -> degrees."""
    x, y = math.radians(xi * _ARCSEC), math.radians(eta * _ARCSEC)
    d0 = math.radians(dec0)
    denom = math.cos(d0) - y * math.sin(d0)
    ra = ra0 + math.degrees(math.atan2(x, denom))
    dec = math.degrees(math.atan2(math.sin(d0) + y * math.cos(d0), math.hypot(x, denom)))
    return ra % 360.0, dec


# --------------------------------------------------------------------------------------------------------------------
# Rendering one chip


@dataclass
class ChipScene:
    """The light on one chip's science area before readout.

    electrons: float32, shape `Detector.science_shape` (2048 x 4096 ACS, 2051 x 4096 UVIS).
    saturated: (row_start, row_stop, col) science-pixel column segments past full well (star cores and their bleed
    columns): they read 65535 DN.
    """

    electrons: np.ndarray
    saturated: list[tuple[int, int, int]]


class Presence(NamedTuple):
    """How much of a body a chip shows.

    body_fraction: share of the chip where the body's diffuse light is above twice the pixel noise (S/N > 2 per pixel;
    S/N > 1 for blurry chips).
    body_stars: the body's point sources on the chip with a peak above 20 sigma of the background (in focus).
    field_stars: the same for the foreground stars of the field.
    """

    body_fraction: float
    body_stars: int
    field_stars: int

    def shows(self, kind: str) -> bool:
        """The manual screening: would an astronomer keep this chip as a sample of a body of this kind?

        Galaxies need their smooth light over 10% of the chip; globular clusters a crowd of resolved stars (500 or
        more) that outnumbers the foreground stars four times; nebulae and (young) open clusters either.
        """
        diffuse = self.body_fraction >= 0.10
        crowd = self.body_stars >= 500 and self.body_stars >= 4 * self.field_stars
        if kind in GALAXY_KINDS:
            return diffuse
        if kind == "globular cluster":
            return crowd
        return diffuse or crowd


def _lowres_grid(det: Detector, exp: Exposure, extver: int, factor: int = LOWRES) -> tuple[np.ndarray, np.ndarray]:
    """Arcsec offsets (xi, eta) of the centres of the factor x factor blocks of a chip's science area."""
    rows, cols = det.science_shape
    nr, nc = -(-rows // factor), cols // factor
    y = np.arange(nr, dtype=np.float32) * factor + np.float32((factor - 1) / 2 + det.chip_y0(extver))
    x = np.arange(nc, dtype=np.float32) * factor + np.float32((factor - 1) / 2)
    xx, yy = np.meshgrid(x, y)
    return focal_to_offset(exp, xx, yy)


def _sources_on_chip(exp: Exposure, extver: int, sources: Sources, margin: float = 30.0):
    """Chip (x, y) in science pixels and electrons of the sources of one population that fall on a chip."""
    det = exp.det
    x, y = offset_to_focal(exp, sources.xi, sources.eta)
    y = y - np.float32(det.chip_y0(extver))
    rows, cols = det.science_shape
    keep = (x > -margin) & (x < cols + margin) & (y > -margin) & (y < rows + margin)
    electrons = sources.flux[keep] * np.float32(colour_factor(exp.filter, sources.beta) * exp.exptime)
    return x[keep], y[keep], electrons


def _noise_sigma(exp: Exposure, extver: int) -> float:
    """Typical background noise of a pixel, electrons."""
    rn = float(np.mean(exp.read_noise[2 * (extver - 1) : 2 * extver]))
    return math.sqrt(exp.sky * exp.exptime + rn * rn)


def _peak_fraction(psf_sigma: float) -> float:
    return 0.88 / (2 * math.pi * psf_sigma**2)


def chip_presence(model: BodyModel, exp: Exposure, extver: int) -> Presence:
    """How much of the body SCI,<extver> shows, from the body's light on a coarse grid (no rendering)."""
    det = exp.det
    xi, eta = _lowres_grid(det, exp, extver, 4 * LOWRES)
    body_e = diffuse_light(model, xi, eta, exp.filter) * np.float32(det.pixel_scale**2 * exp.exptime * exp.brightness)
    sigma = _noise_sigma(exp, extver)
    snr = np.float32(1.0 if exp.blurry else 2.0)  # blurry chips are low-S/N ones
    fraction = float(np.mean(body_e > snr * np.sqrt(np.float32(sigma * sigma) + body_e)))
    peak = _peak_fraction(exp.det.psf_sigma)  # as if in focus: a blurry chip shows a blurred crowd
    n_body = sum(
        int(np.count_nonzero(_sources_on_chip(exp, extver, s, 0.0)[2] * (peak * exp.brightness) > 20 * sigma)) for s in model.body_sources
    )
    n_field = int(np.count_nonzero(_sources_on_chip(exp, extver, model.field_sources[0], 0.0)[2] * peak > 20 * sigma))
    return Presence(fraction, n_body, n_field)


def _deposit(shape: tuple[int, int], x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Bilinear deposit of weights at sub-pixel positions (pixel centres at integers), float32 `shape`."""
    rows, cols = shape
    out = np.zeros(shape, np.float32)
    flat = out.reshape(-1)
    x0f, y0f = np.floor(x), np.floor(y)
    fx, fy = (x - x0f).astype(np.float32), (y - y0f).astype(np.float32)
    x0, y0 = x0f.astype(np.int64), y0f.astype(np.int64)
    w = w.astype(np.float32, copy=False)
    for dx, dy, f in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        xs, ys = x0 + dx, y0 + dy
        ok = (xs >= 0) & (xs < cols) & (ys >= 0) & (ys < rows)
        np.add.at(flat, ys[ok] * cols + xs[ok], w[ok] * f[ok])
    return out


def _spikes(image: np.ndarray, x: np.ndarray, y: np.ndarray, electrons: np.ndarray, angle: float) -> None:
    """Diffraction spikes of bright stars, drawn in place into a (pre-PSF) delta image."""
    order = np.argsort(electrons)[::-1][:150]
    for i in order:
        e = float(electrons[i])
        if e < 3e5:
            break
        length = min(600.0, 12.0 * math.sqrt(e / 3e5) * 6)
        level = e * 2.5e-5
        for ang in (angle, angle + 90.0):
            ca, sa = math.cos(math.radians(ang)), math.sin(math.radians(ang))
            for frac in (1.0, 0.5, 0.25):
                half = length * frac
                p1 = (int(round(x[i] - half * ca)), int(round(y[i] - half * sa)))
                p2 = (int(round(x[i] + half * ca)), int(round(y[i] + half * sa)))
                cv2.line(image, p1, p2, (level,), 1, cv2.LINE_8)


def _saturate(
    shape: tuple[int, int], x: np.ndarray, y: np.ndarray, stars_e: np.ndarray, psf_sigma: float, full_well: float
) -> list[tuple[int, int, int]]:
    """Saturated pixels as (row_start, row_stop, col) segments: cores of stars past full well and their bleed columns.

    The charge a core cannot hold spills up and down its columns (CCD bleeding), about half of the star's electrons
    at full well per pixel, tapered across the core and capped at a short column.
    """
    rows, cols = shape
    segments: list[tuple[int, int, int]] = []
    peak = _peak_fraction(psf_sigma)
    bright = np.nonzero(stars_e * peak > full_well)[0]
    for i in bright[np.argsort(stars_e[bright])[::-1][:400]]:
        e = float(stars_e[i])
        r_sat = psf_sigma * math.sqrt(2.0 * math.log(e * peak / full_well))
        half_w = int(r_sat)
        bleed = 0.5 * e / full_well / (2 * half_w + 1)  # pixels of charge per column beyond the core
        xc, yc = int(round(float(x[i]))), int(round(float(y[i])))
        for dx in range(-half_w, half_w + 1):
            col = xc + dx
            if not 0 <= col < cols:
                continue
            taper = math.exp(-0.5 * (dx / max(r_sat, 0.5)) ** 2)
            half_len = int(min(180.0, r_sat + 0.5 * bleed * taper * (1.0 + 0.3 * math.sin(i + dx))))
            lo, hi = max(0, yc - half_len), min(rows, yc + half_len + 1)
            if lo < hi:
                segments.append((lo, hi, col))
    return segments


def render_chip(model: BodyModel, exp: Exposure, extver: int, rng: np.random.Generator) -> ChipScene:
    """The electrons on the science area of SCI,<extver> for one exposure (before bias, gain and read noise)."""
    det = exp.det
    rows, cols = det.science_shape
    scale = np.float32(det.pixel_scale**2 * exp.exptime)
    xi, eta = _lowres_grid(det, exp, extver)
    body_e = diffuse_light(model, xi, eta, exp.filter) * (scale * np.float32(exp.brightness))

    # sky with a gentle gradient (scattered light), per pixel
    sky_e = exp.sky * exp.exptime
    gx, gy = rng.normal(0, 0.05, 2)
    nr, nc = body_e.shape
    ramp = (
        np.float32(gx) * np.linspace(-1, 1, nc, dtype=np.float32)[None, :]
        + np.float32(gy) * np.linspace(-1, 1, nr, dtype=np.float32)[:, None]
    ).astype(np.float32)
    lowres = body_e + np.float32(sky_e) * (np.float32(1.0) + ramp)
    if exp.blurry:  # out of focus: the diffuse light is blurred too
        lowres = cv2.GaussianBlur(lowres, (0, 0), exp.psf_sigma / LOWRES)

    # point sources: body populations, foreground stars, background galaxies
    pts_x, pts_y, pts_e = [], [], []
    for sources in model.body_sources:
        x, y, e = _sources_on_chip(exp, extver, sources)
        pts_x.append(x), pts_y.append(y), pts_e.append(e * np.float32(exp.brightness))
    x, y, e = _sources_on_chip(exp, extver, model.field_sources[0])
    pts_x.append(x), pts_y.append(y), pts_e.append(e)
    sx, sy, se = np.concatenate(pts_x), np.concatenate(pts_y), np.concatenate(pts_e)

    # the PSF's wings go on the coarse grid with the diffuse light: a halo (12% of the light, sigma 5x the core)
    # and a faint aureole (6%, sigma 30 pixels) that makes bright stars glow
    halo, aureole = 0.12, 0.06
    lr_shape = lowres.shape
    wings = _deposit(lr_shape, (sx - (LOWRES - 1) / 2) / LOWRES, (sy - (LOWRES - 1) / 2) / LOWRES, se * np.float32(1.0 / LOWRES**2))
    lowres += cv2.GaussianBlur(wings, (0, 0), 5.0 * exp.psf_sigma / LOWRES) * np.float32(halo)
    coarse = cv2.resize(wings, (lr_shape[1] // 4, lr_shape[0] // 4), interpolation=cv2.INTER_AREA)  # 16x coarser than the chip
    coarse = cv2.GaussianBlur(coarse, (0, 0), 30.0 / (4 * LOWRES))
    lowres += cv2.resize(coarse, (lr_shape[1], lr_shape[0]), interpolation=cv2.INTER_LINEAR) * np.float32(aureole)
    del wings, coarse
    electrons = cv2.resize(lowres, (cols, lr_shape[0] * LOWRES), interpolation=cv2.INTER_LINEAR)[:rows]

    delta = _deposit((rows, cols), sx, sy, se * np.float32(1.0 - halo - aureole))
    _spikes(delta, sx, sy, se, det.spike_angle)
    if exp.trail is not None:
        tx, ty, ang, width, level = exp.trail
        ty -= det.chip_y0(extver)
        ca, sa = math.cos(math.radians(ang)), math.sin(math.radians(ang))
        p1 = (int(tx - 9000 * ca), int(ty - 9000 * sa))
        p2 = (int(tx + 9000 * ca), int(ty + 9000 * sa))
        cv2.line(delta, p1, p2, (float(level),), int(round(width)), cv2.LINE_8)  # crossing takes ~1 s, whatever the exposure
    electrons += cv2.GaussianBlur(delta, (0, 0), exp.psf_sigma)
    del delta

    gal = model.field_sources[1]
    gx_, gy_, ge = _sources_on_chip(exp, extver, gal)
    if len(ge):
        size = math.hypot(gal.size / det.pixel_scale, exp.psf_sigma)
        pad = int(4 * size) + 2
        stamp_r = np.arange(-pad, pad + 1, dtype=np.float32)
        for i in range(len(ge)):  # a few dozen small galaxies per chip
            xc, yc = int(round(float(gx_[i]))), int(round(float(gy_[i])))
            if not (0 <= xc < cols and 0 <= yc < rows):
                continue
            ell = 0.4 + 0.6 * ((i * 0.618) % 1.0)
            ang = (i * 2.39996) % math.pi
            u = stamp_r[None, :] * math.cos(ang) + stamp_r[:, None] * math.sin(ang)
            v = -stamp_r[None, :] * math.sin(ang) + stamp_r[:, None] * math.cos(ang)
            blob = np.exp(-0.5 * (u * u + (v / ell) ** 2) / size**2)
            blob *= np.float32(ge[i] / blob.sum())
            r0, r1, c0, c1 = max(0, yc - pad), min(rows, yc + pad + 1), max(0, xc - pad), min(cols, xc + pad + 1)
            electrons[r0:r1, c0:c1] += blob[r0 - (yc - pad) : r1 - (yc - pad), c0 - (xc - pad) : c1 - (xc - pad)]

    saturated = _saturate(electrons.shape, sx, sy, se, exp.psf_sigma, det.full_well)

    # cosmic rays: short tracks of a few hundred to a few thousand electrons per pixel
    n_cr = int(rng.poisson(exp.cr_rate * (exp.exptime + 40.0)))
    if n_cr:
        length = np.minimum(1 + rng.exponential(2.5, n_cr).astype(np.int64), 30)
        start_x, start_y = rng.uniform(0, cols, n_cr), rng.uniform(0, rows, n_cr)
        ang = rng.uniform(0, np.pi, n_cr)
        level = np.exp(rng.normal(6.6, 0.7, n_cr)).astype(np.float32)
        track = np.repeat(np.arange(n_cr), length)
        step = np.arange(len(track)) - np.repeat(np.cumsum(length) - length, length)
        px = (start_x[track] + step * np.cos(ang[track])).astype(np.int64)
        py = (start_y[track] + step * np.sin(ang[track])).astype(np.int64)
        ok = (px >= 0) & (px < cols) & (py >= 0) & (py < rows)
        np.add.at(electrons.reshape(-1), py[ok] * cols + px[ok], level[track[ok]])
    # hot pixels (dark current of damaged pixels)
    n_hot = int(rows * cols * 2e-4)
    hot = rng.integers(0, rows * cols, n_hot)
    np.add.at(electrons.reshape(-1), hot, np.exp(rng.normal(-2.5, 1.2, n_hot)).astype(np.float32) * np.float32(exp.exptime))
    return ChipScene(electrons=electrons, saturated=saturated)


@functools.lru_cache(maxsize=1)
def _normal_table() -> np.ndarray:
    """Standard normal quantiles at the centres of 65536 equal-probability bins, float32 (65536,)."""
    inv_cdf = statistics.NormalDist().inv_cdf
    return np.array([inv_cdf((k + 0.5) / 65536.0) for k in range(65536)], dtype=np.float32)


def standard_normal(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Standard normal deviates, float32 `shape`, by inverse-CDF lookup of uniform 16-bit integers.

    About 3x faster than ``rng.standard_normal(dtype=np.float32)`` (the noise of a raw file is 17 million deviates);
    the table has 65536 levels and cuts the tails at 4.3 sigma, far below the cosmic rays and stars.
    """
    return np.take(_normal_table(), rng.integers(0, 65536, size=shape, dtype=np.uint16))


def read_out(scene: ChipScene, exp: Exposure, extver: int, rng: np.random.Generator) -> np.ndarray:
    """Raw SCI array of one chip, uint16 DN, shape `Detector.raw_shape`.

    Every pixel gets its amp's bias plus read noise; the science area adds electrons/gain and their Poisson noise
    (Gaussian approximation, one standard normal per pixel). Saturated pixels read 65535.
    """
    det = exp.det
    biases = exp.bias[2 * (extver - 1) : 2 * extver]
    noises = exp.read_noise[2 * (extver - 1) : 2 * extver]
    inv_gain = np.float32(1.0 / det.gain)
    raw = standard_normal(rng, det.raw_shape)
    rows = det.science_rows(extver)
    n_rows = det.raw_shape[0]
    overscan_rows = [r for r in (slice(0, rows.start), slice(rows.stop, n_rows)) if r.stop > r.start]
    for half, (raw_cols, sci_cols), bias, rn in zip(det.amp_halves(), det.science_cols(), biases, noises, strict=True):
        level = np.float32(bias + 0.5)  # + 0.5: the cast to uint16 below truncates, so this rounds
        # prescan, serial virtual overscan and virtual overscan rows: bias + read noise
        others = [(rows, c) for c in (slice(half.start, raw_cols.start), slice(raw_cols.stop, half.stop)) if c.stop > c.start]
        others += [(r, half) for r in overscan_rows]
        for r, c in others:
            block = raw[r, c]
            block *= np.float32(rn) * inv_gain
            block += level
        # science: bias + (electrons + sqrt(electrons + rn^2) * n) / gain
        electrons = scene.electrons[:, sci_cols]
        block = raw[rows, raw_cols]
        sigma = np.add(electrons, np.float32(rn * rn), dtype=np.float32)
        np.sqrt(sigma, out=sigma)
        block *= sigma
        block += electrons
        block *= inv_gain
        block += level
    np.clip(raw, 0.0, SATURATED_DN + 0.49, out=raw)
    out = raw.astype(np.uint16)
    col0 = {sci.start: raw_c.start for raw_c, sci in det.science_cols()}
    width = det.science_cols()[0][1].stop
    for lo, hi, col in scene.saturated:
        raw_col = col0[(col // width) * width] + col % width
        out[rows.start + lo : rows.start + hi, raw_col] = SATURATED_DN
    return out


# --------------------------------------------------------------------------------------------------------------------
# Headers and FITS writing


def _mjd_to_datetime(mjd: float) -> dt.datetime:
    return dt.datetime(1858, 11, 17) + dt.timedelta(days=mjd)


def primary_header(exp: Exposure, body: Body) -> fits.Header:
    """PRIMARY header of a raw file (no data), with the keywords the reference lists and a few more."""
    det = exp.det
    start = _mjd_to_datetime(exp.expstart)
    h = fits.Header()
    h["SIMPLE"] = (True, "data conform to FITS standard")
    h["BITPIX"] = (16, "bits per data value")
    h["NAXIS"] = (0, "number of data axes")
    h["EXTEND"] = (True, "File may contain standard extensions")
    h["NEXTEND"] = (6, "Number of standard extensions")
    h["ORIGIN"] = ("ray_hrc.synth", "synthetic raw file (not an HST observation)")
    h["DATE"] = (start.strftime("%Y-%m-%d"), "date this file was written (yyyy-mm-dd)")
    h["FILENAME"] = (f"{exp.obsid}_raw.fits", "name of file")
    h["FILETYPE"] = ("SCI", "type of data found in data file")
    h["TELESCOP"] = ("HST", "telescope used to acquire data")
    h["INSTRUME"] = (det.instrume, "identifier for instrument used to acquire data")
    h["EQUINOX"] = (2000.0, "equinox of celestial coord. system")
    h["ROOTNAME"] = (exp.obsid, "rootname of the observation set")
    h["PRIMESI"] = (det.instrume, "instrument designated as prime")
    h["TARGNAME"] = (body.name, "proposer's target name")
    h["RA_TARG"] = (body.ra, "right ascension of the target (deg) (J2000)")
    h["DEC_TARG"] = (body.dec, "declination of the target (deg) (J2000)")
    h["PROPOSID"] = (10000 + program_code(exp.seed, exp.body_index) % 7000, "PEP proposal identifier")
    h["LINENUM"] = (f"{exp.visit + 1:02d}.{exp.file_index % 100:03d}", "proposal logsheet line number")
    h["DATE-OBS"] = (start.strftime("%Y-%m-%d"), "UT date of start of observation (yyyy-mm-dd)")
    h["TIME-OBS"] = (start.strftime("%H:%M:%S"), "UT time of start of observation (hh:mm:ss)")
    h["EXPSTART"] = (round(exp.expstart, 8), "exposure start time (Modified Julian Date)")
    h["EXPEND"] = (round(exp.expstart + exp.exptime / 86400.0, 8), "exposure end time (Modified Julian Date)")
    h["EXPTIME"] = (exp.exptime, "exposure duration (seconds)--calculated")
    h["EXPFLAG"] = ("NORMAL", "Exposure interruption indicator")
    h["OBSTYPE"] = ("IMAGING", "observation type - imaging or spectroscopic")
    h["OBSMODE"] = ("ACCUM", "operating mode")
    h["DETECTOR"] = (det.detector, "detector in use")
    h["SUBARRAY"] = (False, "data from a subarray (T) or full frame (F)")
    h["CCDAMP"] = ("ABCD", "CCD amplifier read out configuration")
    h["CCDGAIN"] = (det.gain, "commanded gain of CCD")
    if det.instrume == "ACS":
        h["FILTER1"] = (exp.filter if exp.filter in ACS_FILTER1 else "CLEAR1L", "element selected from filter wheel 1")
        h["FILTER2"] = (exp.filter if exp.filter in ACS_FILTER2 else "CLEAR2L", "element selected from filter wheel 2")
    else:
        h["FILTER"] = (exp.filter, "element selected from filter wheel")
    h["APERTURE"] = (det.aperture, "aperture name")
    h["ORIENTAT"] = (round(exp.orientat, 4), "position angle of image y axis (deg. e of n)")
    return h


def chip_wcs(exp: Exposure, body: Body, extver: int) -> dict[str, float]:
    """TAN WCS of SCI,<extver>, referring to raw array pixels: CRPIX at the centre of the pixels the crop keeps."""
    det = exp.det
    geom = det.layout.chips[extver]
    rows = range(*geom.rows.indices(det.raw_shape[0]))
    first = range(*geom.amps[0].science.indices(det.raw_shape[1]))
    last = range(*geom.amps[-1].science.indices(det.raw_shape[1]))
    raw_x, raw_y = (first[0] + last[-1]) / 2.0, (rows[0] + rows[-1]) / 2.0  # as chips.chip_centre_radec
    sci_x, sci_y = det.raw_to_science(raw_x, raw_y, extver)
    xi, eta = focal_to_offset(exp, np.float64(sci_x), np.float64(sci_y + det.chip_y0(extver)))
    ra, dec = offset_to_radec(body.ra, body.dec, float(xi), float(eta))
    cd = _cd_matrix(det, exp.orientat)
    return {
        "CRPIX1": raw_x + 1.0,
        "CRPIX2": raw_y + 1.0,
        "CRVAL1": ra,
        "CRVAL2": dec,
        "CD1_1": float(cd[0, 0]),
        "CD1_2": float(cd[0, 1]),
        "CD2_1": float(cd[1, 0]),
        "CD2_2": float(cd[1, 1]),
    }


def sci_header(exp: Exposure, body: Body, extver: int) -> fits.Header:
    """SCI,<extver> header: uint16 as BITPIX=16/BZERO=32768, CCDCHIP, BUNIT, a TAN WCS, LTV1/2, ORIENTAT."""
    det = exp.det
    rows, cols = det.raw_shape
    wcs = chip_wcs(exp, body, extver)
    h = fits.Header()
    h["XTENSION"] = ("IMAGE", "extension type")
    h["BITPIX"] = (16, "bits per data value")
    h["NAXIS"] = (2, "number of data axes")
    h["NAXIS1"] = (cols, "length of first data axis")
    h["NAXIS2"] = (rows, "length of second data axis")
    h["PCOUNT"] = (0, "number of group parameters")
    h["GCOUNT"] = (1, "number of groups")
    h["EXTNAME"] = ("SCI", "extension name")
    h["EXTVER"] = (extver, "extension version number")
    h["INHERIT"] = (True, "inherit the primary header")
    h["ROOTNAME"] = (exp.obsid, "rootname of the observation set")
    h["BSCALE"] = (1, "scale factor for array value to physical value")
    h["BZERO"] = (32768, "physical value for an array value of zero")
    h["BUNIT"] = ("COUNTS", "brightness units")
    h["CCDCHIP"] = (2 if extver == 1 else 1, "CCD chip (1 or 2)")
    h["WCSAXES"] = (2, "number of World Coordinate System axes")
    h["CRPIX1"] = (wcs["CRPIX1"], "x-coordinate of reference pixel")
    h["CRPIX2"] = (wcs["CRPIX2"], "y-coordinate of reference pixel")
    h["CRVAL1"] = (wcs["CRVAL1"], "first axis value at reference pixel")
    h["CRVAL2"] = (wcs["CRVAL2"], "second axis value at reference pixel")
    h["CTYPE1"] = ("RA---TAN", "the coordinate type for the first axis")
    h["CTYPE2"] = ("DEC--TAN", "the coordinate type for the second axis")
    for key in ("CD1_1", "CD1_2", "CD2_1", "CD2_2"):
        h[key] = (wcs[key], "partial of coordinate wrt pixel (deg/px)")
    h["LTV1"] = (float(det.science_cols()[0][0].start), "offset in X to subsection start")
    h["LTV2"] = (float(det.science_rows(extver).start), "offset in Y to subsection start")
    h["LTM1_1"] = (1.0, "reciprocal of sampling rate in X")
    h["LTM2_2"] = (1.0, "reciprocal of sampling rate in Y")
    h["ORIENTAT"] = (round(exp.orientat, 4), "position angle of image y axis (deg. e of n)")
    h["RA_APER"] = (wcs["CRVAL1"], "RA of aperture reference position")
    h["DEC_APER"] = (wcs["CRVAL2"], "Declination of aperture reference position")
    return h


def empty_header(extname: str, extver: int, det: Detector) -> fits.Header:
    """ERR or DQ header of a raw file: no data (NAXIS=0), a constant PIXVALUE over NPIX1 x NPIX2."""
    h = fits.Header()
    h["XTENSION"] = ("IMAGE", "extension type")
    h["BITPIX"] = (-32 if extname == "ERR" else 16, "bits per data value")
    h["NAXIS"] = (0, "number of data axes")
    h["PCOUNT"] = (0, "number of group parameters")
    h["GCOUNT"] = (1, "number of groups")
    h["EXTNAME"] = (extname, "extension name")
    h["EXTVER"] = (extver, "extension version number")
    h["INHERIT"] = (True, "inherit the primary header")
    h["NPIX1"] = (det.raw_shape[1], "length of constant array axis 1")
    h["NPIX2"] = (det.raw_shape[0], "length of constant array axis 2")
    h["PIXVALUE"] = (0.0 if extname == "ERR" else 0, "values of pixels in constant array")
    return h


def write_raw_fits(path: str | Path, primary: fits.Header, chips: Sequence[tuple[fits.Header, np.ndarray]], detector: Detector) -> Path:
    """Write a raw file: PRIMARY, then (SCI, ERR, DQ) per chip in EXTVER order.

    chips: (SCI header, uint16 DN array of `detector.raw_shape`) for SCI,1 then SCI,2. The data are stored as
    big-endian int16 with BZERO=32768 (value - 32768, i.e. the sign bit flipped). Written to a temporary name and
    renamed, so a reader never sees half a file.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as fh:
        fh.write(primary.tostring(padding=True).encode("ascii"))
        for extver, (header, data) in enumerate(chips, start=1):
            if data.dtype != np.uint16 or data.shape != detector.raw_shape:
                raise ValueError(f"SCI,{extver} of {path.name} is {data.dtype} {data.shape}; expected uint16 {detector.raw_shape}")
            fh.write(header.tostring(padding=True).encode("ascii"))
            stored = np.bitwise_xor(data, np.uint16(0x8000))  # value - 32768 as int16 bits
            if sys.byteorder == "little":
                stored.byteswap(inplace=True)  # FITS is big-endian
            fh.write(memoryview(stored).cast("B"))
            fh.write(b"\0" * (-stored.nbytes % 2880))
            for extname in ("ERR", "DQ"):
                fh.write(empty_header(extname, extver, detector).tostring(padding=True).encode("ascii"))
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------------------------------------
# Files and the archive


def _pointings(exp: Exposure) -> list[Exposure]:
    """The drawn pointing, then ones pulled halfway to the body, then the body centred on either chip."""
    det = exp.det
    out = [exp, replace(exp, xi=exp.xi * 0.5, eta=exp.eta * 0.5)]
    cx, cy = det.centre
    rows = det.science_shape[0]
    for extver in (1, 2):
        # the offset of the chip's centre from the detector centre on the sky, for a pointing at the body centre
        xi, eta = focal_to_offset(replace(exp, xi=0.0, eta=0.0), np.float64(cx), np.float64(det.chip_y0(extver) + (rows - 1) / 2.0))
        out.append(replace(exp, xi=-float(xi), eta=-float(eta)))
    return out


def choose_exposure(
    model: BodyModel, seed: int, file_index: int, visit: int, instruments: Sequence[str], blurry_fraction: float
) -> tuple[Exposure, list[Presence]]:
    """Plan a file so that at least one chip shows its body (the paper's manual screening keeps only such chips).

    Tries the drawn pointing, then pointings closer to the body; if none works (a faint body in a short or
    narrow-band exposure), another draw of the exposure. Returns the exposure and `chip_presence` per EXTVER; in the
    rare case nothing works, the best one tried.
    """
    kind = model.body.kind
    best: tuple[float, Exposure, list[Presence]] | None = None
    for attempt in range(8):
        drawn = plan_exposure(seed, file_index, model.body.index, visit, instruments, blurry_fraction, attempt)
        for exp in _pointings(drawn):
            presence = [chip_presence(model, exp, extver) for extver in (1, 2)]
            if any(p.shows(kind) for p in presence):
                return exp, presence
            score = max(p.body_fraction / 0.10 + p.body_stars / 500.0 for p in presence)
            if best is None or score > best[0]:
                best = (score, exp, presence)
    logger.warning("no pointing of %s file %d shows the body well; keeping the best chip", model.body.name, file_index)
    return best[1], best[2]


def synthesize_file(
    seed: int, file_index: int, body_index: int, visit: int, out_dir: str, instruments: Sequence[str], blurry_fraction: float
) -> list[dict]:
    """Render and write one raw file; return its manifest rows (chips that show the body), with a ``blurry`` key."""
    model = body_model(seed, body_index)
    body = model.body
    exp, presence = choose_exposure(model, seed, file_index, visit, instruments, blurry_fraction)
    rng = np.random.default_rng([seed, _FILE_STREAM, file_index, 2])
    det = exp.det
    chips, rows = [], []
    kept = [p.shows(body.kind) for p in presence]
    if not any(kept):  # nothing passed: keep the better chip
        kept[int(np.argmax([p.body_fraction / 0.10 + p.body_stars / 500.0 for p in presence]))] = True
    path = Path(out_dir) / f"{exp.obsid}_raw.fits"
    primary = primary_header(exp, body)
    for extver in (1, 2):
        scene = render_chip(model, exp, extver, rng)
        header = sci_header(exp, body, extver)
        chips.append((header, read_out(scene, exp, extver, rng)))
        del scene
        if kept[extver - 1]:
            ra, dec, _ = chip_centre_radec(header, det.layout, extver, primary)
            rows.append(
                {
                    "ID": body.name,
                    "Instrument": det.name,
                    "OBSID": exp.obsid,
                    "Filter": exp.filter,
                    "RA": round(ra, 6),
                    "DEC": round(dec, 6),
                    "HDU Index": 1 if extver == 1 else 4,
                    "Label": body.label,
                    "URI": path.name,
                    "blurry": exp.blurry,
                    "kind": body.kind,
                }
            )
    write_raw_fits(path, primary, chips, det)
    logger.debug("wrote %s (%s %s, %s, %d chip(s) kept)", path, body.name, body.kind, exp.filter, len(rows))
    return rows


def plan_archive(seed: int, bodies: int, files_per_body: tuple[int, int]) -> list[tuple[int, int, int]]:
    """(file_index, body_index, visit) of every file: body b gets a number of files in `files_per_body` (inclusive)."""
    lo, hi = files_per_body
    if not 1 <= lo <= hi:
        raise ValueError(f"files_per_body is {files_per_body}; expected (min, max) with 1 <= min <= max")
    plan = []
    for b in range(bodies):
        n = int(np.random.default_rng([seed, _BODY_STREAM, b, 1]).integers(lo, hi + 1))
        plan += [(b, v) for v in range(n)]
    return [(i, b, v) for i, (b, v) in enumerate(plan)]


def _init_worker() -> None:
    cv2.setNumThreads(1)


def synthesize_archive(
    out_dir: str | Path,
    bodies: int = 8,
    seed: int = 0,
    files_per_body: tuple[int, int] = (2, 4),
    workers: int | None = None,
    blurry_fraction: float = 0.15,
    instruments: Sequence[str] = ("ACS/WFC", "WFC3/UVIS"),
) -> Path:
    """Write a synthetic archive of raw files and its LCID manifest; return the manifest's path.

    out_dir/<obsid>_raw.fits: the raw files. out_dir/manifest.csv: one row per chip that shows its body (1 or 2 per
    file) in the published LCID format (leading unnamed index column, ``ID, Instrument, OBSID, Filter, RA, DEC,
    HDU Index, Label``) plus ``URI``: the file's name, relative to the manifest's folder (`ray_hrc.manifest.
    read_manifest` resolves it). out_dir/blurry.csv: the same for the blurry chips only (LCID-Blurry); they are in
    manifest.csv as well.

    Galaxies (even body indices) and NSC (odd) alternate, so the classes are balanced; `bodies` >= 2 gives both.
    Each body gets between `files_per_body[0]` and `files_per_body[1]` files (inclusive); each file is blurry with
    probability `blurry_fraction` and observed with one of `instruments` ("ACS/WFC", "WFC3/UVIS").
    `workers` processes write the files, one body per task (None: one per CPU; 1: in this process); the output does
    not depend on it. The pool uses the "spawn" start method: scripts need an ``if __name__ == "__main__":`` guard.
    """
    unknown = [name for name in instruments if name not in DETECTORS]
    if unknown or not instruments:
        raise ValueError(f"instruments {list(instruments)} must be a non-empty subset of {sorted(DETECTORS)}")
    if bodies < 1:
        raise ValueError(f"bodies is {bodies}; expected at least 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = plan_archive(seed, bodies, files_per_body)
    args = [(seed, i, b, v, str(out), tuple(instruments), float(blurry_fraction)) for i, b, v in plan]
    per_body = [[a for a in args if a[2] == b] for b in range(bodies)]  # one task per body: its model is built once
    n_workers = min(bodies, workers if workers is not None else (os.cpu_count() or 1))
    if n_workers <= 1:
        results = [_synthesize_files(task) for task in per_body]
    else:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx, initializer=_init_worker) as pool:
            results = list(pool.map(_synthesize_files, per_body))
    rows = [row for body_rows in results for row in body_rows]
    frame = pd.DataFrame(rows, columns=[*MANIFEST_COLUMNS, "blurry", "kind"])
    manifest = out / MANIFEST_NAME
    frame[MANIFEST_COLUMNS].to_csv(manifest, index=True)
    frame.loc[frame["blurry"], MANIFEST_COLUMNS].reset_index(drop=True).to_csv(out / BLURRY_NAME, index=True)
    logger.info("wrote %d raw files, %d chips of %d bodies to %s", len(args), len(frame), bodies, out)
    return manifest


def _synthesize_files(task: list[tuple]) -> list[dict]:
    """`synthesize_file` over the files of one body, rows in file order."""
    return [row for args in task for row in synthesize_file(*args)]


def body_kinds(seed: int, bodies: int) -> dict[str, str]:
    """Body name -> kind (spiral, globular cluster, ...) for an archive: a convenience for previews and analyses."""
    return {make_body(seed, b).name: make_body(seed, b).kind for b in range(bodies)}
