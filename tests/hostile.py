"""Hostile and odd FITS files, as small bytes: one per way a structural keyword or a cap can be abused.

Each entry of `HOSTILE` is (bytes, the error class `read_fits` must give). They are built card by card (not with
astropy, which refuses to write most of them), all under 3 MB. Used by the chips, crop/classify, Serve and fuzz tests.
"""

from __future__ import annotations

from ray_hrc.chips import BLOCK, MAX_HDUS, MAX_HEADER_BLOCKS


def card(key: str, value: object = None) -> bytes:
    """One 80-byte card: ``KEY     = value`` (fixed format: numbers and T/F right-aligned to column 30)."""
    if value is None:
        return key.ljust(80).encode()
    text = f"'{value:<8}'" if isinstance(value, str) and not value.startswith(("T", "F")) or value == "" else str(value)
    return f"{key:<8}= {text:>20}".ljust(80).encode() if not text.startswith("'") else f"{key:<8}= {text}".ljust(80).encode()


def header(cards: list[tuple[str, object]], end: bool = True) -> bytes:
    """A header of `cards` (and END), padded with blanks to whole 2880-byte blocks."""
    raw = b"".join(card(k, v) for k, v in cards) + (card("END") if end else b"")
    return raw + b" " * (-len(raw) % BLOCK)


def primary(instrument: str = "WFC3", detector: str = "UVIS") -> bytes:
    return header(
        [
            ("SIMPLE", "T"),
            ("BITPIX", 16),
            ("NAXIS", 0),
            ("EXTEND", "T"),
            ("ROOTNAME", "ihostile"),
            ("INSTRUME", instrument),
            ("DETECTOR", detector),
        ]
    )


def image(
    naxis1: object = 10, naxis2: object = 10, *, bitpix: object = 16, extname: str = "SCI", extver: object = 1, extra=(), naxis: object = 2
) -> bytes:
    """An IMAGE extension's header (cards in the standard's order) followed by zero data of the size it declares, if sane."""
    cards = [("XTENSION", "IMAGE"), ("BITPIX", bitpix), ("NAXIS", naxis), ("NAXIS1", naxis1), ("NAXIS2", naxis2)]
    cards += [("PCOUNT", 0), ("GCOUNT", 1), ("EXTNAME", extname), ("EXTVER", extver), *extra]
    head = header(cards)
    try:
        nbytes = abs(int(bitpix)) // 8 * int(naxis1) * int(naxis2)
    except (TypeError, ValueError):
        nbytes = 0
    return head + b"\0" * (-(-nbytes // BLOCK) * BLOCK if 0 < nbytes < 10**7 else 0)


def _replace(data: bytes, key: str, value: object) -> bytes:
    """`data` with the first card of `key` given a new value."""
    at = data.index(f"{key:<8}=".encode())
    return data[:at] + card(key, value) + data[at + 80 :]


def hostile_files() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, expected error class)."""
    p = primary()
    files = {
        # the file: 5,760 bytes; NAXIS1 = -1 x NAXIS2 = 1440 x 2 bytes = -2880 stepped back onto the same header
        "negative_naxis1": (p + image(-1, 1440), "bad_header"),
        "huge_naxis": (p + image(10**18, 10**18), "truncated"),
        "naxis_past_int64": (p + image(2**70, 3), "truncated"),
        "bogus_bitpix": (p + image(bitpix=7), "bad_header"),
        "naxis_1000": (p + image(naxis=1000), "bad_header"),
        "negative_naxis": (p + image(naxis=-1), "bad_header"),
        "naxis1_not_an_integer": (p + image("abc"), "bad_header"),
        "naxis1_a_float": (p + image(4144.5), "bad_header"),
        "missing_naxis2": (
            p + header([("XTENSION", "IMAGE"), ("BITPIX", 16), ("NAXIS", 2), ("NAXIS1", 10), ("EXTNAME", "SCI")]),
            "bad_header",
        ),
        "negative_pcount": (p + _replace(image(), "PCOUNT", -2880), "bad_header"),
        "zero_gcount": (p + _replace(image(), "GCOUNT", 0), "bad_header"),
        "duplicate_naxis1": (p + header([("XTENSION", "IMAGE"), ("BITPIX", 8), ("NAXIS", 1), ("NAXIS1", 0), ("NAXIS1", 5)]), "bad_header"),
        "many_hdus": (
            p + header([("XTENSION", "IMAGE"), ("BITPIX", 8), ("NAXIS", 0), ("PCOUNT", 0), ("GCOUNT", 1)]) * MAX_HDUS,
            "over_limit",
        ),
        "header_without_end": (p + header([("XTENSION", "IMAGE")] + [("HISTORY", None)] * (36 * MAX_HEADER_BLOCKS)), "over_limit"),
        "ends_inside_a_header": (p + header([("XTENSION", "IMAGE"), ("BITPIX", 8)], end=False), "truncated"),
        "data_past_the_end": (p + image(4206, 2070)[:BLOCK], "truncated"),
        "not_fits": (b"<html>" + b" " * 6000, "not_fits"),
        "short": (b"SIMPLE  =                    T", "not_fits"),
        "empty": (b"", "not_fits"),
        # valid structure, wrong content: classified by what is wrong
        "small_sci_uvis": (p + image(10, 10), "bad_shape"),
        "sci_3d": (p + image(4, 4, extra=[("NAXIS3", 2)], naxis=3), "bad_shape"),
        "other_instrument": (primary("WFC3", "IR") + image(1014, 1014), "unsupported_instrument"),
        "extver_text": (p + image(extver="two"), "bad_header"),
        "no_sci": (p + image(extname="ERR"), "missing_sci"),
    }
    return files
