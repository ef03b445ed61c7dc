"""FITS bytes -> chips: crop each SCI extension to its 2048 x 4096 science area and estimate its bias.

A `Chip` is the unit everything downstream works on: the cropped pixels (raw files stay uint16 DN; calibrated
files are float32 electrons), one bias level per amplifier (from that amp's own prescan), and the metadata a
catalog row needs. Anything wrong with a file or a chip becomes a `ChipError` record naming the file, the HDU and
what was expected; nothing raises out of `read_fits`.

Pure numpy/astropy (plus the compiled loops of `ray_hrc.kernels`): no Ray here, so every path is unit-tested
without a cluster. Well-formed local files and bytes have their headers walked by `map_fits` and their data
memory-mapped; anything else goes through astropy's HDU list. Remote URIs are fetched into memory first
(`ray_hrc.remote`) and then read as bytes, by the same two paths.
"""

from __future__ import annotations

import io
import logging
import math
import mmap
import os
import re
import warnings
import zlib
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.utils.exceptions import AstropyWarning
from astropy.wcs import WCS, FITSFixedWarning, NoWcsKeywordsFoundError, Wcsprm

from ray_hrc.kernels import crop_offset_uint16, offset_uint16_median
from ray_hrc.layouts import CHIP_SHAPE, LAYOUTS, Layout, UnsupportedLayoutError, find_layout

logger = logging.getLogger(__name__)

SCI = "SCI"
RAW_HDU_PER_EXTVER = 3  # SCI, ERR, DQ per chip: HDU index 1 is SCI,1 and 4 is SCI,2


@dataclass
class ChipMeta:
    """Everything a catalog row says about a chip besides its label."""

    uri: str
    obsid: str = ""  # ROOTNAME, lower case, e.g. "j96r23b7q"
    hdu: int = -1  # absolute HDU index of the SCI extension (1 or 4 in raw files)
    extver: int = -1
    ccdchip: int = -1
    instrument: str = ""  # "ACS/WFC", "WFC3/UVIS"
    detector: str = ""
    product: str = ""  # "raw" or "calibrated"
    filter: str = ""
    exptime: float = float("nan")  # seconds
    targname: str = ""
    date_obs: str = ""  # ISO 8601, UTC
    ra: float = float("nan")  # chip centre, degrees (ICRS)
    dec: float = float("nan")
    radec_from_targ: bool = False  # True where the SCI WCS was unusable and RA_TARG/DEC_TARG were used


META_FIELDS = [f.name for f in fields(ChipMeta)]
LABEL_COLUMNS = ["body", "label_true"]  # a chip row's labels, from a manifest (empty when unknown)
ERROR_COLUMNS = ["error_class", "error"]  # a chip row's failure (empty for good chips)


@dataclass
class Chip:
    """A cropped chip.

    pixels: uint16 DN for raw files or float32 electrons for calibrated ones, shape (2048, 4096), not bias-subtracted.
    amp_bias: float32 DN, shape (n_amps,): the bias of each equal-width column block, left to right (0 for calibrated).
    """

    pixels: np.ndarray
    amp_bias: np.ndarray
    meta: ChipMeta

    def to_row(self) -> dict[str, Any]:
        """A flat Ray Data row: metadata columns plus ``pixels`` and ``amp_bias``."""
        return {**asdict(self.meta), "pixels": self.pixels, "amp_bias": self.amp_bias}


@dataclass
class ChipError:
    """A file or chip that could not be read: where, which kind of failure, and what was expected."""

    uri: str
    hdu: int
    error_class: str  # one of ERROR_CLASSES
    message: str
    meta: dict[str, Any] = field(default_factory=dict)

    def to_row(self) -> dict[str, Any]:
        return {"uri": self.uri, "hdu": self.hdu, "error_class": self.error_class, "message": self.message}


ERROR_CLASSES = (
    "unreadable",  # the URI could not be opened or fetched
    "not_fits",  # the bytes are not a FITS file
    "bad_header",  # a structural keyword (BITPIX, NAXIS, NAXISn, PCOUNT, GCOUNT, EXTVER, BZERO...) is missing or invalid
    "over_limit",  # over a documented cap: MAX_HDUS HDUs, MAX_HEADER_BLOCKS header blocks (Serve: more chips than the instrument)
    "truncated",  # the file ends before the data its headers promise
    "unsupported_instrument",  # INSTRUME/DETECTOR match no layout
    "missing_sci",  # no SCI extension (or the requested HDU is not SCI)
    "bad_shape",  # a supported instrument's SCI of the wrong dimensionality or shape
    "all_nan",  # no finite pixel in the science area
    "internal",  # anything else: a bug; the message carries the exception
)


class ChipReadError(Exception):
    def __init__(self, error_class: str, message: str):
        super().__init__(message)
        self.error_class = error_class


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def open_fits(source: str | bytes, storage_options: dict | None = None) -> fits.HDUList:
    """Open a FITS file lazily: local paths are memory-mapped, remote URIs are read through fsspec by byte range.

    `source` is a path, a URI (``s3://``, ``https://``, ...), or the file's bytes (Serve's request bodies).
    Data are never scaled by astropy: `read_fits` converts uint16 itself, which is both exact and fast.
    """
    kwargs = dict(lazy_load_hdus=True, do_not_scale_image_data=True, ignore_missing_simple=False)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return fits.open(io.BytesIO(source), **kwargs)
    if is_remote(source):
        return fits.open(source, use_fsspec=True, fsspec_kwargs=storage_options or {}, **kwargs)
    path = source[len("file://") :] if source.startswith("file://") else source
    return fits.open(path, memmap=True, **kwargs)


def _get(header: fits.Header, key: str, default: Any = None) -> Any:
    """``header.get(key, default)``, with a card astropy cannot parse (a hostile header) read as absent."""
    try:
        return header.get(key, default)
    except (fits.VerifyError, ValueError):
        return default


def _str(header: fits.Header, key: str) -> str:
    value = _get(header, key, "")
    return str(value).strip() if value is not None else ""


def _float(header: fits.Header, key: str) -> float:
    try:
        return float(_get(header, key, float("nan")))
    except (TypeError, ValueError, OverflowError):
        return float("nan")


def filter_name(primary: fits.Header) -> str:
    """FILTER (WFC3), or the one of FILTER1/FILTER2 (ACS) that is not a CLEAR position."""
    if _str(primary, "FILTER"):
        return _str(primary, "FILTER")
    names = [_str(primary, k) for k in ("FILTER1", "FILTER2")]
    named = [n for n in names if n and not n.upper().startswith("CLEAR")]
    return ";".join(named) if named else (names[0] or "")


def date_obs(primary: fits.Header) -> str:
    day, time = _str(primary, "DATE-OBS"), _str(primary, "TIME-OBS")
    if "T" in day or not time:
        return day
    return f"{day}T{time}"


def chip_centre_radec(sci: fits.Header, layout: Layout, extver: int, primary: fits.Header) -> tuple[float, float, bool]:
    """RA/Dec (degrees) of the cropped chip's centre from the SCI header's WCS; RA_TARG/DEC_TARG if unusable.

    The WCS of a raw file refers to raw array pixels, so the centre is taken in raw coordinates, at the middle of
    the rows and columns the crop keeps. Returns (ra, dec, from_targ).
    """
    geom = layout.chips[extver]
    rows = range(*geom.rows.indices(layout.shape[0]))
    first = range(*geom.amps[0].science.indices(layout.shape[1]))
    last = range(*geom.amps[-1].science.indices(layout.shape[1]))
    x, y = (first[0] + last[-1]) / 2.0, (rows[0] + rows[-1]) / 2.0
    try:
        radec = sky_position(sci, x, y)
        if radec is not None and np.isfinite(radec[0]) and np.isfinite(radec[1]):
            return radec[0] % 360.0, radec[1], False
    except Exception as exc:  # noqa: BLE001 - any WCS trouble falls back to the target position
        logger.debug("WCS of %s unusable: %s", _get(primary, "ROOTNAME", "?"), exc)
    return _float(primary, "RA_TARG"), _float(primary, "DEC_TARG"), True


MAX_SIP_ORDER = 9
"""SIP distortions of a higher order are not evaluated (the centre falls back to RA_TARG/DEC_TARG); HST uses <= 5."""
_DISTORTION_KEYWORD = re.compile(r"([AB]P?_ORDER|CPDIS\d|D2IMDIS\d|PV\d+_\d+)$")
"""SIP polynomials, lookup-table distortions, and PV cards (which astropy may reinterpret as TPV)."""
_CORE_WCS_KEYWORD = re.compile(
    r"(WCSAXES|NAXIS\d*|CTYPE\d+|CUNIT\d+|CRVAL\d+|CRPIX\d+|CDELT\d+|CROTA\d+|CD\d+_\d+|PC\d+_\d+|PS\d+_\d+"
    r"|LONPOLE|LATPOLE|RADESYS|RADECSYS|EQUINOX|EPOCH|MJD-OBS|DATE-OBS)$"
)
"""The primary (key ' ') WCS keywords that decide a core celestial transform."""


def sky_position(sci: fits.Header, x: float, y: float) -> tuple[float, float] | None:
    """(RA, Dec) in degrees of 0-based array pixel (x, y) from the header's celestial WCS; None if it has none.

    The same numbers as ``WCS(sci, naxis=2).all_pix2world([[x, y]], 0)``. Headers with distortion keywords go
    through exactly that; the others (raw files: TAN with a CD matrix) go straight to wcslib with only their core
    WCS cards, which skips astropy converting the whole header to text three times (most of the cost).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        if any(_DISTORTION_KEYWORD.match(key) for key in sci):
            orders = [sci.get(k, 0) for k in ("A_ORDER", "B_ORDER", "AP_ORDER", "BP_ORDER")]
            if any(not isinstance(o, int) or not 0 <= o <= MAX_SIP_ORDER for o in orders):
                return None  # astropy would allocate (order + 1)^2 coefficients for each
            full = WCS(sci, naxis=2)
            if not (full.has_celestial and full.wcs.ctype[0].strip()):
                return None
            ra, dec = full.all_pix2world([[x, y]], 0)[0]
            return float(ra), float(dec)
        text = "".join(str(card) for card in sci.cards if _CORE_WCS_KEYWORD.match(card.keyword))
        try:
            core = Wcsprm(header=text.encode("ascii"), key=" ", relax=True, keysel=-1).sub(2)
        except NoWcsKeywordsFoundError:
            return None
        core.fix()
        core.set()
        if not (core.lng >= 0 and core.lat >= 0 and core.ctype[0].strip()):
            return None
        ra, dec = core.p2s(np.array([[x, y]], np.float64), 0)["world"][0]
        return float(ra), float(dec)


def _is_offset_uint16(header: fits.Header) -> bool:
    """The usual raw encoding: uint16 stored as int16 with BZERO = 32768 (BITPIX = 16, BSCALE = 1)."""
    return header.get("BITPIX") == 16 and header.get("BZERO", 0) == 32768 and header.get("BSCALE", 1) == 1


def to_physical(raw: np.ndarray, header: fits.Header) -> np.ndarray:
    """Stored FITS values -> physical values: uint16 for the usual BITPIX=16/BZERO=32768, else float32."""
    bitpix, bzero, bscale = header.get("BITPIX"), header.get("BZERO", 0), header.get("BSCALE", 1)
    if _is_offset_uint16(header):
        # v + 32768 (mod 2**16) flips the sign bit of the int16 two's complement: exact and one pass.
        return np.bitwise_xor(raw.view(raw.dtype.str.replace("i", "u")), np.uint16(0x8000), dtype=np.uint16)
    if bitpix in (8, 16) and bzero == 0 and bscale == 1:
        return raw.astype(np.uint16 if bitpix == 8 or raw.min() >= 0 else np.float32)
    out = raw.astype(np.float32)
    if bscale != 1:
        out *= np.float32(bscale)
    if bzero != 0:
        out += np.float32(bzero)
    return out


def crop_sci(hdu: fits.ImageHDU, layout: Layout, extver: int, *, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Crop one SCI extension to its (2048, 4096) science area and estimate each amp's bias.

    Reads only the rows the chip keeps (one contiguous byte range), joins the amps' science columns, and takes the
    median of each amp's prescan over the same rows as its bias (DN). Returns (pixels, amp_bias).
    """
    geom = layout.chips[extver]
    try:
        rows = hdu.section[geom.rows, :]
    except (OSError, ValueError, TypeError, IndexError) as exc:
        raise ChipReadError("truncated", f"{where}: data could not be read ({exc}); the file looks truncated") from exc
    if rows.shape[0] != len(range(*geom.rows.indices(layout.shape[0]))):
        raise ChipReadError("truncated", f"{where}: got {rows.shape[0]} rows of data; the file looks truncated")
    header = hdu.header
    offset_uint16 = _is_offset_uint16(header) and rows.dtype.kind == "i" and rows.dtype.itemsize == 2
    if offset_uint16:
        science = [range(*a.science.indices(rows.shape[1])) for a in geom.amps]
        pixels = crop_offset_uint16(rows, [r.start for r in science], len(science[0]))  # join + uint16 in one pass
    else:
        pixels = to_physical(np.concatenate([rows[:, a.science] for a in geom.amps], axis=1), header)
    if pixels.shape != CHIP_SHAPE:
        raise ChipReadError("bad_shape", f"{where} crops to {pixels.shape}; expected {CHIP_SHAPE}")
    if pixels.dtype.kind == "f" and not np.isfinite(pixels[::16, ::16]).any() and not np.isfinite(pixels).any():
        raise ChipReadError("all_nan", f"{where} has no finite pixel in its science area")
    bias = np.zeros(len(geom.amps), dtype=np.float32)
    for i, amp in enumerate(geom.amps):
        if amp.prescan is None:
            continue
        if offset_uint16:
            prescan = range(*amp.prescan.indices(rows.shape[1]))
            bias[i] = offset_uint16_median(rows, prescan.start, prescan.stop)
        else:
            bias[i] = np.median(to_physical(rows[:, amp.prescan], header))
    return pixels, bias


def _sci_hdus(hdul: fits.HDUList, name: str = "") -> tuple[list[tuple[int, fits.ImageHDU]], bool]:
    """Every SCI extension with its absolute HDU index, and whether the HDU list ended early (a truncated file).

    At most `MAX_HDUS` HDUs are parsed (astropy parses each header it steps over): more is ``over_limit``.
    """
    found = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for index, hdu in enumerate(hdul):
            if index >= MAX_HDUS:
                raise ChipReadError("over_limit", f"{name} has more than {MAX_HDUS} HDUs (the limit; Hubble files have about 20)")
            if index and _str(hdu.header, "EXTNAME").upper() == SCI:
                found.append((index, hdu))
    cut_short = any("truncated" in str(w.message) or "corrupted" in str(w.message) or "Header size" in str(w.message) for w in caught)
    return found, cut_short


def expected_chips(primary: fits.Header) -> int:
    """How many chips (SCI extensions) the primary header's instrument has; 0 for an instrument with no layout."""
    return len(_expected_extvers(primary))


def _expected_extvers(primary: fits.Header) -> list[int]:
    instrument, detector = _str(primary, "INSTRUME").upper(), _str(primary, "DETECTOR").upper()
    extvers = {v for lay in LAYOUTS if (lay.instrument, lay.detector) == (instrument, detector) for v in lay.chips}
    return sorted(extvers)


BLOCK = 2880
"""FITS headers and data areas come in 2880-byte blocks of 36 80-character cards."""
CARD = 80
_DATA_DTYPES = {8: "u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}
MAX_NAXIS = 999
"""The FITS standard's largest NAXIS."""
MAX_HDUS = 1000
"""At most this many HDUs are walked in a file; a file with more is refused (``over_limit``).

Hubble raw and calibrated files hold 4 to about 20 (PRIMARY, SCI/ERR/DQ per chip, WCSCORR, HDRLET); 1000 bounds
the work a hostile file can ask for (each HDU costs a header scan) without refusing any real product.
"""
MAX_HEADER_BLOCKS = 200
"""A header with no END card in its first 200 blocks (7200 cards, 576,000 bytes) is refused (``over_limit``).

The largest Hubble headers (a calibrated file's primary, with its HISTORY) are under 20 blocks; the cap bounds the
bytes scanned and parsed per header, so a file of header cards without END cannot make a reader scan it all.
"""
_STRUCTURAL = frozenset({"SIMPLE", "XTENSION", "BITPIX", "NAXIS", "PCOUNT", "GCOUNT", "GROUPS", "EXTNAME"})
_NAXIS_N = re.compile(r"NAXIS[1-9][0-9]{0,2}")


class FitsStructureError(ChipReadError):
    """A structural keyword is missing or out of range, a size does not fit the file, or a cap is exceeded.

    `hdu` is the index of the HDU at fault. Raised by `map_fits` only for files that are certainly not valid FITS
    (or over a documented cap): astropy is never asked to open them.
    """

    def __init__(self, error_class: str, message: str, hdu: int = -1):
        super().__init__(error_class, message)
        self.hdu = hdu


@dataclass(frozen=True)
class HDUSpan:
    """Where one HDU lies in the file, from its structural keywords, all checked. Offsets are bytes from the start."""

    index: int
    kind: str  # "PRIMARY" or the XTENSION value: "IMAGE", "BINTABLE", ...
    header_start: int
    data_start: int
    data_bytes: int  # unpadded: |BITPIX|/8 * GCOUNT * (PCOUNT + NAXIS1 * ... * NAXISn)
    end: int  # the next HDU's start (data padded to whole blocks)
    bitpix: int
    axes: tuple[int, ...]  # (NAXIS1, ..., NAXISn)
    extname: str
    groups: bool  # random groups (primary with NAXIS1 = 0 and GROUPS = T)
    simple: bool  # the primary's SIMPLE = T (False for extensions)


@dataclass
class MappedImage:
    """An image extension found by `map_fits`: its header, and its stored values mapped from the file, not read.

    Quacks like the parts of astropy's ImageHDU that `crop_sci` uses: ``section[rows, cols]`` reads only what it
    touches, and gives the stored (unscaled) values, as astropy does with ``do_not_scale_image_data``.
    """

    header: fits.Header
    section: np.ndarray  # stored values, big-endian, shape (NAXISn, ..., NAXIS1)


def _card_value(card: bytes) -> str:
    """The value field of a ``KEYWORD = value / comment`` card, as text: a string's contents or the bare token."""
    field = card[10:].decode("ascii").strip()
    if field.startswith("'"):
        text, i = [], 1
        while i < len(field):
            if field[i] == "'":
                if field[i + 1 : i + 2] != "'":
                    return "".join(text).rstrip()
                i += 1
            text.append(field[i])
            i += 1
        raise ValueError("unterminated string")
    return field.split("/", 1)[0].strip()


def _int_value(cards: dict[str, bytes], key: str, where: str, index: int, default: int | None = None) -> int:
    """An integer structural keyword, read as the standard says (fixed or free format); its absence or any other
    type is a `FitsStructureError` naming the HDU."""
    card = cards.get(key)
    if card is None:
        if default is not None:
            return default
        raise FitsStructureError("bad_header", f"{where} has no {key} card; the FITS standard requires it", index)
    try:
        text = _card_value(card)
        return int(text) if re.fullmatch(r"[+-]?[0-9]{1,30}", text) else _strict_int(fits.Card.fromstring(card.decode("ascii")).value)
    except (ValueError, UnicodeDecodeError, TypeError, fits.VerifyError) as exc:
        shown = card[10:].decode("ascii", "replace").split("/", 1)[0].strip()[:40]
        raise FitsStructureError("bad_header", f"{where} has {key} = {shown!r}; expected an integer", index) from exc


def _text_value(cards: dict[str, bytes], key: str, where: str, index: int) -> str:
    """A string or logical structural keyword's value ("" when absent); one that cannot be read is `bad_header`."""
    if key not in cards:
        return ""
    try:
        return _card_value(cards[key]).strip()
    except (ValueError, UnicodeDecodeError) as exc:
        shown = cards[key][10:].decode("ascii", "replace").strip()[:40]
        raise FitsStructureError("bad_header", f"{where} has {key} = {shown!r}, which is not a valid value ({exc})", index) from exc


def _shown(axes: tuple[int, ...]) -> str:
    """The axis lengths for a message, shortened: a hostile header can declare 999 axes of 70 digits."""
    text = ", ".join(str(n) if n < 10**12 else f"~10^{len(str(n)) - 1}" for n in axes[:4])
    return f"({text}{', ...' if len(axes) > 4 else ''})"


def _strict_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"not an integer: {value!r}")
    return int(value)


def _walk_hdus(buffer: mmap.mmap | memoryview, name: str) -> tuple[list[HDUSpan], dict[int, bytes], FitsStructureError | None]:
    """Every HDU of a FITS file, each structural keyword checked before it is used. Never loops, never over-reads.

    Returns the HDU spans, the raw header bytes of the primary and of every SCI extension, and, for a file that ends
    inside an extension, the ``truncated`` error that stopped the walk (the complete HDUs before it are returned, so
    a chip before the cut is still read). Raises
    `FitsStructureError` (naming `name`, the HDU and what was expected) for a file that is not FITS, a structural
    keyword that is missing, not an integer or out of range, a header with no END, a size beyond the end of the
    file, or more than `MAX_HDUS` HDUs. Bytes after the last HDU that do not begin an extension are ignored, as
    astropy ignores them. Each HDU moves the position forward by at least one block, and sizes are compared with
    the bytes left before they are used, so the walk ends after at most ``len(buffer) / 2880`` steps.
    """
    size, pos = len(buffer), 0
    spans: list[HDUSpan] = []
    headers: dict[int, bytes] = {}
    if size < BLOCK or bytes(buffer[:10]) != b"SIMPLE  = ":
        what = "is empty" if size == 0 else ("is shorter than one FITS block" if size < BLOCK else "does not begin with a SIMPLE card")
        raise FitsStructureError("not_fits", f"{name} {what}; expected a FITS file", -1 if size < BLOCK else 0)
    while pos < size:
        index = len(spans)
        if index and bytes(buffer[pos : pos + 10]) != b"XTENSION= ":
            break  # trailing bytes that begin no extension: ignored, as astropy does
        if index >= MAX_HDUS:
            raise FitsStructureError("over_limit", f"{name} has more than {MAX_HDUS} HDUs (the limit; Hubble files have about 20)", index)
        where = f"HDU {index} of {name}"
        start, cards, done = pos, {}, False
        while not done:  # the header's blocks, up to its END card
            if pos + BLOCK > size:
                cut = FitsStructureError(
                    "truncated", f"{where}: the file ends inside its header (no END card); the file looks truncated", index
                )
                if index == 0:
                    raise cut
                return spans, headers, cut
            if pos - start >= MAX_HEADER_BLOCKS * BLOCK:
                raise FitsStructureError(
                    "over_limit", f"{where} has no END card in its first {MAX_HEADER_BLOCKS} header blocks (the limit)", index
                )
            block = bytes(buffer[pos : pos + BLOCK])
            pos += BLOCK
            for i in range(0, BLOCK, CARD):
                card = block[i : i + CARD]
                key = card[:8]
                if key == b"END     ":
                    done = True
                    break
                name8 = key.rstrip().decode("ascii", "replace")
                if name8 in _STRUCTURAL or _NAXIS_N.fullmatch(name8):
                    if card[8:10] != b"= ":
                        raise FitsStructureError("bad_header", f"{where}: {name8} has no value ('= ' in columns 9-10)", index)
                    if name8 in cards:
                        raise FitsStructureError(
                            "bad_header", f"{where}: {name8} appears twice; a structural keyword must appear once", index
                        )
                    cards[name8] = card
        data_start = pos
        kind = "PRIMARY" if index == 0 else _text_value(cards, "XTENSION", where, index).upper()
        extname = _text_value(cards, "EXTNAME", where, index).upper()
        groups = index == 0 and _text_value(cards, "GROUPS", where, index) == "T"
        simple = index == 0 and _text_value(cards, "SIMPLE", where, index) == "T"
        bitpix = _int_value(cards, "BITPIX", where, index)
        if bitpix not in _DATA_DTYPES:
            raise FitsStructureError("bad_header", f"{where} has BITPIX = {bitpix}; expected one of 8, 16, 32, 64, -32, -64", index)
        naxis = _int_value(cards, "NAXIS", where, index)
        if not 0 <= naxis <= MAX_NAXIS:
            raise FitsStructureError("bad_header", f"{where} has NAXIS = {naxis}; expected 0 to {MAX_NAXIS}", index)
        axes = tuple(_int_value(cards, f"NAXIS{n}", where, index) for n in range(1, naxis + 1))
        for n, length in enumerate(axes, 1):
            if length < 0:
                raise FitsStructureError("bad_header", f"{where} has NAXIS{n} = {length}; expected an integer >= 0", index)
        pcount = _int_value(cards, "PCOUNT", where, index, default=0)
        gcount = _int_value(cards, "GCOUNT", where, index, default=1)
        if pcount < 0 or gcount < 1:
            raise FitsStructureError(
                "bad_header", f"{where} has PCOUNT = {pcount}, GCOUNT = {gcount}; expected PCOUNT >= 0 and GCOUNT >= 1", index
            )
        groups = groups and naxis >= 1 and axes[0] == 0
        counted = axes[1:] if groups else axes
        left = size - data_start
        data_bytes = abs(bitpix) // 8 * gcount * (pcount + (math.prod(counted) if counted else 0))  # exact: Python ints
        if data_bytes > left:
            declared = str(data_bytes) if data_bytes < 10**18 else f"over 10^{len(str(data_bytes)) - 1}"
            cut = FitsStructureError(
                "truncated",
                f"{where}: BITPIX = {bitpix}, NAXISn = {_shown(axes)}, PCOUNT = {pcount}, GCOUNT = {gcount} declare {declared} data "
                f"bytes but the file has {left} left; the file looks truncated",
                index,
            )
            if index == 0:
                raise cut
            return spans, headers, cut
        end = data_start + -(-data_bytes // BLOCK) * BLOCK
        if end > size:  # the last block's padding is missing: tolerated, as astropy tolerates it
            end = size
        assert end > start  # the position strictly advances: at least one header block per HDU
        spans.append(HDUSpan(index, kind, start, data_start, data_bytes, end, bitpix, axes, extname, groups, simple))
        if index == 0 or extname == SCI:
            headers[index] = bytes(buffer[start:data_start])
        pos = end
    return spans, headers, None


GZIP_MAGIC = b"\x1f\x8b"
MAX_DECOMPRESSED_BYTES = 192 << 20
"""A gzip-compressed FITS file is decompressed in memory up to 192 MiB (a calibrated Hubble file is 168 MB);
beyond that it is refused (``over_limit``): a small compressed file must not expand without bound."""


def _gunzip(buffer: mmap.mmap | memoryview, name: str) -> bytes:
    """The decompressed bytes of a gzip file (every member), at most `MAX_DECOMPRESSED_BYTES`.

    The first block is checked for a SIMPLE card before anything more is inflated, so a bomb of zeros (or any
    compressed non-FITS) is refused after inflating 2880 bytes.
    """
    out, data, total = [], bytes(buffer), 0
    while data:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        pending = data
        while not inflater.eof:
            step = BLOCK if total == 0 else 16 << 20
            try:
                chunk = inflater.decompress(pending, step)
            except zlib.error as exc:
                raise FitsStructureError("not_fits", f"{name} is gzip-compressed but does not decompress ({exc})") from exc
            pending = inflater.unconsumed_tail
            if not chunk and not pending:
                break  # the input ran out before the end of the stream
            if total == 0 and chunk[:10] != b"SIMPLE  = ":
                raise FitsStructureError("not_fits", f"{name} is gzip-compressed but holds no FITS file (no SIMPLE card)")
            total += len(chunk)
            out.append(chunk)
            if total > MAX_DECOMPRESSED_BYTES:
                raise FitsStructureError("over_limit", f"{name} decompresses to more than {MAX_DECOMPRESSED_BYTES} bytes (the limit)")
        if not inflater.eof:
            raise FitsStructureError("truncated", f"{name}: the gzip stream ends early; the file looks truncated")
        data = inflater.unused_data if inflater.unused_data.startswith(GZIP_MAGIC) else b""
    return b"".join(out)


def map_fits(source: str | bytes, name: str | None = None) -> tuple[fits.Header, list[tuple[int, MappedImage]]] | None:
    """The primary header and the complete SCI image extensions of a local FITS file (or its bytes), or None.

    See `_map_fits`; a file cut inside an extension gives the SCI extensions before the cut (`read_fits` reports the
    missing ones as ``truncated``), or raises the ``truncated`` `FitsStructureError` when none is complete.
    """
    mapped = _map_fits(source, name)
    return None if mapped is None else mapped[:2]


def _map_fits(
    source: str | bytes, name: str | None = None
) -> tuple[fits.Header, list[tuple[int, MappedImage]], FitsStructureError | None] | None:
    """The primary header and every SCI image extension of a local FITS file (or its bytes), or None.

    The fast path of `read_fits`, and its guard: `_walk_hdus` checks the whole structure first, reading only the
    structural keywords of the extensions it skips (ERR, DQ), and the SCI data are mapped without copying. astropy
    would build a full Header and HDU object for every extension, which costs more than cropping the chip.
    Raises `FitsStructureError` for a file whose structure is invalid (see `_walk_hdus`): it must not be handed to
    astropy. Returns None for a valid file the fast path does not handle (random groups, SIMPLE = F, a SCI that is
    not an IMAGE extension, a header that is not plain ASCII) and for a path it cannot open: astropy reads those,
    and its work is bounded by the structure already checked.
    """
    label = name or (os.path.basename(source) if isinstance(source, str) else "<bytes>")
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            buffer = memoryview(source).cast("B")
        else:
            path = source[len("file://") :] if source.startswith("file://") else source
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size == 0:
                    raise FitsStructureError("not_fits", f"{label} is empty; expected a FITS file")
                buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        return None
    if bytes(buffer[:2]) == GZIP_MAGIC:  # a .fits.gz: walked (and mapped) once decompressed, under a cap
        buffer = memoryview(_gunzip(buffer, label))
    spans, headers, cut = _walk_hdus(buffer, label)
    primary, scis = None, []
    for span in spans:
        if span.index not in headers:
            continue
        if span.groups or (span.index and span.kind != "IMAGE"):
            return None
        try:
            header = fits.Header.fromstring(headers[span.index].decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            return None
        if span.index == 0:
            if not span.simple:
                return None
            primary = header
            continue
        shape = tuple(reversed(span.axes))
        stored = np.ndarray(shape, _DATA_DTYPES[span.bitpix], buffer, span.data_start) if span.axes else np.zeros(0)
        scis.append((span.index, MappedImage(header, stored)))
    if cut is not None and not scis:
        raise cut
    return primary, scis, cut


def read_fits(
    source: str | bytes,
    *,
    uri: str | None = None,
    hdus: list[int] | None = None,
    storage_options: dict | None = None,
    fetch: Any = None,
) -> list[Chip | ChipError]:
    """Read the chips of one FITS file.

    source: path, URI, or the file's bytes; `uri` names it in records (defaults to `source` when it is a string).
    hdus: absolute HDU indices to read (the LCID lists' ``HDU Index``: 1 or 4); None reads every SCI extension
    (and reports a chip the instrument has but the file lacks, e.g. one cut off by truncation).
    A remote URI is fetched by `ray_hrc.remote.read_remote` (`storage_options`; `fetch`: its `FetchConfig`) and its
    bytes read here. Never raises for bad input: each failure is a `ChipError` (one per requested HDU, or one for
    the file).
    """
    if isinstance(source, str) and is_remote(source):
        from ray_hrc.remote import read_remote

        return read_remote(source, hdus=hdus, storage_options=storage_options, config=fetch)
    uri = uri if uri is not None else (source if isinstance(source, str) else "<bytes>")
    name = os.path.basename(uri.rstrip("/")) or uri
    wanted = hdus if hdus else [-1]
    try:
        return _read_fits(source, uri, name, hdus, wanted, storage_options)
    except Exception as exc:  # noqa: BLE001 - a bug must not take a whole run (or a Serve replica) down with it
        logger.exception("reading %s failed", uri)
        return [ChipError(uri, h, "internal", f"{name}: {type(exc).__name__}: {exc}") for h in wanted]


def _read_fits(
    source: str | bytes, uri: str, name: str, hdus: list[int] | None, wanted: list[int], storage_options: dict | None
) -> list[Chip | ChipError]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyWarning)
        try:
            mapped = _map_fits(source, name)
        except FitsStructureError as exc:  # certainly not valid FITS: refused before astropy sees it
            return [ChipError(uri, h, exc.error_class, str(exc)) for h in wanted]
        if mapped is not None:
            primary, scis, cut = mapped
            return _read_selected(primary, scis, cut is not None, hdus, uri, name)
    try:
        hdul = _open_checked(source, uri, storage_options)
    except ChipReadError as exc:
        return [ChipError(uri, h, exc.error_class, str(exc)) for h in wanted]
    with hdul, warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyWarning)
        try:
            primary = hdul[0].header
            scis, cut_short = _sci_hdus(hdul, name)
        except ChipReadError as exc:
            return [ChipError(uri, h, exc.error_class, str(exc)) for h in wanted]
        except (OSError, ValueError, TypeError, IndexError) as exc:
            return [ChipError(uri, h, "truncated", f"{name}: headers could not be read ({exc}); the file looks truncated") for h in wanted]
        except Exception as exc:  # noqa: BLE001 - astropy's own failures on odd headers (e.g. AttributeError from a bare _BaseHDU)
            message = f"{name}: astropy could not read its headers ({type(exc).__name__}: {exc})"
            return [ChipError(uri, h, "bad_header", message) for h in wanted]
        return _read_selected(primary, scis, cut_short, hdus, uri, name)


def _read_selected(
    primary: fits.Header, scis: list[tuple[int, Any]], cut_short: bool, hdus: list[int] | None, uri: str, name: str
) -> list[Chip | ChipError]:
    """The requested SCI extensions (`hdus`, or every one the file has and the instrument should have) -> records."""
    missing_class = "truncated" if cut_short else "missing_sci"
    why = "the file ends early (truncated)" if cut_short else "no such extension"
    by_index = dict(scis)
    if hdus:
        have = ", ".join(f"{i} (SCI,{_get(hdu.header, 'EXTVER', 1)})" for i, hdu in scis) or "none"
        selected = [
            (
                h,
                by_index[h]
                if h in by_index
                else ChipReadError(missing_class, f"HDU {h} of {name} is not a SCI extension ({why}); SCI HDUs are: {have}"),
            )
            for h in hdus
        ]
    else:
        if not scis and not cut_short:
            return [ChipError(uri, -1, "missing_sci", f"{name} has no SCI extension; expected SCI,1 and SCI,2 (HDU 1 and 4)")]
        selected = list(scis)
        found = {_extver(hdu.header, default=-1) for _, hdu in scis}
        for extver in _expected_extvers(primary):
            index = (extver - 1) * RAW_HDU_PER_EXTVER + 1
            if extver not in found and index not in by_index:
                selected.append(
                    (index, ChipReadError(missing_class, f"SCI,{extver} of {name} is missing ({why}); expected SCI,1 and SCI,2"))
                )
    records = [_read_one(hdu, index, primary, uri, name) for index, hdu in selected]
    if not records:  # e.g. a file cut short before any SCI, of an instrument with no layout
        what = "the file ends early (truncated)" if cut_short else "no SCI extension"
        records = [ChipError(uri, -1, missing_class, f"{name} has no SCI extension to read ({what})")]
    return records


def _open_checked(source: str | bytes, uri: str, storage_options: dict | None) -> fits.HDUList:
    name = os.path.basename(uri.rstrip("/")) or uri
    if isinstance(source, (bytes, bytearray, memoryview)) and len(source) == 0:
        raise ChipReadError("not_fits", f"{name} is empty; expected a FITS file")
    try:
        hdul = open_fits(source, storage_options)
        hdul[0]  # noqa: B018 - forces the primary header to be parsed
    except FileNotFoundError as exc:
        raise ChipReadError("unreadable", f"{uri} could not be opened: {exc}") from exc
    except PermissionError as exc:
        raise ChipReadError("unreadable", f"{uri} could not be opened: {exc}") from exc
    except OSError as exc:
        text = str(exc)
        if "Empty or corrupt FITS" in text or "No SIMPLE card" in text or "SIMPLE" in text:
            raise ChipReadError("not_fits", f"{name} is not a FITS file ({text}); expected a Hubble raw or calibrated FITS file") from exc
        raise ChipReadError("unreadable", f"{uri} could not be read: {exc}") from exc
    except (ValueError, TypeError, IndexError, UnicodeDecodeError) as exc:
        raise ChipReadError("not_fits", f"{name} is not a FITS file ({exc}); expected a Hubble raw or calibrated FITS file") from exc
    except Exception as exc:  # noqa: BLE001 - fsspec backends raise their own types (botocore, aiohttp)
        raise ChipReadError("unreadable", f"{uri} could not be read: {type(exc).__name__}: {exc}") from exc
    return hdul


def _extver(header: fits.Header, default: int | None = None) -> int:
    """EXTVER as an int (1 when absent); a value that is not an integer is `bad_header` (or `default`)."""
    value = _get(header, "EXTVER", "unparsable")
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    if default is not None:
        return default
    raise ChipReadError("bad_header", f"EXTVER = {str(value)[:40]!r}; expected an integer")


def _number(header: fits.Header, key: str, default: float, where: str) -> None:
    """Checks that a scaling keyword, if present, is a finite number (BZERO, BSCALE)."""
    value = header.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not math.isfinite(value):
        raise ChipReadError("bad_header", f"{where} has {key} = {str(value)[:40]!r}; expected a finite number")


def _read_one(hdu: Any, index: int, primary: fits.Header, uri: str, name: str) -> Chip | ChipError:
    if isinstance(hdu, ChipReadError):
        return ChipError(uri, index, hdu.error_class, str(hdu))
    header = hdu.header
    where = f"SCI (HDU {index}) of {name}"
    try:
        try:
            extver = _extver(header)
        except ChipReadError as exc:
            raise ChipReadError(exc.error_class, f"{where}: {exc}") from exc
        where = f"SCI,{extver} (HDU {index}) of {name}"
        if header.get("NAXIS", 0) != 2:
            raise ChipReadError("bad_shape", f"{where} has NAXIS={header.get('NAXIS', 0)}; expected a 2-D image")
        shape = (int(header["NAXIS2"]), int(header["NAXIS1"]))
        instrument, detector = _str(primary, "INSTRUME"), _str(primary, "DETECTOR")
        try:
            layout = find_layout(instrument, detector, shape, where=where)
        except UnsupportedLayoutError as exc:
            known = any((lay.instrument, lay.detector) == (instrument.upper(), detector.upper()) for lay in LAYOUTS)
            raise ChipReadError("bad_shape" if known else "unsupported_instrument", str(exc)) from exc
        if extver not in layout.chips:
            raise ChipReadError("missing_sci", f"{where}: EXTVER {extver} is not a chip of {layout.name}; expected {sorted(layout.chips)}")
        _number(header, "BZERO", 0, where)
        _number(header, "BSCALE", 1, where)
        pixels, bias = crop_sci(hdu, layout, extver, where=where)
        ra, dec, from_targ = chip_centre_radec(header, layout, extver, primary)
        ccdchip = _get(header, "CCDCHIP", _get(primary, "CCDCHIP", -1))
        meta = ChipMeta(
            uri=uri,
            obsid=(_str(primary, "ROOTNAME") or name.split("_")[0]).lower(),
            hdu=index,
            extver=extver,
            ccdchip=int(ccdchip) if isinstance(ccdchip, (int, np.integer)) and ccdchip else -1,
            instrument=layout.name,
            detector=layout.detector,
            product=layout.product,
            filter=filter_name(primary),
            exptime=_float(primary, "EXPTIME"),
            targname=_str(primary, "TARGNAME"),
            date_obs=date_obs(primary),
            ra=ra,
            dec=dec,
            radec_from_targ=from_targ,
        )
        return Chip(pixels=pixels, amp_bias=bias, meta=meta)
    except ChipReadError as exc:
        return ChipError(uri, index, exc.error_class, str(exc))
    except fits.VerifyError as exc:
        return ChipError(uri, index, "bad_header", f"{where}: {exc}")
    except (OSError, ValueError, TypeError, IndexError, KeyError) as exc:
        return ChipError(
            uri,
            index,
            "truncated" if "truncat" in str(exc).lower() or isinstance(exc, OSError) else "internal",
            f"{where}: {type(exc).__name__}: {exc}",
        )
    except Exception as exc:  # noqa: BLE001 - astropy's own failures on an odd HDU it parsed (the fast path has none)
        if isinstance(hdu, MappedImage):
            raise
        return ChipError(uri, index, "bad_header", f"{where}: astropy could not read it ({type(exc).__name__}: {exc})")
