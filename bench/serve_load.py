"""Section serve: Ray Serve under HTTP load from `hey`, beside the model's own chips/s (issue 11).

One replica of `ray_hrc.serve` (every CPU of the machine, the narrow model, ``batch_size`` chips per forward pass)
gets ``POST /classify`` with a synthetic raw file (2 chips, 34 MB) at concurrency 1, 4 and 8. `hey` (Debian's
package) sends the body intact and writes one CSV line per request; requests/s, chips/s and p50/p99 latency come
from those lines. The baseline is the model alone in this process: `ChipClassifier.probabilities` on
``batch_size`` normalised chips with the replica's torch thread count. ``serve_efficiency_c8`` is Serve's chips/s at
concurrency 8 over that rate; the replica's own counters (forward passes, chips) say how full its batches were.
"""

from __future__ import annotations

import csv
import io
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np

from bench.common import median

CHIPS_PER_FILE = 2


def model_chips_per_s(checkpoint: str, image: np.ndarray, batch: int, threads: int, repeats: int) -> dict:
    """The model alone: chips/s of `ChipClassifier.probabilities` on `batch` chips, median of `repeats`."""
    import torch

    from ray_hrc.predict import ChipClassifier

    torch.set_num_threads(threads)
    classifier = ChipClassifier(checkpoint, device="cpu")
    images = np.stack([image] * batch)
    classifier.probabilities(images[:1])  # warm-up: first-call allocations
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        classifier.probabilities(images)
        times.append(time.perf_counter() - t0)
    return {"model_chips_per_s": batch / median(times), "model_s_per_batch": times, "model_batch": batch, "model_threads": threads}


def hey(url: str, body: Path, requests: int, concurrency: int, timeout_s: int = 600) -> dict:
    """`hey` POSTing `body` `requests` times at `concurrency`; figures from its per-request CSV."""
    cmd = ["hey", "-n", str(requests), "-c", str(concurrency), "-m", "POST", "-D", str(body), "-T", "application/octet-stream"]
    cmd += ["-t", str(timeout_s), "-o", "csv", url]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=timeout_s * 2)
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    latency = np.array([float(r["response-time"]) for r in rows])
    starts = np.array([float(r["offset"]) for r in rows])
    statuses = [int(r["status-code"]) for r in rows]
    wall = float((starts + latency).max() - starts.min())
    return {
        "concurrency": concurrency,
        "requests": len(rows),
        "ok": statuses.count(200),
        "wall_s": wall,
        "requests_per_s": len(rows) / wall,
        "chips_per_s": statuses.count(200) * CHIPS_PER_FILE / wall,
        "p50_s": float(np.percentile(latency, 50)),
        "p99_s": float(np.percentile(latency, 99)),
        "command": " ".join(cmd),
    }


def measure(raw_file: str, checkpoint: str, *, levels: dict[int, int], batch_size: int, repeats: int) -> dict:
    """levels: concurrency -> number of requests at it."""
    import ray
    import requests
    from ray import serve

    from ray_hrc.chips import Chip, read_fits
    from ray_hrc.preprocess import NormConfig, normalise
    from ray_hrc.serve import run_server

    if shutil.which("hey") is None:
        raise RuntimeError("`hey` is not installed (Debian: apt-get install -y hey)")
    cpus = int(ray.cluster_resources()["CPU"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = run_server(checkpoint, port=port, max_body_mb=64, num_cpus=cpus, batch_size=batch_size, blocking=False)
    try:
        info = requests.get(f"{url}/", timeout=60).json()
        threads = int(info["torch_threads"])
        requests.post(f"{url}/classify", data=Path(raw_file).read_bytes(), timeout=600).raise_for_status()  # warm-up
        out: dict = {"serve_levels": {}, "serve_replica_cpus": cpus, "serve_batch_size": batch_size, "serve_torch_threads": threads}
        for concurrency, n in levels.items():
            before = requests.get(f"{url}/", timeout=60).json()
            level = hey(f"{url}/classify", Path(raw_file), n, concurrency)
            after = requests.get(f"{url}/", timeout=60).json()
            passes = after["forward_passes"] - before["forward_passes"]
            level["mean_chips_per_forward_pass"] = (after["chips"] - before["chips"]) / max(1, passes)
            out["serve_levels"][concurrency] = level
    finally:
        serve.shutdown()
    chip = next(c for c in read_fits(raw_file) if isinstance(c, Chip))
    image = normalise(chip.pixels, chip.amp_bias, NormConfig())
    out.update(model_chips_per_s(checkpoint, image, batch_size, threads, repeats))
    for concurrency, level in out["serve_levels"].items():
        level["efficiency"] = level["chips_per_s"] / out["model_chips_per_s"]
        out[f"serve_efficiency_c{concurrency}"] = level["efficiency"]
        out[f"serve_p99_s_c{concurrency}"] = level["p99_s"]
        out[f"serve_p50_s_c{concurrency}"] = level["p50_s"]
        out[f"serve_requests_per_s_c{concurrency}"] = level["requests_per_s"]
    return out
