"""CPU inference of one full 2048 x 4096 chip: the reference's way against the project's inference path, in float32
and in bf16.

Reference ("eager"): the model as the reference implementation runs it: eval mode, float32, NCHW, BatchNorm as
separate layers, ``torch.no_grad()``. Project path: `ray_hrc.predict.ChipClassifier.probabilities`, the very
call that ``ray-hrc classify`` and the Serve deployment make (BatchNorm folded, pools before ReLUs, channels_last,
``torch.inference_mode``), from a checkpoint on disk, fed the float16 normalised chip that Ray Data hands it: once
with ``precision="fp32"`` ("project") and, where the CPU has native bf16 matrix instructions (AMX or AVX-512 BF16,
`ray_hrc.models.choose_precision`), once with ``precision="bf16"`` ("bf16": bf16 weights, the stem at float32 accuracy through
`ray_hrc.models.inference.split_conv`), which is
what "auto" picks there. The bf16 path with ``compile=True`` (torch.compile) is timed as well, with its compile
time, to say whether it pays.

All run in one process on the same chip, one forward of each after the other in every repeat; figures are medians
of wall-clock seconds. A roofline puts them in context: the model's multiply-accumulates (counted on the meta
device) against the matrix-multiply rate this machine reaches in the same run in each precision (torch.mm, n x n,
float32 and bf16: the roofs), and a torch.profiler table of the bf16 (else the fp32) path shows where its time goes.
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench.common import CHIP_SHAPE, cpu_flags, cpu_model, random_checkpoint

logger = logging.getLogger(__name__)

CONV_WRAPPERS = ("aten::conv2d", "aten::convolution", "aten::_convolution")


def model_macs(model: nn.Module) -> dict[str, float]:
    """Multiply-accumulates of one forward on one chip, by layer kind, counted with hooks on a meta-device copy."""
    meta = copy.deepcopy(model).to("meta").eval()
    counts = {"conv": 0.0, "linear": 0.0}

    def conv_hook(module: nn.Conv2d, _inputs, output):
        kh, kw = module.kernel_size
        counts["conv"] += output.numel() * (module.in_channels // module.groups) * kh * kw

    def linear_hook(module: nn.Linear, _inputs, output):
        counts["linear"] += output.numel() * module.in_features

    for m in meta.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(conv_hook)
        elif isinstance(m, nn.Linear):
            m.register_forward_hook(linear_hook)
    with torch.no_grad():
        meta(torch.empty(1, 1, *CHIP_SHAPE, device="meta"))
    return counts


def gemm_gflops(n: int = 4096, repeats: int = 3, dtype: torch.dtype = torch.float32) -> float:
    """The best GEMM rate (GFLOP/s) of `repeats` n x n x n products in `dtype` at the current thread count."""
    a, b = torch.rand(n, n, dtype=dtype), torch.rand(n, n, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best


def _conv_gflop(shapes: list) -> float | None:
    """GFLOP of a stride-1, unpadded convolution (every one in HR-CelestialNet) from its profiled input shapes."""
    try:
        (n, _, h, w), (o, c, kh, kw) = shapes[0], shapes[1]
    except (TypeError, ValueError, IndexError):
        return None
    return 2 * n * o * (h - kh + 1) * (w - kw + 1) * c * kh * kw / 1e9


def _full_resolution(shapes: str, side: int = 2000) -> bool:
    """Whether an operator's first input is at the chip's full resolution: chip-wide (at least `side` columns), the whole
    chip or one of the row strips the stem runs in (`ray_hrc.models.inference.RowStrips`)."""
    import ast

    try:
        first = ast.literal_eval(shapes)[0]
        return len(first) == 4 and first[3] >= side
    except (ValueError, SyntaxError, IndexError, TypeError):
        return False


def profile_table(model: nn.Module, x: torch.Tensor) -> list[dict]:
    """Self CPU time of the operators of one forward (torch.profiler), by operator and input shape, largest first.

    Convolution rows carry the GFLOP/s they ran at.
    """
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        model(x)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            model(x)
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    rows = []
    for e in events:
        row = {
            "op": e.key,
            "input_shapes": str(e.input_shapes[:2]),
            "self_ms": e.self_cpu_time_total / 1e3,
            "share": e.self_cpu_time_total / total,
        }
        # the operator that computes (aten::mkldnn_convolution, ...), not the wrappers that call it (their self time is
        # dispatch only, and counting their FLOPs too would triple the rate)
        if "convolution" in e.key and e.key not in CONV_WRAPPERS and e.self_cpu_time_total > 0:
            gflop = _conv_gflop(e.input_shapes)
            if gflop:
                gflop *= e.count  # the stem's row strips call it many times with one shape
                row["gflop"] = gflop
                row["in_channels"] = int(e.input_shapes[1][1])
                row["gflops"] = gflop / (e.self_cpu_time_total / 1e6)
        rows.append(row)
    rows.sort(key=lambda r: r["self_ms"], reverse=True)
    return rows


def _time(fn) -> tuple[float, float]:
    c0, w0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def measure(
    image: np.ndarray, workdir: Path, width: float = 1.0, repeats: int = 3, compile: bool = True, profile: bool = True, gemm_n: int = 4096
) -> dict:
    """Seconds per chip of the reference and of the project's paths (fp32; bf16 where the CPU has it) at `width` on one
    normalised chip `image`.

    image: float16 (2048, 4096), as `ray_hrc.preprocess.normalise` returns it.
    """
    from ray_hrc.checkpoint import load_checkpoint, model_from_checkpoint
    from ray_hrc.models import choose_precision
    from ray_hrc.models.inference import cpu_bf16_features
    from ray_hrc.predict import ChipClassifier

    checkpoint = random_checkpoint(workdir / f"checkpoint_w{width:g}", width)
    reference = model_from_checkpoint(load_checkpoint(checkpoint)).eval()  # eager float32 NCHW, BatchNorm unfolded
    x_ref = torch.from_numpy(image.astype(np.float32))[None, None]
    batch = image[None]

    def eager():
        with torch.no_grad():
            return torch.softmax(reference(x_ref), dim=1)

    features = cpu_bf16_features()
    auto = choose_precision("auto", "cpu")
    project = ChipClassifier(checkpoint, device="cpu", precision="fp32")
    paths = {"eager": eager, "project": lambda: project.probabilities(batch)}
    bf16 = ChipClassifier(checkpoint, device="cpu", precision="bf16") if features else None
    if bf16 is not None:
        paths["bf16"] = lambda: bf16.probabilities(batch)
        # the same with the stem's input in plain bf16 too (prepare_for_inference(float32_stem=False)): what float32
        # accuracy in the stem costs
        from ray_hrc.models import prepare_for_inference

        bf16_stem = prepare_for_inference(reference, dtype=torch.bfloat16, float32_stem=False)
        x_bf16 = torch.from_numpy(image)[None, None].to(torch.bfloat16).contiguous(memory_format=torch.channels_last)

        def all_bf16():
            with torch.inference_mode():
                return torch.softmax(bf16_stem(x_bf16).float(), dim=1)

        paths["bf16_stem"] = all_bf16
    compile_s = None
    if compile and bf16 is not None:
        compiled = ChipClassifier(checkpoint, device="cpu", compile=True, precision="bf16")
        t0 = time.perf_counter()
        compiled.probabilities(batch)  # compiles
        compile_s = time.perf_counter() - t0
        paths["bf16_compiled"] = lambda: compiled.probabilities(batch)

    p_eager = eager().numpy()
    p_project = project.probabilities(batch)
    p_bf16 = bf16.probabilities(batch) if bf16 is not None else None
    gemm = [gemm_gflops(gemm_n)]
    gemm_bf16 = [gemm_gflops(gemm_n, dtype=torch.bfloat16)] if features else []
    wall: dict[str, list[float]] = {k: [] for k in paths}
    cpu: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(repeats):
        for name, fn in paths.items():
            w, c = _time(fn)
            wall[name].append(w)
            cpu[name].append(c)
        gemm.append(gemm_gflops(gemm_n, repeats=1))
        if features:
            gemm_bf16.append(gemm_gflops(gemm_n, repeats=1, dtype=torch.bfloat16))

    macs = model_macs(reference)
    flops = 2 * (macs["conv"] + macs["linear"])
    peak = max(gemm)
    peak_bf16 = max(gemm_bf16) if gemm_bf16 else None
    med = {k: statistics.median(v) for k, v in wall.items()}
    achieved = {k: flops / v / 1e9 for k, v in med.items()}
    roof = {k: (peak_bf16 if k.startswith("bf16") else peak) for k in med}
    out = {
        "cpu_model": cpu_model(),  # this section's machine (a merged run keeps the other sections' machine description)
        "cpu_flags": cpu_flags(),
        "cpu_bf16_features": features,
        "cpu_precision_auto": auto.describe(),
        "cpu_forward_s_per_chip": med["project"],
        "cpu_forward_eager_s_per_chip": med["eager"],
        "cpu_forward_speedup": med["eager"] / med["project"],
        "cpu_forward_bf16_s_per_chip": med.get("bf16"),
        "cpu_forward_bf16_speedup": med["eager"] / med["bf16"] if "bf16" in med else None,
        "cpu_forward_bf16_compiled_s_per_chip": med.get("bf16_compiled"),
        "cpu_forward_bf16_stem_s_per_chip": med.get("bf16_stem"),
        "cpu_forward_bf16_compiled_speedup": med["eager"] / med["bf16_compiled"] if "bf16_compiled" in med else None,
        "cpu_forward_compile_s": compile_s,
        "cpu_forward_runs_s": wall,
        "cpu_forward_cpu_s": {k: statistics.median(v) for k, v in cpu.items()},
        "cpu_forward_max_abs_diff_vs_eager": float(np.abs(p_project - p_eager).max()),
        "cpu_forward_bf16_max_abs_diff_vs_fp32": float(np.abs(p_bf16 - p_project).max()) if p_bf16 is not None else None,
        "width": width,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "gflop_per_chip": flops / 1e9,
        "gemm_gflops": gemm,
        "gemm_bf16_gflops": gemm_bf16 or None,
        "cpu_matmul_bf16_gflops": peak_bf16,
        "floor_s_per_chip": flops / (peak * 1e9),
        "floor_bf16_s_per_chip": flops / (peak_bf16 * 1e9) if peak_bf16 else None,
        "max_speedup_at_gemm_peak": med["eager"] / (flops / (peak * 1e9)),
        "achieved_gflops": achieved,
        "roof_fraction": {k: achieved[k] / roof[k] for k in med if roof[k]},
    }
    if compile_s is not None and med["bf16"] > med["bf16_compiled"]:
        out["compile_break_even_chips"] = compile_s / (med["bf16"] - med["bf16_compiled"])
    if profile:
        profiled = bf16 if bf16 is not None else project
        out["profile_path"] = "bf16" if bf16 is not None else "project"
        x = torch.from_numpy(image.astype(np.float32))[None, None].contiguous(memory_format=torch.channels_last)
        rows = profile_table(profiled.model, x)
        conv_ms = sum(r["self_ms"] for r in rows if "convolution" in r["op"])
        total_ms = sum(r["self_ms"] for r in rows)
        # the stem: every operator at full resolution (conv1 on the chip and the first pool on its output)
        stem = [r for r in rows if _full_resolution(r["input_shapes"])]
        conv1 = [r for r in stem if "gflop" in r]
        rest = [r for r in rows if "gflop" in r and r not in conv1]
        out["profile"] = rows[:12]
        out["profile_total_ms"] = total_ms
        out["profile_conv_ms"] = conv_ms
        out["profile_conv_gflops"] = 2 * macs["conv"] / (conv_ms / 1e3) / 1e9 if conv_ms else None
        out["profile_stem_ms"] = sum(r["self_ms"] for r in stem)
        conv1_s = sum(r["self_ms"] for r in conv1) / 1e3
        # conv1 reads one channel; in bf16 it runs as `split_conv`, four input channels (hi, hi, lo, 1): the executed
        # rate counts those, the model's rate the one channel's multiply-adds
        out["profile_conv1_executed_gflops"] = sum(r["gflop"] for r in conv1) / conv1_s if conv1 else None
        out["profile_conv1_gflops"] = sum(r["gflop"] / r["in_channels"] for r in conv1) / conv1_s if conv1 else None
        out["profile_other_conv_gflops"] = sum(r["gflop"] for r in rest) / (sum(r["self_ms"] for r in rest) / 1e3) if rest else None
    return out
