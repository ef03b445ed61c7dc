"""A CPU training step of HR-CelestialNet in float32 against bf16 autocast (`torch.autocast("cpu", torch.bfloat16)`),
on full 2048 x 4096 chips, in one process, interleaved; wall and process CPU seconds per step (medians).

    PYTHONPATH=. flock /tmp/ray.lock python bench/train_precision.py --width 0.0625 --batch 2 --steps 4
    PYTHONPATH=. flock /tmp/ray.lock python bench/train_precision.py --width 1 --batch 1 --steps 2

This is `ray_hrc.train.train_step` as the Ray Train loop calls it (AdamW, channels_last as on GPU is not used on CPU);
the CPU configs keep float32 unless bf16 is faster here (the README says which).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext

import torch

from ray_hrc.models import build_model
from ray_hrc.train import train_step


def measure(width: float, batch: int, steps: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    x = torch.randn(batch, 1, 2048, 4096)
    y = torch.arange(batch) % 2
    runs = {}
    for name, autocast in (("fp32", nullcontext), ("bf16_autocast", lambda: torch.autocast("cpu", dtype=torch.bfloat16))):
        torch.manual_seed(seed)
        model = build_model("hrcelestialnet", width=width, input_shape=[2048, 4096], stem_init="dct")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        runs[name] = (model, optimizer, autocast)
    wall: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    losses: dict[str, list[float]] = {k: [] for k in runs}
    for step in range(steps + 1):  # the first step of each is a warm-up
        for name, (model, optimizer, autocast) in runs.items():
            c0, w0 = time.process_time(), time.perf_counter()
            losses[name].append(train_step(model, optimizer, x, y, autocast))
            if step:
                wall[name].append(time.perf_counter() - w0)
                cpu[name].append(time.process_time() - c0)
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    return {
        "width": width,
        "batch": batch,
        "steps": steps,
        "threads": torch.get_num_threads(),
        "wall_s_per_step": med,
        "cpu_s_per_step": med_cpu,
        "bf16_speedup_wall": med["fp32"] / med["bf16_autocast"],
        "bf16_speedup_cpu": med_cpu["fp32"] / med_cpu["bf16_autocast"],
        "losses": losses,
        "runs_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=float, default=0.0625)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(measure(args.width, args.batch, args.steps), indent=2))


if __name__ == "__main__":
    main()
