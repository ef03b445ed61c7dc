"""A narrow HR-CelestialNet's CPU training step with and without the compiled single-channel stem convolution.

At width 1/16 the first convolution (1 -> 2 channels, 7 x 7, over 2048 x 4096) is most of a CPU training step when
oneDNN runs it: its kernels for one input channel and few output channels reach a few GFLOP/s, and the weight
gradient less. `ray_hrc.models.stem.StemConv2d` computes it row by row from L1-resident rows (numba). This times, on one
thread and by process CPU time, the conv1 forward + weight gradient alone and a whole training step (forward,
cross-entropy, backward, AdamW), each with the stem kernel and with plain `F.conv2d`, interleaved, median of the repeats.

    python bench/stem.py [--width 0.0625] [--batch 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from ray_hrc.models import build_model
from ray_hrc.models.stem import StemConv2d


def _cpu_s(fn) -> float:
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=float, default=1 / 16)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.rand(args.batch, 1, 2048, 4096)
    y = torch.zeros(args.batch, dtype=torch.long)
    model = build_model("hrcelestialnet", width=args.width, input_shape=(2048, 4096))
    stem = model.conv1[0]
    assert isinstance(stem, StemConv2d)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def conv1(fast: bool) -> None:
        stem.zero_grad()
        out = stem(x) if fast else F.conv2d(x, stem.weight, stem.bias)
        out.sum().backward()

    def step(fast: bool) -> None:
        original = StemConv2d.forward
        if not fast:
            StemConv2d.forward = lambda self, v: F.conv2d(v, self.weight, self.bias)
        try:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        finally:
            StemConv2d.forward = original

    times: dict[str, list[float]] = {k: [] for k in ("conv1_stem", "conv1_onednn", "step_stem", "step_onednn")}
    conv1(True), step(True)  # compile or load the kernels, warm the allocator
    for _ in range(args.repeats):
        times["conv1_stem"].append(_cpu_s(lambda: conv1(True)) / args.batch)
        times["conv1_onednn"].append(_cpu_s(lambda: conv1(False)) / args.batch)
        times["step_stem"].append(_cpu_s(lambda: step(True)) / args.batch)
        times["step_onednn"].append(_cpu_s(lambda: step(False)) / args.batch)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "width": args.width,
        "batch": args.batch,
        "repeats": args.repeats,
        "cpu_s_per_chip": med,
        "conv1_speedup": med["conv1_onednn"] / med["conv1_stem"],
        "step_speedup": med["step_onednn"] / med["step_stem"],
        "runs": times,
    }
    print(
        f"width {args.width:g}, one thread, CPU s per chip (median of {args.repeats}): conv1 forward + weight gradient "
        f"{med['conv1_stem']:.3f} (stem kernel) vs {med['conv1_onednn']:.3f} (oneDNN), {result['conv1_speedup']:.1f}x; "
        f"training step {med['step_stem']:.3f} vs {med['step_onednn']:.3f}, {result['step_speedup']:.1f}x"
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
