"""Fuzzing `read_fits(bytes)` with hypothesis: any input returns chips and error records, quickly, and never raises.

Seeds are real Hubble files from astropy's own test data (the headers of an ACS/WFC flt, a STIS raw), other odd
but valid FITS from there (random groups, tile-compressed images, tables), small synthetic raw and flt files, and
the hostile files of `hostile.py`. Each example applies a few mutations aimed at what a reader trusts: structural
cards (BITPIX, NAXIS, NAXISn, PCOUNT, GCOUNT, XTENSION, EXTNAME, END) given hostile values, blocks duplicated or
dropped, truncation, byte flips and HDUs repeated. Property: for any input up to 1 MB, `read_fits` answers within a
second with only `Chip` and `ChipError` records, none of them ``internal`` (a bug caught by the last-resort guard).

``FUZZ_SECONDS`` sets how long it fuzzes (60 s in ``make test``; ``make fuzz`` runs 30 minutes), in rounds of
`ROUND` hypothesis examples. Each run prints its executions and executions per second; with ``FUZZ_DUMP=<dir>``
an input that gives an ``internal`` record is also written there. An input that ever
failed is kept in `REGRESSIONS` and replayed first.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from hostile import card, header, hostile_files
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rawfits import write_file

from ray_hrc.chips import BLOCK, Chip, ChipError, read_fits

ASTROPY = Path(np.__file__).parents[1] / "astropy"
REAL_FILES = [  # real Hubble headers (data cut to 1 x 1) and odd but valid FITS that the fast path leaves to astropy
    ASTROPY / "wcs/tests/data/j94f05bgq_flt.fits",
    ASTROPY / "io/fits/tests/data/o4sp040b0_raw.fits",
    ASTROPY / "io/fits/tests/data/random_groups.fits",
    ASTROPY / "io/fits/tests/data/comp.fits",
    ASTROPY / "io/fits/tests/data/btable.fits",
    ASTROPY / "io/fits/tests/data/scale.fits",
]
MAX_INPUT = 1 << 20
STRUCTURAL_KEYS = [b"SIMPLE", b"XTENSION", b"BITPIX", b"NAXIS", b"NAXIS1", b"NAXIS2", b"NAXIS3", b"PCOUNT", b"GCOUNT"]
STRUCTURAL_KEYS += [b"EXTNAME", b"EXTVER", b"GROUPS", b"BZERO", b"BSCALE", b"INSTRUME", b"DETECTOR", b"ZNAXIS1", b"ZBITPIX", b"A_ORDER"]
HOSTILE_VALUES = [
    -1, 0, 1, 2, 3, 8, 16, -32, -64, 7, 999, 1000, 2880, -2880, -5760, 1440, 2048, 2051, 2068, 2070, 4096, 4144, 4206,
    2**31, 2**31 - 1, 2**32, 2**63, 2**63 - 1, 2**64, -(2**63), 10**18, 10**30, "'SCI     '", "'IMAGE   '", "'BINTABLE'",
    "T", "F", "'ACS     '", "'WFC     '", "'WFC3    '", "'UVIS    '", "1.5", "'abc'", "1E400", "", "'unterminated",
]  # fmt: skip
REGRESSIONS: list[tuple[str, bytes]] = [  # (what it found, the input, made small) for every failure the fuzzer has found
    # SIMPLE = F and data not padded to a whole block: astropy warns "truncated", finds no HDU, read_fits returned []
    ("simple_false_unpadded_returned_nothing", header([("SIMPLE", "F"), ("BITPIX", 8), ("NAXIS", 1), ("NAXIS1", 100)]) + b"\0" * 100),
    # a flipped bit in SIMPLE's value field (' ' -> '!'): astropy's Header.get raised VerifyError out of map_fits
    ("unparsable_simple_raised", header([("SIMPLE", "T"), ("BITPIX", 8), ("NAXIS", 0)]).replace(b"=  ", b"= !", 1)),
]


def _synthetic_seeds(tmp: Path) -> list[bytes]:
    seeds = []
    for name, product, shape in [("ACS/WFC", "raw", (20, 30)), ("WFC3/UVIS", "calibrated", (12, 8)), ("WFC3/UVIS", "raw", (4, 6))]:
        data_fn = None if product == "raw" else (lambda layout, extver, shape=shape: np.ones(shape, np.float32))
        seeds.append(write_file(tmp / f"s_{len(seeds)}.fits", name, product, shape=shape, data_fn=data_fn).read_bytes())
    return seeds


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> list[bytes]:
    real = [p.read_bytes() for p in REAL_FILES]
    assert all(len(b) <= MAX_INPUT for b in real), "a seed over the 1 MB the property is about"
    hostile = [b for b, _ in hostile_files().values() if len(b) <= MAX_INPUT]
    return real + _synthetic_seeds(tmp_path_factory.mktemp("seeds")) + hostile


def _cards_of(data: bytes, keys: list[bytes]) -> list[int]:
    """Offsets of the cards (80-byte aligned) whose keyword is one of `keys`, in the first 2 MB."""
    return [i for i in range(0, min(len(data), MAX_INPUT), 80) if data[i : i + 8].rstrip() in keys]


def mutate(data: bytes, draw) -> bytes:
    """One mutation of `data`, chosen by hypothesis' `draw` (so failures shrink to a short list of choices)."""
    kind = draw(st.sampled_from(["card", "card", "card", "truncate", "flip", "drop_block", "dup_block", "repeat_hdu", "no_end"]))
    if kind == "card":
        offsets = _cards_of(data, STRUCTURAL_KEYS)
        if offsets:
            at = draw(st.sampled_from(offsets))
            value = draw(st.one_of(st.sampled_from(HOSTILE_VALUES), st.integers(-(2**70), 2**70)))
            key = data[at : at + 8].rstrip().decode()
            return data[:at] + card(key, value if not isinstance(value, str) or value else "")[:80] + data[at + 80 :]
        return data
    if kind == "truncate":
        cut = draw(st.one_of(st.integers(0, len(data)), st.integers(0, len(data) // BLOCK).map(lambda b: b * BLOCK)))
        return data[:cut]
    if kind == "flip" and data:
        at, bit = draw(st.integers(0, len(data) - 1)), draw(st.integers(0, 7))
        return data[:at] + bytes([data[at] ^ (1 << bit)]) + data[at + 1 :]
    blocks = len(data) // BLOCK
    if kind in ("drop_block", "dup_block") and blocks:
        b = draw(st.integers(0, blocks - 1))
        block = data[b * BLOCK : (b + 1) * BLOCK]
        return data[: b * BLOCK] + (block + block if kind == "dup_block" else b"") + data[(b + 1) * BLOCK :]
    if kind == "repeat_hdu" and blocks > 1:
        first = draw(st.integers(1, blocks - 1))
        span = data[first * BLOCK : (first + draw(st.integers(1, 3))) * BLOCK]
        return (data + span * draw(st.integers(1, 400)))[:MAX_INPUT]
    if kind == "no_end":
        return data.replace(b"END" + b" " * 77, b" " * 80, draw(st.integers(1, 3)))
    return data


def check(data: bytes) -> list[Chip | ChipError]:
    """The property, for one input."""
    start = time.perf_counter()
    records = read_fits(data, uri="fuzz.fits")
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"read_fits took {elapsed:.2f} s on a {len(data)}-byte input"
    assert records and all(isinstance(r, (Chip, ChipError)) for r in records), records
    internal = [r.message for r in records if isinstance(r, ChipError) and r.error_class == "internal"]
    if internal and os.environ.get("FUZZ_DUMP"):  # keep the input for a regression test
        Path(os.environ["FUZZ_DUMP"], f"internal-{len(data)}.fits").write_bytes(data)
    assert not internal, internal
    return records


@pytest.mark.parametrize("found", range(len(REGRESSIONS)), ids=[what for what, _ in REGRESSIONS])
def test_regressions_found_by_the_fuzzer(found):
    check(REGRESSIONS[found][1])


SECONDS = float(os.environ.get("FUZZ_SECONDS", "60"))
ROUND = 500  # examples per hypothesis run; runs repeat (each with fresh random choices) until SECONDS are spent
_stats = {"runs": 0, "seconds": 0.0, "classes": {}}


@pytest.mark.timeout(int(SECONDS) + 600)
def test_read_fits_is_total_on_mutated_fits(seeds, capsys):
    @settings(max_examples=ROUND, deadline=None, database=None, suppress_health_check=list(HealthCheck), print_blob=True)
    @given(st.data())
    def property_holds(data):
        raw = data.draw(st.sampled_from(seeds))
        for _ in range(data.draw(st.integers(1, 4))):
            raw = mutate(raw, data.draw)
        raw = raw[:MAX_INPUT]
        start = time.perf_counter()
        records = check(raw)
        _stats["seconds"] += time.perf_counter() - start
        _stats["runs"] += 1
        for r in records:
            key = "chip" if isinstance(r, Chip) else r.error_class
            _stats["classes"][key] = _stats["classes"].get(key, 0) + 1

    start, rounds = time.perf_counter(), 0
    while rounds == 0 or time.perf_counter() - start < SECONDS:
        property_holds()
        rounds += 1
    wall = time.perf_counter() - start
    with capsys.disabled():
        print(
            f"\nfuzz: {_stats['runs']} executions in {wall:.1f} s, {rounds} rounds ({_stats['runs'] / wall:.0f}/s overall, "
            f"{_stats['runs'] / max(_stats['seconds'], 1e-9):.0f}/s in read_fits); records by class: {_stats['classes']}"
        )
    assert _stats["runs"] >= ROUND * rounds // 2
