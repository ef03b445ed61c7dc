"""`bench/run.py --quick` end to end: every figure of results.json is there and sane, and RESULTS.md is written.

Timing targets are not asserted (a shared CI machine makes them noise); what is asserted does not depend on
timing: every section ran, every number is a positive finite figure, GPU figures are null without CUDA, and a chip
takes 16 MiB (16-bit pixels) in the object store.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.timeout(480), pytest.mark.slow]

CPU_KEYS = [
    "preprocess_ms_per_chip",
    "preprocess_naive_ms_per_chip",
    "cpu_forward_s_per_chip",
    "cpu_forward_eager_s_per_chip",
    "pipeline_efficiency",
    "pipeline_peak_memory_ratio",
    "train_ray_vs_plain",
    "object_store_mib_per_chip",
    "serve_efficiency_c8",
    "serve_p99_s_c8",
]
GPU_KEYS = ["gpu_infer_chips_per_s", "gpu_train_chips_per_s"]


@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--device", "auto", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=470)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the bench, its section processes and their Ray clusters
        proc.communicate()
        raise
    assert proc.returncode == 0, f"bench/run.py --quick failed:\n{stdout[-3000:]}\n{stderr[-6000:]}"
    return out, json.loads((out / "results.json").read_text()), stdout


def test_every_figure_is_a_positive_number(quick_bench):
    _, results, _ = quick_bench
    for key in CPU_KEYS:
        value = results[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, f"{key} = {value!r}"
    assert 0 < results["pipeline_efficiency"] < 2
    assert 0 < results["pipeline_peak_memory_ratio"] < 10
    assert 0 < results["train_ray_vs_plain"] < 3
    assert results["preprocess_naive_ms_per_chip"] > results["preprocess_ms_per_chip"]


def test_s3_figures(quick_bench):
    _, results, _ = quick_bench
    assert results["s3_requests_per_file"] == 1  # one GET per file
    assert results["s3_preprocess_ms_per_chip"] > 0 and 0 < results["s3_vs_local_pipeline"] < 3
    requests = results["sections"]["s3"]["requests"]
    assert requests["whole"]["fetched_over_file"] == 1 and requests["astropy_fsspec"]["requests_per_file"] >= 1


def test_gpu_figures_are_null_without_cuda(quick_bench):
    import torch

    _, results, _ = quick_bench
    for key in GPU_KEYS:
        if torch.cuda.is_available():
            assert results[key] > 0, key
        else:
            assert results[key] is None, key
    if not torch.cuda.is_available():
        assert "no CUDA" in results["sections"]["gpu"]["gpu_skipped"]


def test_a_chip_takes_16_mib_in_the_object_store(quick_bench):
    _, results, _ = quick_bench
    stats = results["sections"]["pipeline"]["object_store_stats"]
    assert stats["rows"] > 0
    assert 2**24 <= stats["bytes"] / stats["rows"] <= 2**24 + 1024  # float16 pixels plus the row's metadata


def test_results_md_and_table(quick_bench):
    out, results, stdout = quick_bench
    text = (out / "RESULTS.md").read_text()
    assert "## Machine" in text and "## Figures" in text
    assert results["machine"]["versions"]["torch"] in text
    for figure in results["figures"]:
        assert figure["name"] in text and figure["reproduce"] in text
    assert any(line.startswith("#  figure") and line.rstrip().endswith("met  n") for line in stdout.splitlines())  # the printed table
    assert results["plan"]["quick"] is True


def test_merge_into_replaces_only_the_sections_measured():
    """`bench/run.py --sections preprocess --merge-into results.json`: the other sections stay the earlier run's."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from bench.run import merge_into

    old = {
        "sections": {"preprocess": {"preprocess_ms_per_chip": 40.0}, "train": {"train_ray_vs_plain": 0.9}},
        "plan": {"quick": False, "notes": ["archive"]},
        "machine": {"cpu": "old", "versions": {"numpy": "1"}},
        "run": {"wall_s": 900.0, "section_wall_s": {"preprocess": 15.0, "train": 200.0}},
    }
    new = {"preprocess": {"preprocess_ms_per_chip": 7.0, "section_wall_s": 17.0}, "train": {"error": "not run (--sections)"}}
    run = {
        "started": 0.0,
        "command": "python bench/run.py --sections preprocess",
        "contention": {"loadavg_start": [1.0, 2.0, 3.0], "cpu_pressure_some": 0.5},
    }
    sections, plan, machine, merged_run = merge_into(old, ["preprocess"], new, {"quick": False}, {"versions": {"numba": "2"}}, run)
    assert sections == {"preprocess": new["preprocess"], "train": old["sections"]["train"]}
    assert plan["notes"][0] == "archive" and "preprocess re-measured" in plan["notes"][1] and "50%" in plan["notes"][1]
    assert machine == {"cpu": "old", "versions": {"numpy": "1", "numba": "2"}}
    assert merged_run["section_wall_s"] == {"preprocess": 17.0, "train": 200.0} and merged_run["wall_s"] == 900.0
    with pytest.raises(SystemExit, match="quick"):
        merge_into(old, ["preprocess"], new, {"quick": True}, {"versions": {}}, run)
