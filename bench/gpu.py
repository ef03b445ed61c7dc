"""GPU throughput of HR-CelestialNet at width 1 on full 2048 x 4096 chips: inference and training, chips per second.

Inference: `ray_hrc.predict.ChipClassifier` on CUDA (BatchNorm folded, channels_last, bf16 autocast), the path
classify and Serve use, against the reference's eager float32 NCHW model on the same GPU. Training: the project's
`ray_hrc.train.train_step` with channels_last and bf16 autocast (as `train_loop_per_worker` runs it on a GPU)
against the same step in float32 NCHW. Batches of `batch` chips; medians over `repeats` timed batches after
warm-up, each ended by a device synchronisation. Peak memory: the project's bf16 + channels_last training step at
batch 1, 2 and 4 per GPU (`torch.cuda.max_memory_allocated` over warm-up and timed steps; "out of memory" where a
batch does not fit). Skipped, and said so, where there is no CUDA device.
"""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from bench.common import CHIP_SHAPE, random_checkpoint


def skipped(reason: str) -> dict:
    return {"gpu_infer_chips_per_s": None, "gpu_train_chips_per_s": None, "gpu_skipped": reason}


def _rate(fn, chips: int, repeats: int, device: torch.device) -> list[float]:
    rates = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rates.append(chips / (time.perf_counter() - t0))
    return rates


def _infer_rates(checkpoint: str, images: np.ndarray, dev: torch.device, repeats: int, warmup: int) -> tuple[list[float], list[float]]:
    """Chips/s of the project's predictor and of the eager reference on the same batch, interleaved repeats."""
    from ray_hrc.checkpoint import load_checkpoint, model_from_checkpoint
    from ray_hrc.predict import ChipClassifier

    classifier = ChipClassifier(checkpoint, device=dev.type)
    reference = model_from_checkpoint(load_checkpoint(checkpoint)).to(dev).eval()
    x_ref = torch.from_numpy(images.astype(np.float32))[:, None].to(dev)

    def eager_infer():
        with torch.no_grad():
            torch.softmax(reference(x_ref), dim=1).cpu()

    def project_infer():
        classifier.probabilities(images)

    for _ in range(warmup):
        eager_infer()
        project_infer()
    infer, infer_eager = [], []
    for _ in range(repeats):
        infer += _rate(project_infer, len(images), 1, dev)
        infer_eager += _rate(eager_infer, len(images), 1, dev)
    return infer, infer_eager


def train_memory(
    dev: torch.device, width: float, batches: tuple[int, ...] = (1, 2, 4), repeats: int = 3, warmup: int = 1
) -> dict[str, dict[str, float | str | None]]:
    """Per batch size: peak GiB allocated and chips/s of the bf16 + channels_last training step (SGD, as the paper).

    On CPU (only to test this code) peak memory is None. A batch that does not fit is recorded as "out of memory".
    """
    from ray_hrc.models import build_model
    from ray_hrc.train import train_step

    cuda = dev.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else nullcontext
    out: dict[str, dict[str, float | str | None]] = {}
    for batch in batches:
        model = optimizer = None
        try:
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dev)
            torch.manual_seed(0)
            model = build_model("hrcelestialnet", width=width, input_shape=list(CHIP_SHAPE)).to(dev).to(memory_format=torch.channels_last)
            optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
            x = torch.rand((batch, 1, *CHIP_SHAPE), device=dev).contiguous(memory_format=torch.channels_last)
            y = torch.arange(batch, device=dev) % 2
            for _ in range(warmup):
                train_step(model, optimizer, x, y, autocast)
            rates = _rate(lambda m=model, o=optimizer, x=x, y=y: train_step(m, o, x, y, autocast), batch, repeats, dev)
            out[str(batch)] = {
                "peak_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else None,
                "chips_per_s": statistics.median(rates),
            }
        except torch.OutOfMemoryError:
            out[str(batch)] = {"peak_gib": "out of memory", "chips_per_s": None}
        finally:
            del model, optimizer
            if cuda:
                torch.cuda.empty_cache()
    return out


def measure(
    workdir: Path,
    device: str = "cuda",
    width: float = 1.0,
    batch: int = 4,
    repeats: int = 5,
    warmup: int = 2,
    memory_batches: tuple[int, ...] = (1, 2, 4),
) -> dict:
    """Chips per second of inference and training at `width` on `device` (``cuda``; ``cpu`` only to test this code)."""
    from ray_hrc.models import build_model
    from ray_hrc.train import train_step

    dev = torch.device(device)
    checkpoint = random_checkpoint(workdir / f"gpu_checkpoint_w{width:g}", width)
    rng = np.random.default_rng(0)
    images = rng.random((batch, *CHIP_SHAPE), dtype=np.float32).astype(np.float16)

    infer, infer_eager = _infer_rates(checkpoint, images, dev, repeats, warmup)
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    y = torch.arange(batch, device=dev) % 2
    x = torch.from_numpy(images.astype(np.float32))[:, None].to(dev)
    bf16 = dev.type == "cuda"
    runs: dict[str, list[float]] = {}
    for name, channels_last, autocast in (
        ("project", True, (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else nullcontext),
        ("eager", False, nullcontext),
    ):
        torch.manual_seed(0)
        model = build_model("hrcelestialnet", width=width, input_shape=list(CHIP_SHAPE)).to(dev)
        xb = x
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
            xb = x.contiguous(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
        for _ in range(warmup):
            train_step(model, optimizer, xb, y, autocast)
        runs[name] = _rate(lambda m=model, o=optimizer, xb=xb, a=autocast: train_step(m, o, xb, y, a), batch, repeats, dev)
        del model, optimizer
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return {
        "gpu_infer_chips_per_s": statistics.median(infer),
        "gpu_infer_eager_chips_per_s": statistics.median(infer_eager),
        "gpu_infer_speedup": statistics.median(infer) / statistics.median(infer_eager),
        "gpu_train_chips_per_s": statistics.median(runs["project"]),
        "gpu_train_eager_chips_per_s": statistics.median(runs["eager"]),
        "gpu_train_speedup": statistics.median(runs["project"]) / statistics.median(runs["eager"]),
        "gpu_infer_runs": infer,
        "gpu_train_runs": runs["project"],
        "gpu_train_memory_by_batch": train_memory(dev, width, memory_batches, repeats=max(1, min(3, repeats))),
        "gpu_device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev),
        "gpu_width": width,
        "gpu_batch": batch,
        "gpu_repeats": repeats,
    }
