"""The classification pipeline: `ray-hrc classify` (`ray_hrc.classify.classify_archive`) over N and k x N files.

Pipeline efficiency: chips per second of the whole pipeline over the k x N files against its slowest stage run
alone over the same files, on the same Ray cluster, with the same per-stage settings:

* read stage alone: `ray_hrc.data.read_chips(files, norm=...)` (read + crop + bias + normalise, one task per file)
  consumed to the end (``materialize``: every normalised chip lands in the object store, as in the pipeline);
* model stage alone: those materialised chips through the same ``map_batches(ChipClassifier, ...)`` actor pool
  (`ray_hrc.classify.ClassifyConfig`'s defaults) and the same Parquet writer.

Peak memory: driver + every Ray process + the object store (`bench.common.MemorySampler`, every 0.2 s) during the
pipeline over k x N files against the same over N files; streaming keeps the ratio near 1, materialising makes it
grow with k. Repeats are interleaved (pipeline N, pipeline kN, read alone, model alone; again) and each figure is
the median.

Bytes per chip in the object store: the read stage's output bytes over its output rows, from Ray Data's own stats
(`Dataset.get_stats_summary`, operator ``FlatMap(chip_rows)``).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import pandas as pd

from bench.common import MIB, MemorySampler, median, wait_for_empty_store

logger = logging.getLogger(__name__)

READ_OPERATOR = "FlatMap(chip_rows)"


def _catalog_stats(frame: pd.DataFrame, wall: float) -> dict:
    """Per-chip model and preprocessing time from the rows the pipeline wrote, and the model actors' busy share."""
    good = frame[frame["error_class"] == ""] if "error_class" in frame else frame
    return {
        "chips": int(len(good)),
        "classify_ms_mean": float(good["classify_ms"].mean()),
        "preprocess_ms_mean": float(good["preprocess_ms"].mean()) if "preprocess_ms" in good else None,
        # seconds of model time per second of wall time: about the number of model actors kept busy
        "model_concurrency": float(good["classify_ms"].sum() / 1e3 / wall),
    }


def run_pipeline(files: list[str], checkpoint: str, out: Path) -> dict:
    """`classify_archive` over `files` with the CLI's defaults on CPU, under the memory sampler."""
    from ray_hrc.classify import ClassifyConfig, classify_archive
    from ray_hrc.data import ReadConfig

    wait_for_empty_store()
    with MemorySampler() as memory:
        t0 = time.perf_counter()
        summary = classify_archive(files, checkpoint, str(out), read=ReadConfig(), config=ClassifyConfig(device="cpu"), overwrite=True)
        wall = time.perf_counter() - t0
    catalog = pd.read_parquet(summary["catalog"])
    result = {"wall_s": wall, "chips_per_s": summary["chips"] / wall, "failed": summary["failed"], **_catalog_stats(catalog, wall)}
    result.update(memory.result())
    return result


def read_stage_stats(ds) -> dict:
    """Output rows and bytes of the read stage, from Ray Data's stats of an executed dataset."""
    summary = ds.get_stats_summary()
    ops = [op for s in [summary, *summary.parents] for op in s.operators_stats if READ_OPERATOR in op.operator_name]
    if not ops or not ops[-1].output_num_rows or not ops[-1].output_size_bytes:
        raise RuntimeError(f"no {READ_OPERATOR} operator with output stats in {[op.operator_name for op in summary.operators_stats]}")
    op = ops[-1]
    rows, size = int(op.output_num_rows.sum), int(op.output_size_bytes.sum)
    return {"operator": op.operator_name, "rows": rows, "bytes": size, "mib_per_chip": size / rows / MIB}


def run_stages_alone(files: list[str], checkpoint: str, out: Path) -> dict:
    """The read stage alone (materialised), then the model stage alone on its output; wall time of each.

    Both run under the same memory sampler as the pipeline, so that its (small) cost is the same on both sides.
    The materialised chips are released, and the object store drained, before returning.
    """
    import ray

    from ray_hrc.checkpoint import load_checkpoint, norm_from_checkpoint
    from ray_hrc.classify import ClassifyConfig
    from ray_hrc.data import ReadConfig, read_chips
    from ray_hrc.predict import ChipClassifier

    norm = norm_from_checkpoint(load_checkpoint(checkpoint))
    read, config = ReadConfig(), ClassifyConfig(device="cpu")
    if out.exists():
        shutil.rmtree(out)
    with MemorySampler():
        t0 = time.perf_counter()
        chips = read_chips(files, read, norm=norm).materialize()
        read_wall = time.perf_counter() - t0
    rows = chips.count()
    stats = read_stage_stats(chips)
    with MemorySampler():
        t0 = time.perf_counter()
        chips.map_batches(  # as ray_hrc.classify._run_pipeline builds its model stage on CPU
            ChipClassifier,
            fn_constructor_kwargs={"checkpoint": checkpoint, "device": "cpu", "storage_options": None},
            batch_size=config.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(min_size=config.min_actors, max_size=config.max_actors),
            num_gpus=0,
            num_cpus=config.cpus_per_actor,
        ).write_parquet(str(out))
        model_wall = time.perf_counter() - t0
    del chips
    left = wait_for_empty_store()
    frame = pd.read_parquet(out)
    return {
        "read": {"wall_s": read_wall, "chips": rows, "chips_per_s": rows / read_wall},
        "model": {"wall_s": model_wall, "chips_per_s": rows / model_wall, **_catalog_stats(frame, model_wall)},
        "object_store": stats,
        "object_store_left_mib": left / MIB,
    }


def measure(small: list[str], big: list[str], checkpoint: str, workdir: Path, repeats: int = 2, warmup: bool = True) -> dict:
    """Pipeline efficiency over `big`, peak memory over `big` against `small`, object-store bytes per chip."""
    from ray_hrc.classify import ClassifyConfig, classify_archive
    from ray_hrc.data import ReadConfig

    if warmup:  # untimed: starts Ray's worker processes and imports the model code in them
        classify_archive(
            small[:1], checkpoint, str(workdir / "warmup"), read=ReadConfig(), config=ClassifyConfig(device="cpu"), overwrite=True
        )
    runs: dict[str, list[dict]] = {"pipeline_small": [], "pipeline_big": [], "read_alone": [], "model_alone": []}
    store = None
    for r in range(repeats):
        runs["pipeline_small"].append(run_pipeline(small, checkpoint, workdir / "catalog_small"))
        runs["pipeline_big"].append(run_pipeline(big, checkpoint, workdir / "catalog_big"))
        alone = run_stages_alone(big, checkpoint, workdir / "model_alone")
        runs["read_alone"].append(alone["read"])
        runs["model_alone"].append(alone["model"])
        store = alone["object_store"]
        logger.info(
            "pipeline repeat %d: %.3f chips/s (read alone %.3f, model alone %.3f)",
            r + 1, runs["pipeline_big"][-1]["chips_per_s"], alone["read"]["chips_per_s"], alone["model"]["chips_per_s"],
        )  # fmt: skip

    def med(kind: str, key: str) -> float | None:
        return median([run[key] for run in runs[kind]])

    stages = {"read": med("read_alone", "chips_per_s"), "model": med("model_alone", "chips_per_s")}
    slowest = min(stages, key=stages.get)
    pipeline = med("pipeline_big", "chips_per_s")
    return {
        "pipeline_efficiency": pipeline / stages[slowest],
        "pipeline_chips_per_s": pipeline,
        "pipeline_slowest_stage": slowest,
        "pipeline_slowest_stage_chips_per_s": stages[slowest],
        "pipeline_stage_chips_per_s": stages,
        "pipeline_peak_memory_ratio": med("pipeline_big", "peak_mib") / med("pipeline_small", "peak_mib"),
        "pipeline_peak_mib_small": med("pipeline_small", "peak_mib"),
        "pipeline_peak_mib_big": med("pipeline_big", "peak_mib"),
        "object_store_mib_per_chip": store["mib_per_chip"],
        "object_store_stats": store,
        "pipeline_runs": runs,
        "files_small": len(small),
        "files_big": len(big),
        "chips_small": runs["pipeline_small"][0]["chips"],
        "chips_big": runs["pipeline_big"][0]["chips"],
        "repeats": repeats,
        "peak_memory_ratio_per_repeat": [
            b["peak_mib"] / s["peak_mib"] for s, b in zip(runs["pipeline_small"], runs["pipeline_big"], strict=True)
        ],
        "efficiency_per_repeat": [
            p["chips_per_s"] / min(a["chips_per_s"], m["chips_per_s"])
            for p, a, m in zip(runs["pipeline_big"], runs["read_alone"], runs["model_alone"], strict=True)
        ],
        "model_concurrency": {
            "pipeline": med("pipeline_big", "model_concurrency"),
            "alone": med("model_alone", "model_concurrency"),
        },
        "classify_ms_mean": {"pipeline": med("pipeline_big", "classify_ms_mean"), "alone": med("model_alone", "classify_ms_mean")},
    }
