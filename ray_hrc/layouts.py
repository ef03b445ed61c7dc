"""Detector layouts: where the science area, prescans and overscans sit in each Hubble SCI extension.

Every supported product (instrument, detector, raw or calibrated) is one `Layout` entry in `LAYOUTS`.
The cropping code is generic over these entries, so adding a detector (CSST's, later) is a new entry here,
not a new code path.

Indices are numpy ``[row, col]``, 0-based, on the array astropy returns (NAXIS1 is the column count),
as in ``shared/reference/hst-raw-format.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

CHIP_SHAPE = (2048, 4096)
"""Shape of every chip after cropping: rows x columns (the paper's 2048 x 4096 LCID samples)."""


@dataclass(frozen=True)
class Amp:
    """One amplifier's share of a chip.

    `science` is the block of raw columns that this amp reads out, `prescan` the raw columns of its physical
    prescan (used to estimate its bias level); `prescan` is None for calibrated products, which are already
    bias-subtracted and trimmed.
    """

    science: slice
    prescan: slice | None = None


@dataclass(frozen=True)
class ChipGeometry:
    """Where the 2048 x 4096 chip sits in one SCI extension (identified by its EXTVER).

    The chip is ``array[rows, amps[0].science] | array[rows, amps[1].science] | ...`` joined left to right.
    """

    rows: slice
    amps: tuple[Amp, ...]


@dataclass(frozen=True)
class Layout:
    """One product type: the SCI array shape it has and the chip geometry per EXTVER."""

    instrument: str  # INSTRUME keyword: "ACS", "WFC3"
    detector: str  # DETECTOR keyword: "WFC", "UVIS"
    product: str  # "raw" (uint16 DN with prescan/overscan) or "calibrated" (_flt/_flc, float32 electrons)
    shape: tuple[int, int]  # (NAXIS2, NAXIS1) of each SCI extension
    chips: dict[int, ChipGeometry]  # EXTVER -> geometry
    name: str  # human name, e.g. "ACS/WFC"

    def __post_init__(self) -> None:
        for extver, geom in self.chips.items():
            widths = {_span(a.science, self.shape[1]) for a in geom.amps}
            rows = _span(geom.rows, self.shape[0])
            cols = sum(_span(a.science, self.shape[1]) for a in geom.amps)
            if (rows, cols) != CHIP_SHAPE or len(widths) != 1:
                raise ValueError(
                    f"layout {self.name} {self.product} SCI,{extver} crops to {(rows, cols)}; expected {CHIP_SHAPE} in equal-width amps"
                )


def _span(s: slice, n: int) -> int:
    return len(range(*s.indices(n)))


# ACS/WFC raw: 2068 x 4144; 24 prescan columns each side; 20 virtual overscan rows next to the chip gap.
# SCI,1 is WFC2 (amps C|D, overscan rows at the bottom of the array), SCI,2 is WFC1 (amps A|B, overscan at the top).
_ACS_RAW_AMPS = (Amp(science=slice(24, 2072), prescan=slice(0, 24)), Amp(science=slice(2072, 4120), prescan=slice(4120, 4144)))

# WFC3/UVIS raw: 2070 x 4206; 25 prescan columns each side; 60 serial virtual overscan columns in the middle;
# 19 virtual overscan rows next to the chip gap, and the paper drops 3 more science rows there (2051 -> 2048).
_UVIS_RAW_AMPS = (Amp(science=slice(25, 2073), prescan=slice(0, 25)), Amp(science=slice(2133, 4181), prescan=slice(4181, 4206)))

_FULL_WIDTH = (Amp(science=slice(0, 2048)), Amp(science=slice(2048, 4096)))

LAYOUTS: list[Layout] = [
    Layout(
        instrument="ACS",
        detector="WFC",
        product="raw",
        shape=(2068, 4144),
        chips={1: ChipGeometry(rows=slice(0, 2048), amps=_ACS_RAW_AMPS), 2: ChipGeometry(rows=slice(20, 2068), amps=_ACS_RAW_AMPS)},
        name="ACS/WFC",
    ),
    Layout(
        instrument="ACS",
        detector="WFC",
        product="calibrated",
        shape=(2048, 4096),
        chips={1: ChipGeometry(rows=slice(0, 2048), amps=_FULL_WIDTH), 2: ChipGeometry(rows=slice(0, 2048), amps=_FULL_WIDTH)},
        name="ACS/WFC",
    ),
    Layout(
        instrument="WFC3",
        detector="UVIS",
        product="raw",
        shape=(2070, 4206),
        chips={1: ChipGeometry(rows=slice(0, 2048), amps=_UVIS_RAW_AMPS), 2: ChipGeometry(rows=slice(22, 2070), amps=_UVIS_RAW_AMPS)},
        name="WFC3/UVIS",
    ),
    Layout(
        instrument="WFC3",
        detector="UVIS",
        product="calibrated",
        shape=(2051, 4096),
        chips={1: ChipGeometry(rows=slice(0, 2048), amps=_FULL_WIDTH), 2: ChipGeometry(rows=slice(3, 2051), amps=_FULL_WIDTH)},
        name="WFC3/UVIS",
    ),
]


class UnsupportedLayoutError(ValueError):
    """The file's instrument, detector or SCI shape matches no entry of `LAYOUTS`."""


def supported_instruments() -> list[str]:
    """Names like ``ACS/WFC`` of every instrument/detector pair with a layout."""
    return sorted({lay.name for lay in LAYOUTS})


def find_layout(instrument: str, detector: str, shape: tuple[int, int], *, where: str = "") -> Layout:
    """The layout for an INSTRUME/DETECTOR pair and SCI shape ``(NAXIS2, NAXIS1)``.

    Raises `UnsupportedLayoutError` naming `where` (e.g. ``"SCI,2 of x.fits"``) and what was expected.
    """
    instrument, detector = instrument.strip().upper(), detector.strip().upper()
    candidates = [lay for lay in LAYOUTS if lay.instrument == instrument and lay.detector == detector]
    if not candidates:
        raise UnsupportedLayoutError(
            f"{where or 'file'} is {instrument or '?'}/{detector or '?'}; expected one of {', '.join(supported_instruments())}"
        )
    for lay in candidates:
        if tuple(shape) == lay.shape:
            return lay
    expected = " or ".join(f"{lay.shape} ({lay.product})" for lay in candidates)
    raise UnsupportedLayoutError(f"{where or 'file'} has shape {tuple(shape)}; expected {expected} for {candidates[0].name}")
