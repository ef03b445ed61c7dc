"""Data-parallel training with Ray Train: chips stream from Ray Data into `train_loop_per_worker`.

The loop reads top to bottom: build the model, `prepare_model` (DDP), restore the latest checkpoint if the run is
resuming, then per epoch `train_step` over the worker's shard, `evaluate` on the validation bodies (every worker
scores its share, the logits are all-reduced, a temperature is fitted to them), and `ray.train.report` with a
checkpoint from rank 0 that also holds every rank's RNG states.

Three parts, each by body: train, validation (from the training bodies) and test. The validation part chooses
``best/``; the test manifest is not opened until the last epoch has ended, and is then scored once with ``best/``
(`score_test`), into ``test_metrics.json`` and ``reliability.png``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import tempfile
import threading
import time
import zlib
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
import ray
import ray.train
import torch
import torch.distributed as dist
from torch import nn

from ray_hrc.checkpoint import CLASS_NAMES, load_checkpoint, save_checkpoint
from ray_hrc.config import AugmentConfig, ConfigError, JobConfig, TrainConfig, config_from_dict
from ray_hrc.data import good_chips, read_chips
from ray_hrc.manifest import SourceOptions, read_manifest, resolve_sources, split_three, write_manifest
from ray_hrc.models import build_model
from ray_hrc.models.syncbn import local_batchnorm, sync_batchnorm
from ray_hrc.preprocess import NormConfig, normalise
from ray_hrc.storage import Storage

logger = logging.getLogger(__name__)

CHIP_BYTES = 2048 * 4096 * 2
"""Object-store bytes of one raw chip row (uint16 pixels); the metadata columns are negligible."""


# --- pure pieces: batches, augmentation, steps, metrics (tested without Ray) -------------------------------------------


def label_index(labels: np.ndarray) -> np.ndarray:
    """'galaxy' -> 0, 'NSC' -> 1 (the order of `CLASS_NAMES`); anything else is an error naming the value."""
    lookup = {name: i for i, name in enumerate(CLASS_NAMES)}
    try:
        return np.array([lookup[str(v)] for v in labels], dtype=np.int64)
    except KeyError as exc:
        raise ValueError(f"label {exc.args[0]!r} is not one of {list(CLASS_NAMES)}; training needs a labelled manifest") from exc


def augment(image: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Flip, roll, blur and add noise to one normalised image (float32 (H, W)); shape is kept."""
    import cv2

    if cfg.flips:
        if rng.random() < 0.5:
            image = image[:, ::-1]
        if rng.random() < 0.5:
            image = image[::-1, :]
        image = np.ascontiguousarray(image)
    if cfg.roll:
        image = np.roll(image, (int(rng.integers(image.shape[0])), int(rng.integers(image.shape[1]))), axis=(0, 1))
    if cfg.blur_prob > 0 and rng.random() < cfg.blur_prob:
        image = cv2.GaussianBlur(image, (0, 0), sigmaX=float(rng.uniform(*cfg.blur_sigma)))
    if cfg.noise_prob > 0 and rng.random() < cfg.noise_prob:
        image = image + rng.normal(0, rng.uniform(*cfg.noise_std), image.shape).astype(np.float32)
    return image


def batch_to_tensors(
    batch: dict[str, np.ndarray], norm: NormConfig, aug: AugmentConfig | None = None, rng: np.random.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A Ray Data chip batch -> (x float32 (B, 1, H, W), y int64 (B,) or None without labels).

    The same `normalise` as batch classification and Serve; augmentation only when `aug` is given.
    """
    images = []
    for pixels, bias in zip(batch["pixels"], batch["amp_bias"], strict=True):
        image = normalise(pixels, bias, norm).astype(np.float32)
        if aug is not None and aug.enabled:
            image = augment(image, aug, rng or np.random.default_rng())
        images.append(image)
    x = torch.from_numpy(np.stack(images)[:, None])
    y = torch.from_numpy(label_index(batch["label_true"])) if "label_true" in batch else None
    return x, y


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, autocast=nullcontext) -> float:
    """One optimisation step; returns the batch's mean cross-entropy."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with autocast():
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


@torch.inference_mode()
def eval_step(model: nn.Module, x: torch.Tensor, autocast=nullcontext) -> torch.Tensor:
    """Logits for a batch, in eval mode (float32 (B, n_classes))."""
    model.eval()
    with autocast():
        return model(x).float()


def recalibrate_batchnorm(module: nn.Module, inputs: list[torch.Tensor], autocast=nullcontext) -> None:
    """Precise BatchNorm: running statistics recomputed from `inputs` with the current weights, averaged over workers.

    The running averages that training keeps mix statistics of many past weights; while weights still move fast (a
    short run, a narrow model at a high learning rate) they lag, and evaluation in eval mode suffers. This resets them
    and takes the mean of the batch statistics over `inputs` (`torch.optim.swa_utils.update_bn`, in train mode, no
    gradients), then averages them across data-parallel workers. Every worker must call it (it all-reduces).
    """
    with autocast(), local_batchnorm(module):  # each worker its own chips (and its own count of them); averaged below
        torch.optim.swa_utils.update_bn(inputs, module)
    stats = [t for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for t in (m.running_mean, m.running_var)]
    if stats and _world_size() > 1:
        device = stats[0].device  # the module's device: NCCL (GPU workers) takes no CPU tensors
        flat = all_reduce_tensor(torch.cat([t.reshape(-1).float() for t in stats]), device) / _world_size()
        for t, value in zip(stats, torch.split(flat, [t.numel() for t in stats]), strict=True):
            t.copy_(value.view_as(t))


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """The learning rate at optimizer step `step` (from 0) as a share of the configured one.

    A linear rise over the first `warmup` steps (reaching 1 at step `warmup`), then 1 ("constant") or a cosine from 1
    down to 0 at step `total` ("cosine").
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return 1.0


def lr_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR | None:
    """The per-step schedule of `cfg` (`lr_factor`), or None for a constant rate without warmup."""
    if cfg.lr_schedule not in ("constant", "cosine"):
        raise ConfigError(f"train.lr_schedule is {cfg.lr_schedule!r}; expected 'constant' or 'cosine'")
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    if cfg.lr_schedule == "constant" and warmup == 0:
        return None
    total = max(1, cfg.epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, total=total, warmup=warmup, schedule=cfg.lr_schedule))


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n: int = len(CLASS_NAMES)) -> np.ndarray:
    """Counts [true, predicted], int64 (n, n)."""
    return np.bincount(np.asarray(y_true) * n + np.asarray(y_pred), minlength=n * n).reshape(n, n).astype(np.int64)


def classification_metrics(confusion: np.ndarray) -> dict[str, float]:
    """Accuracy and per-class F1 (the paper's equations 2-5) from a confusion matrix [true, predicted]."""
    confusion = np.asarray(confusion, dtype=np.float64)
    total = confusion.sum()
    out = {"accuracy": float(np.trace(confusion) / total) if total else float("nan")}
    for i, name in enumerate(CLASS_NAMES):
        tp = confusion[i, i]
        precision = tp / confusion[:, i].sum() if confusion[:, i].sum() else 0.0
        recall = tp / confusion[i, :].sum() if confusion[i, :].sum() else 0.0
        out[f"f1_{name.lower()}"] = float(2 * precision * recall / (precision + recall)) if precision + recall else 0.0
    return out


def _owner(uri: str, hdu: int, world: int) -> int:
    """Which worker evaluates a chip: a stable hash, so every chip is scored exactly once across workers."""
    return zlib.crc32(f"{uri}#{hdu}".encode()) % world


# --- the Ray Train loop --------------------------------------------------------------------------------------------------


def rng_state(augment_rng: np.random.Generator) -> dict:
    """This process's random states as tensors and plain Python types (a checkpoint loads with ``weights_only=True``):
    the augmentation generator's, torch's (CPU and, where there is one, the current CUDA device's), numpy's global
    and Python's."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "augment": augment_rng.bit_generator.state,
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "numpy": [str(kind), [int(k) for k in keys], int(pos), int(has_gauss), float(gauss)],
        "python": random.getstate(),
    }


def set_rng_state(state: dict, augment_rng: np.random.Generator) -> None:
    """Restore what `rng_state` saved, into this process and `augment_rng`."""
    augment_rng.bit_generator.state = state["augment"]
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))


# --- collectives: the only calls into torch.distributed. Every tensor goes to the training device first: Ray Train
# starts NCCL for GPU workers, and NCCL takes no CPU tensors (gloo, for CPU workers, takes both).


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_tensor(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The element-wise sum of `tensor` over all workers, as a tensor on `device` (the model's); `tensor` itself if alone."""
    if _world_size() == 1:
        return tensor
    summed = tensor.to(device, copy=True)  # never reduce the caller's tensor in place
    dist.all_reduce(summed)
    return summed


def all_reduce(values: np.ndarray, device: torch.device) -> np.ndarray:
    """The element-wise sum of `values` over all workers (float64), reduced on `device` (the model's) and returned on the host."""
    values = np.asarray(values, dtype=np.float64)
    if _world_size() == 1:
        return values
    return all_reduce_tensor(torch.from_numpy(np.ascontiguousarray(values)), device).cpu().numpy()


def _gather_rng_states(augment_rng: np.random.Generator, world: int) -> list[dict]:
    """Every rank's `rng_state`, in rank order (a collective: every worker calls it)."""
    mine = rng_state(augment_rng)
    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return [mine]
    states: list = [None] * world
    dist.all_gather_object(states, mine)
    return states


def chip_key(uri: str, hdu: int) -> str:
    """How a chip is named across workers and manifests: ``<uri>#<hdu>``."""
    return f"{uri}#{int(hdu)}"


def logit_metrics(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0, prefix: str = "") -> dict[str, Any]:
    """Loss (cross-entropy of ``logits / temperature``), accuracy, F1 per class, confusion matrix and ECE before and
    after `temperature`, for logits float (N, C) and label indices (N,); keys prefixed by `prefix`."""
    from ray_hrc.calibration import expected_calibration_error, softmax

    confusion = confusion_matrix(labels, logits.argmax(1)) if len(labels) else np.zeros((2, 2), np.int64)
    probs = softmax(logits, temperature) if len(labels) else np.zeros((0, 2))
    nll = float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-300, None)))) if len(labels) else float("nan")
    out = {
        "loss": nll,
        **classification_metrics(confusion),
        "confusion": confusion.tolist(),
        "chips": int(len(labels)),
        "ece": expected_calibration_error(softmax(logits), labels) if len(labels) else float("nan"),
        "ece_calibrated": expected_calibration_error(probs, labels) if len(labels) else float("nan"),
    }
    return {f"{prefix}{k}": v for k, v in out.items()}


def evaluate(
    model: nn.Module, dataset, keys: dict[str, int], cfg: JobConfig, device: torch.device, autocast, rank: int, world: int
) -> tuple[np.ndarray, np.ndarray]:
    """The logits float64 (N, C) and label indices (N,) of the chips in `keys` (chip_key -> row), over all workers.

    Every worker scores the chips it owns (`_owner`) and puts their logits in their rows; one all-reduce sums the
    workers' arrays, so every worker ends with all of them. Chips that never arrive (error rows) are left out.
    """
    n, c = len(keys), len(CLASS_NAMES)
    logits, labels, seen = np.zeros((n, c)), np.zeros(n), np.zeros(n)
    per_worker = max(1, cfg.train.batch_size // max(1, world))
    module = model.module if hasattr(model, "module") else model
    for batch in dataset.iter_batches(batch_size=per_worker, batch_format="numpy"):
        mine = np.array([_owner(u, h, world) == rank for u, h in zip(batch["uri"], batch["hdu"], strict=True)])
        if not mine.any():
            continue
        batch = {k: v[mine] for k, v in batch.items()}
        rows = []
        for u, h in zip(batch["uri"], batch["hdu"], strict=True):
            if chip_key(u, h) not in keys:
                raise KeyError(f"validation chip {chip_key(u, h)} is not in the validation manifest's {n} chips")
            rows.append(keys[chip_key(u, h)])
        x, y = batch_to_tensors(batch, cfg.preprocess)
        x = x.to(device, memory_format=torch.channels_last if cfg.train.channels_last else torch.contiguous_format)
        logits[rows] = eval_step(module, x, autocast).cpu().double().numpy()
        labels[rows] = y.numpy()
        seen[rows] = 1
    totals = all_reduce(np.concatenate([logits.ravel(), labels, seen]), device)
    logits, labels, seen = totals[: n * c].reshape(n, c), totals[n * c : n * c + n], totals[n * c + n :] > 0
    return logits[seen], labels[seen].round().astype(np.int64)


def selection_score(val_accuracy: float, val_loss: float) -> float:
    """What chooses ``best/``: validation accuracy, ties broken by the lower validation loss (the loss, capped at 10,
    moves the score by at most 1e-4: a tenth of one chip's share of the accuracy in a validation set of 1,000 chips)."""
    return float(val_accuracy - 1e-5 * min(10.0, val_loss if math.isfinite(val_loss) else 10.0))


def train_loop_per_worker(loop_config: dict) -> None:
    from ray_hrc.calibration import fit_temperature

    cfg = config_from_dict(loop_config["job"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed + rank)
    rng = np.random.default_rng(cfg.train.seed + rank)

    model = build_model(cfg.model.name, **cfg.model.kwargs)
    model_args = dict(getattr(model, "model_args", cfg.model.kwargs))
    if cfg.train.sync_bn and world > 1:
        model = sync_batchnorm(model, device)  # the statistics of batch_size chips, not of batch_size / world
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    module = model.module if hasattr(model, "module") else model
    params = model.parameters()
    if cfg.train.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=cfg.train.lr, momentum=cfg.train.momentum, weight_decay=cfg.train.weight_decay)
    elif cfg.train.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    else:
        raise ConfigError(f"train.optimizer is {cfg.train.optimizer!r}; expected 'sgd' or 'adamw'")
    scheduler = lr_scheduler(optimizer, cfg.train, loop_config.get("steps_per_epoch", 1))
    use_bf16 = cfg.train.bf16 and (device.type == "cuda" or cfg.train.cpu_bf16)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext

    start_epoch, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_checkpoint(d)
        module.load_state_dict(state["model_state"])
        optimizer.load_state_dict(state["optimizer_state"])
        if scheduler is not None and state.get("scheduler_state"):
            scheduler.load_state_dict(state["scheduler_state"])
        start_epoch, history = state["epoch"] + 1, state.get("history", [])
        states = state.get("rng_state") or []
        if isinstance(states, list) and len(states) == world:
            set_rng_state(states[rank], rng)
        else:
            logger.warning("the checkpoint holds the RNG states of %d worker(s), this run has %d: fresh seeds", len(states), world)
        logger.info("rank %d resumes at epoch %d of %d", rank, start_epoch + 1, cfg.train.epochs)

    per_worker = cfg.train.batch_size // world
    train_shard = ray.train.get_dataset_shard("train")
    val_ds = ray.train.get_dataset_shard("val")
    val_keys = {key: i for i, key in enumerate(loop_config["val_keys"])}
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    bn_batches = -(-cfg.train.precise_bn_chips // cfg.train.batch_size)  # per worker: batch_size is global
    for epoch in range(start_epoch, cfg.train.epochs):
        t0, n_chips, loss_sum, steps = time.perf_counter(), 0, 0.0, 0
        bn_inputs: deque[torch.Tensor] = deque(maxlen=max(1, bn_batches))
        for batch in train_shard.iter_batches(
            batch_size=per_worker,
            batch_format="numpy",
            local_shuffle_buffer_size=cfg.train.shuffle_buffer or None,
            local_shuffle_seed=cfg.train.seed + epoch,
        ):
            x, y = batch_to_tensors(batch, cfg.preprocess, cfg.augment, rng)
            x = x.to(device, memory_format=memory_format)
            loss_sum += train_step(model, optimizer, x, y.to(device), autocast) * len(y)
            if bn_batches:
                bn_inputs.append(x)
            if scheduler is not None:
                scheduler.step()
            n_chips += len(y)
            steps += 1
        train_s = time.perf_counter() - t0
        if bn_batches:
            recalibrate_batchnorm(module, list(bn_inputs), autocast)
        bn_inputs.clear()
        sums = all_reduce(np.array([loss_sum, n_chips, train_s]), device)
        t_val = time.perf_counter()
        logits, labels = evaluate(model, val_ds, val_keys, cfg, device, autocast, rank, world)
        temperature = fit_temperature(logits, labels)
        val = logit_metrics(logits, labels, prefix="val_")
        val["val_ece_calibrated"] = logit_metrics(logits, labels, temperature)["ece_calibrated"]
        metrics = {
            "epoch": epoch + 1,
            "lr": float(optimizer.param_groups[0]["lr"]),
            "train_loss": float(sums[0] / max(1, sums[1])),
            "train_chips": int(sums[1]),
            "train_chips_per_s": float(sums[1] / max(1e-9, train_s)),
            **val,
            "temperature": temperature,
            "val_score": selection_score(val["val_accuracy"], val["val_loss"]),
            "train_s": train_s,
            "val_s": time.perf_counter() - t_val,
            "epoch_s": time.perf_counter() - t0,
        }
        history.append(metrics)
        if rank == 0:
            logger.info(
                "epoch %d/%d: train loss %.3f | val loss %.3f, accuracy %.3f, F1 galaxy %.3f, NSC %.3f, ECE %.3f -> %.3f (T %.2f) | %.0f s",
                epoch + 1, cfg.train.epochs, metrics["train_loss"], metrics["val_loss"], metrics["val_accuracy"],
                metrics["val_f1_galaxy"], metrics["val_f1_nsc"], metrics["val_ece"], metrics["val_ece_calibrated"], temperature,
                metrics["epoch_s"],
            )  # fmt: skip
        rng_states = _gather_rng_states(rng, world)
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if rank == 0:
                save_checkpoint(
                    d,
                    {
                        "model_name": cfg.model.name,
                        "model_args": model_args,
                        "model_state": module.state_dict(),
                        "optimizer_state": optimizer.state_dict(),
                        "scheduler_state": scheduler.state_dict() if scheduler is not None else None,
                        "epoch": epoch,
                        "rng_state": rng_states,  # one per rank, in rank order
                        "temperature": float(temperature),
                        "preprocess": cfg.preprocess.to_dict(),
                        "class_names": list(CLASS_NAMES),
                        "history": history,
                        "metrics": metrics,
                        "config": cfg.to_dict(),
                    },
                )
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report(
                {k: v for k, v in metrics.items() if k != "val_confusion"}, checkpoint=ckpt, checkpoint_dir_name=f"epoch_{epoch + 1:03d}"
            )


# --- the driver ------------------------------------------------------------------------------------------------------------


@dataclass
class TrainOutcome:
    run_dir: str
    best_checkpoint: str  # URI of the best checkpoint's directory (a copy at <run_dir>/best), chosen on validation
    best_metrics: dict  # the best epoch's training and validation metrics
    history: list[dict]
    test_metrics: dict  # the test part scored once, after training, with best/ (and, for a stability check only, the last epoch)


@dataclass(frozen=True)
class Splits:
    """A run's manifests: `train` and `val` are read while training; `test` is not opened until training has ended."""

    train: str
    val: str
    test: str


def _abs_storage(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def _uri(checkpoint: ray.train.Checkpoint, storage_path: str) -> str:
    path = checkpoint.path
    if "://" in storage_path and "://" not in path:
        return f"{storage_path.split('://', 1)[0]}://{path}"
    return path


def prepare_manifests(cfg: JobConfig, run_dir: str) -> Splits:
    """Train, validation and test manifests for the run, by body (synthesizing an archive if none is given).

    Without ``data.test_manifest``, ``data.manifest`` is split three ways (`split_three`) and the parts are written
    as ``train.csv``, ``val.csv`` and ``test.csv`` into the run folder. With it, ``data.manifest`` is split into
    train and validation only, and the test manifest is not opened here (nor anywhere before training ends).
    """
    store = Storage.at(run_dir, cfg.run.storage_options)  # the output side: the run folder
    fs, root = store.fs, store.root
    fs.makedirs(root, exist_ok=True)
    manifest = cfg.data.manifest
    if manifest is None:
        from ray_hrc.synth import synthesize_archive

        if "://" in run_dir:
            raise ConfigError("data.manifest is required when the run is stored remotely (a synthetic archive is written locally)")
        manifest = str(synthesize_archive(os.path.join(run_dir, "archive"), **cfg.data.synth_kwargs()))
    read = cfg.data.read
    df = read_manifest(manifest, template=read.template, storage_options=read.storage_options or None)
    test_fraction = None if cfg.data.test_manifest else cfg.data.test_fraction
    train, val, test = split_three(df, val_fraction=cfg.data.val_fraction, test_fraction=test_fraction, seed=cfg.data.split_seed)
    paths = {}
    for name, part in (("train", train), ("val", val), ("test", test)):
        if part is None:
            continue
        if part.empty or part["Label"].nunique() < 2:
            raise ConfigError(
                f"the {name} part of {manifest} has {len(part)} chips of labels {sorted(set(part['Label']))}; expected both labels in "
                "train, validation and test: each label needs at least three bodies (two with data.test_manifest)"
            )
        paths[name] = f"{run_dir.rstrip('/')}/{name}.csv"
        with fs.open(f"{root}/{name}.csv", "w") as fh:
            write_manifest(part, fh)
        logger.info("%s: %d chips of %d bodies %s", name, len(part), part["ID"].nunique(), part["Label"].value_counts().to_dict())
    return Splits(paths["train"], paths["val"], cfg.data.test_manifest or paths["test"])


def _ray_started_here() -> bool:
    """Whether this process started Ray itself (`init_ray` without an address): a plain local Ray, to which no
    autoscaler and no `ray start --address` adds nodes. Joining a cluster (``RAY_ADDRESS``, ``ray job submit``) is not."""
    node = ray._private.worker._global_node  # Ray sets head=True only on the node that ray.init() started
    return node is not None and node.head


def check_resources(cfg: JobConfig) -> None:
    """Refuse a scaling that leaves a plain local Ray no CPU for Ray Data's read tasks (the run would hang).

    On a cluster this process joined, nodes can be added (an autoscaler, or `ray start --address`): a head with no CPU
    and workers that scale from zero is the usual shape, and the run waits for them, so the shortfall is only logged.
    """
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    total = ray.cluster_resources().get("CPU", 0)
    asked = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    if len(nodes) == 1 and total - asked < min(1.0, cfg.data.read.num_cpus):
        shortfall = (
            f"{cfg.scaling.num_workers} training worker(s) x {cfg.scaling.cpus_per_worker} CPU leave {total - asked:g} of this node's "
            f"{total:g} CPUs for Ray Data's read tasks, which need {cfg.data.read.num_cpus:g} each"
        )
        if _ray_started_here():
            raise ConfigError(f"{shortfall}: the run would wait forever. Lower scaling.cpus_per_worker (e.g. 0.5) or scaling.num_workers.")
        logger.warning("%s; the run waits until nodes with CPUs join the cluster (an autoscaler or `ray start --address`)", shortfall)
    if cfg.train.batch_size % cfg.scaling.num_workers:
        raise ConfigError(
            f"train.batch_size {cfg.train.batch_size} (global) is not divisible by scaling.num_workers {cfg.scaling.num_workers}"
        )


def cache_datasets(datasets: dict[str, ray.data.Dataset], chips: int) -> dict[str, ray.data.Dataset]:
    """Read and crop every chip once, into the object store (`Dataset.materialize`), so epochs do not re-read files.

    chips: how many chips the datasets hold together (their manifests' rows). Refused, before anything is read, when
    they would need more than half of the cluster's object store: they would spill to disk, which is slower than
    reading the files again.
    """
    need = chips * CHIP_BYTES
    store = ray.cluster_resources().get("object_store_memory", 0)
    if need > store / 2:
        raise ConfigError(
            f"data.cache: {chips} chips need {need / 2**30:.1f} GiB of object store, more than half of the cluster's "
            f"{store / 2**30:.1f} GiB; set data.cache=false to read them every epoch instead"
        )
    t0 = time.perf_counter()
    cached = {name: ds.materialize() for name, ds in datasets.items()}
    logger.info("cached %d chips (%.1f GiB) in the object store in %.1f s", chips, need / 2**30, time.perf_counter() - t0)
    return cached


def _steps_per_epoch(chips: int, cfg: JobConfig) -> int:
    """Optimizer steps per epoch on each worker (for LR schedules): `chips` / workers / per-worker batch, rounded up."""
    per_worker = cfg.train.batch_size // cfg.scaling.num_workers
    return max(1, -(-(chips // cfg.scaling.num_workers) // per_worker))


def _epochs_done(fs, root: str) -> int:
    """How many epochs the run in `root` has checkpointed (its highest ``epoch_NNN`` folder)."""
    done = [p.rstrip("/").rsplit("epoch_", 1)[-1] for p in fs.ls(root, detail=False) if "epoch_" in p.rsplit("/", 1)[-1]]
    return max((int(n) for n in done if n.isdigit()), default=0)


def run_training(cfg: JobConfig, resume: bool = False) -> TrainOutcome:
    """Train as `cfg` says, choose ``best/`` on validation, then score the test part once; returns where it all is.

    Ray must be initialised (`init_ray`).
    """
    from ray.train.torch import TorchTrainer

    storage = _abs_storage(cfg.run.storage_path)
    run_dir = f"{storage.rstrip('/')}/{cfg.run.name}"
    out = cfg.run.storage_options or None  # the output side: run folder, checkpoints, manifests of the split, report
    runs, store = Storage.at(storage, out), Storage.at(run_dir, out)  # Ray Train's storage_path, and this run's folder in it
    fs, root = store.fs, store.root
    existing = fs.exists(root) and any("epoch_" in p for p in fs.ls(root, detail=False))
    if existing and not resume:
        raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it, or choose another --out / run.name")
    check_resources(cfg)
    if resume and fs.exists(f"{root}/train.csv") and fs.exists(f"{root}/val.csv"):
        test = cfg.data.test_manifest or f"{run_dir}/test.csv"
        splits = Splits(f"{run_dir}/train.csv", f"{run_dir}/val.csv", test)
    else:
        splits = prepare_manifests(cfg, run_dir)
    read = cfg.data.read
    # the split's manifests live in the run folder (output side); the chips they name are read with `read` (input side)
    parts = {
        name: read_manifest(path, template=read.template, storage_options=out)
        for name, path in (("train", splits.train), ("val", splits.val))
    }
    val_keys = list(dict.fromkeys(chip_key(u, h) for u, h in zip(parts["val"]["URI"], parts["val"]["HDU Index"], strict=True)))
    files = {
        name: resolve_sources(path, SourceOptions(read.template, out)) for name, path in (("train", splits.train), ("val", splits.val))
    }
    train = good_chips(read_chips(files["train"], read, shuffle_seed=cfg.train.seed))  # a new file order every epoch
    datasets = {"train": train, "val": good_chips(read_chips(files["val"], read))}
    if cfg.data.cache:
        datasets = cache_datasets(datasets, len(parts["train"]) + len(parts["val"]))
        # the cached blocks, reordered every epoch
        datasets["train"] = datasets["train"].randomize_block_order(seed=ray.data.RandomSeedConfig(cfg.train.seed))
    done = _epochs_done(fs, root) if resume and existing else 0
    if done:
        # Ray Data derives each epoch's file (or block) order from the seed and how often the dataset has run; a resumed
        # run starts that count where the stopped one left it, so epoch N sees the order it would have seen.
        datasets["train"].context._execution_idx += done
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": cfg.to_dict(), "steps_per_epoch": _steps_per_epoch(len(parts["train"]), cfg), "val_keys": val_keys},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={
                "CPU": cfg.scaling.cpus_per_worker,
                **({"GPU": cfg.scaling.gpus_per_worker} if cfg.scaling.use_gpu else {}),
            },
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            # remote: the same filesystem object as the run folder's (endpoint, credentials), and a path without scheme
            storage_path=runs.root if runs.remote else storage,
            storage_filesystem=runs.pyarrow() if runs.remote else None,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.run.num_to_keep, checkpoint_score_attribute="val_score", checkpoint_score_order="max"
            ),
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    with EpochPrinter(fs, root, cfg.train.epochs):
        result = trainer.fit()
    best = result.get_best_checkpoint("val_score", "max") or result.checkpoint
    if best is None:
        raise RuntimeError(f"training finished without a checkpoint in {run_dir}")
    state = load_checkpoint(_uri(best, storage), out)
    last_uri = _uri(result.checkpoint, storage) if result.checkpoint else _uri(best, storage)
    history = load_checkpoint(last_uri, out).get("history", [])
    best_dir = f"{run_dir}/best"  # a stable name for the best checkpoint (Ray's epoch_NNN folders rotate)
    if fs.exists(f"{root}/best"):
        fs.rm(f"{root}/best", recursive=True)
    fs.copy(fs._strip_protocol(_uri(best, storage)), f"{root}/best", recursive=True)
    write_run_report(run_dir, history, cfg)
    # only now, with every epoch trained and best/ chosen, is the test manifest opened
    test_metrics = score_test(cfg, splits, {"best": best_dir, "last": last_uri}, run_dir)
    if cfg.run.mlflow_tracking_uri:
        log_to_mlflow(cfg, history, test_metrics)
    return TrainOutcome(
        run_dir=run_dir, best_checkpoint=best_dir, best_metrics=state["metrics"], history=history, test_metrics=test_metrics
    )


class EpochPrinter(threading.Thread):
    """Logs one line per epoch in the driver, from each new ``epoch_NNN/meta.json`` in the run folder.

    The workers log their epochs too, but their output reaches the driver only on a terminal (`ray_hrc.runtime.
    init_ray`); this keeps a log readable wherever it goes. Polls every `interval` seconds (one listing).
    """

    def __init__(self, fs, root: str, epochs: int, interval: float = 2.0):
        super().__init__(daemon=True, name="epoch-printer")
        self.fs, self.root, self.epochs, self.interval = fs, root, epochs, interval
        self.done: set[str] = {p for p in self._epochs()}
        self.stop = threading.Event()

    def _epochs(self) -> list[str]:
        try:
            return sorted(p for p in self.fs.ls(self.root, detail=False) if p.rstrip("/").rsplit("/", 1)[-1].startswith("epoch_"))
        except FileNotFoundError:
            return []

    def poll(self) -> None:
        for path in self._epochs():
            if path in self.done:
                continue
            try:
                with self.fs.open(f"{path}/meta.json") as fh:
                    m = json.load(fh)["metrics"]
            except (FileNotFoundError, KeyError, ValueError):
                continue  # still being written, or already rotated away
            self.done.add(path)
            logger.info(
                "epoch %d/%d: train loss %.3f (%.1f chips/s) | validation loss %.3f, accuracy %.3f, ECE %.3f -> %.3f (T %.2f) | %.0f s",
                m["epoch"], self.epochs, m["train_loss"], m["train_chips_per_s"], m["val_loss"], m["val_accuracy"], m["val_ece"],
                m["val_ece_calibrated"], m["temperature"], m["epoch_s"],
            )  # fmt: skip

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            self.poll()

    def __enter__(self) -> EpochPrinter:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.join()
        self.poll()


class _TestLogits:
    """Ray Data callable: the logits of several checkpoints for preprocessed chip rows (one read of the test chips)."""

    def __init__(self, checkpoints: dict[str, str], storage_options: dict | None = None):
        from ray_hrc.predict import ChipClassifier

        self.models = {name: ChipClassifier(uri, storage_options=storage_options) for name, uri in checkpoints.items()}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ray_hrc.predict import _dense

        ok = np.asarray(batch["error_class"] == "")
        out = {k: batch[k] for k in ("uri", "hdu", "label_true", "body", "error_class")}
        for name, model in self.models.items():
            logits = np.full((len(ok), len(CLASS_NAMES)), np.nan)
            if ok.any():
                logits[ok] = model.logits(_dense(batch["image"][ok]))
            out[f"logits_{name}"] = logits
        return out


def score_test(cfg: JobConfig, splits: Splits, checkpoints: dict[str, str], run_dir: str) -> dict[str, Any]:
    """Score the test manifest once with ``checkpoints["best"]`` (and ``["last"]``, for the report's stability check).

    Writes ``test_metrics.json``, ``reliability.png`` and (when the test manifest lives elsewhere) a copy of it as
    ``test.csv`` into the run folder. Every figure of the best checkpoint is computed from its logits: accuracy, F1
    per class, the confusion matrix, and the expected calibration error before and after its temperature.
    """
    from ray_hrc.calibration import reliability_bins, softmax
    from ray_hrc.checkpoint import norm_from_checkpoint
    from ray_hrc.plots import reliability_diagram

    read = cfg.data.read
    out = cfg.run.storage_options or None  # the run folder, its manifests and checkpoints (output side)
    test_opts = (read.storage_options or None) if cfg.data.test_manifest else out  # a given test list is a source
    store = Storage.at(run_dir, out)
    fs, root = store.fs, store.root
    test_store = Storage.at(splits.test, test_opts)
    test_fs, test_path = test_store.fs, test_store.root
    if not test_fs.exists(test_path):
        raise FileNotFoundError(
            f"test manifest {splits.test} does not exist; the model is trained (best/ in {run_dir}, chosen on validation): "
            f"score it with `ray-hrc evaluate --checkpoint {run_dir}/best --manifest TEST.csv --out REPORT`"
        )
    t0 = time.perf_counter()
    test = read_manifest(splits.test, template=read.template, storage_options=test_opts)
    if splits.test != f"{run_dir}/test.csv":
        with fs.open(f"{root}/test.csv", "w") as fh:
            write_manifest(test, fh)
    trained = set(read_manifest(splits.train, template=read.template, storage_options=out)["ID"])
    trained |= set(read_manifest(splits.val, template=read.template, storage_options=out)["ID"])
    leaked = sorted(trained & set(test["ID"]))
    if leaked:
        logger.warning("bodies %s are in the training or validation and the test manifests: test accuracy will be optimistic", leaked)
    states = {name: load_checkpoint(uri, out) for name, uri in checkpoints.items()}
    # checkpoints of the same epoch (best/ is the last epoch) are the same weights: one forward pass serves both
    same_as = {name: next(n for n in states if states[n]["epoch"] == state["epoch"]) for name, state in states.items()}
    norm = norm_from_checkpoint(states["best"])
    scored = read_chips(resolve_sources(splits.test, SourceOptions(read.template, test_opts)), read, norm=norm).map_batches(
        _TestLogits,
        fn_constructor_kwargs={"checkpoints": {n: checkpoints[n] for n in set(same_as.values())}, "storage_options": out},
        batch_size=max(1, cfg.train.batch_size),
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=1 if not cfg.scaling.use_gpu else 0,
        num_gpus=cfg.scaling.gpus_per_worker if cfg.scaling.use_gpu else 0,
    )
    rows = scored.take_all()
    good = [r for r in rows if not r["error_class"]]
    labels = label_index(np.array([r["label_true"] for r in good])) if good else np.zeros(0, np.int64)
    out: dict[str, Any] = {"manifest": splits.test, "failed_chips": len(rows) - len(good), "leaked_bodies": leaked}
    for name, state in states.items():
        logits = np.stack([r[f"logits_{same_as[name]}"] for r in good]) if good else np.zeros((0, len(CLASS_NAMES)))
        temperature = float(state.get("temperature", 1.0))
        metrics = {"epoch": int(state["epoch"]) + 1, "temperature": temperature, **logit_metrics(logits, labels, temperature)}
        if name == "best":
            metrics["reliability"] = {
                "before": reliability_bins(softmax(logits), labels),
                "after": reliability_bins(softmax(logits, temperature), labels),
            }
        out[name] = metrics
    out["last_minus_best_accuracy"] = out["last"]["accuracy"] - out["best"]["accuracy"]
    out["score_s"] = round(time.perf_counter() - t0, 1)
    with fs.open(f"{root}/test_metrics.json", "w") as fh:
        json.dump(out, fh, indent=2)
    with tempfile.TemporaryDirectory() as d:
        best = out["best"]
        png = reliability_diagram(
            best["reliability"]["before"], best["reliability"]["after"], os.path.join(d, "reliability.png"),
            title=f"test, best epoch {best['epoch']}: ECE {best['ece']:.3f} -> {best['ece_calibrated']:.3f} (T = {best['temperature']:.2f})",
        )  # fmt: skip
        fs.put(str(png), f"{root}/reliability.png")
    b, last = out["best"], out["last"]
    logger.info(
        "test (%d chips, scored once): best epoch %d accuracy %.4f, F1 galaxy %.4f, NSC %.4f, ECE %.3f -> %.3f; last epoch %d accuracy %.4f",
        b["chips"], b["epoch"], b["accuracy"], b["f1_galaxy"], b["f1_nsc"], b["ece"], b["ece_calibrated"], last["epoch"], last["accuracy"],
    )  # fmt: skip
    return out


def write_run_report(run_dir: str, history: list[dict], cfg: JobConfig) -> None:
    """``metrics.csv`` (one row per epoch: training and validation, no test columns) and ``training_curves.png``."""
    from ray_hrc.plots import training_curves

    store = Storage.at(run_dir, cfg.run.storage_options)
    fs, root = store.fs, store.root
    df = pd.DataFrame(history)
    with fs.open(f"{root}/metrics.csv", "w") as fh:
        df.to_csv(fh, index=False)
    with tempfile.TemporaryDirectory() as d:
        png = training_curves(df, os.path.join(d, "training_curves.png"), title=f"{cfg.model.name} {cfg.model.kwargs}")
        fs.put(str(png), f"{root}/training_curves.png")


def log_to_mlflow(cfg: JobConfig, history: list[dict], test_metrics: dict | None = None) -> None:
    import mlflow

    mlflow.set_tracking_uri(cfg.run.mlflow_tracking_uri)
    mlflow.set_experiment("ray_hrc")
    with mlflow.start_run(run_name=cfg.run.name):
        mlflow.log_params(
            {
                "model": cfg.model.name,
                **{f"model.{k}": v for k, v in cfg.model.kwargs.items()},
                **{f"train.{k}": v for k, v in vars(cfg.train).items()},
            }
        )
        for h in history:
            mlflow.log_metrics({k: v for k, v in h.items() if isinstance(v, (int, float)) and k != "epoch"}, step=int(h["epoch"]))
        if test_metrics:
            mlflow.log_metrics({f"test_{k}": v for k, v in test_metrics["best"].items() if isinstance(v, (int, float)) and k != "epoch"})
