"""The benchmark of the project (issue 6): one program, one table, ``results.json`` and ``RESULTS.md``.

    python bench/run.py [--quick] [--device cpu|cuda|auto] [--out bench/] [--sections preprocess,inference,...]
    python bench/run.py --sections preprocess --merge-into bench/results.json   # re-measure one section of a run

Sections, each in its own Python process (so that one section's threads, core pinning, memory or Ray cluster never
leak into another's figures), all on one synthetic archive written once:

1. preprocess  read + crop + bias + normalise on one core vs a naive astropy/np.percentile version (bench/preprocess.py)
2. inference   one 2048 x 4096 chip on CPU: the reference's eager model vs the project's inference path (bench/inference.py)
3. gpu         inference and training chips/s on CUDA; skipped, and said so, without a GPU (bench/gpu.py)
4. pipeline    `ray-hrc classify` over N and k x N files: efficiency against the slowest stage alone, peak memory
               ratio, object-store bytes per chip from Ray Data's stats (sections 4 and 6; bench/pipeline.py)
5. train       one Ray Train worker fed by Ray Data vs a plain PyTorch loop (bench/train_overhead.py)
6. serve       Ray Serve under `hey` at concurrency 1, 4, 8 vs the model's own chips/s (bench/serve_load.py)
7. consolidate resume planning and catalog consolidation over 10k / 100k / 1M synthetic part rows (no pixels, no
               Ray): wall time and the driver's peak RSS, each size in a fresh process (bench/consolidate.py)
8. s3          the same files from a local S3 server (moto, loopback) and from disk: ms/chip, requests and bytes per
               file of each remote read path, pipeline chips/s from S3 against from disk (bench/s3.py)

``--quick`` runs every section on small inputs and narrow models (a smoke test for CI, seconds per section);
its figures are not the benchmark's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if sys.path and Path(sys.path[0]).resolve() == ROOT / "bench":
    sys.path[0] = str(ROOT)  # import the sections as bench.<name>, never as top-level modules
elif str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

logger = logging.getLogger("bench")

SECTIONS = ("preprocess", "inference", "gpu", "pipeline", "train", "serve", "consolidate", "s3")

FULL = {
    "quick": False,
    "n_files": 10,  # N distinct synthetic raw files (2 chips each)
    "copies": 10,  # the large set is copies x N files
    "preprocess_files": 4,
    "preprocess_repeats": 3,
    "inference_width": 1.0,
    "inference_repeats": 3,
    "inference_compile": True,
    "inference_gemm_n": 4096,
    "gpu_width": 1.0,
    "gpu_batch": 4,
    "gpu_repeats": 5,
    "pipeline_width": 0.0625,
    "pipeline_repeats": 2,
    "pipeline_warmup": True,
    "train_width": 0.0625,
    "train_batch": 2,
    "train_steps": 6,
    "train_warmup": 1,
    "train_repeats": 3,
    "serve_width": 0.03125,
    "serve_batch": 8,
    "serve_levels": {1: 6, 4: 16, 8: 32},  # concurrency -> requests (2 chips each)
    "serve_repeats": 3,
    "consolidate_sizes": [10_000, 100_000, 1_000_000],  # chips of synthetic part rows
    "s3_files": 4,  # files read one by one in each way (local, astropy + fsspec, whole, ranges)
    "s3_repeats": 3,
    "s3_read_stage": True,  # also the read stage alone from S3 (1 and 0.5 CPU per task, direct and paced)
    "section_timeout_s": 1200,
}
QUICK = {
    **FULL,
    "quick": True,
    "n_files": 1,
    "copies": 3,
    "preprocess_files": 1,
    "preprocess_repeats": 1,
    "inference_width": 0.0625,
    "inference_repeats": 1,
    "inference_compile": False,
    "inference_gemm_n": 2048,
    "gpu_width": 0.25,
    "gpu_batch": 1,
    "gpu_repeats": 2,
    "pipeline_width": 0.03125,
    "pipeline_repeats": 1,
    "pipeline_warmup": False,
    "train_width": 0.03125,
    "train_batch": 1,
    "train_steps": 1,
    "train_warmup": 1,
    "train_repeats": 1,
    "serve_levels": {1: 2, 4: 4, 8: 8},
    "serve_repeats": 1,
    "consolidate_sizes": [10_000],
    "s3_files": 1,
    "s3_repeats": 1,
    "s3_read_stage": False,
    "section_timeout_s": 300,
}


# --- one section, in a child process ----------------------------------------------------------------------------------


def run_section(name: str, plan: dict) -> dict:
    """Measure one section as `plan` says; the child process's whole job."""
    workdir = Path(plan["workdir"])
    files = plan["files"]
    if name == "preprocess":
        from bench import preprocess

        preprocess.pin_one_core()
        return preprocess.measure(files["small"][: plan["preprocess_files"]], plan["preprocess_repeats"])
    if name == "inference":
        from bench import inference
        from ray_hrc.chips import Chip, read_fits
        from ray_hrc.preprocess import NormConfig, normalise

        chip = next(c for c in read_fits(files["small"][0]) if isinstance(c, Chip))
        image = normalise(chip.pixels, chip.amp_bias, NormConfig())
        return inference.measure(
            image,
            workdir,
            width=plan["inference_width"],
            repeats=plan["inference_repeats"],
            compile=plan["inference_compile"],
            gemm_n=plan["inference_gemm_n"],
        )
    if name == "gpu":
        from bench import gpu

        return gpu.measure(workdir, device="cuda", width=plan["gpu_width"], batch=plan["gpu_batch"], repeats=plan["gpu_repeats"])
    if name == "pipeline":
        from bench import pipeline
        from bench.common import random_checkpoint, start_ray, warm_page_cache

        start_ray()
        warm_page_cache(files["big"])
        checkpoint = random_checkpoint(workdir / "checkpoint_pipeline", plan["pipeline_width"])
        return pipeline.measure(
            files["small"], files["big"], checkpoint, workdir / "pipeline", repeats=plan["pipeline_repeats"], warmup=plan["pipeline_warmup"]
        )
    if name == "train":
        from bench import train_overhead
        from bench.common import start_ray

        start_ray()
        return train_overhead.measure(
            files["small"],
            workdir / "train",
            width=plan["train_width"],
            batch_size=plan["train_batch"],
            steps=plan["train_steps"],
            warmup=plan["train_warmup"],
            repeats=plan["train_repeats"],
        )
    if name == "serve":
        from bench import serve_load
        from bench.common import random_checkpoint, start_ray

        start_ray()
        checkpoint = random_checkpoint(workdir / "checkpoint_serve", plan["serve_width"])
        levels = {int(c): int(n) for c, n in plan["serve_levels"].items()}
        return serve_load.measure(
            files["small"][0], checkpoint, levels=levels, batch_size=plan["serve_batch"], repeats=plan["serve_repeats"]
        )
    if name == "consolidate":
        from bench import consolidate

        return consolidate.measure(workdir / "consolidate", tuple(plan["consolidate_sizes"]))
    if name == "s3":
        from bench import s3
        from bench.common import random_checkpoint, warm_page_cache

        warm_page_cache(files["small"])
        checkpoint = random_checkpoint(workdir / "checkpoint_s3", plan["pipeline_width"])
        n, repeats = plan["s3_files"], plan["s3_repeats"]
        return s3.measure(files["small"][:n], files["small"], workdir / "s3", checkpoint, repeats, plan["s3_read_stage"])
    raise ValueError(f"unknown section {name!r}; expected one of {SECTIONS}")


def child_main(args: argparse.Namespace) -> int:
    plan = json.loads(Path(args.plan).read_text())
    result = run_section(args.section, plan)
    Path(args.result).write_text(json.dumps(result, default=float))
    return 0


def spawn_section(name: str, plan_path: Path, workdir: Path, timeout: float) -> dict:
    """Run one section in a fresh Python process; its result, or {"error": ...} if it failed."""
    result_path = workdir / f"result_{name}.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])  # Ray workers import bench.*
    if name == "preprocess":
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--plan", str(plan_path), "--result", str(result_path)]
    t0 = time.perf_counter()
    try:  # on a timeout the child is killed; Ray's processes share its fate (Ray's kernel fate-sharing or reaper)
        proc = subprocess.run(cmd, env=env, cwd=str(ROOT), timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "section_wall_s": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not result_path.exists():
        return {"error": f"exited with status {proc.returncode}", "section_wall_s": wall}
    return {**json.loads(result_path.read_text()), "section_wall_s": wall}


# --- the driver ----------------------------------------------------------------------------------------------------------


def merge_into(old: dict, sections: list[str], results: dict, plan: dict, machine: dict, run: dict) -> tuple[dict, dict, dict, dict]:
    """An earlier run's results with `sections` replaced by this run's, and a note in the plan saying which and when.

    The machine description keeps the earlier run's (its load figures describe that run), with this run's versions.
    """
    if old["plan"]["quick"] != plan["quick"]:
        raise SystemExit(
            f"cannot merge a {'quick' if plan['quick'] else 'full'} run into a {'quick' if old['plan']['quick'] else 'full'} one"
        )
    c = run["contention"]
    when = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(run["started"]))
    note = (
        f"Section(s) {', '.join(sections)} re-measured on {when} (`{run['command']}`; load average "
        f"{', '.join(f'{x:.2f}' for x in c['loadavg_start'])} at its start, some task waiting for a CPU "
        + ("n/a" if c["cpu_pressure_some"] is None else f"{100 * c['cpu_pressure_some']:.0f}%")
        + " of its wall time) and merged into this run's results; the other sections are the run's own."
    )
    merged_plan = {**old["plan"], "notes": [*old["plan"].get("notes", []), note]}
    merged_run = {
        **old["run"],
        "section_wall_s": {**old["run"]["section_wall_s"], **{k: results[k].get("section_wall_s") for k in sections}},
    }
    merged_machine = {**old["machine"], "versions": {**old["machine"]["versions"], **machine["versions"]}}
    return {**old["sections"], **{k: results[k] for k in sections}}, merged_plan, merged_machine, merged_run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small inputs and narrow models: a smoke test (CI), not the figures")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto", help="cuda: the GPU section must run; cpu: skip it")
    parser.add_argument("--out", default=str(ROOT / "bench"), help="where results.json and RESULTS.md go (default: bench/)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--workdir", default=None, help="scratch folder for the archive and checkpoints (default: a temporary one)")
    parser.add_argument(
        "--report-from", default=None, help="rewrite the table and RESULTS.md from an existing results.json; measure nothing"
    )
    parser.add_argument(
        "--merge-into",
        default=None,
        help="an existing results.json: keep its other sections, replace the ones measured now, write both files to --out",
    )
    parser.add_argument("--section", help=argparse.SUPPRESS)
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.section:
        return child_main(args)

    if args.report_from:
        from bench import report

        old = json.loads(Path(args.report_from).read_text())
        _, md_path, figs = report.write(Path(args.out), old["sections"], old["plan"], old["machine"], old["run"])
        print(report.text_table(figs))
        print(f"rewrote {md_path} from {args.report_from}")
        return 0

    import torch

    from bench import gpu, report
    from bench.common import contention, load_snapshot, machine_info, make_archive

    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"unknown section(s) {unknown}; expected a subset of {','.join(SECTIONS)}")
    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        raise SystemExit("--device cuda: no CUDA device is visible to torch; use --device auto or cpu")
    plan = dict(QUICK if args.quick else FULL)
    started, start_load, t0 = time.time(), load_snapshot(), time.perf_counter()
    machine = machine_info()

    with tempfile.TemporaryDirectory(prefix="ray_hrc_bench_") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        logger.info("writing %d synthetic raw files (and %d links) under %s", plan["n_files"], plan["n_files"] * plan["copies"], workdir)
        t_archive = time.perf_counter()
        plan["files"] = make_archive(workdir / "archive", plan["n_files"], plan["copies"])
        archive_s = time.perf_counter() - t_archive
        plan["workdir"] = str(workdir)
        plan["notes"] = [
            f"{plan['n_files']} distinct synthetic raw files (`ray_hrc.synth.synthesize_archive`, 2 chips of 2048 x 4096 each), "
            f"written in {archive_s:.0f} s; the {plan['copies']}x larger set for section 4 hard-links each of them "
            f"{plan['copies']} times under distinct names (same bytes, read from the page cache as the distinct files are).",
            f"Models: seeded random weights (speed does not depend on them); BatchNorm statistics randomised so that folding is "
            f"exercised. Widths: inference {plan['inference_width']:g}, pipeline {plan['pipeline_width']:g}, training "
            f"{plan['train_width']:g}, GPU {plan['gpu_width']:g}.",
        ]
        plan_path = workdir / "plan.json"
        plan_path.write_text(json.dumps(plan))

        results: dict[str, dict] = {}
        for name in SECTIONS:
            if name not in sections:
                results[name] = gpu.skipped("not run (--sections)") if name == "gpu" else {"error": "not run (--sections)"}
                continue
            if name == "gpu" and (args.device == "cpu" or not cuda):
                reason = "--device cpu" if args.device == "cpu" else "no CUDA device on this machine"
                logger.info("section gpu skipped: %s", reason)
                results[name] = gpu.skipped(reason)
                continue
            logger.info("section %s ...", name)
            results[name] = spawn_section(name, plan_path, workdir, plan["section_timeout_s"])
            logger.info(
                "section %s: %.0f s%s",
                name,
                results[name]["section_wall_s"],
                f" ({results[name]['error']})" if "error" in results[name] else "",
            )

    run = {
        "started": started,
        "wall_s": time.perf_counter() - t0,
        "archive_s": archive_s,
        "section_wall_s": {k: v.get("section_wall_s") for k, v in results.items()},
        "contention": contention(start_load, load_snapshot()),
        "command": " ".join([Path(sys.executable).name, "bench/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "device": args.device,
    }
    plan.pop("files", None)
    wall_min = run["wall_s"] / 60
    if args.merge_into:
        results, plan, machine, run = merge_into(json.loads(Path(args.merge_into).read_text()), sections, results, plan, machine, run)
    json_path, md_path, figs = report.write(Path(args.out), results, plan, machine, run)
    print()
    print(report.text_table(figs))
    print(f"\nbench wall time {wall_min:.1f} min; wrote {json_path} and {md_path}")
    failed = [k for k, v in results.items() if "error" in v and not v["error"].startswith("not run")]
    if failed:
        print(f"sections that failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
