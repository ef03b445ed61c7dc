"""Catalog and error tables on disk: Parquet, CSV, FITS binary table, VOTable and HATS, with units and UCDs.

Every table is written under a temporary name and renamed, so a half-written file is never mistaken for a catalog
(a HATS folder on an object store, which cannot rename, is copied into place with its collection file last). Columns carry a unit, a UCD (IVOA UCD1+) and a description from `COLUMNS`, so TOPCAT and
Aladin recognise the sky position (``ra``/``dec`` in deg, ``pos.eq.ra;meta.main``), the exposure time (s) and the
probabilities (``stat.probability``):

- Parquet: in each field's metadata (``unit``, ``ucd``, ``description``);
- FITS: ``TUNITn``, plus ``TUCDn`` and ``TCOMMn`` as STILTS writes and reads them; logical columns stay FITS ``L``;
  text is printable ASCII as the standard requires (other characters become backslash escapes, controls spaces);
- VOTable: the ``unit``/``ucd`` attributes and ``DESCRIPTION`` of each ``FIELD`` (TABLEDATA serialisation). Bool
  columns are written as ``short`` 0/1, because astropy writes them as ``bit`` and not every reader takes that
  (STILTS 3.4 fails on astropy's BINARY bool);
- HATS: a HEALPix-partitioned Parquet catalog of chip centres, written by `lsdb` (``from_dataframe`` then
  ``write_catalog``) as a collection with a margin cache of `HATS_MARGIN_ARCSEC`, with its coverage
  (``point_map.fits``, which LSDB reads as a MOC) and ``moc.fits`` (the same MOC as a FITS file for Aladin). LSDB opens it with ``lsdb.open_catalog``. Chips without a sky position cannot be
  placed and go to ``no_position.parquet`` inside the same folder (with a warning).
"""

from __future__ import annotations

import logging
import posixpath
import re

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

FORMATS = {"parquet": "parquet", "csv": "csv", "fits": "fits", "votable": "vot", "hats": "hats"}
"""Catalog format -> file extension (``hats`` is a folder)."""

ERRORS_FORMAT = {"hats": "parquet"}
"""The error table's format where it differs from the catalog's: failed chips have no position to partition by."""

NUMERIC = {"hdu": "int64", "extver": "int64", "ccdchip": "int64", "exptime": "float64", "ra": "float64", "dec": "float64",
           "p_galaxy": "float64", "p_nsc": "float64", "preprocess_ms": "float64", "classify_ms": "float64"}  # fmt: skip
"""Known numeric columns: an empty table (no failed chip) still gets them typed, not as text."""

HATS_CATALOG_NAME = "catalog"
HATS_MARGIN_ARCSEC = 120.0
"""Margin cache width: every point of a chip lies within 120 arcsec of its centre (ACS/WFC chip 202 x 101 arcsec,
WFC3/UVIS 162 x 81 arcsec), so a cross-match at that radius finds every chip that can cover a source."""
NO_POSITION = "no_position.parquet"

COLUMNS: dict[str, tuple[str, str, str]] = {  # name -> (unit, UCD, description)
    "uri": ("", "meta.ref.uri", "URI of the source raw FITS file"),
    "obsid": ("", "meta.id;obs", "dataset name (ROOTNAME) of the source file"),
    "hdu": ("", "meta.id.part", "HDU index of the chip's SCI extension in the source file"),
    "extver": ("", "meta.id.part", "EXTVER of the chip's SCI extension"),
    "ccdchip": ("", "meta.id;instr.det", "CCD chip number"),
    "instrument": ("", "meta.id;instr", "instrument/detector, e.g. ACS/WFC"),
    "detector": ("", "meta.id;instr.det", "detector"),
    "product": ("", "meta.code", "source product: raw or calibrated"),
    "filter": ("", "meta.id;instr.filter", "filter name"),
    "exptime": ("s", "time.duration;obs.exposure", "exposure time"),
    "targname": ("", "meta.id;src", "proposer's target name (TARGNAME)"),
    "date_obs": ("", "time.start;obs.exposure", "UTC start of the exposure, ISO 8601"),
    "ra": ("deg", "pos.eq.ra;meta.main", "right ascension of the chip centre (ICRS)"),
    "dec": ("deg", "pos.eq.dec;meta.main", "declination of the chip centre (ICRS)"),
    "radec_from_targ": ("", "meta.code", "true where the centre is RA_TARG/DEC_TARG (no usable WCS)"),
    "label": ("", "src.class", "predicted class: galaxy or NSC"),
    "p_galaxy": ("", "stat.probability", "model probability of the galaxy class"),
    "p_nsc": ("", "stat.probability", "model probability of the NSC (nebula/star cluster) class"),
    "model": ("", "meta.id;meta.software", "model name"),
    "checkpoint": ("", "meta.version", "weights hash of the checkpoint"),
    "checkpoint_id": ("", "meta.version", "checkpoint identity (weights hash and preprocessing)"),
    "label_true": ("", "src.class", "label from the input manifest"),
    "body": ("", "meta.id;src", "celestial body (manifest ID)"),
    "preprocess_ms": ("ms", "time.duration", "read, crop and normalise time per chip"),
    "classify_ms": ("ms", "time.duration", "model time per chip"),
    "error_class": ("", "meta.code.error", "kind of failure"),
    "error": ("", "meta.note", "what went wrong and what was expected"),
}


def check_format(fmt: str) -> None:
    """Fail before a run, not after it, on an unknown format or one whose writer is not installed."""
    import importlib.util

    if fmt not in FORMATS:
        raise ValueError(f"format is {fmt!r}; expected one of {sorted(FORMATS)}")
    if fmt == "hats" and importlib.util.find_spec("lsdb") is None:
        raise ImportError("format 'hats' needs the lsdb and hats packages: pip install 'ray_hrc[hats]'")


def write_table(df: pd.DataFrame | pa.Table, path: str, fmt: str, storage_options: dict | None = None) -> None:
    """Write a table as `fmt` (a key of `FORMATS`) at `path` (local or remote); atomically (temporary name, then rename)."""
    check_format(fmt)
    if isinstance(df, pa.Table):
        df = df.to_pandas()
    df = df.reset_index(drop=True)
    if df.empty:
        df = df.astype({c: t for c, t in NUMERIC.items() if c in df.columns})
    fs, target = fsspec.core.url_to_fs(path, **(storage_options or {}))
    tmp = f"{target}.tmp"
    if fmt == "hats":
        _write_hats(df, fs, tmp, storage_options, name=path)
        if fs.exists(target):
            fs.rm(target, recursive=True)
        _move_folder(fs, tmp, target)
        return
    with fs.open(tmp, "wb") as fh:
        if fmt == "parquet":
            pq.write_table(_arrow_table(df), fh)
        elif fmt == "csv":
            fh.write(df.to_csv(index=False).encode())
        elif fmt == "fits":
            _fits_hdulist(df, posixpath.basename(target).split(".")[0]).writeto(fh)
        else:
            _votable(df).to_xml(fh)
    fs.mv(tmp, target)


def _move_folder(fs, src: str, dst: str) -> None:
    """Rename a folder; on an object store (no rename) copy its files with ``collection.properties`` last, so that
    LSDB finds the collection only once every file it names is in place, then delete `src`."""
    if "file" in fs.protocol:
        fs.mv(src, dst, recursive=True)
        return
    files = sorted(fs.find(src), key=lambda f: f.endswith("collection.properties"))
    for f in files:
        fs.copy(f, dst + f[len(src) :])
    fs.rm(src, recursive=True)


def read_table(path: str, fmt: str, storage_options: dict | None = None) -> pd.DataFrame:
    """Read a table `write_table` wrote (for HATS: the whole catalog, without LSDB's ``_healpix_29`` index)."""
    if fmt == "parquet":
        with fsspec.open(path, "rb", **(storage_options or {})) as fh:
            return pd.read_parquet(fh)
    if fmt == "csv":
        with fsspec.open(path, **(storage_options or {})) as fh:
            return pd.read_csv(fh, keep_default_na=False)
    if fmt == "hats":
        import lsdb
        from upath import UPath

        catalog = lsdb.open_catalog(UPath(path, **(storage_options or {})))  # hats 0.11 drops storage_options= on the way
        return pd.DataFrame(catalog.compute(progress_bar=False)).reset_index(drop=True)
    from astropy.table import Table

    with fsspec.open(path, "rb", **(storage_options or {})) as fh:
        table = Table.read(fh, format="fits" if fmt == "fits" else "votable")
    table.convert_bytestring_to_unicode()
    return table.to_pandas()


def annotate_schema(schema: pa.Schema) -> pa.Schema:
    """`schema` with each known field's unit, UCD and description in its metadata (for streamed Parquet writers too)."""
    fields = []
    for f in schema:
        unit, ucd, description = COLUMNS.get(f.name, ("", "", ""))
        meta = {k: v for k, v in (("unit", unit), ("ucd", ucd), ("description", description)) if v}
        fields.append(f.with_metadata(meta) if meta else f)
    return pa.schema(fields, metadata=schema.metadata)


def _arrow_table(df: pd.DataFrame) -> pa.Table:
    """`df` as Arrow, each known field annotated with its unit, UCD and description."""
    table = pa.Table.from_pandas(df, preserve_index=False)
    return table.cast(annotate_schema(table.schema))


_XML_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f]")
_NOT_FITS_TEXT = re.compile("[^\x20-\x7e]")


def _fits_text(text: str) -> str:
    """FITS character columns hold printable ASCII only: other characters become backslash escapes, controls spaces."""
    return _NOT_FITS_TEXT.sub(" ", text.encode("ascii", "backslashreplace").decode("ascii"))


def _xml_text(text: str) -> str:
    """XML 1.0 has no place for control characters other than tab, newline and carriage return."""
    return _XML_ILLEGAL.sub(" ", text)


def _astropy_table(df: pd.DataFrame, *, bool_as_int: bool, text=str, unsafe: re.Pattern | None = None):
    """An astropy Table with units, UCDs and descriptions; text columns as fixed-width unicode, the values that
    match `unsafe` passed through `text`."""
    from astropy.table import Table

    table = Table()
    for name in df.columns:
        values = df[name].to_numpy()
        if values.dtype == object or not (np.issubdtype(values.dtype, np.number) or values.dtype == bool):
            strings = df[name].astype(object).where(df[name].notna(), "").astype(str)
            if unsafe is not None:
                bad = strings.str.contains(unsafe)
                strings[bad] = strings[bad].map(text)
            values = strings.to_numpy(dtype=str)
            if values.dtype.itemsize == 0:  # an empty column still needs a width
                values = values.astype("U1")
        elif values.dtype == bool and bool_as_int:
            values = values.astype(np.int16)
        unit, ucd, description = COLUMNS.get(name, ("", "", ""))
        table[name] = values
        if unit:
            table[name].unit = unit
        if description:
            table[name].description = description
        if ucd:
            table[name].meta["ucd"] = ucd
    return table


def _fits_hdulist(df: pd.DataFrame, extname: str):
    """A FITS file: empty primary HDU + one binary table with ``TUNITn``, ``TUCDn`` and ``TCOMMn`` per known column."""
    from astropy.io import fits

    hdu = fits.table_to_hdu(_astropy_table(df, bool_as_int=False, text=_fits_text, unsafe=_NOT_FITS_TEXT))
    hdu.header["EXTNAME"] = (extname.upper()[:68], "table name")
    for i, name in enumerate(df.columns, start=1):
        unit, ucd, description = COLUMNS.get(name, ("", "", ""))
        if ucd:
            hdu.header.set(f"TUCD{i}", ucd, "UCD of the column", after=f"TFORM{i}")
        if description:
            hdu.header.set(f"TCOMM{i}", description[:68], after=f"TFORM{i}")
    primary = fits.PrimaryHDU()
    primary.header["ORIGIN"] = ("ray_hrc", "HR-CelestialNet chip classification")
    return fits.HDUList([primary, hdu])


def _votable(df: pd.DataFrame):
    """A VOTable (TABLEDATA) whose FIELDs carry unit, UCD and description; bools as short 0/1."""
    from astropy.io.votable import from_table

    votable = from_table(_astropy_table(df, bool_as_int=True, text=_xml_text, unsafe=_XML_ILLEGAL))
    for f in votable.get_first_table().fields:
        f.ucd = COLUMNS.get(f.name, ("", None, ""))[1] or None
    return votable


def _write_hats(df: pd.DataFrame, fs, folder: str, storage_options: dict | None, name: str) -> None:
    """A HATS collection at `folder`: the chips with a position, partitioned by HEALPix (lsdb), plus ``moc.fits``."""
    import lsdb
    from upath import UPath

    if fs.exists(folder):
        fs.rm(folder, recursive=True)
    fs.makedirs(folder, exist_ok=True)
    placed = np.isfinite(pd.to_numeric(df["ra"], errors="coerce")) & np.isfinite(pd.to_numeric(df["dec"], errors="coerce"))
    if not placed.all():
        logger.warning("%d chip(s) have no sky position; written to %s/%s, not to the HATS catalog", (~placed).sum(), name, NO_POSITION)
        with fs.open(f"{folder}/{NO_POSITION}", "wb") as fh:
            pq.write_table(_arrow_table(df[~placed]), fh)
    rows = df[placed].reset_index(drop=True)
    if rows.empty:
        logger.warning("no chip has a sky position: %s holds no HATS catalog", name)
        return
    catalog = lsdb.from_dataframe(
        rows,
        ra_column="ra",
        dec_column="dec",
        catalog_name=HATS_CATALOG_NAME,
        margin_threshold=HATS_MARGIN_ARCSEC,
    )
    catalog.write_catalog(UPath(fs.unstrip_protocol(folder), **(storage_options or {})), catalog_name=HATS_CATALOG_NAME, progress_bar=False)
    with fs.open(f"{folder}/moc.fits", "wb") as fh:
        catalog.hc_structure.moc.serialize(format="fits").writeto(fh)
