"""Object storage against local disk: the same files on a local S3-protocol server (moto, loopback) and on disk.

Four ways to read a file's chips (read + crop + bias + normalise, as `ray_hrc.data.chip_rows` does), each pass over
the same files, interleaved, in one process:

* ``local``: the fast path on a local file (`read_fits(path)`: headers walked, rows memory-mapped);
* ``astropy_fsspec``: remote URIs as the project read them before `ray_hrc.remote` (astropy opens the URI lazily
  through fsspec and reads it block by block, then crops from its HDU list);
* ``whole``: `ray_hrc.remote` fetching the object in one GET, then the fast walker on its bytes (the default);
* ``ranges``: `ray_hrc.remote` fetching the headers and the SCI extensions' byte ranges (HEAD first).

Wall clock per chip is the figure (a remote read waits on the network, which CPU time does not count); the
process's CPU time per chip is kept too. Requests per file and bytes fetched per chip come from one more pass of each
remote way through a counting proxy (`bench.s3proxy`) in front of the server, kept out of the timed passes.

Then, on a private local Ray: `ray-hrc classify` (`classify_archive`) over the files from the S3 server against the
same over the files on disk, interleaved (chips/s; the target is >= 0.8 of local), and the read stage alone
(`read_chips(...).materialize()`) from disk, and from S3 with 1 and with 0.5 CPU per read task (two tasks per core
overlap one's network wait with another's decoding).

The S3 server runs in its own process on the same machine: its CPU time (serving 35 MB per file from Python) is
taken from the same cores as the readers', so on a machine with few cores these figures understate what a cluster
reading from a real bucket gets.

    python bench/s3.py [--files N] [--repeats R]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from bench.common import median

logger = logging.getLogger(__name__)

WAYS = ("local", "astropy_fsspec", "whole", "ranges")
PACED_BYTES_PER_S = 100e6
"""Per-connection transfer rate of the paced proxy: an assumed figure for one connection to a bucket in the same
region, chosen for the emulation (not AWS's published figure, and not measured here)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """moto's S3 server in its own process on a loopback port; `options` are fsspec storage options for it."""

    def __init__(self):
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"}}
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> S3Server:
        server = Path(sys.executable).parent / "moto_server"
        cmd = [str(server), "-H", "127.0.0.1", "-p", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.1)
        self.__exit__()
        raise RuntimeError(f"moto_server did not start on port {self.port} within 30 s")

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)

    def cpu_s(self) -> float:
        """CPU seconds (user + system) the server process has used so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def upload(self, paths: list[str], bucket: str = "hst") -> list[str]:
        import boto3
        import s3fs

        client = boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing"
        )
        client.create_bucket(Bucket=bucket)
        fs = s3fs.S3FileSystem(**self.options)
        uris = []
        for path in paths:
            uri = f"s3://{bucket}/{Path(path).name}"
            fs.put_file(path, uri)
            uris.append(uri)
        return uris


def astropy_fsspec_records(uri: str, storage_options: dict) -> list:
    """The remote read before `ray_hrc.remote`: astropy opens the URI lazily through fsspec, crops from its HDUs."""
    from astropy.utils.exceptions import AstropyWarning

    from ray_hrc import chips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyWarning)
        hdul = chips._open_checked(uri, uri, storage_options)
        with hdul:
            scis, cut_short = chips._sci_hdus(hdul)
            return chips._read_selected(hdul[0].header, scis, cut_short, None, uri, os.path.basename(uri))


def read_one(way: str, source: str, storage_options: dict | None) -> list:
    from ray_hrc.chips import read_fits
    from ray_hrc.remote import FetchConfig

    if way == "local":
        return read_fits(source)
    if way == "astropy_fsspec":
        return astropy_fsspec_records(source, storage_options)
    return read_fits(source, storage_options=storage_options, fetch=FetchConfig(mode=way))


def timed_pass(way: str, sources: list[str], storage_options: dict | None, server: S3Server) -> dict:
    """Read + crop + normalise every chip of `sources` one way; wall, CPU and the server's CPU seconds per chip."""
    from ray_hrc.chips import Chip
    from ray_hrc.preprocess import NormConfig, preprocess_row

    cfg, chips, errors = NormConfig(), 0, []
    wall0, cpu0, server0 = time.perf_counter(), time.process_time(), server.cpu_s()
    for source in sources:
        for record in read_one(way, source, storage_options):
            if isinstance(record, Chip):
                preprocess_row(record.to_row(), cfg)
                chips += 1
            else:
                errors.append(record.message)
    wall, cpu, server_cpu = time.perf_counter() - wall0, time.process_time() - cpu0, server.cpu_s() - server0
    if errors or not chips:
        raise RuntimeError(f"{way}: {len(errors)} error(s) reading {len(sources)} file(s): {errors[:3]}")
    return {
        "chips": chips,
        "wall_ms_per_chip": 1e3 * wall / chips,
        "cpu_ms_per_chip": 1e3 * cpu / chips,
        "server_cpu_ms_per_chip": 1e3 * server_cpu / chips,
    }


def count_requests(way: str, uris: list[str], server: S3Server, sizes: list[int]) -> dict:
    """Requests per file and bytes fetched per chip for one remote way, through a counting proxy."""
    from bench.s3proxy import CountingProxy
    from ray_hrc.chips import Chip

    with CountingProxy(server.endpoint) as proxy:
        options = {**server.options, "client_kwargs": {**server.options["client_kwargs"], "endpoint_url": proxy.endpoint}}
        chips = sum(isinstance(r, Chip) for uri in uris for r in read_one(way, uri, options))
        requests = list(proxy.requests)
    by_method: dict[str, int] = {}
    for method, *_ in requests:
        by_method[method] = by_method.get(method, 0) + 1
    fetched = sum(n for *_, n in requests)
    return {
        "requests_per_file": len(requests) / len(uris),
        "requests_by_method": by_method,
        "bytes_fetched_per_chip": fetched / chips,
        "file_bytes_per_chip": sum(sizes) / chips,
        "fetched_over_file": fetched / sum(sizes),
    }


def sci_bytes_per_chip(paths: list[str]) -> float:
    """The floor of bytes fetched per chip: one read of each SCI extension's data."""
    from ray_hrc.chips import map_fits

    scis = [sci for path in paths for _, sci in map_fits(path)[1]]
    return sum(s.section.nbytes for s in scis) / len(scis)


def run_pipeline(sources: list[str], checkpoint: str, out: Path, storage_options: dict | None) -> dict:
    from bench.common import wait_for_empty_store
    from ray_hrc.classify import ClassifyConfig, classify_archive
    from ray_hrc.data import ReadConfig

    wait_for_empty_store()
    t0 = time.perf_counter()
    summary = classify_archive(
        sources,
        checkpoint,
        str(out),
        read=ReadConfig(storage_options=storage_options or {}),
        config=ClassifyConfig(device="cpu"),
        overwrite=True,
    )
    wall = time.perf_counter() - t0
    if summary["failed"] or not summary["chips"]:
        raise RuntimeError(f"classify over {len(sources)} file(s) failed: {summary}")
    return {"wall_s": wall, "chips": summary["chips"], "chips_per_s": summary["chips"] / wall}


def run_read_stage(sources: list[str], checkpoint: str, storage_options: dict | None, num_cpus: float) -> dict:
    from bench.common import wait_for_empty_store
    from ray_hrc.checkpoint import load_checkpoint, norm_from_checkpoint
    from ray_hrc.data import ReadConfig, read_chips

    norm = norm_from_checkpoint(load_checkpoint(checkpoint))
    wait_for_empty_store()
    t0 = time.perf_counter()
    ds = read_chips(sources, ReadConfig(storage_options=storage_options or {}, num_cpus=num_cpus), norm=norm).materialize()
    wall = time.perf_counter() - t0
    rows = ds.count()
    del ds
    return {"wall_s": wall, "chips": rows, "chips_per_s": rows / wall}


def measure(
    paths: list[str], pipeline_paths: list[str], workdir: Path, checkpoint: str | None, repeats: int, read_stage: bool = True
) -> dict:
    """Every figure of the section (see the module docstring); `checkpoint` None skips the Ray part, `read_stage`
    False the read stage alone (and the paced proxy)."""
    workdir.mkdir(parents=True, exist_ok=True)
    with S3Server() as server:
        uris = server.upload(sorted(set(paths) | set(pipeline_paths)))
        uri_of = dict(zip(sorted(set(paths) | set(pipeline_paths)), uris, strict=True))
        sources = {"local": paths, **{w: [uri_of[p] for p in paths] for w in WAYS[1:]}}
        for way in WAYS:  # warm-up: imports, compiled loops, the filesystems' clients, moto's first answers
            read_one(way, sources[way][0], server.options)
        passes: dict[str, list[dict]] = {w: [] for w in WAYS}
        for _ in range(repeats):
            for way in WAYS:
                passes[way].append(timed_pass(way, sources[way], server.options, server))
                logger.info("s3 %s: %.1f ms/chip wall", way, passes[way][-1]["wall_ms_per_chip"])
        sizes = [os.path.getsize(p) for p in paths]
        requests = {w: count_requests(w, sources[w], server, sizes) for w in WAYS[1:]}
        result = {
            "files": len(paths),
            "repeats": repeats,
            "file_mb": median([s / 1e6 for s in sizes]),
            "passes": passes,
            "ms_per_chip": {w: median([p["wall_ms_per_chip"] for p in passes[w]]) for w in WAYS},
            "cpu_ms_per_chip": {w: median([p["cpu_ms_per_chip"] for p in passes[w]]) for w in WAYS},
            "server_cpu_ms_per_chip": {w: median([p["server_cpu_ms_per_chip"] for p in passes[w]]) for w in WAYS},
            "requests": requests,
            "sci_bytes_per_chip": sci_bytes_per_chip(paths),
        }
        result["s3_preprocess_ms_per_chip"] = result["ms_per_chip"]["whole"]
        result["s3_requests_per_file"] = requests["whole"]["requests_per_file"]
        if checkpoint is not None:
            uris = [uri_of[p] for p in pipeline_paths]
            result.update(measure_pipeline(pipeline_paths, uris, server, checkpoint, workdir, repeats, read_stage))
    return result


def measure_pipeline(
    paths: list[str], uris: list[str], server: S3Server, checkpoint: str, workdir: Path, repeats: int, read_stage: bool = True
) -> dict:
    from bench.common import start_ray
    from bench.s3proxy import CountingProxy

    start_ray()
    names = ["pipeline_local", "pipeline_s3", "pipeline_s3_paced", "read_local", "read_s3_1cpu", "read_s3_half_cpu", "read_s3_paced_1cpu", "read_s3_paced_half_cpu"]  # fmt: skip
    names = names if read_stage else names[:2]
    runs: dict[str, list[dict]] = {k: [] for k in names}
    run_pipeline(paths[:1], checkpoint, workdir / "warmup", None)  # workers, model actors and imports warm
    with CountingProxy(server.endpoint, rate_bytes_per_s=PACED_BYTES_PER_S) as paced:
        slow = {**server.options, "client_kwargs": {**server.options["client_kwargs"], "endpoint_url": paced.endpoint}}
        for _ in range(repeats):
            runs["pipeline_local"].append(run_pipeline(paths, checkpoint, workdir / "local", None))
            runs["pipeline_s3"].append(run_pipeline(uris, checkpoint, workdir / "s3", server.options))
            if not read_stage:
                continue
            runs["pipeline_s3_paced"].append(run_pipeline(uris, checkpoint, workdir / "s3", slow))
            runs["read_local"].append(run_read_stage(paths, checkpoint, None, 1.0))
            runs["read_s3_1cpu"].append(run_read_stage(uris, checkpoint, server.options, 1.0))
            runs["read_s3_half_cpu"].append(run_read_stage(uris, checkpoint, server.options, 0.5))
            runs["read_s3_paced_1cpu"].append(run_read_stage(uris, checkpoint, slow, 1.0))
            runs["read_s3_paced_half_cpu"].append(run_read_stage(uris, checkpoint, slow, 0.5))
            logger.info("s3 pipeline: %s", {k: round(v[-1]["chips_per_s"], 2) for k, v in runs.items()})
    for name in ("warmup", "local", "s3"):
        shutil.rmtree(workdir / name, ignore_errors=True)
    cps = {k: median([r["chips_per_s"] for r in v]) for k, v in runs.items()}
    return {
        "pipeline_runs": runs,
        "chips_per_s": cps,
        "pipeline_files": len(paths),
        "s3_vs_local_pipeline": cps["pipeline_s3"] / cps["pipeline_local"],
        "paced_bytes_per_s": PACED_BYTES_PER_S,
        "s3_vs_local_read_stage": {k[len("read_s3_") :]: cps[k] / cps["read_local"] for k in names if k.startswith("read_s3")},
        "s3_vs_local_pipeline_per_repeat": [
            s["chips_per_s"] / loc["chips_per_s"] for s, loc in zip(runs["pipeline_s3"], runs["pipeline_local"], strict=True)
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--pipeline", action="store_true", help="also the Ray pipeline figures (starts a local Ray)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from bench.common import make_archive, random_checkpoint

    with tempfile.TemporaryDirectory(prefix="ray_hrc_s3_") as tmp:
        files = make_archive(Path(tmp) / "archive", args.files, 1)["small"]
        checkpoint = random_checkpoint(Path(tmp) / "checkpoint", 0.0625) if args.pipeline else None
        result = measure(files, files, Path(tmp) / "work", checkpoint, args.repeats)
    result.pop("passes")
    print(json.dumps(result, indent=2, default=float))


if __name__ == "__main__":
    main()
