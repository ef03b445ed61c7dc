"""`ray-hrc classify`: a whole archive -> a labelled catalog, in one streaming Ray Data pipeline.

read + crop + normalise (CPU tasks) -> `ChipClassifier` (an autoscaling actor pool, GPUs where there are any) ->
Parquet parts under ``OUT/_parts`` as chips finish. Nothing is materialised: memory stays flat as the archive grows.
At the end the parts become ``OUT/catalog.<fmt>`` and ``OUT/errors.<fmt>``, each written under a temporary name
and renamed, so a half-written file is never mistaken for a catalog. A rerun with the same ``OUT`` skips every chip
already in the parts (resume); ``overwrite=True`` starts over.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import ray

from ray_hrc.checkpoint import load_checkpoint, norm_from_checkpoint
from ray_hrc.data import ReadConfig, read_chips
from ray_hrc.manifest import resolve_sources
from ray_hrc.predict import CATALOG_COLUMNS, ChipClassifier
from ray_hrc.storage import OutputConfig, Storage

logger = logging.getLogger(__name__)

FORMATS = {"parquet": "parquet", "csv": "csv", "fits": "fits", "votable": "vot"}
ERROR_TABLE_COLUMNS = ["uri", "hdu", "obsid", "error_class", "error"]
PARTS = "_parts"


@dataclass(frozen=True)
class ClassifyConfig:
    """How the model stage runs."""

    batch_size: int = 4  # chips per model call
    min_actors: int = 1  # model actor pool: autoscales between min_actors and max_actors
    max_actors: int | None = None  # None: as many as resources allow
    use_gpu: bool | None = None  # None: use GPUs when the cluster has any
    gpus_per_actor: float = 1.0
    cpus_per_actor: float = 1.0
    device: str = "auto"  # "auto", "cpu" or "cuda"
    format: str = "parquet"  # catalog format: parquet, csv, fits (binary table) or votable

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format is {self.format!r}; expected one of {sorted(FORMATS)}")


@dataclass(frozen=True)
class ClassifyJobConfig:
    """A classification config file: what each stage asks of the cluster (configs/classify_cluster.yaml)."""

    read: ReadConfig = field(default_factory=ReadConfig)  # the sources (input side)
    model_stage: ClassifyConfig = field(default_factory=ClassifyConfig)
    output: OutputConfig = field(default_factory=OutputConfig)  # --out and the checkpoint (output side)


def load_classify_config(path: str | None) -> ClassifyJobConfig:
    from pathlib import Path

    import yaml

    from ray_hrc.config import _build

    tree = yaml.safe_load(Path(path).read_text()) if path else {}
    return _build(ClassifyJobConfig, tree or {}, "")


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


def load_parts(fs, parts_root: str) -> pd.DataFrame:
    """Every readable part written so far; unreadable ones (a run killed mid-write) are deleted, their chips redone."""
    frames = []
    if fs.exists(parts_root):
        for path in sorted(fs.find(parts_root)):
            if not path.endswith(".parquet"):
                continue
            try:
                with fs.open(path, "rb") as fh:
                    frames.append(pq.read_table(fh).to_pandas())
            except Exception as exc:  # noqa: BLE001 - any unreadable part is dropped and redone
                logger.warning("dropping unreadable part %s (%s); its chips will be classified again", path, exc)
                fs.rm(path)
    if not frames:
        return pd.DataFrame(columns=["uri", "hdu", "n_in_file", "error_class"])
    df = pd.concat(frames, ignore_index=True)
    for column in df.columns:
        if df[column].dtype == object or str(df[column].dtype).startswith("string"):
            df[column] = df[column].astype(str)
    return df.drop_duplicates(["uri", "hdu"], keep="first").reset_index(drop=True)


def plan_resume(files: pd.DataFrame, done: pd.DataFrame) -> pd.DataFrame:
    """Drop files whose chips are all catalogued; for partly done files, list the HDUs to skip."""
    if done.empty:
        return files.assign(skip_hdus=[[] for _ in range(len(files))])
    by_uri = done.groupby("uri").agg(hdus=("hdu", lambda s: sorted(int(h) for h in s)), n=("n_in_file", "max"))
    keep, skips = [], []
    for _, row in files.iterrows():
        if row["uri"] not in by_uri.index:
            keep.append(True)
            skips.append([])
            continue
        seen = set(by_uri.at[row["uri"], "hdus"])
        wanted = set(row["hdus"]) if row["hdus"] else None
        complete = wanted <= seen if wanted else len(seen) >= int(by_uri.at[row["uri"], "n"])
        keep.append(not complete)
        skips.append(sorted(seen))
    return files.assign(skip_hdus=skips)[keep].reset_index(drop=True)


def write_table(df: pd.DataFrame, path: str, fmt: str, storage_options: dict | None = None) -> None:
    """Write a table as parquet, csv, FITS binary table or VOTable; atomically (temporary name, then rename)."""
    fs, target = fsspec.core.url_to_fs(path, **(storage_options or {}))
    tmp = f"{target}.tmp"
    with fs.open(tmp, "wb") as fh:
        if fmt == "parquet":
            df.to_parquet(fh, index=False)
        elif fmt == "csv":
            fh.write(df.to_csv(index=False).encode())
        else:
            from astropy.table import Table

            table = Table.from_pandas(df.reset_index(drop=True))
            for name in table.colnames:
                if table[name].dtype == object:
                    table[name] = table[name].astype(str)
            table.write(fh, format="fits" if fmt == "fits" else "votable")
    fs.mv(tmp, target)


def _use_gpu(cfg: ClassifyConfig) -> bool:
    if cfg.use_gpu is not None:
        return cfg.use_gpu
    if cfg.device == "cpu":
        return False
    if ray.cluster_resources().get("GPU", 0) > 0:
        return True
    logger.warning(
        "model_stage.use_gpu is auto (null; --gpu auto) and the cluster shows no GPU now, so the model runs on CPU actors, "
        "far slower per chip. GPU nodes that scale from zero are not visible until something asks for them: set "
        "model_stage.use_gpu: true (--gpu yes) to ask for them, or false (--gpu no) for CPU on purpose"
    )
    return False


def classify_archive(
    sources: list[str] | str,
    checkpoint: str,
    out: str,
    *,
    read: ReadConfig = ReadConfig(),
    config: ClassifyConfig = ClassifyConfig(),
    overwrite: bool = False,
    output: OutputConfig = OutputConfig(),
) -> dict[str, Any]:
    """Classify every chip of `sources` with `checkpoint` into ``out``; return the run summary (also ``summary.json``).

    `read` reaches the sources; `output` reaches ``out`` and the checkpoint (`ray_hrc.storage`: input apart from output).
    """
    start = time.perf_counter()
    opts = output.storage_options or None  # the output side: out, its parts and catalogs, and the checkpoint
    store = Storage.at(out, opts)
    fs, root = store.fs, store.root
    if overwrite and fs.exists(root):
        fs.rm(root, recursive=True)
    fs.makedirs(root, exist_ok=True)
    parts_root = _join(root, PARTS)
    state = load_checkpoint(checkpoint, opts)
    norm = norm_from_checkpoint(state)
    done_before = load_parts(fs, parts_root)
    files = plan_resume(resolve_sources(sources, read.source_options()), done_before)
    logger.info("%d file(s) to classify; %d chip(s) already catalogued in %s", len(files), len(done_before), out)
    if len(files):
        _run_pipeline(files, checkpoint, out, norm, read, config, opts)
        _record_lost_files(files, fs, parts_root, read.max_retries)
    rows = load_parts(fs, parts_root)
    new = len(rows) - len(done_before)
    summary = consolidate(rows, out, config.format, opts)
    wall = time.perf_counter() - start
    summary.update(new_chips=int(new), wall_s=round(wall, 2), chips_per_s=round(new / wall, 3) if wall > 0 else None, checkpoint=checkpoint)
    with fs.open(_join(root, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    return summary


def _run_pipeline(
    files: pd.DataFrame, checkpoint: str, out: str, norm, read: ReadConfig, config: ClassifyConfig, opts: dict | None
) -> None:
    """read + crop + normalise (CPU tasks) -> model (actor pool) -> Parquet parts under ``out/_parts``, streaming."""
    gpu = _use_gpu(config)
    ctx = ray.data.DataContext.get_current()
    saved = ctx.max_errored_blocks
    # A file whose task dies on every retry becomes an error row (`_record_lost_files`), not a failed run. Set before
    # the dataset is built: a Dataset keeps a copy of the DataContext taken when it is created.
    ctx.max_errored_blocks = -1
    try:
        ds = read_chips(files, read, norm=norm).map_batches(
            ChipClassifier,
            fn_constructor_kwargs={"checkpoint": checkpoint, "device": "cuda" if gpu else "cpu", "storage_options": opts},
            batch_size=config.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(min_size=config.min_actors, max_size=config.max_actors),
            num_gpus=config.gpus_per_actor if gpu else 0,
            num_cpus=config.cpus_per_actor,
        )
        parts = _join(out, PARTS)
        if "://" in out:
            ds.write_parquet(parts.split("://", 1)[1], filesystem=_arrow_fs(out, opts))
        else:
            ds.write_parquet(parts)
    finally:
        ctx.max_errored_blocks = saved


def _record_lost_files(files: pd.DataFrame, fs, parts_root: str, attempts: int) -> None:
    """Files that left no row at all (their task kept dying: a poisoned file, a lost node) become error rows."""
    seen = set(load_parts(fs, parts_root)["uri"])
    lost = [u for u in files["uri"] if u not in seen]
    if not lost:
        return
    rows = []
    for uri, hdus in zip(files["uri"], files["hdus"], strict=True):
        if uri in lost:
            for hdu in hdus or [-1]:
                rows.append({"uri": uri, "hdu": int(hdu), "obsid": "", "n_in_file": 0, "error_class": "unreadable",
                             "error": f"{uri}: the read/classify task failed {attempts + 1} times (a worker died); recorded as an error"})  # fmt: skip
    logger.error("%d file(s) could not be processed after retries; see the errors table", len(lost))
    with fs.open(f"{parts_root}/lost-{int(time.time() * 1e3)}.parquet", "wb") as fh:
        pd.DataFrame(rows).to_parquet(fh, index=False)


def _arrow_fs(uri: str, storage_options: dict | None):
    """A pyarrow filesystem for `uri` built from the same fsspec options (endpoint, credentials)."""
    return Storage.at(uri, storage_options).pyarrow()


def consolidate(rows: pd.DataFrame, out: str, fmt: str, storage_options: dict | None = None) -> dict[str, Any]:
    """Parts -> ``catalog.<ext>`` (one row per chip) and ``errors.<ext>``; returns counts for the summary."""
    ext = FORMATS[fmt]
    good = rows[rows["error_class"] == ""].sort_values(["uri", "hdu"]) if len(rows) else rows
    bad = rows[rows["error_class"] != ""].sort_values(["uri", "hdu"]) if len(rows) else rows
    columns = list(CATALOG_COLUMNS)
    if len(good) and "label_true" in good and (good["label_true"] != "").any():
        columns += ["label_true", "body"]
    columns += [c for c in ("preprocess_ms", "classify_ms") if c in good]
    catalog = good.reindex(columns=columns)
    errors = bad.reindex(columns=ERROR_TABLE_COLUMNS)
    write_table(catalog, _join(out, f"catalog.{ext}"), fmt, storage_options)
    write_table(errors, _join(out, f"errors.{ext}"), fmt, storage_options)
    summary: dict[str, Any] = {
        "catalog": _join(out, f"catalog.{ext}"),
        "errors_table": _join(out, f"errors.{ext}"),
        "chips": int(len(catalog)),
        "failed": int(len(errors)),
        "by_label": {k: int(v) for k, v in catalog["label"].value_counts().items()} if len(catalog) else {},
    }
    if len(errors):
        summary["failed_by_class"] = {k: int(v) for k, v in errors["error_class"].value_counts().items()}
    if len(catalog):
        summary["mean_preprocess_ms"] = float(np.nanmean(catalog["preprocess_ms"])) if "preprocess_ms" in catalog else None
        summary["mean_classify_ms"] = float(np.nanmean(catalog["classify_ms"])) if "classify_ms" in catalog else None
    return summary


def config_dict(cfg: ClassifyConfig) -> dict:
    return asdict(cfg)
