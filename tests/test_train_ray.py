"""Ray Train on a real local Ray: training, resume at the next epoch, a killed worker, and resource sizing."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from ray_hrc.checkpoint import load_checkpoint
from ray_hrc.config import ConfigError, load_config
from ray_hrc.data import good_chips, read_chips
from ray_hrc.manifest import read_manifest, write_manifest
from ray_hrc.train import cache_datasets, check_resources, run_training

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]


def _kill_a_worker_after(path: Path, done: threading.Event, killed: list) -> None:
    """Wait for `path` to appear (a checkpoint), then SIGKILL one Ray Train worker process mid-epoch.

    Workers are found by their process title (``ray::RayTrainWorker...``): the state API needs the dashboard,
    which the tests' Ray does not run.
    """
    import psutil

    while not done.is_set():
        if path.exists():
            time.sleep(2.0)  # into the next epoch
            for proc in psutil.process_iter(["cmdline"]):
                title = " ".join(proc.info["cmdline"] or [])
                if title.startswith("ray::RayTrainWorker"):
                    os.kill(proc.pid, signal.SIGKILL)
                    killed.append(proc.pid)
                    return
        time.sleep(0.5)


def test_train_resume_at_next_epoch_and_survive_a_killed_worker(ray_session, tiny_archive, tmp_path):
    overrides = [f"data.manifest={tiny_archive}", f"run.storage_path={tmp_path}", "run.name=r", "data.test_fraction=0.3", "data.cache=true"]
    first = run_training(load_config(SMOKE, overrides + ["train.epochs=1"]))
    assert [h["epoch"] for h in first.history] == [1]
    state = load_checkpoint(first.best_checkpoint)
    for key in (
        "model_args",
        "model_state",
        "optimizer_state",
        "epoch",
        "rng_state",
        "preprocess",
        "class_names",
        "history",
        "weights_hash",
    ):
        assert key in state, key
    assert state["class_names"] == ["galaxy", "NSC"] and state["model_args"]["width"] == 0.0625
    assert (tmp_path / "r" / "metrics.csv").exists() and (tmp_path / "r" / "training_curves.png").exists()
    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        run_training(load_config(SMOKE, overrides + ["train.epochs=2"]))

    done, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_a_worker_after, args=(tmp_path / "r" / "epoch_002", done, killed), daemon=True)
    killer.start()
    try:
        resumed = run_training(load_config(SMOKE, overrides + ["train.epochs=3", "run.max_failures=2"]), resume=True)
    finally:
        done.set()
    assert killed, "no training worker was killed: the fault was not exercised"
    epochs = [h["epoch"] for h in resumed.history]
    assert epochs == [1, 2, 3]  # resumed at epoch 2, not 1; after the kill, resumed from epoch 2's checkpoint
    assert resumed.history[0] == first.history[0]
    metrics = pd.read_csv(tmp_path / "r" / "metrics.csv")
    assert metrics["epoch"].tolist() == [1, 2, 3]


def test_refuses_workers_that_starve_ingest(ray_session):
    cfg = load_config(SMOKE, ["scaling.num_workers=2", "scaling.cpus_per_worker=1.0", "train.batch_size=2"])
    with pytest.raises(ConfigError, match="would wait forever"):
        check_resources(cfg)
    check_resources(load_config(SMOKE, ["scaling.num_workers=2", "scaling.cpus_per_worker=0.5", "train.batch_size=2"]))


def test_cached_chips_are_read_once(ray_session, tiny_archive, tmp_path, monkeypatch):
    """data.cache: chips are read into the object store once; epochs iterate them with the files gone."""
    import shutil

    import ray_hrc.train

    files = read_manifest(str(tiny_archive))
    for uri in files["URI"].unique():
        shutil.copy(uri, tmp_path)
    manifest = tmp_path / "manifest.csv"
    write_manifest(files.assign(URI=[str(tmp_path / Path(u).name) for u in files["URI"]]), manifest)
    cfg = load_config(SMOKE, [f"data.manifest={manifest}", "data.cache=true"])
    cached = cache_datasets({"train": good_chips(read_chips(str(manifest), cfg.data.read))}, len(files))
    for fits_file in tmp_path.glob("*.fits"):
        fits_file.unlink()
    for _epoch in range(2):
        rows = list(cached["train"].iter_rows())
        assert len(rows) == len(files) and all(r["pixels"].shape == (2048, 4096) for r in rows)

    monkeypatch.setattr(ray_hrc.train, "CHIP_BYTES", 2**40)
    with pytest.raises(ConfigError, match=r"data.cache: \d+ chips need .* GiB of object store"):
        cache_datasets({}, len(files))
