"""Ray Train overhead: one Ray Train worker fed by Ray Data against a plain PyTorch loop, same everything else.

Both loops run the same `step_loop`: `ray_hrc.train.batch_to_tensors` (normalise inside the loop, as
`train_loop_per_worker` does) and `ray_hrc.train.train_step`, on the same labelled chip rows in the same order,
with the same seeded narrow HR-CelestialNet (channels_last), AdamW, batch size and number of steps, one torch
thread each. The plain loop takes its batches from a list in memory; the Ray Train worker
(`ray.train.torch.TorchTrainer`, one worker, 1 CPU, `prepare_model`) takes them from its dataset shard
(``get_dataset_shard("train").iter_batches``) of the same rows held in Ray's object store.

The figure is steady-state samples per second (after `warmup` steps) of Ray Train over the plain loop; each step
is split into the wait for its batch and the compute, so that an overhead shows where it comes from. The wall
time of ``TorchTrainer.fit()`` (worker start-up included) is reported next to the plain loop's for reference.
Repeats alternate which loop runs first.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from bench.common import CHIP_SHAPE

logger = logging.getLogger(__name__)


def step_loop(batches: Iterable[dict], config: dict) -> dict:
    """Train steps over `batches`; steady-state chips/s after `config["warmup"]` steps, fetch vs compute per step."""
    from ray_hrc.models import build_model
    from ray_hrc.preprocess import NormConfig
    from ray_hrc.train import batch_to_tensors, train_step

    torch.set_num_threads(config["threads"])
    torch.manual_seed(config["seed"])
    model = build_model("hrcelestialnet", width=config["width"], input_shape=list(CHIP_SHAPE)).to(memory_format=torch.channels_last)
    if config.get("ray"):
        import ray.train.torch

        model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    norm = NormConfig()
    fetch = compute = 0.0
    steps = chips = 0
    losses = []
    start = steady = time.perf_counter()
    iterator = iter(batches)
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            break
        t1 = time.perf_counter()
        x, y = batch_to_tensors(batch, norm)
        losses.append(train_step(model, optimizer, x.contiguous(memory_format=torch.channels_last), y))
        t2 = time.perf_counter()
        steps += 1
        if steps == config["warmup"]:
            steady = t2
        elif steps > config["warmup"]:
            fetch += t1 - t0
            compute += t2 - t1
            chips += len(y)
    end = time.perf_counter()
    measured = max(1, steps - config["warmup"])
    return {
        "chips_per_s": chips / (end - steady),
        "fetch_s_per_step": fetch / measured,
        "compute_s_per_step": compute / measured,
        "steps": steps,
        "chips": chips,
        "loop_s": end - start,
        "threads": torch.get_num_threads(),
        "losses": losses,
    }


def ray_train_loop(config: dict) -> None:
    """The Ray Train worker: `step_loop` over this worker's shard of the "train" dataset; reports its timings.

    Ray Train attaches reported metrics to a checkpoint, so the timings travel with an (otherwise empty) one.
    """
    import tempfile

    import ray.train

    shard = ray.train.get_dataset_shard("train")
    result = step_loop(shard.iter_batches(batch_size=config["batch_size"], batch_format="numpy"), {**config, "ray": True})
    with tempfile.TemporaryDirectory() as d:
        ray.train.report(result, checkpoint=ray.train.Checkpoint.from_directory(d))


def labelled_rows(files: list[str], n: int) -> list[dict]:
    """`n` chip rows (pixels, amp_bias, label_true) read from `files` with `ray_hrc.data.read_chips`, cycled if needed.

    Labels alternate galaxy/NSC: the figure is about speed, and both loops see the same rows in the same order.
    """
    from ray_hrc.checkpoint import CLASS_NAMES
    from ray_hrc.data import ReadConfig, good_chips, read_chips

    rows = good_chips(read_chips(files, ReadConfig())).select_columns(["pixels", "amp_bias"]).take(n)
    if not rows:
        raise RuntimeError(f"no chip could be read from {files}")
    out = []
    for i in range(n):
        row = rows[i % len(rows)]
        out.append({"pixels": np.asarray(row["pixels"]), "amp_bias": np.asarray(row["amp_bias"]), "label_true": CLASS_NAMES[i % 2]})
    return out


def measure(
    files: list[str], workdir: Path, width: float = 0.0625, batch_size: int = 2, steps: int = 6, warmup: int = 1, repeats: int = 3
) -> dict:
    """Steady-state chips/s of one Ray Train worker over a plain loop (median of `repeats`, interleaved)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    config = {"width": width, "batch_size": batch_size, "warmup": warmup, "seed": 0, "threads": 1}
    n = batch_size * (warmup + steps)
    dataset = ray.data.from_items(labelled_rows(files, n)).materialize()
    plain_batches = list(dataset.iter_batches(batch_size=batch_size, batch_format="numpy"))
    threads = torch.get_num_threads()

    def plain() -> dict:
        t0 = time.perf_counter()
        try:
            result = step_loop(plain_batches, config)
        finally:
            torch.set_num_threads(threads)
        return {**result, "wall_s": time.perf_counter() - t0}

    def ray_train(r: int) -> dict:
        trainer = TorchTrainer(
            ray_train_loop,
            train_loop_config=config,
            scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=False, resources_per_worker={"CPU": 1}),
            run_config=ray.train.RunConfig(name=f"overhead_{r}", storage_path=str(workdir / "ray_train")),
            datasets={"train": dataset},
        )
        t0 = time.perf_counter()
        result = trainer.fit()
        wall = time.perf_counter() - t0
        if not result.metrics:
            raise RuntimeError(f"the Ray Train run reported no metrics (error: {result.error})")
        return {**result.metrics, "wall_s": wall}

    runs: dict[str, list[dict]] = {"plain": [], "ray": []}
    for r in range(repeats):
        order = ("plain", "ray") if r % 2 == 0 else ("ray", "plain")
        for name in order:
            runs[name].append(plain() if name == "plain" else ray_train(r))
        logger.info(
            "train repeat %d: ray %.3f chips/s, plain %.3f chips/s", r + 1, runs["ray"][-1]["chips_per_s"], runs["plain"][-1]["chips_per_s"]
        )

    def med(name: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[name])

    same_losses = all(np.allclose(a["losses"], b["losses"], rtol=1e-4, atol=1e-5) for a, b in zip(runs["plain"], runs["ray"], strict=True))
    return {
        "train_ray_vs_plain": med("ray", "chips_per_s") / med("plain", "chips_per_s"),
        "train_ray_chips_per_s": med("ray", "chips_per_s"),
        "train_plain_chips_per_s": med("plain", "chips_per_s"),
        "train_ratio_per_repeat": [r["chips_per_s"] / p["chips_per_s"] for r, p in zip(runs["ray"], runs["plain"], strict=True)],
        "train_fetch_s_per_step": {"ray": med("ray", "fetch_s_per_step"), "plain": med("plain", "fetch_s_per_step")},
        "train_compute_s_per_step": {"ray": med("ray", "compute_s_per_step"), "plain": med("plain", "compute_s_per_step")},
        "train_fit_wall_s": med("ray", "wall_s"),
        "train_plain_wall_s": med("plain", "wall_s"),
        "train_same_losses": bool(same_losses),
        "train_threads": {"ray": runs["ray"][0]["threads"], "plain": runs["plain"][0]["threads"]},
        "width": width,
        "batch_size": batch_size,
        "steps": steps,
        "warmup": warmup,
        "repeats": repeats,
        "runs": {k: [{kk: vv for kk, vv in run.items() if kk != "losses"} for run in v] for k, v in runs.items()},
    }
