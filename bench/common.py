"""What every benchmark section shares: the machine's description, a private local Ray, the synthetic archive,
seeded checkpoints, a peak-memory sampler and medians.

Timings on a shared machine are noisy, so each section measures a figure and its baseline in the same process,
on the same inputs, interleaving their repeats, and reports medians. The machine description records the load
and CPU pressure around the run so that a reader can tell a quiet run from a contended one.
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import threading
import time
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

CHIP_SHAPE = (2048, 4096)
MIB = 2**20


def median(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None]
    return float(statistics.median(values)) if values else None


def cpu_pressure_total_us() -> int | None:
    """Microseconds that some task has waited for a CPU since boot (Linux PSI), or None where PSI is unavailable."""
    try:
        for line in Path("/proc/pressure/cpu").read_text().splitlines():
            if line.startswith("some"):
                return int(line.split("total=")[1])
    except (OSError, IndexError, ValueError):
        return None
    return None


def load_snapshot() -> dict:
    """Load average and the PSI counter now; two snapshots give the share of time tasks waited for a CPU."""
    return {"time": time.time(), "loadavg": list(os.getloadavg()), "cpu_pressure_us": cpu_pressure_total_us()}


def contention(start: dict, end: dict) -> dict:
    """Load averages at both ends and the share of wall time during which some task waited for a CPU."""
    wall = end["time"] - start["time"]
    waited = None
    if start["cpu_pressure_us"] is not None and end["cpu_pressure_us"] is not None and wall > 0:
        waited = (end["cpu_pressure_us"] - start["cpu_pressure_us"]) / 1e6 / wall
    return {"loadavg_start": start["loadavg"], "loadavg_end": end["loadavg"], "cpu_pressure_some": waited}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))
    except OSError:
        pass
    return []


def machine_info() -> dict:
    """The machine and the versions of everything the figures depend on."""
    import astropy
    import numba
    import numpy as np
    import psutil
    import ray
    import torch

    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    return {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": gpu,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": {
            "torch": torch.__version__,
            "ray": ray.__version__,
            "numpy": np.__version__,
            "astropy": astropy.__version__,
            "numba": numba.__version__,
        },
        "torch_threads": torch.get_num_threads(),
    }


# --- Ray -----------------------------------------------------------------------------------------------------------------


def start_ray(num_cpus: int | None = None) -> None:
    """A private local Ray for this process (never another user's cluster), quiet, without progress bars."""
    import ray

    if ray.is_initialized():
        return
    cpus = num_cpus or len(os.sched_getaffinity(0))
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


# --- inputs --------------------------------------------------------------------------------------------------------------


def make_archive(out_dir: Path, n_files: int, copies: int, seed: int = 0) -> dict[str, list[str]]:
    """`n_files` distinct synthetic raw files, and a `copies` x larger set of the same files under distinct names.

    The larger set hard-links each file `copies` times (named ``<obsid>c<k>_raw.fits``): the same bytes, read from
    the page cache as the distinct files are, without writing `copies` x as many gigabytes to a shared disk.
    Returns {"small": paths, "big": paths}.
    """
    from ray_hrc.synth import synthesize_archive

    out_dir.mkdir(parents=True, exist_ok=True)
    bodies = max(1, (n_files + 1) // 2)
    per_body = max(1, -(-n_files // bodies))
    manifest = synthesize_archive(out_dir / "distinct", bodies=bodies, seed=seed, files_per_body=(per_body, per_body), workers=None)
    small = sorted(str(p) for p in manifest.parent.glob("*_raw.fits"))[:n_files]
    links = out_dir / "linked"
    links.mkdir(exist_ok=True)
    big = []
    for k in range(copies):
        for path in small:
            target = links / Path(path).name.replace("_raw.fits", f"c{k}_raw.fits")
            if not target.exists():
                os.link(path, target)
            big.append(str(target))
    return {"small": small, "big": big}


def warm_page_cache(paths: Sequence[str]) -> None:
    """Read each file once (hard links to one file once in all), so that reads come from the page cache."""
    by_inode = {(st.st_dev, st.st_ino): p for p in paths for st in [os.stat(p)]}
    for path in by_inode.values():
        with open(path, "rb") as fh:
            while fh.read(1 << 24):
                pass


def random_checkpoint(directory: Path, width: float, seed: int = 0, randomise_bn: bool = True) -> str:
    """A checkpoint of HR-CelestialNet at `width` with seeded random weights (and non-trivial BatchNorm statistics,
    so that folding them is exercised); returns its directory."""
    import torch
    from torch import nn

    from ray_hrc.checkpoint import save_checkpoint
    from ray_hrc.models import build_model
    from ray_hrc.preprocess import NormConfig

    torch.manual_seed(seed)
    args = {"width": width, "input_shape": list(CHIP_SHAPE)}
    model = build_model("hrcelestialnet", **args)
    if randomise_bn:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.05, 0.05)
                    m.running_var.uniform_(0.5, 1.5)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.05, 0.05)
    save_checkpoint(
        str(directory),
        {"model_name": "hrcelestialnet", "model_args": args, "model_state": model.state_dict(), "epoch": 0,
         "preprocess": NormConfig().to_dict()},
    )  # fmt: skip
    return str(directory)


# --- memory ----------------------------------------------------------------------------------------------------------------


def _status_kib(pid: int, keys: tuple[str, ...] = ("RssAnon", "RssShmem")) -> dict[str, int]:
    """Resident memory counters of a process from /proc/<pid>/status (KiB); cheap, unlike smaps, which walks page tables."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in keys:
                out[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return out


def object_store_bytes(raylet: tuple[str, int]) -> int:
    """Bytes the object store of the raylet at (address, port) holds, by Ray's own account (spilling fallback included)."""
    from ray._private.internal_api import get_memory_info_reply

    reply = get_memory_info_reply(None, node_manager_address=raylet[0], node_manager_port=raylet[1], timeout_seconds=5)
    return int(reply.store_stats.object_store_bytes_used + reply.store_stats.object_store_bytes_fallback)


def local_raylet() -> tuple[str, int]:
    import ray

    node = next(n for n in ray.nodes() if n["Alive"])
    return node["NodeManagerAddress"], node["NodeManagerPort"]


def wait_for_empty_store(limit_bytes: int = 64 * MIB, timeout: float = 60.0) -> int:
    """Collect garbage and wait until the object store holds less than `limit_bytes` (objects are freed asynchronously)."""
    import gc

    raylet = local_raylet()
    deadline = time.monotonic() + timeout
    while True:
        gc.collect()
        used = object_store_bytes(raylet)
        if used < limit_bytes or time.monotonic() > deadline:
            return used
        time.sleep(0.5)


class MemorySampler:
    """Peak memory of this process, every process it started (Ray's GCS, raylet and workers) and the object store.

    Every `interval` seconds: the private resident memory of each process (RssAnon: heap, arrays, tensors; shared
    libraries, which do not grow with the data, are left out) plus the bytes the object store holds by Ray's own
    account (the raylet's store stats). Object-store pages are shared memory mapped into the workers and the
    driver (RssShmem); they are counted once, through the store's figure, not once per process. A sample costs
    a few milliseconds of CPU (reading /proc/<pid>/status and one RPC), so it does not slow what it measures.
    """

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.peak_total = 0
        self.peak_processes = 0
        self.peak_store = 0
        self.peak_rss_shmem = 0
        self.samples = 0
        self.store_errors = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._raylet: tuple[str, int] | None = None

    def _store_bytes(self) -> int:
        if self._raylet is None:
            self._raylet = local_raylet()
        try:
            return object_store_bytes(self._raylet)
        except Exception:  # noqa: BLE001 - a missed sample must not stop the run; counted and reported
            self.store_errors += 1
            return 0

    def sample(self) -> None:
        import psutil

        me = psutil.Process()
        try:
            pids = [me.pid] + [p.pid for p in me.children(recursive=True)]
        except psutil.Error:
            pids = [me.pid]
        processes, shmem = 0, 0
        for pid in pids:
            counters = _status_kib(pid)
            processes += counters.get("RssAnon", 0) * 1024
            shmem += counters.get("RssShmem", 0) * 1024
        store = self._store_bytes()
        self.peak_total = max(self.peak_total, processes + store)
        self.peak_processes = max(self.peak_processes, processes)
        self.peak_store = max(self.peak_store, store)
        self.peak_rss_shmem = max(self.peak_rss_shmem, shmem)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            self.sample()
            self._stop.wait(max(0.0, self.interval - (time.perf_counter() - t0)))

    def __enter__(self) -> MemorySampler:
        self.sample()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    def result(self) -> dict:
        return {
            "peak_mib": self.peak_total / MIB,
            "peak_processes_mib": self.peak_processes / MIB,
            "peak_object_store_mib": self.peak_store / MIB,
            "peak_rss_shmem_mib": self.peak_rss_shmem / MIB,
            "samples": self.samples,
            "store_errors": self.store_errors,
        }
