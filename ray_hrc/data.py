"""Ray Data ingestion: sources -> one row per chip, read and cropped in parallel tasks.

Every row has the metadata columns of `ray_hrc.chips.ChipMeta`, ``body`` and ``label_true`` (from a manifest,
else empty), ``error_class`` and ``error`` (empty for good chips), ``pixels`` (uint16 DN (2048, 4096) for raw
files: 16 MiB a chip in the object store; empty for error rows) and ``amp_bias`` (float32 DN per amp).
Error rows travel in the same dataset so that no failure is lost: consumers split them with `good_chips` /
`error_rows` or pass them through.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import ray
from ray.data.expressions import col

from ray_hrc.chips import ERROR_COLUMNS, LABEL_COLUMNS, META_FIELDS, Chip, ChipMeta, read_fits
from ray_hrc.manifest import DEFAULT_TEMPLATE, SourceOptions, resolve_sources
from ray_hrc.preprocess import NormConfig, preprocess_row
from ray_hrc.remote import FetchConfig
from ray_hrc.runtime import retry_bounds_as_remote_args

logger = logging.getLogger(__name__)

PIXEL_COLUMNS = ["pixels", "amp_bias"]
ROW_COLUMNS = META_FIELDS + LABEL_COLUMNS + ERROR_COLUMNS + ["n_in_file", "read_ms"] + PIXEL_COLUMNS
_NO_PIXELS = np.zeros((0, 0), np.uint16)


@dataclass(frozen=True)
class ReadConfig:
    """How the read stage runs: where sources are and what each read task asks of the cluster."""

    template: str = DEFAULT_TEMPLATE  # manifest rows -> URIs; a local folder means <folder>/{obsid}_raw.fits
    storage_options: dict = field(
        default_factory=dict
    )  # fsspec options for the sources only (input side), e.g. {"anon": True} for s3://stpubdata
    num_cpus: float = 1.0  # CPUs per read task (one file per task)
    concurrency: int | None = None  # at most this many read tasks at once; None lets Ray Data decide
    max_retries: int = 3  # retries of a read task lost to a node or worker failure (bad files become error rows, not retries)
    fetch: dict = field(default_factory=dict)  # remote sources: `ray_hrc.remote.FetchConfig` (mode, max_object_bytes, attempts, timeouts)

    def source_options(self) -> SourceOptions:
        return SourceOptions(template=self.template, storage_options=self.storage_options or None)

    @classmethod
    def from_dict(cls, d: dict | None) -> ReadConfig:
        return cls(**(d or {}))

    def to_dict(self) -> dict:
        return asdict(self)


def chip_rows(
    file: dict[str, Any],
    storage_options: dict | None = None,
    norm: NormConfig | None = None,
    data: bytes | None = None,
    fetch: dict | None = None,
) -> list[dict[str, Any]]:
    """Read one file (a row of `resolve_sources`) into chip rows and error rows. Never raises for bad input.

    ``n_in_file`` is how many records the file gave (before ``skip_hdus``), so a resumed run knows when a file is
    complete; ``read_ms`` is the file's read-and-crop time shared among its chips. HDUs in ``skip_hdus`` (chips a
    previous run already catalogued) are dropped. With `norm`, rows carry the normalised ``image`` instead of
    ``pixels`` (`ray_hrc.preprocess.preprocess_row`), so normalisation runs in the same CPU task as the read.
    With `data`, the file's bytes are read instead of ``file["uri"]``, which then only names them (Serve).
    `fetch` configures how a remote URI is fetched (`ray_hrc.remote.FetchConfig` as a dict).
    """
    uri, hdus = file["uri"], [int(h) for h in file.get("hdus") or []]
    known = {h: (lab, body) for h, lab, body in zip(hdus, file.get("labels") or [], file.get("bodies") or [], strict=False)}
    skip = {int(h) for h in file.get("skip_hdus") or []}
    t0 = time.perf_counter()
    fetch_config = FetchConfig.from_dict(fetch) if fetch else None
    records = read_fits(uri if data is None else data, uri=uri, hdus=hdus or None, storage_options=storage_options, fetch=fetch_config)
    read_ms = (time.perf_counter() - t0) * 1e3 / max(1, len(records))
    out = []
    for record in records:
        if (record.meta.hdu if isinstance(record, Chip) else record.hdu) in skip:
            continue
        label, body = known.get(record.meta.hdu if isinstance(record, Chip) else record.hdu, ("", ""))
        if isinstance(record, Chip):
            row = record.to_row()
            row.update(body=body, label_true=label, error_class="", error="")
        else:
            meta = asdict(ChipMeta(uri=record.uri, hdu=record.hdu))
            row = {**meta, "body": body, "label_true": label, "error_class": record.error_class, "error": record.message}
            row.update(pixels=_NO_PIXELS, amp_bias=np.zeros(0, np.float32))
            logger.warning("%s", record.message)
        row.update(n_in_file=len(records), read_ms=read_ms)
        out.append(preprocess_row(row, norm) if norm is not None else row)
    return out


def read_chips(
    source: list[str] | str | pd.DataFrame,
    config: ReadConfig = ReadConfig(),
    norm: NormConfig | None = None,
    shuffle_seed: int | None = None,
) -> ray.data.Dataset:
    """A Ray Dataset of chip rows (good and error rows, see the module docstring) from any source.

    source: manifest CSV(s), FITS paths or URIs, folders, prefixes or globs, local or ``s3://``; or a table of
    files as `resolve_sources` returns it (optionally with ``skip_hdus`` per file).
    Files are listed once on the driver (or taken from the manifest as they are) and each file is read by
    its own task: nothing is fetched or stat-ed per file on the driver. With `norm`, chips are also normalised
    in that task (rows carry ``image`` instead of ``pixels``; see `chip_rows`).
    With `shuffle_seed`, the files are read in a shuffled order, a new one each time the dataset is executed (each
    training epoch), reproducible from the seed: a manifest lists a body's chips together, and SGD on batches of
    one body at a time learns poorly. Only the small list of files is shuffled, so reading still streams.
    """
    files = source if isinstance(source, pd.DataFrame) else resolve_sources(source, config.source_options())
    if files.empty:
        raise FileNotFoundError(f"no FITS file found in {source}; expected a manifest (.csv), FITS files, a folder, a prefix or a glob")
    logger.info("reading %d file(s)", len(files))
    items = files.to_dict("records")
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    if shuffle_seed is not None:
        ds = ds.randomize_block_order(seed=ray.data.RandomSeedConfig(shuffle_seed))  # one file per block; reseeded every execution
    with retry_bounds_as_remote_args():
        return ds.flat_map(
            chip_rows,
            fn_kwargs={"storage_options": config.storage_options or None, "norm": norm, "fetch": config.fetch or None},
            num_cpus=config.num_cpus,
            concurrency=config.concurrency,
            max_retries=config.max_retries,  # a static remote arg: Ray 2.60 has no named parameter for it
        )


def stack_pixels(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Make ``pixels`` and ``amp_bias`` dense (B, ...) arrays.

    A block that held error rows next to chips carries a variable-shaped tensor column, which numpy sees as an
    object array of per-row arrays even once the error rows are gone; this stacks it (a copy only in that case).
    """
    for name in PIXEL_COLUMNS:
        if name in batch and batch[name].dtype == object:
            batch[name] = np.stack(list(batch[name])) if len(batch[name]) else batch[name]
    return batch


def good_chips(ds: ray.data.Dataset) -> ray.data.Dataset:
    """The rows that hold a chip, with dense pixel columns (an Arrow-native filter, fused with the read tasks)."""
    return ds.filter(expr=col("error_class") == "").map_batches(stack_pixels, batch_format="numpy", batch_size=None)


def error_rows(ds: ray.data.Dataset) -> ray.data.Dataset:
    """The error rows, without the (empty) pixel columns."""
    return ds.filter(expr=col("error_class") != "").drop_columns(PIXEL_COLUMNS)


def summarize(rows: list[dict] | Any) -> dict[str, Any]:
    """Counts for a run's summary from rows (or a DataFrame) with ``error_class`` and, optionally, label columns."""
    import pandas as pd

    df = pd.DataFrame(rows) if not isinstance(rows, pd.DataFrame) else rows
    ok = df[df["error_class"] == ""] if len(df) else df
    bad = df[df["error_class"] != ""] if len(df) else df
    summary: dict[str, Any] = {"chips": int(len(ok)), "errors": int(len(bad)), "files": int(df["uri"].nunique()) if len(df) else 0}
    if len(bad):
        summary["errors_by_class"] = {k: int(v) for k, v in bad["error_class"].value_counts().items()}
    if "label_true" in ok and len(ok):
        counts = ok["label_true"].replace("", "unlabelled").value_counts()
        summary["by_label"] = {k: int(v) for k, v in counts.items()}
    return summary
