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
    "truncated",  # the file ends before the data its headers promise
    "unsupported_instrument",  # INSTRUME/DETECTOR or SCI shape matches no layout
    "missing_sci",  # no SCI extension (or the requested HDU is not SCI)
    "bad_shape",  # SCI data of the wrong dimensionality
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


def _str(header: fits.Header, key: str) -> str:
    value = header.get(key, "")
    return str(value).strip() if value is not None else ""


def _float(header: fits.Header, key: str) -> float:
    try:
        return float(header.get(key, float("nan")))
    except (TypeError, ValueError):
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
        logger.debug("WCS of %s unusable: %s", primary.get("ROOTNAME", "?"), exc)
    return _float(primary, "RA_TARG"), _float(primary, "DEC_TARG"), True


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


def _sci_hdus(hdul: fits.HDUList) -> tuple[list[tuple[int, fits.ImageHDU]], bool]:
    """Every SCI extension with its absolute HDU index, and whether the HDU list ended early (a truncated file)."""
    found = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for index, hdu in enumerate(hdul):
            if index and _str(hdu.header, "EXTNAME").upper() == SCI:
                found.append((index, hdu))
    cut_short = any("truncated" in str(w.message) or "corrupted" in str(w.message) or "Header size" in str(w.message) for w in caught)
    return found, cut_short


def _expected_extvers(primary: fits.Header) -> list[int]:
    instrument, detector = _str(primary, "INSTRUME").upper(), _str(primary, "DETECTOR").upper()
    extvers = {v for lay in LAYOUTS if (lay.instrument, lay.detector) == (instrument, detector) for v in lay.chips}
    return sorted(extvers)


BLOCK = 2880
"""FITS headers and data areas come in 2880-byte blocks of 36 80-character cards."""
_DATA_DTYPES = {8: "u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}
_STRUCTURAL = {"SIMPLE", "XTENSION", "BITPIX", "PCOUNT", "GCOUNT", "GROUPS", "EXTNAME"}  # and NAXIS, NAXISn


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


def map_fits(source: str | bytes) -> tuple[fits.Header, list[tuple[int, MappedImage]]] | None:
    """The primary header and every SCI image extension of a well-formed local FITS file (or its bytes), or None.

    A fast path for `read_fits`: it walks the headers block by block, reading only the structural keywords of the
    extensions it skips (ERR, DQ), and maps the SCI data without copying. astropy would build a full Header and
    HDU object for every extension, which costs more than cropping the chip. Anything it does not expect (not
    SIMPLE, a missing END, a size that is not exactly the sum of the HDUs, a non-IMAGE extension, random groups,
    an unreadable path) gives None, and the caller opens the file with astropy, which says what is wrong.
    """
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            buffer = memoryview(source).cast("B")
        else:
            path = source[len("file://") :] if source.startswith("file://") else source
            with open(path, "rb") as f:
                buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return _walk_hdus(buffer)
    except (OSError, ValueError, UnicodeDecodeError, KeyError):
        return None


def _walk_hdus(buffer: mmap.mmap | memoryview) -> tuple[fits.Header, list[tuple[int, MappedImage]]] | None:
    size, pos, index = len(buffer), 0, 0
    primary, scis = None, []
    while pos < size:
        start, cards = pos, {}
        first = b"SIMPLE  = " if index == 0 else b"XTENSION= "
        if bytes(buffer[pos : pos + len(first)]) != first:
            return None
        while "END" not in cards:  # the header's blocks, up to its END card
            if pos + BLOCK > size:
                return None
            block = bytes(buffer[pos : pos + BLOCK])
            pos += BLOCK
            for i in range(0, BLOCK, 80):
                key = block[i : i + 8].rstrip().decode("ascii")
                if key == "END":
                    cards[key] = ""
                    break
                if key in _STRUCTURAL or key.startswith("NAXIS"):
                    if block[i + 8 : i + 10] != b"= ":
                        return None  # a structural keyword without a value: let astropy judge it
                    cards[key] = _card_value(block[i : i + 80])
        kind = cards.get("SIMPLE") if index == 0 else cards.get("XTENSION")
        bitpix, naxis = int(cards["BITPIX"]), int(cards["NAXIS"])
        if kind != ("T" if index == 0 else "IMAGE") or "GROUPS" in cards or bitpix not in _DATA_DTYPES:
            return None
        axes = [int(cards[f"NAXIS{i}"]) for i in range(1, naxis + 1)]
        nbytes = abs(bitpix) // 8 * int(cards.get("GCOUNT", 1)) * (int(cards.get("PCOUNT", 0)) + (math.prod(axes) if naxis else 0))
        data_start, pos = pos, pos + -(-nbytes // BLOCK) * BLOCK
        if pos > size:
            return None
        if index == 0:
            primary = fits.Header.fromstring(bytes(buffer[start:data_start]).decode("ascii"))
        elif cards.get("EXTNAME", "").strip().upper() == SCI:
            header = fits.Header.fromstring(bytes(buffer[start:data_start]).decode("ascii"))
            stored = np.ndarray(tuple(reversed(axes)), _DATA_DTYPES[bitpix], buffer, data_start) if naxis else np.zeros(0)
            scis.append((index, MappedImage(header, stored)))
        index += 1
    return (primary, scis) if primary is not None else None


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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyWarning)
        mapped = map_fits(source)
        if mapped is not None:
            primary, scis = mapped
            return _read_selected(primary, scis, False, hdus, uri, name)
    try:
        hdul = _open_checked(source, uri, storage_options)
    except ChipReadError as exc:
        return [ChipError(uri, h, exc.error_class, str(exc)) for h in wanted]
    with hdul, warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyWarning)
        try:
            primary = hdul[0].header
            scis, cut_short = _sci_hdus(hdul)
        except (OSError, ValueError, TypeError, IndexError) as exc:
            return [ChipError(uri, h, "truncated", f"{name}: headers could not be read ({exc}); the file looks truncated") for h in wanted]
        return _read_selected(primary, scis, cut_short, hdus, uri, name)


def _read_selected(
    primary: fits.Header, scis: list[tuple[int, Any]], cut_short: bool, hdus: list[int] | None, uri: str, name: str
) -> list[Chip | ChipError]:
    """The requested SCI extensions (`hdus`, or every one the file has and the instrument should have) -> records."""
    missing_class = "truncated" if cut_short else "missing_sci"
    why = "the file ends early (truncated)" if cut_short else "no such extension"
    by_index = dict(scis)
    if hdus:
        have = ", ".join(f"{i} (SCI,{hdu.header.get('EXTVER', 1)})" for i, hdu in scis) or "none"
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
        found = {int(hdu.header.get("EXTVER", 1)) for _, hdu in scis}
        for extver in _expected_extvers(primary):
            if extver not in found:
                index = (extver - 1) * RAW_HDU_PER_EXTVER + 1
                selected.append(
                    (index, ChipReadError(missing_class, f"SCI,{extver} of {name} is missing ({why}); expected SCI,1 and SCI,2"))
                )
    return [_read_one(hdu, index, primary, uri, name) for index, hdu in selected]


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


def _read_one(hdu: Any, index: int, primary: fits.Header, uri: str, name: str) -> Chip | ChipError:
    if isinstance(hdu, ChipReadError):
        return ChipError(uri, index, hdu.error_class, str(hdu))
    header = hdu.header
    extver = int(header.get("EXTVER", 1))
    where = f"SCI,{extver} (HDU {index}) of {name}"
    try:
        if header.get("NAXIS", 0) != 2:
            raise ChipReadError("bad_shape", f"{where} has NAXIS={header.get('NAXIS', 0)}; expected a 2-D image")
        shape = (int(header["NAXIS2"]), int(header["NAXIS1"]))
        instrument, detector = _str(primary, "INSTRUME"), _str(primary, "DETECTOR")
        try:
            layout = find_layout(instrument, detector, shape, where=where)
        except UnsupportedLayoutError as exc:
            raise ChipReadError("unsupported_instrument", str(exc)) from exc
        if extver not in layout.chips:
            raise ChipReadError("missing_sci", f"{where}: EXTVER {extver} is not a chip of {layout.name}; expected {sorted(layout.chips)}")
        pixels, bias = crop_sci(hdu, layout, extver, where=where)
        ra, dec, from_targ = chip_centre_radec(header, layout, extver, primary)
        meta = ChipMeta(
            uri=uri,
            obsid=(_str(primary, "ROOTNAME") or name.split("_")[0]).lower(),
            hdu=index,
            extver=extver,
            ccdchip=int(header.get("CCDCHIP", primary.get("CCDCHIP", -1)) or -1),
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
    except (OSError, ValueError, TypeError, IndexError, KeyError) as exc:
        return ChipError(
            uri,
            index,
            "truncated" if "truncat" in str(exc).lower() or isinstance(exc, OSError) else "internal",
            f"{where}: {type(exc).__name__}: {exc}",
        )
