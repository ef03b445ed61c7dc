"""LCID manifests and sources: which chips to read, where they live, and their labels.

The paper's authors published their chip lists as CSV with a leading unnamed index column and the columns
``ID, Instrument, OBSID, Filter, RA, DEC, HDU Index, Label`` (one row per chip). `read_manifest` reads such files
exactly as published and resolves every row to a URI through a template (MAST's public bucket by default), unless
an optional ``URI`` column names the file. `resolve_sources` turns anything a user may point the pipeline at (a
manifest, file paths or URIs, a folder, prefix or glob, local or ``s3://``) into one row per file to read.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

MANIFEST_COLUMNS = ["ID", "Instrument", "OBSID", "Filter", "RA", "DEC", "HDU Index", "Label"]
LABELS = ("galaxy", "NSC")

TEMPLATES = {
    "mast-s3": "s3://stpubdata/hst/public/{obsid[:4]}/{obsid}/{obsid}_raw.fits",
    "mast-https": "https://mast.stsci.edu/api/v0.1/Download/file?uri=mast:HST/product/{obsid}_raw.fits",
}
DEFAULT_TEMPLATE = TEMPLATES["mast-s3"]
"""MAST's public HST bucket (us-east-1, anonymous reads): raw files are read lazily, with no download step."""

FITS_SUFFIXES = (".fits", ".fits.gz", ".fit", ".fts")


class ManifestError(ValueError):
    """A manifest that does not have the published LCID columns or values."""


_FIELD = re.compile(r"\{(\w+)(?:\[(-?\d*):(-?\d*)\])?\}")


def render_template(template: str, **fields: str) -> str:
    """Fill a URI template. Fields are ``{obsid}``, ``{id}``, ``{instrument}``; slices like ``{obsid[:4]}`` work.

    A template that is a local folder (no ``{`` and no scheme) means ``<folder>/{obsid}_raw.fits``.
    """
    if "{" not in template:
        template = template.rstrip("/") + "/{obsid}_raw.fits"

    def sub(m: re.Match) -> str:
        name, start, stop = m.group(1), m.group(2), m.group(3)
        if name not in fields:
            raise ManifestError(f"URI template {template!r} uses {{{name}}}; known fields are {sorted(fields)}")
        value = str(fields[name])
        if start is None and stop is None:
            return value
        return value[int(start) if start else None : int(stop) if stop else None]

    return _FIELD.sub(sub, template)


def _uri_relative_to(uri: str, base: str) -> str:
    """Relative paths in a manifest's URI column are relative to the manifest's folder."""
    if "://" in uri or os.path.isabs(uri):
        return uri
    if "://" in base:
        return base.rsplit("/", 1)[0] + "/" + uri
    return str((Path(base).parent / uri).resolve())


def read_manifest(path: str, *, template: str = DEFAULT_TEMPLATE, storage_options: dict | None = None) -> pd.DataFrame:
    """Read a manifest in the published LCID format (local or remote) and add a resolved ``URI`` column.

    Returns one row per chip with `MANIFEST_COLUMNS` + ``URI`` (+ any extra columns, kept as they are).
    ``HDU Index`` is int, ``Label`` one of `LABELS` (case-insensitive on input). An existing ``URI`` column
    overrides the template row by row (blank cells fall back to it).
    """
    with fsspec.open(path, "r", **(storage_options or {})) as fh:
        df = pd.read_csv(fh, dtype={"OBSID": str, "ID": str})
    first = df.columns[0]
    if first == "" or first.startswith("Unnamed:"):
        df = df.drop(columns=first)
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(
            f"{path} lacks the column(s) {missing}; expected the published LCID columns {MANIFEST_COLUMNS} (+ optional URI)"
        )
    if df.empty:
        return df.assign(URI=pd.Series(dtype=str))
    df["OBSID"] = df["OBSID"].astype(str).str.strip().str.lower()
    try:
        df["HDU Index"] = df["HDU Index"].astype(int)
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"{path}: 'HDU Index' must be integers (1 or 4 for the two SCI extensions): {exc}") from exc
    labels = df["Label"].astype(str).str.strip()
    canonical = {lab.lower(): lab for lab in LABELS}
    bad = sorted(set(labels[~labels.str.lower().isin(canonical)]))
    if bad:
        raise ManifestError(f"{path}: Label values {bad} are not known; expected one of {list(LABELS)}")
    df["Label"] = labels.str.lower().map(canonical)
    templated = [
        render_template(template, obsid=o, id=i, instrument=ins) for o, i, ins in zip(df["OBSID"], df["ID"], df["Instrument"], strict=True)
    ]
    if "URI" in df.columns:
        given = df["URI"].fillna("").astype(str).str.strip()
        df["URI"] = [_uri_relative_to(u, path) if u else t for u, t in zip(given, templated, strict=True)]
    else:
        df["URI"] = templated
    return df


def write_manifest(df: pd.DataFrame, path: str | Path) -> None:
    """Write a manifest in the published layout: a leading unnamed index column, then the columns as given."""
    df.reset_index(drop=True).to_csv(path, index=True)


def split_manifest(df: pd.DataFrame, test_fraction: float = 0.2, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split by celestial body (``ID``), stratified by label: no body is in both halves (the paper's guard
    against leakage), each label gives about `test_fraction` of its chips to the test half, reproducibly.

    Each label with at least two bodies keeps at least one body on each side.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction is {test_fraction}; expected a number between 0 and 1")
    per_body = df.groupby("ID")["Label"].agg(lambda s: sorted(set(s)))
    mixed = per_body[per_body.map(len) > 1]
    if len(mixed):
        raise ManifestError(f"bodies {list(mixed.index)} carry more than one label; a body is either galaxy or NSC")
    rng = np.random.default_rng(seed)
    test_bodies: list[str] = []
    counts = df.groupby("ID").size()
    for label in sorted(df["Label"].unique()):
        bodies = sorted(per_body[per_body.map(lambda v, lab=label: v[0] == lab)].index)
        order = [bodies[i] for i in rng.permutation(len(bodies))]
        target = test_fraction * counts[bodies].sum()
        taken, chosen = 0, []
        for body in order:
            if len(bodies) - len(chosen) <= 1:
                break
            if chosen and abs(taken + counts[body] - target) >= abs(taken - target):
                continue
            chosen.append(body)
            taken += counts[body]
        test_bodies += chosen
    is_test = df["ID"].isin(test_bodies)
    return df[~is_test].reset_index(drop=True), df[is_test].reset_index(drop=True)


def split_three(
    df: pd.DataFrame, val_fraction: float = 0.2, test_fraction: float | None = 0.2, seed: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame | None]:
    """Train, validation and test parts, each by body and stratified by label (`split_manifest` twice).

    The test part takes `test_fraction` of the chips; the validation part then takes `val_fraction` of the remaining
    training bodies' chips, so it never holds a test body. With ``test_fraction=None`` (a separate test manifest is
    given) only train and validation are split and the third part is None.
    """
    train, test = (df, None) if test_fraction is None else split_manifest(df, test_fraction=test_fraction, seed=seed)
    train, val = split_manifest(train, test_fraction=val_fraction, seed=seed + 1)
    return train, val, test


@dataclass(frozen=True)
class SourceOptions:
    """Where sources live and how to reach them."""

    template: str = DEFAULT_TEMPLATE  # manifest rows -> URIs (ignored where a URI column is given)
    storage_options: dict | None = None  # fsspec options, e.g. {"anon": True} or {"client_kwargs": {"endpoint_url": ...}}


def _fs_for(uri: str, storage_options: dict | None):
    fs, _ = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    return fs


def _is_manifest(s: str) -> bool:
    return s.lower().endswith((".csv", ".csv.gz"))


def _expand(source: str, storage_options: dict | None) -> list[str]:
    """A path/URI to a FITS file stays as it is; a folder, prefix or glob becomes the FITS files under it.

    One listing call per source: thousands of files are never stat-ed one by one on the driver.
    """
    if source.lower().endswith(FITS_SUFFIXES) and not any(ch in source for ch in "*?["):
        return [source]
    fs = _fs_for(source, storage_options)
    protocol = source.split("://", 1)[0] if "://" in source else None
    if any(ch in source for ch in "*?["):
        found = fs.glob(source)
    else:
        found = [p for p in fs.find(source) if p.lower().endswith(FITS_SUFFIXES)]
        if not found and not fs.exists(source):
            raise FileNotFoundError(f"{source} does not exist; expected a manifest (.csv), a FITS file, a folder, a prefix or a glob")
    found = sorted(p for p in found if p.lower().endswith(FITS_SUFFIXES))
    return [f"{protocol}://{p}" if protocol and "://" not in p else p for p in found]


def resolve_sources(sources: list[str] | str, options: SourceOptions = SourceOptions()) -> pd.DataFrame:
    """Everything to read, one row per file.

    Columns: ``uri``; ``hdus`` (list of HDU indices to read, empty for every SCI extension); ``labels`` and
    ``bodies`` (per HDU, from a manifest; empty strings when unknown). A manifest naming two chips of one file
    gives one row, so each file is opened once.
    """
    if isinstance(sources, str):
        sources = [sources]
    if not sources:
        raise ValueError("no source given; expected a manifest (.csv), FITS files or URIs, a folder, a prefix or a glob")
    rows: list[dict] = []
    for source in sources:
        if _is_manifest(source):
            df = read_manifest(source, template=options.template, storage_options=options.storage_options)
            for uri, group in df.groupby("URI", sort=False):
                group = group.drop_duplicates("HDU Index")
                rows.append(
                    {
                        "uri": uri,
                        "hdus": [int(h) for h in group["HDU Index"]],
                        "labels": [str(v) for v in group["Label"]],
                        "bodies": [str(v) for v in group["ID"]],
                    }
                )
        else:
            rows += [{"uri": u, "hdus": [], "labels": [], "bodies": []} for u in _expand(source, options.storage_options)]
    files = pd.DataFrame(rows, columns=["uri", "hdus", "labels", "bodies"])
    dup = files["uri"].duplicated()
    if dup.any():
        logger.warning("%d file(s) named by more than one source; each is read once", int(dup.sum()))
        files = files[~dup].reset_index(drop=True)
    return files
