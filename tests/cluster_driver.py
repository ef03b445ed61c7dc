"""Drivers for the multi-node tests. Each runs in its own process (`python tests/cluster_driver.py MODE ...`) so it
never touches the test session's Ray, and prints one JSON line with what it saw."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import ray

from ray_hrc.classify import ClassifyConfig, classify_archive
from ray_hrc.data import ReadConfig


def _alive_nodes() -> int:
    return sum(1 for n in ray.nodes() if n["Alive"])


def _watch_nodes(before: int) -> tuple[list[int], threading.Event]:
    """Count the alive nodes every half second in a daemon thread, until the event is set: (counts so far, event)."""
    peak, stop = [before], threading.Event()

    def watch():
        while not stop.is_set():
            peak.append(_alive_nodes())
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True).start()
    return peak, stop


def autoscale(address: str, manifest: str, checkpoint: str, out: str) -> dict:
    """Join an autoscaling cluster whose head has no CPU; classification's requests must bring up workers."""
    ray.init(address=address)
    before = _alive_nodes()
    peak, stop = _watch_nodes(before)
    summary = classify_archive(
        [manifest], checkpoint, out, read=ReadConfig(num_cpus=1), config=ClassifyConfig(cpus_per_actor=1, max_actors=1, use_gpu=False)
    )
    stop.set()
    return {"nodes_before": before, "nodes_peak": max(peak), "summary": summary}


def train(address: str, config: str, manifest: str, out: str) -> dict:
    """Join a cluster whose head has no CPU (as `ray job submit` does) and train; the autoscaler must bring up a worker."""
    from ray_hrc.config import load_config
    from ray_hrc.train import run_training

    ray.init(address=address)
    before, cpus = _alive_nodes(), ray.cluster_resources().get("CPU", 0)
    peak, stop = _watch_nodes(before)
    overrides = [f"run.storage_path={out}", "run.name=cluster"] + ([f"data.manifest={manifest}"] if manifest else [])
    cfg = load_config(config, overrides)  # no manifest: the config's own synthetic archive (smoke: 6 bodies, 3 splits)
    outcome = run_training(cfg)
    stop.set()
    return {"nodes_before": before, "cpus_before": cpus, "nodes_peak": max(peak), "epochs": [h["epoch"] for h in outcome.history],
            "best_checkpoint": outcome.best_checkpoint}  # fmt: skip


def node_loss(manifest: str, checkpoint: str, out: str) -> dict:
    """Three nodes on one machine; one worker node dies once the first chips are catalogued and a replacement joins
    (as an autoscaler would add one). Classification runs in a thread: node handling needs the main thread."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=2, object_store_memory=300 * 2**20) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    result: dict = {}

    def run():
        config = ClassifyConfig(cpus_per_actor=1, max_actors=1, use_gpu=False, part_rows=2)  # parts appear as chips finish
        result["summary"] = classify_archive([manifest], checkpoint, out, read=ReadConfig(num_cpus=1), config=config)

    worker = threading.Thread(target=run)
    worker.start()
    parts, removed = Path(out) / "_parts", False
    deadline = time.time() + 400
    while worker.is_alive() and time.time() < deadline and not removed:
        if parts.exists() and any(p.suffix == ".parquet" for p in parts.iterdir()):
            cluster.remove_node(workers[0], allow_graceful=False)
            removed = True
            cluster.add_node(num_cpus=2, object_store_memory=300 * 2**20)
        time.sleep(0.2)
    worker.join()
    if "summary" in result:  # a rerun on the same --out: the chips the lost node took are retried (transient), the rest kept
        config = ClassifyConfig(cpus_per_actor=1, max_actors=1, use_gpu=False, part_rows=2)
        result["rerun"] = classify_archive([manifest], checkpoint, out, read=ReadConfig(num_cpus=1), config=config)
    ray.shutdown()
    cluster.shutdown()
    return {"removed": removed, **result}


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    result = {"autoscale": autoscale, "train": train, "node_loss": node_loss}[mode](*args)
    print("RESULT " + json.dumps(result, default=str))
