"""`ray-hrc classify`: a whole archive -> a labelled catalog, in one streaming Ray Data pipeline.

read + crop + normalise (CPU tasks) -> `ChipClassifier` (an autoscaling actor pool, GPUs where there are any) ->
Parquet parts under ``OUT/_parts`` as chips finish, indexed by the driver (`ray_hrc.parts`). Nothing is
materialised: memory stays flat as the archive grows. At the end the parts are streamed into ``OUT/catalog.<fmt>``
and ``OUT/errors.<fmt>``, each written under a temporary name and renamed, so a half-written file is never mistaken
for a catalog. A rerun with the same ``OUT`` and checkpoint skips every chip already catalogued or failed for good
and retries transient failures (resume); another checkpoint is refused; ``overwrite=True`` starts over.

Failures: a bad file or chip is a row of the errors table; a read task that dies on every retry leaves ``lost`` rows
per (uri, hdu); an exception in the model stage, after retries, stops the run with `ModelStageError`.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch

from ray_hrc.catalog_formats import FORMATS, check_format, write_table
from ray_hrc.checkpoint import load_checkpoint, norm_from_checkpoint
from ray_hrc.chips import META_FIELDS
from ray_hrc.data import ERROR_COLUMNS, LABEL_COLUMNS, ReadConfig, read_chips
from ray_hrc.manifest import resolve_sources
from ray_hrc.models import PRECISIONS
from ray_hrc.parts import (
    ERROR_TABLE_COLUMNS,
    INDEX_COLUMNS,
    INDEX_TYPES,
    PARTS,
    ModelStageError,
    ResumeRefusedError,
    RunFailedError,
    best_rows,
    check_checkpoint,
    checkpoint_id,
    compact,
    done_rows,
    index_of,
    load_index,
    lost_rows,
    new_run_id,
    remove_run_outputs,
    write_index_segment,
    write_part,
)
from ray_hrc.parts import consolidate as consolidate_parts
from ray_hrc.predict import CATALOG_COLUMNS, ChipClassifier, precision_counts
from ray_hrc.runtime import retry_bounds_as_remote_args
from ray_hrc.storage import OutputConfig, Storage

logger = logging.getLogger(__name__)

INDEX_SEGMENT_ROWS = 50_000  # the driver writes an index segment every this many rows ...
INDEX_SEGMENT_S = 60.0  # ... or this many seconds, whichever comes first
__all__ = [
    "ClassifyConfig",
    "ERROR_TABLE_COLUMNS",
    "ModelStageError",
    "ResumeRefusedError",
    "RunFailedError",
    "classify_archive",
    "consolidate",
]


@dataclass(frozen=True)
class ClassifyConfig:
    """How the model stage runs."""

    batch_size: int = 4  # chips per model call
    min_actors: int = 1  # model actor pool: autoscales between min_actors and max_actors
    max_actors: int | None = None  # None: as many as resources allow
    use_gpu: bool | None = None  # None: use GPUs when the cluster has any
    gpus_per_actor: float = 1.0
    cpus_per_actor: float = 1.0
    max_retries: int = 3  # a model batch that raises is tried again this often (a dead actor is restarted as often), then the run fails
    part_rows: int = 256  # chips per part file under OUT/_parts: fewer files to consolidate, more work redone after a crash
    device: str = "auto"  # "auto", "cpu" or "cuda"
    format: str = "parquet"  # catalog format: parquet, csv, fits (binary table), votable or hats (HEALPix-partitioned, for LSDB)
    precision: str = "auto"  # model forward: "auto" (bf16 on CPUs with AMX/AVX-512 BF16 and bf16 GPUs, else fp32), "fp32" or "bf16"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision is {self.precision!r}; expected one of {list(PRECISIONS)}")
        check_format(self.format)


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


def plan_resume(files: pd.DataFrame, done: pd.DataFrame) -> pd.DataFrame:
    """Drop files whose chips are all settled (`done`: uri, hdu, n_in_file); for partly done files, list the HDUs to skip.

    A file the manifest lists by HDU is done when each of those HDUs is; a file read whole when it has as many rows
    as it holds chips (``n_in_file``). Vectorised: a million chips plan in seconds.
    """
    if done.empty or files.empty:
        return files.assign(skip_hdus=[[] for _ in range(len(files))])
    keys = done[["uri", "hdu"]].astype({"uri": str, "hdu": "int64"}).drop_duplicates()
    per_uri = done.groupby("uri").agg(n=("n_in_file", "max")).join(keys.groupby("uri").size().rename("seen"))
    listed = files["hdus"].map(len) > 0
    wanted = files.loc[listed, ["uri", "hdus"]].explode("hdus").rename(columns={"hdus": "hdu"}).astype({"uri": str, "hdu": "int64"})
    missing = wanted.merge(keys, on=["uri", "hdu"], how="left", indicator=True)
    incomplete = set(missing.loc[missing["_merge"] == "left_only", "uri"])
    whole = files.loc[~listed, ["uri"]].join(per_uri, on="uri")
    incomplete |= set(whole.loc[~(whole["seen"] >= whole["n"]), "uri"])
    kept = files[files["uri"].isin(incomplete)].reset_index(drop=True)
    seen = keys[keys["uri"].isin(incomplete)].sort_values("hdu").groupby("uri")["hdu"].agg(list)
    return kept.assign(skip_hdus=[list(map(int, seen.get(u, []))) for u in kept["uri"]])


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
    Raises `ModelStageError` when the model stage fails (the parts written so far stay, for a rerun to resume), and
    `ResumeRefusedError` when ``out`` holds another checkpoint's parts, or ``overwrite`` would remove files a run
    did not write. Bad inputs are not exceptions: they are rows of the errors table (``summary["failed"]``).
    """
    start = time.perf_counter()
    opts = output.storage_options or None  # the output side: out, its parts and catalogs, and the checkpoint
    store = Storage.at(out, opts)
    fs, root = store.fs, store.root
    if overwrite:
        remove_run_outputs(fs, root, out, FORMATS.values())
    fs.makedirs(root, exist_ok=True)
    parts_root = _join(root, PARTS)
    try:
        state = load_checkpoint(checkpoint, opts)
    except (FileNotFoundError, ValueError):
        raise
    except Exception as exc:  # noqa: BLE001 - torch.load's many ways to fail on a corrupt file
        raise ValueError(f"{checkpoint} could not be loaded as a checkpoint: {type(exc).__name__}: {exc}") from exc
    norm = norm_from_checkpoint(state)
    ckpt_id = checkpoint_id(state)
    index = load_index(fs, parts_root)
    check_checkpoint(index, ckpt_id, checkpoint, out)
    done_before = done_rows(best_rows(index))
    files = plan_resume(resolve_sources(sources, read.source_options()), done_before)
    logger.info("%d file(s) to classify; %d chip(s) already settled in %s", len(files), len(done_before), out)
    run_id = new_run_id()
    new = lost = 0
    if len(files):
        run_index = _run_pipeline(files, checkpoint, ckpt_id, out, norm, read, config, opts, run_id)
        missing = lost_rows(files, run_index, read.max_retries, ckpt_id, run_id)
        if len(missing):
            logger.error(
                "%d chip(s) or file(s) were lost after %d retries; they are in the errors table, and a rerun retries them",
                len(missing),
                read.max_retries,
            )
            name = f"part-{run_id}-lost.parquet"
            table = pa.Table.from_pandas(missing, preserve_index=False)
            write_part(fs, parts_root, name, table)
            write_index_segment(fs, parts_root, index_of(table, name), f"{run_id}-lost.parquet")
            run_index = pd.concat([run_index, index_of(table, name).to_pandas()], ignore_index=True)
        new, lost = int((run_index["error_class"] == "").sum()), len(missing)
        index = compact(pd.concat([index, run_index], ignore_index=True))
    summary = consolidate(index, out, config.format, opts)
    wall = time.perf_counter() - start
    summary.update(
        new_chips=new, lost=lost, wall_s=round(wall, 2), chips_per_s=round(new / wall, 3) if wall > 0 else None, checkpoint=checkpoint,
        checkpoint_id=ckpt_id, run=run_id, files_planned=len(files),
        precision=_precision_counts(fs, root, run_index) if len(files) else {},
    )  # fmt: skip
    with fs.open(_join(root, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    return summary


class _ModelStage:
    """The model stage's actor: `ChipClassifier`, each batch tried up to ``1 + max_retries`` times.

    A batch that fails on every attempt (CUDA out of memory, a checkpoint the model cannot run) is returned as one row
    per chip with ``model_error`` set, which the driver turns into `ModelStageError`: it never becomes a catalog or
    error row. So does a checkpoint that fails to load on the actor. Rows carry ``checkpoint_id``.
    """

    def __init__(
        self, checkpoint: str, checkpoint_id: str, device: str, storage_options: dict | None, max_retries: int, precision: str = "auto"
    ):
        self.checkpoint, self.checkpoint_id, self.max_retries = checkpoint, checkpoint_id, max_retries
        self.classifier, self.init_error, self.failed = None, "", ""
        try:
            self.classifier = ChipClassifier(checkpoint, device=device, storage_options=storage_options, precision=precision)
        except Exception as exc:  # noqa: BLE001 - reported with the first chip it would have classified
            self.init_error = f"loading the checkpoint on the model actor failed: {type(exc).__name__}: {exc}"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["uri"])
        if self.failed:  # the run is stopping: later batches go straight through, so the driver hears of it soon
            return self._failure_rows(batch, self.failed)
        error, attempts = self.init_error, 0
        while self.classifier is not None and attempts <= self.max_retries:
            attempts += 1
            try:
                out = self.classifier(batch)
                out.update(checkpoint_id=np.full(n, self.checkpoint_id), model_error=np.full(n, ""))
                return out
            except Exception as exc:  # noqa: BLE001 - retried, then reported to the driver, which stops the run
                error = f"{type(exc).__name__}: {exc}"
                logger.warning("model stage attempt %d on %s HDU %s failed: %s", attempts, batch["uri"][0], batch["hdu"][0], error)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        where = f"{batch['uri'][0]} HDU {int(batch['hdu'][0])}"
        self.failed = (
            f"the model stage failed on {where} (the first chip of a batch of {n}) with checkpoint {self.checkpoint} "
            f"({self.checkpoint_id}) after {max(attempts, 1)} attempt(s): {error}"
        )
        return self._failure_rows(batch, self.failed)

    def _failure_rows(self, batch: dict[str, np.ndarray], message: str) -> dict[str, np.ndarray]:
        """The batch's rows with ``model_error`` set and no prediction: the driver stops the run on seeing one."""
        n = len(batch["uri"])
        out = {k: batch[k] for k in META_FIELDS + LABEL_COLUMNS + ERROR_COLUMNS + ["n_in_file"] if k in batch}
        out.update(
            label=np.full(n, ""), p_galaxy=np.full(n, np.nan), p_nsc=np.full(n, np.nan), model=np.full(n, ""), checkpoint=np.full(n, ""),
            preprocess_ms=np.zeros(n), classify_ms=np.zeros(n), checkpoint_id=np.full(n, self.checkpoint_id), model_error=np.full(n, message),
        )  # fmt: skip
        return out


def write_parts(batch: pa.Table, out: str, storage_options: dict | None, run_id: str, max_retries: int) -> pa.Table:
    """The write stage: the batch's classified rows -> one part under ``out/_parts``; returns their index rows.

    Rows whose model stage failed (``model_error``) are not written: they come back to the driver, which stops the
    run. So does a part that cannot be written after retries (``run_error``): a broken output is not a bad input.
    """
    failed = pc.not_equal(batch["model_error"], "")
    rows = batch.filter(pc.invert(failed)).drop_columns(["model_error"])
    index = pa.table({c: pa.array([], t) for c, t in zip(INDEX_COLUMNS, INDEX_TYPES, strict=True)})
    run_error = ""
    if rows.num_rows:
        name = f"part-{run_id}-{uuid.uuid4().hex[:12]}.parquet"
        for attempt in range(max_retries + 1):
            try:
                store = Storage.at(out, storage_options)
                fs, root = store.fs, store.root
                write_part(fs, _join(root, PARTS), name, rows)
                index, run_error = index_of(rows, name), ""
                break
            except Exception as exc:  # noqa: BLE001 - retried, then reported to the driver, which stops the run
                run_error = f"writing {_join(out, PARTS)}/{name} failed {attempt + 1} time(s): {type(exc).__name__}: {exc}"
    index = index.append_column("model_error", pa.array([""] * index.num_rows, pa.string()))
    index = index.append_column("run_error", pa.array([""] * index.num_rows, pa.string()))
    bad = batch.filter(failed)
    if bad.num_rows or run_error:
        first = (bad if bad.num_rows else rows).slice(0, 1)
        blank = {c: pa.array([None], t) for c, t in zip(INDEX_COLUMNS, INDEX_TYPES, strict=True)}
        blank.update(uri=first["uri"].cast(pa.string()), hdu=first["hdu"].cast(pa.int64()))
        model_error = first["model_error"].cast(pa.string()) if bad.num_rows else pa.array([""])
        index = pa.concat_tables([index, pa.table({**blank, "model_error": model_error, "run_error": pa.array([run_error])})])
    return index


def _run_pipeline(
    files: pd.DataFrame,
    checkpoint: str,
    ckpt_id: str,
    out: str,
    norm,
    read: ReadConfig,
    config: ClassifyConfig,
    opts: dict | None,
    run_id: str,
) -> pd.DataFrame:
    """read + crop + normalise (CPU tasks) -> model (actor pool) -> parts under ``out/_parts``, streaming.

    Returns the index rows of the parts this run wrote; the driver writes them as index segments as they arrive. A
    read task that dies on every retry (a poisoned file, a lost node) is skipped by Ray Data (``max_errored_blocks``
    -1) and its chips are accounted afterwards (`ray_hrc.parts.lost_rows`); a Python exception while reading is
    already an error row. A model-stage failure comes back as a ``model_error`` row and stops the run.
    """
    gpu = _use_gpu(config)
    store = Storage.at(out, opts)
    fs, root = store.fs, store.root
    parts_root = _join(root, PARTS)
    ctx = ray.data.DataContext.get_current()
    saved = ctx.max_errored_blocks
    # Set before the dataset is built: a Dataset keeps a copy of the DataContext taken when it is created.
    ctx.max_errored_blocks = -1
    try:
        ds = read_chips(files, read, norm=norm)
        with retry_bounds_as_remote_args():
            ds = ds.map_batches(
                _ModelStage,
                fn_constructor_kwargs={
                    "checkpoint": checkpoint,
                    "checkpoint_id": ckpt_id,
                    "device": "cuda" if gpu else "cpu",
                    "storage_options": opts,
                    "max_retries": config.max_retries,
                    "precision": config.precision,
                },  # fmt: skip
                batch_size=config.batch_size,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(min_size=config.min_actors, max_size=config.max_actors),
                num_gpus=config.gpus_per_actor if gpu else 0,
                num_cpus=config.cpus_per_actor,
                max_task_retries=config.max_retries,  # an actor that dies mid-batch is restarted and the batch retried, this often
            )
        ds = ds.map_batches(
            write_parts, fn_kwargs={"out": out, "storage_options": opts, "run_id": run_id, "max_retries": config.max_retries},
            batch_size=config.part_rows,
            batch_format="pyarrow", num_cpus=0.25,
        )  # fmt: skip
    finally:
        ctx.max_errored_blocks = saved
    written, pending, segment, flushed = [], [], 0, time.monotonic()

    def flush() -> None:
        nonlocal pending, segment, flushed
        if pending:
            write_index_segment(fs, parts_root, pa.concat_tables(pending), f"{run_id}-{segment:05d}.parquet")
            segment, pending, flushed = segment + 1, [], time.monotonic()

    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            failed = batch.filter(pc.not_equal(batch["model_error"], ""))
            if failed.num_rows:
                raise ModelStageError(failed["model_error"][0].as_py())
            failed = batch.filter(pc.not_equal(batch["run_error"], ""))
            if failed.num_rows:
                raise RunFailedError(failed["run_error"][0].as_py())
            rows = batch.drop_columns(["model_error", "run_error"]).filter(pc.is_valid(batch["part"]))
            written.append(rows)
            pending.append(rows)
            if sum(t.num_rows for t in pending) >= INDEX_SEGMENT_ROWS or time.monotonic() - flushed > INDEX_SEGMENT_S:
                flush()
    finally:
        flush()  # the parts written before a failure stay indexed, for a rerun to resume from
    if not written:
        return pd.DataFrame({c: pd.Series(dtype=t.to_pandas_dtype()) for c, t in zip(INDEX_COLUMNS, INDEX_TYPES, strict=True)})
    return pa.concat_tables(written).to_pandas()


def consolidate(rows_index: pd.DataFrame, out: str, fmt: str, storage_options: dict | None = None) -> dict[str, Any]:
    """``out/_parts`` (as `rows_index` indexes them) -> ``catalog.<ext>`` and ``errors.<ext>``; counts for the summary."""
    store = Storage.at(out, storage_options)
    fs, root = store.fs, store.root
    return consolidate_parts(fs, root, out, rows_index, fmt, FORMATS[fmt], list(CATALOG_COLUMNS), storage_options, write_table)


def _precision_counts(fs, root: str, run_index: pd.DataFrame) -> dict[str, int]:
    """Chips per forward precision in this run's parts (their ``precision`` column alone), for the summary."""
    import pyarrow.parquet as pq

    counts: dict[str, int] = {}
    parts = run_index["part"].dropna().unique() if "part" in run_index else []
    for name in parts:
        path = _join(_join(root, PARTS), str(name))
        try:
            with fs.open(path, "rb") as fh:
                table = pq.read_table(fh, columns=["precision", "error_class"])
        except (FileNotFoundError, KeyError, ValueError, OSError):
            continue  # a part without the column (written before it existed) or gone: not counted
        for k, v in precision_counts(table.to_pandas()).items():
            counts[k] = counts.get(k, 0) + v
    return counts


def config_dict(cfg: ClassifyConfig) -> dict:
    return asdict(cfg)
