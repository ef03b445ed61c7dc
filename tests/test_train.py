"""Training pieces without Ray: metrics, labels, augmentation, configs (every shipped YAML), resource sizing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ray_hrc.config import AugmentConfig, ConfigError, TrainConfig, load_config
from ray_hrc.models import build_model
from ray_hrc.train import augment, classification_metrics, confusion_matrix, label_index, lr_factor, lr_scheduler, recalibrate_batchnorm

CONFIGS = sorted(p for p in Path(__file__).resolve().parents[1].glob("configs/**/*.yaml") if not p.name.startswith("classify"))


def test_metrics_match_the_papers_equations():
    y_true = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    y_pred = np.array([0, 0, 0, 1, 1, 1, 1, 1, 0, 0])
    cm = confusion_matrix(y_true, y_pred)
    assert cm.tolist() == [[3, 1], [2, 4]]
    m = classification_metrics(cm)
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["f1_galaxy"] == pytest.approx(2 * 0.6 * 0.75 / (0.6 + 0.75))  # precision 3/5, recall 3/4
    assert m["f1_nsc"] == pytest.approx(2 * 0.8 * (4 / 6) / (0.8 + 4 / 6))


def test_labels():
    assert label_index(np.array(["galaxy", "NSC", "galaxy"])).tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match="'star' is not one of"):
        label_index(np.array(["star"]))


def test_augment_keeps_shape():
    rng = np.random.default_rng(0)
    image = rng.random((64, 128), dtype=np.float32)
    cfg = AugmentConfig(flips=True, blur_prob=1.0, noise_prob=1.0)
    out = augment(image, cfg, rng)
    assert out.shape == image.shape and out.dtype == np.float32 and not np.array_equal(out, image)


def test_roll_moves_every_pixel_together():
    rng = np.random.default_rng(0)
    image = rng.random((64, 128), dtype=np.float32)
    out = augment(image, AugmentConfig(roll=True), np.random.default_rng(1))
    shifts = [(dy, dx) for dy in range(64) for dx in range(128) if np.array_equal(np.roll(image, (dy, dx), axis=(0, 1)), out)]
    assert len(shifts) == 1 and shifts[0] != (0, 0)


def test_warmup_then_cosine_learning_rate():
    factors = [lr_factor(step, total=100, warmup=10, schedule="cosine") for step in range(101)]
    assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert factors[10] == 1.0 and factors[55] == pytest.approx(0.5) and factors[100] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))
    assert [lr_factor(s, total=100, warmup=4, schedule="constant") for s in (0, 3, 4, 99)] == [0.25, 1.0, 1.0, 1.0]

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    assert lr_scheduler(optimizer, TrainConfig(), steps_per_epoch=10) is None  # the paper's constant rate: no scheduler
    scheduler = lr_scheduler(optimizer, TrainConfig(epochs=2, lr_schedule="cosine", warmup_epochs=0.5), steps_per_epoch=10)
    rates = []
    for _ in range(20):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[:5] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1]) and rates[-1] < 0.01
    with pytest.raises(ConfigError, match="lr_schedule is 'step'"):
        lr_scheduler(optimizer, TrainConfig(lr_schedule="step"), steps_per_epoch=10)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_builds(path):
    cfg = load_config(path)
    with torch.device("meta"):
        model = build_model(cfg.model.name, **cfg.model.kwargs)
    assert sum(p.numel() for p in model.parameters()) > 0
    assert cfg.train.batch_size % cfg.scaling.num_workers == 0
    if "paper" in path.parts:
        assert (cfg.train.batch_size, cfg.train.optimizer, cfg.train.lr, cfg.train.epochs) == (4, "sgd", 1e-4, 20)
        assert not cfg.augment.enabled
        assert (cfg.preprocess.resize is not None) == ("resize" in path.name)


def test_paper_configs_cover_table_4():
    names = {p.stem for p in CONFIGS if "paper" in p.parts}
    assert names == {f"{m}_lcid" for m in ("hrcelestialnet", "alexnet", "vgg", "resnet")} | {
        f"{m}_lcid_resize" for m in ("alexnet", "vgg", "resnet")
    }


def test_config_errors_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 3\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['learning_rate'\] in train; known keys are"):
        load_config(path)
    path.write_text("train:\n  epochs: 3\n")
    cfg = load_config(path, ["train.lr=0.01", "model.kwargs={width: 0.5}", "preprocess.resize=[224, 448]"])
    assert (cfg.train.epochs, cfg.train.lr, cfg.model.kwargs, cfg.preprocess.resize) == (3, 0.01, {"width": 0.5}, (224, 448))
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load_config(path, ["train.lr"])


def test_precise_batchnorm_replaces_lagging_running_stats_by_the_current_weights_batch_statistics():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.ReLU())
    bn = model[1]
    bn.running_mean.fill_(5.0)  # stale: statistics of weights long gone
    bn.running_var.fill_(9.0)
    inputs = [torch.randn(2, 1, 16, 16) * 3 + 1 for _ in range(3)]
    model.eval()
    recalibrate_batchnorm(model, inputs)
    with torch.no_grad():
        outs = [model[0](x) for x in inputs]
    expected_mean = torch.stack([o.mean((0, 2, 3)) for o in outs]).mean(0)
    expected_var = torch.stack([o.transpose(0, 1).reshape(3, -1).var(1, unbiased=True) for o in outs]).mean(0)
    torch.testing.assert_close(bn.running_mean, expected_mean)
    torch.testing.assert_close(bn.running_var, expected_var)
    assert not model.training and bn.momentum == 0.1  # mode and momentum are restored


def test_the_driver_logs_one_line_per_new_epoch_checkpoint(tmp_path, caplog):
    import json
    import logging

    import fsspec

    from ray_hrc.train import EpochPrinter

    metrics = {"epoch": 1, "train_loss": 0.61, "train_chips_per_s": 4.0, "val_loss": 0.5, "val_accuracy": 0.75, "val_ece": 0.2,
               "val_ece_calibrated": 0.05, "temperature": 1.5, "epoch_s": 30.0}  # fmt: skip
    (tmp_path / "epoch_000_old").mkdir()  # there before training started (a resumed run): not repeated
    printer = EpochPrinter(fsspec.filesystem("file"), str(tmp_path), epochs=2)
    (tmp_path / "epoch_001").mkdir()
    with caplog.at_level(logging.INFO, logger="ray_hrc.train"):
        printer.poll()  # no meta.json yet: nothing, and tried again later
        (tmp_path / "epoch_001" / "meta.json").write_text(json.dumps({"metrics": metrics}))
        printer.poll()
        printer.poll()
    lines = [r.getMessage() for r in caplog.records if r.name == "ray_hrc.train"]
    assert len(lines) == 1 and lines[0].startswith("epoch 1/2: train loss 0.610") and "accuracy 0.750" in lines[0], lines
