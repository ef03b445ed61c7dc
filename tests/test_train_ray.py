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


@pytest.fixture(scope="module")
def six_bodies(module_tmp):
    """A synthetic archive of 6 bodies, 3 of each class, one file each: enough for train, validation and test by body."""
    from ray_hrc.synth import synthesize_archive

    return synthesize_archive(module_tmp / "six_bodies", bodies=6, seed=2, files_per_body=(1, 1), workers=2)


def test_train_resume_at_next_epoch_and_survive_a_killed_worker(ray_session, six_bodies, tmp_path):
    overrides = [f"data.manifest={six_bodies}", f"run.storage_path={tmp_path}", "run.name=r", "data.test_fraction=0.3", "data.cache=true"]
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
    parts = {name: set(read_manifest(str(tmp_path / "r" / f"{name}.csv"))["ID"]) for name in ("train", "val", "test")}
    assert parts["train"] and parts["val"] and parts["test"]
    assert not parts["train"] & parts["val"] and not parts["train"] & parts["test"] and not parts["val"] & parts["test"]


def test_the_test_manifest_is_not_read_before_training_ends(ray_session, six_bodies, tmp_path, monkeypatch):
    """--test-manifest: the file exists only from the moment training has ended; any earlier read fails the run.

    Training (`TorchTrainer.fit`) is wrapped so that the test manifest is written when it returns, with the time.
    best/ is chosen on validation, metrics.csv has validation columns and no test columns, and the test part is scored
    once, afterwards, into test_metrics.json.
    """
    import json

    from ray.train.torch import TorchTrainer

    from ray_hrc.manifest import split_manifest

    rest, held_out = split_manifest(read_manifest(str(six_bodies)), test_fraction=0.3, seed=0)
    train_manifest, test_manifest = tmp_path / "train_in.csv", tmp_path / "lists" / "test_in.csv"
    write_manifest(rest, train_manifest)
    fit, seen = TorchTrainer.fit, {}

    def fit_then_publish_the_test_manifest(self):
        seen["datasets"] = sorted(self.datasets) if hasattr(self, "datasets") else None
        result = fit(self)
        test_manifest.parent.mkdir()
        write_manifest(held_out, test_manifest)
        seen["published"] = time.time()
        return result

    monkeypatch.setattr(TorchTrainer, "fit", fit_then_publish_the_test_manifest)
    overrides = [f"data.manifest={train_manifest}", f"data.test_manifest={test_manifest}", f"run.storage_path={tmp_path}", "run.name=t",
                 "train.epochs=2", "data.val_fraction=0.4"]  # fmt: skip
    outcome = run_training(load_config(SMOKE, overrides))
    assert "published" in seen and seen["datasets"] == ["train", "val"]  # the test chips are not in training
    run = tmp_path / "t"
    metrics = pd.read_csv(run / "metrics.csv")
    assert {"val_loss", "val_accuracy", "val_f1_galaxy", "val_f1_nsc", "val_ece", "temperature"} <= set(metrics.columns)
    assert not [c for c in metrics.columns if "test" in c]
    best = metrics.loc[metrics["val_score"].idxmax(), "epoch"]
    assert load_checkpoint(outcome.best_checkpoint)["epoch"] + 1 == best == outcome.best_metrics["epoch"]
    test = json.loads((run / "test_metrics.json").read_text())
    assert test["best"]["chips"] == len(held_out) == outcome.test_metrics["best"]["chips"]
    assert test["best"]["epoch"] == best and test["last"]["epoch"] == 2 and not test["leaked_bodies"]
    assert 0 <= test["best"]["ece"] <= 1 and 0 <= test["best"]["ece_calibrated"] <= 1
    assert (run / "reliability.png").stat().st_mtime >= seen["published"]
    assert set(read_manifest(str(run / "test.csv"))["ID"]) == set(held_out["ID"])
    assert not set(read_manifest(str(run / "val.csv"))["ID"]) & set(held_out["ID"])


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


def test_a_resumed_run_ends_with_the_weights_of_a_straight_one(ray_session, six_bodies, tmp_path):
    """Stopped after epoch 2 and resumed, a run ends with exactly the weights of one that ran its 3 epochs straight:
    the augmentation generator, the RNG states and the data order continue where they stopped."""
    import torch

    base = [f"data.manifest={six_bodies}", f"run.storage_path={tmp_path}", "data.test_fraction=0.3", "data.cache=true", "run.num_to_keep=3",
            "augment.flips=true", "augment.roll=true", "augment.noise_prob=0.5", "train.shuffle_buffer=2"]  # fmt: skip
    straight = run_training(load_config(SMOKE, base + ["run.name=straight", "train.epochs=3"]))
    run_training(load_config(SMOKE, base + ["run.name=resumed", "train.epochs=2"]))
    resumed = run_training(load_config(SMOKE, base + ["run.name=resumed", "train.epochs=3"]), resume=True)
    a, b = (load_checkpoint(str(tmp_path / name / "epoch_003")) for name in ("straight", "resumed"))
    assert a["epoch"] == b["epoch"] == 2
    for key, tensor in a["model_state"].items():
        assert torch.equal(tensor, b["model_state"][key]), key
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in straight.history]
    assert a["weights_hash"] == b["weights_hash"]
