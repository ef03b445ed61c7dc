"""A classification run's parts, their compact index, and the catalog and errors tables built from them by streaming.

Layout of a run folder ``OUT``::

    OUT/_parts/part-<run>-<n>.parquet   catalog and error rows as chips finish (every column, one row per chip)
    OUT/_parts/_index/<run>-<n>.parquet the compact index: (part, uri, hdu, error_class, n_in_file, checkpoint_id,
                                        labelled), a few dozen bytes a chip, written by the driver as parts arrive
    OUT/catalog.<ext>, OUT/errors.<ext>, OUT/summary.json

Resume planning, lost-chip accounting and deduplication read only the index (one small file per few thousand
parts); a part that the index does not cover (a run killed between writing it and indexing it) has its key columns
read once and is indexed then. Consolidation streams the parts through pyarrow's dataset scanner into the output
writer, a record batch at a time: for Parquet and CSV the driver never holds more than a batch of rows. FITS and
VOTable are written by astropy from an in-memory table, so for those the catalog (not the parts) must fit in the
driver's memory: about 250 bytes a chip, 250 MB per million chips.

Status of a (uri, hdu): ``error_class`` "" (catalogued), a deterministic error (``not_fits``, ``bad_shape``, ...:
the same bytes fail the same way again, so a rerun does not retry them) or a transient one (`TRANSIENT`:
``unreadable`` URIs and ``lost`` chips, whose tasks died; a rerun retries them). Where a key has several rows (a
transient failure retried later) the best status wins: catalogued, then deterministic, then transient.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

PARTS = "_parts"
INDEX = "_index"
INDEX_COLUMNS = ["part", "uri", "hdu", "error_class", "n_in_file", "checkpoint_id", "labelled"]
INDEX_TYPES = [pa.string(), pa.string(), pa.int64(), pa.string(), pa.int64(), pa.string(), pa.bool_()]
ERROR_TABLE_COLUMNS = ["uri", "hdu", "obsid", "error_class", "error"]
TRANSIENT = frozenset({"unreadable", "lost"})
"""Error classes a rerun retries: the URI could not be fetched, or the task holding the chip died on every retry."""
WRITE_ROWS = 65_536
"""Rows per Parquet row group (and CSV write) of the consolidated tables: the driver holds about this many at once."""
RUN_FILES = ("summary.json",)
"""What a run writes besides `PARTS` and ``catalog.<ext>``/``errors.<ext>``: all that ``--overwrite`` may remove."""


class RunFailedError(RuntimeError):
    """The run itself failed (exit code 1): the parts written so far stay, and a rerun resumes from them."""


class ModelStageError(RunFailedError):
    """The model stage raised on a batch on every attempt: the run stops instead of writing rows for it."""


class ResumeRefusedError(ValueError):
    """``OUT`` holds parts of another checkpoint, or ``--overwrite`` was asked to remove files a run did not write."""


def checkpoint_id(state: dict[str, Any]) -> str:
    """``<weights hash>-<hash of model name, args, preprocessing and temperature>``: what a part's chips were classified with.

    Two checkpoints with the same weights but another preprocessing (or input shape), or another calibration
    temperature (which changes every ``p_galaxy``), get different ids, so a resumed run never mixes their rows.
    """
    from ray_hrc.checkpoint import weights_hash

    weights = state.get("weights_hash") or weights_hash(state["model_state"])
    recipe = {"model": state["model_name"], "args": state.get("model_args") or {}, "preprocess": state.get("preprocess") or {}}
    if float(state.get("temperature", 1.0)) != 1.0:  # uncalibrated checkpoints keep the ids they had before temperatures
        recipe["temperature"] = float(state["temperature"])
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{weights}-{digest}"


def new_run_id() -> str:
    import time

    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"


def index_of(table: pa.Table, part: str) -> pa.Table:
    """The compact index rows of one part's table."""
    n = table.num_rows
    labelled = pc.not_equal(table["label_true"], "") if "label_true" in table.column_names else pa.array(np.zeros(n, bool))
    return pa.table(
        {
            "part": pa.array([part] * n, pa.string()),
            "uri": table["uri"].cast(pa.string()),
            "hdu": table["hdu"].cast(pa.int64()),
            "error_class": table["error_class"].cast(pa.string()),
            "n_in_file": table["n_in_file"].cast(pa.int64()),
            "checkpoint_id": table["checkpoint_id"].cast(pa.string())
            if "checkpoint_id" in table.column_names
            else pa.array([""] * n, pa.string()),
            "labelled": labelled,
        }
    )


def write_part(fs, parts_root: str, name: str, table: pa.Table) -> None:
    """One part: rows sorted by (uri, hdu), written in one go (a killed writer leaves an unreadable file, dropped on load)."""
    table = table.sort_by([("uri", "ascending"), ("hdu", "ascending")])
    fs.makedirs(parts_root, exist_ok=True)
    with fs.open(posixpath.join(parts_root, name), "wb") as fh:
        pq.write_table(table, fh)


def write_index_segment(fs, parts_root: str, rows: pa.Table | pd.DataFrame, name: str) -> None:
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pandas(rows[INDEX_COLUMNS], preserve_index=False)
    if table.num_rows == 0:
        return
    fs.makedirs(posixpath.join(parts_root, INDEX), exist_ok=True)
    with fs.open(posixpath.join(parts_root, INDEX, name), "wb") as fh:
        pq.write_table(table, fh)


def _part_names(fs, parts_root: str) -> list[str]:
    if not fs.exists(parts_root):
        return []
    names = []
    for path in fs.find(parts_root):
        rel = posixpath.relpath(path, parts_root.rstrip("/"))
        if rel.endswith(".parquet") and not rel.startswith(f"{INDEX}/"):
            names.append(rel)
    return sorted(names)


def load_index(fs, parts_root: str) -> pd.DataFrame:
    """The compact index of every readable part (columns `INDEX_COLUMNS`), repaired on the way.

    Index segments are read whole (they are small); parts no segment covers have only their key columns read, and
    get a segment of their own; unreadable parts (a run killed mid-write) are deleted, their chips redone; index rows
    of parts that no longer exist are dropped.
    """
    parts = _part_names(fs, parts_root)
    index_root = posixpath.join(parts_root, INDEX)
    tables = []
    if parts and fs.exists(index_root):
        for path in sorted(fs.find(index_root)):
            try:
                with fs.open(path, "rb") as fh:
                    tables.append(pq.read_table(fh).select(INDEX_COLUMNS))
            except Exception as exc:  # noqa: BLE001 - an unreadable segment is rebuilt from its parts
                logger.warning("dropping unreadable index segment %s (%s); its parts are indexed again", path, exc)
                fs.rm(path)
    indexed = set()
    for t in tables:
        indexed.update(pc.unique(t["part"]).to_pylist())
    missing = [p for p in parts if p not in indexed]
    repaired = []
    for name in missing:
        path = posixpath.join(parts_root, name)
        try:
            with fs.open(path, "rb") as fh:
                pf = pq.ParquetFile(fh)
                wanted = [
                    c for c in ("uri", "hdu", "error_class", "n_in_file", "checkpoint_id", "label_true") if c in pf.schema_arrow.names
                ]
                repaired.append(index_of(pf.read(columns=wanted), name))
        except Exception as exc:  # noqa: BLE001 - any unreadable part is dropped and redone
            logger.warning("dropping unreadable part %s (%s); its chips will be classified again", path, exc)
            fs.rm(path)
    if repaired:
        write_index_segment(fs, parts_root, pa.concat_tables(repaired), f"repair-{new_run_id()}.parquet")
        tables += repaired
    if not tables:
        return pa.table({c: pa.array([], t) for c, t in zip(INDEX_COLUMNS, INDEX_TYPES, strict=True)}).to_pandas()
    table = pa.concat_tables(tables)
    table = table.filter(pc.is_in(table["part"], pa.array(parts, pa.string())))
    return compact(table)


def compact(table: pa.Table | pd.DataFrame) -> pd.DataFrame:
    """The index as pandas with few-valued strings (part, error class, checkpoint id) as categoricals: ~100 bytes a chip."""
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(
            table[INDEX_COLUMNS].astype({c: str for c in ("part", "error_class", "checkpoint_id")}), preserve_index=False
        )
    for name in ("part", "error_class", "checkpoint_id"):
        i = table.schema.get_field_index(name)
        table = table.set_column(i, name, pc.dictionary_encode(table[name]))
    return table.to_pandas()


def best_rows(index: pd.DataFrame) -> pd.DataFrame:
    """One index row per (uri, hdu): catalogued beats a deterministic error beats a transient one; ties: first part.

    A transient whole-file row (hdu -1, e.g. an unreadable URI) is dropped once the file's chips are all accounted for.
    """
    if index.empty:
        return index
    error_class = index["error_class"].astype(str)
    rank = np.where(error_class == "", 0, np.where(error_class.isin(TRANSIENT), 2, 1))
    dup = index.duplicated(["uri", "hdu"], keep=False).to_numpy()
    best = index
    if dup.any():  # only keys with several rows are ranked (a retried failure): most runs have none
        ranked = index[dup].assign(_rank=rank[dup], _part=index.loc[dup, "part"].astype(str))
        ranked = ranked.sort_values(["uri", "hdu", "_rank", "_part"], kind="stable").drop(columns="_part")
        winners = ranked.drop_duplicates(["uri", "hdu"], keep="first").drop(columns="_rank")
        best = pd.concat([index[~dup], winners]).sort_index()
        rank = np.where(best["error_class"].astype(str) == "", 0, np.where(best["error_class"].astype(str).isin(TRANSIENT), 2, 1))
    orphan = (best["hdu"].to_numpy() < 0) & (rank == 2)
    if orphan.any():  # a transient whole-file row goes once the file's chips are all accounted for
        uris = set(best.loc[orphan, "uri"])
        mine = best["uri"].isin(uris).to_numpy()
        settled = best[mine & (rank < 2) & (best["hdu"].to_numpy() >= 0)]
        counts = settled.groupby("uri").agg(n=("hdu", "size"), want=("n_in_file", "max"))
        complete = set(counts.index[counts["n"] >= counts["want"]])
        best = best[~(orphan & best["uri"].isin(complete).to_numpy())]
    return best.reset_index(drop=True)


def done_rows(best: pd.DataFrame) -> pd.DataFrame:
    """The (uri, hdu, n_in_file) a rerun skips: catalogued chips and deterministic errors, not transient ones."""
    if best.empty:
        return best
    return best[~best["error_class"].astype(str).isin(TRANSIENT)].reset_index(drop=True)


def check_checkpoint(index: pd.DataFrame, wanted: str, checkpoint: str, out: str) -> None:
    """Refuse to resume into parts classified with another checkpoint (or written before parts recorded one)."""
    if index.empty:
        return
    others = sorted(set(index["checkpoint_id"].astype(str)) - {wanted})
    if others:
        shown = ", ".join(o or "(none recorded)" for o in others[:3])
        raise ResumeRefusedError(
            f"{out} holds chips classified with checkpoint id(s) {shown}, not {wanted} ({checkpoint}); a resumed run "
            "would mix two models' labels. Use --overwrite to start over in this folder, or another --out"
        )


def lost_rows(files: pd.DataFrame, run_index: pd.DataFrame, attempts: int, checkpoint_id: str, run_id: str) -> pd.DataFrame:
    """Error rows (class ``lost``) for every chip this run planned and that left no row: per (uri, hdu).

    A file the manifest lists by HDU gets one row per missing HDU. A file read whole gets one row (hdu -1) when it left
    no row at all, or when fewer chips came back than the file holds (``n_in_file``).
    """
    seen: dict[str, set[int]] = {}
    n_in: dict[str, int] = {}
    for uri, hdu, n in zip(run_index["uri"], run_index["hdu"], run_index["n_in_file"], strict=True):
        seen.setdefault(uri, set()).add(int(hdu))
        n_in[uri] = max(n_in.get(uri, 0), int(n))
    why = f"the task holding it died {attempts + 1} times (a lost worker or node, in the read or the model stage; run {run_id}); a rerun retries it"
    rows = []
    for uri, hdus, skip in zip(files["uri"], files["hdus"], files["skip_hdus"], strict=True):
        got = seen.get(uri, set())
        if hdus is not None and len(hdus):
            for hdu in sorted({int(h) for h in hdus} - {int(s) for s in skip} - got):
                rows.append((uri, hdu, f"HDU {hdu} of {uri}: {why}"))
        elif not got:
            rows.append((uri, -1, f"{uri}: {why}"))
        elif len(got) + len(skip) < n_in[uri]:
            k = n_in[uri] - len(got) - len(skip)
            rows.append((uri, -1, f"{k} of the {n_in[uri]} chips of {uri} (not HDUs {sorted(got | set(skip))}): {why}"))
    return pd.DataFrame(
        {
            "uri": [r[0] for r in rows],
            "hdu": np.array([r[1] for r in rows], np.int64),
            "obsid": "",
            "error_class": "lost",
            "error": [r[2] for r in rows],
            "n_in_file": np.zeros(len(rows), np.int64),
            "label_true": "",
            "checkpoint_id": checkpoint_id,
        }
    )


def catalog_columns(base: list[str], labelled: bool) -> list[str]:
    columns = list(base)
    if labelled:
        columns += ["label_true", "body"]
    return columns + ["preprocess_ms", "classify_ms"]


def _dataset(fs, parts_root: str, names: list[str], schema: pa.Schema) -> pads.Dataset:
    from pyarrow.fs import FSSpecHandler, LocalFileSystem, PyFileSystem

    paths = [posixpath.join(parts_root, n) for n in names]
    local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    return pads.dataset(paths, schema=schema, format="parquet", filesystem=LocalFileSystem() if local else PyFileSystem(FSSpecHandler(fs)))


def stream_rows(
    fs, parts_root: str, index: pd.DataFrame, best: pd.DataFrame, schema: pa.Schema, columns: list[str], keep_errors: bool
) -> Iterator[pa.RecordBatch]:
    """The winning rows (`best_rows`) of the parts, `columns` only, catalogued rows or (`keep_errors`) error rows.

    Only parts that hold such rows are read (the index says which). Parts whose rows all win (nearly all) go through
    pyarrow's scanner (reads ahead, keeps the parts' order); a part with a row beaten by another part's (a transient
    failure retried later) is read on its own and filtered.
    """
    keep = pc.field("error_class") != "" if keep_errors else pc.field("error_class") == ""
    key = ["uri", "hdu", "part"]
    losers = index.iloc[:0][key]
    if len(best) < len(index):
        merged = index[key].astype({"part": str}).merge(best[key].astype({"part": str}).assign(_win=True), on=key, how="left")
        losers = merged[merged["_win"].isna()]
    dirty = set(losers["part"])
    wanted = index["error_class"].astype(str) != "" if keep_errors else index["error_class"].astype(str) == ""
    clean = [n for n in sorted(set(index.loc[wanted.to_numpy(), "part"].astype(str))) if n not in dirty]
    if clean:
        for batch in _dataset(fs, parts_root, clean, schema).to_batches(columns=columns, filter=keep, batch_size=65_536):
            if batch.num_rows:
                yield batch
    for name in sorted(dirty):
        table = _dataset(fs, parts_root, [name], schema).to_table()
        drop = losers[losers["part"] == name]
        drop = pa.table(
            {"uri": pa.array(drop["uri"], pa.string()), "hdu": pa.array(drop["hdu"], pa.int64()), "_drop": np.ones(len(drop), bool)}
        )
        joined = table.join(drop, ["uri", "hdu"], join_type="left outer")
        kept = joined.filter(pc.is_null(joined["_drop"])).filter(keep)
        yield from kept.select(columns).to_batches()


class _Tally:
    """Counts for the run summary, kept while the catalog streams past."""

    def __init__(self) -> None:
        self.rows = 0
        self.labels: dict[str, int] = {}
        self.classes: dict[str, int] = {}
        self.sums = {"preprocess_ms": [0.0, 0], "classify_ms": [0.0, 0]}

    def catalog(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        self.rows += batch.num_rows
        for value, count in zip(*np.unique(batch.column("label").to_numpy(zero_copy_only=False), return_counts=True), strict=True):
            self.labels[str(value)] = self.labels.get(str(value), 0) + int(count)
        for name, acc in self.sums.items():
            if name in batch.schema.names:
                values = batch.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
                finite = values[np.isfinite(values)]
                acc[0] += float(finite.sum())
                acc[1] += len(finite)
        return batch

    def errors(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        for value, count in zip(*np.unique(batch.column("error_class").to_numpy(zero_copy_only=False), return_counts=True), strict=True):
            self.classes[str(value)] = self.classes.get(str(value), 0) + int(count)
        return batch


def write_batches(
    batches: Iterable[pa.RecordBatch], schema: pa.Schema, path: str, fmt: str, storage_options: dict | None, write_table
) -> None:
    """Write a stream of record batches as one file, atomically (temporary name, then rename).

    Parquet and CSV are written a batch at a time. FITS and VOTable go through `write_table` (astropy writes them from
    one in-memory table), so for those the whole table is held once.
    """
    import fsspec

    if fmt not in ("parquet", "csv"):
        table = pa.Table.from_batches(list(batches), schema=schema)
        write_table(table.to_pandas(), path, fmt, storage_options)
        return
    import pyarrow.csv as pacsv

    from ray_hrc.catalog_formats import annotate_schema

    fs, target = fsspec.core.url_to_fs(path, **(storage_options or {}))
    tmp = f"{target}.tmp"
    with fs.open(tmp, "wb") as fh:
        writer = pq.ParquetWriter(fh, annotate_schema(schema)) if fmt == "parquet" else pacsv.CSVWriter(fh, schema)
        with writer:
            for chunk in _rebatched(batches, schema, WRITE_ROWS):
                writer.write_table(chunk)
    fs.mv(tmp, target)


def _rebatched(batches: Iterable[pa.RecordBatch], schema: pa.Schema, rows: int) -> Iterator[pa.Table]:
    """Parts' small batches regrouped into tables of about `rows` rows (Parquet row groups of a useful size)."""
    held: list[pa.RecordBatch] = []
    n = 0
    for batch in batches:
        held.append(batch)
        n += batch.num_rows
        if n >= rows:
            yield pa.Table.from_batches(held, schema=schema)
            held, n = [], 0
    if held or n == 0:
        yield pa.Table.from_batches(held, schema=schema)


def _schema(fs, parts_root: str, index: pd.DataFrame, columns: list[str]) -> pa.Schema:
    """`columns` as the parts type them (strings, float64, int64), from the footers of as few parts as hold them all."""
    fields: dict[str, pa.Field] = {}
    for name in sorted(set(index["part"].astype(str))):
        with fs.open(posixpath.join(parts_root, name), "rb") as fh:
            schema = pq.read_schema(fh)
        for column in columns:
            if column in schema.names and column not in fields:
                fields[column] = schema.field(column)
        if len(fields) == len(columns):
            break
    return pa.schema([fields[c] for c in columns if c in fields])


def _select(schema: pa.Schema, columns: list[str]) -> pa.Schema:
    return pa.schema([schema.field(c) for c in columns])


def consolidate(
    fs, root: str, out: str, index: pd.DataFrame, fmt: str, ext: str, base_columns: list[str], storage_options: dict | None, write_table
) -> dict[str, Any]:
    """Parts -> ``catalog.<ext>`` (one row per catalogued chip) and ``errors.<ext>``, streamed; counts for the summary."""
    parts_root = posixpath.join(root, PARTS)
    best = best_rows(index)
    labelled = bool(best["labelled"].any()) if len(best) else False
    columns = catalog_columns(base_columns, labelled)
    from ray_hrc.catalog_formats import ERRORS_FORMAT, FORMATS

    errors_fmt = ERRORS_FORMAT.get(fmt, fmt)  # HATS partitions by position; failed chips have none
    catalog_path, errors_path = f"{out.rstrip('/')}/catalog.{ext}", f"{out.rstrip('/')}/errors.{FORMATS[errors_fmt]}"
    tally = _Tally()
    if len(index):
        schema = _schema(fs, parts_root, index, list(dict.fromkeys(columns + ERROR_TABLE_COLUMNS)))
        columns = [c for c in columns if c in schema.names]
        rows = stream_rows(fs, parts_root, index, best, schema, columns, keep_errors=False)
        write_batches((tally.catalog(b) for b in rows), _select(schema, columns), catalog_path, fmt, storage_options, write_table)
        rows = stream_rows(fs, parts_root, index, best, schema, ERROR_TABLE_COLUMNS, keep_errors=True)
        write_batches(
            (tally.errors(b) for b in rows), _select(schema, ERROR_TABLE_COLUMNS), errors_path, errors_fmt, storage_options, write_table
        )
    else:
        write_table(pd.DataFrame(columns=columns), catalog_path, fmt, storage_options)
        write_table(pd.DataFrame(columns=ERROR_TABLE_COLUMNS), errors_path, errors_fmt, storage_options)
    summary: dict[str, Any] = {
        "catalog": catalog_path,
        "errors_table": errors_path,
        "chips": tally.rows,
        "failed": int(sum(tally.classes.values())),
        "by_label": dict(sorted(tally.labels.items())),
    }
    if tally.classes:
        summary["failed_by_class"] = dict(sorted(tally.classes.items()))
        summary["to_retry"] = int(sum(v for k, v in tally.classes.items() if k in TRANSIENT))
    if tally.rows:
        for name, (total, count) in tally.sums.items():
            summary[f"mean_{name}"] = total / count if count else None
    return summary


def run_outputs(fs, root: str, extensions: Iterable[str]) -> tuple[list[str], list[str]]:
    """(what a run wrote in `root`, anything else there): the first is all ``--overwrite`` may remove."""
    if not fs.exists(root):
        return [], []
    own = {PARTS, *RUN_FILES}
    for ext in extensions:
        for stem in ("catalog", "errors"):
            own |= {f"{stem}.{ext}", f"{stem}.{ext}.tmp"}
    ours, other = [], []
    for path in fs.ls(root, detail=False):
        name = posixpath.basename(path.rstrip("/"))
        (ours if name in own else other).append(path)
    return ours, other


def remove_run_outputs(fs, root: str, out: str, extensions: Iterable[str]) -> None:
    """``--overwrite``: remove what a run wrote in `root` (parts, catalogs, error tables, summary), nothing else.

    Refuses (`ResumeRefusedError`) when `root` holds anything a run does not write: ``--out`` then names a folder (or a
    bucket) that is not a run folder, and removing it would lose data.
    """
    ours, other = run_outputs(fs, root, extensions)
    if other:
        shown = ", ".join(posixpath.basename(p.rstrip("/")) for p in sorted(other)[:5])
        more = f" and {len(other) - 5} more" if len(other) > 5 else ""
        raise ResumeRefusedError(
            f"--overwrite refused: {out} holds {shown}{more}, which a classification run does not write; expected only "
            f"{PARTS}/, catalog.*, errors.* and {', '.join(RUN_FILES)}. Choose an --out of its own"
        )
    for path in ours:
        fs.rm(path, recursive=True)
