"""Temperature scaling, ECE, the predictor's temperature, RNG states in a weights-only checkpoint, and the splits'
metrics from logits. No Ray."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch

from ray_hrc.calibration import expected_calibration_error, fit_temperature, logits_from_probabilities, reliability_bins, softmax
from ray_hrc.train import logit_metrics, rng_state, selection_score, set_rng_state


def _overconfident(n: int = 4000, true_t: float = 2.5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose labels are drawn from softmax(logits / true_t): the model is overconfident by true_t."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 4, (n, 2))
    p = softmax(logits, true_t)
    labels = (rng.random(n) < p[:, 1]).astype(np.int64)
    return logits, labels


def test_fitted_temperature_recovers_the_true_one_and_lowers_ece():
    logits, labels = _overconfident()
    t = fit_temperature(logits, labels)
    assert t == pytest.approx(2.5, rel=0.1)
    before, after = expected_calibration_error(softmax(logits), labels), expected_calibration_error(softmax(logits, t), labels)
    assert before > 0.1 and after < 0.03, (before, after)
    nll = [torch.nn.functional.cross_entropy(torch.tensor(logits) / s, torch.tensor(labels)).item() for s in (t * 0.8, t, t * 1.25)]
    assert nll[1] < nll[0] and nll[1] < nll[2]  # a minimum of the validation NLL
    assert (softmax(logits, t).argmax(1) == logits.argmax(1)).all()  # no decision changes
    assert fit_temperature(np.zeros((0, 2)), np.zeros(0, np.int64)) == 1.0


def test_a_perfectly_separated_validation_set_does_not_drive_the_temperature_to_zero():
    """The demo's seed 1: 24 validation chips all right with small margins; maximum likelihood sends T to its bound."""
    rng = np.random.default_rng(1)
    labels = np.arange(24) % 2
    margin = rng.uniform(0.3, 1.5, 24)
    logits = np.stack([np.where(labels == 0, margin, 0.0), np.where(labels == 1, margin, 0.0)], axis=1)
    assert fit_temperature(logits, labels, prior_sigma=None) == 0.05  # the old fit: every probability to 0 or 1
    t = fit_temperature(logits, labels)
    assert 0.1 < t < 0.6, t  # sharper than T = 1 (the chips are all right) but not to certainty
    # with many chips that are not separated the prior changes nothing that matters
    logits, labels = _overconfident(n=400, seed=3)
    ml, map_ = fit_temperature(logits, labels, prior_sigma=None), fit_temperature(logits, labels)
    assert map_ == pytest.approx(ml, rel=0.05)


def test_ece_and_reliability_bins_by_hand():
    probs = np.array([[0.95, 0.05], [0.9, 0.1], [0.3, 0.7], [0.4, 0.6]])
    labels = np.array([0, 1, 1, 1])
    bins = reliability_bins(probs, labels, bins=10)
    assert [b["chips"] for b in bins] == [0, 0, 0, 0, 0, 0, 1, 1, 0, 2]
    assert bins[9]["accuracy"] == 0.5 and bins[9]["confidence"] == pytest.approx(0.925)
    # |1 - 0.6| + |1 - 0.7| + 2 * |0.5 - 0.925|, over 4 chips
    assert expected_calibration_error(probs, labels, bins=10) == pytest.approx((0.4 + 0.3 + 2 * 0.425) / 4)


def test_uncalibrated_probabilities_follow_from_calibrated_ones_and_the_temperature():
    logits, _ = _overconfident(n=50)
    calibrated = softmax(logits, 1.7)
    np.testing.assert_allclose(softmax(logits_from_probabilities(calibrated, 1.7)), softmax(logits), rtol=1e-9, atol=1e-12)


def test_the_predictor_applies_the_checkpoints_temperature(random_checkpoint, tmp_path):
    from ray_hrc.checkpoint import load_checkpoint, save_checkpoint
    from ray_hrc.predict import ChipClassifier

    state = load_checkpoint(random_checkpoint)
    save_checkpoint(str(tmp_path), {**state, "temperature": 3.0})
    plain, hot = ChipClassifier(random_checkpoint, device="cpu"), ChipClassifier(str(tmp_path), device="cpu")
    assert (plain.temperature, hot.temperature) == (1.0, 3.0)
    images = np.random.default_rng(0).normal(0, 1, (1, 2048, 4096)).astype(np.float16)
    logits = hot.logits(images)
    np.testing.assert_allclose(plain.logits(images), logits, rtol=1e-5)
    np.testing.assert_allclose(hot.probabilities(images), softmax(logits / 3.0), rtol=1e-6)
    np.testing.assert_allclose(plain.probabilities(images), softmax(logits), rtol=1e-5)


def test_rng_states_survive_a_weights_only_checkpoint_and_replay_the_same_draws():
    aug = np.random.default_rng(7)
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    aug.random(5), torch.rand(3), np.random.rand(2), random.random()  # move every generator along
    buffer = io.BytesIO()
    torch.save({"rng_state": [rng_state(aug)]}, buffer)
    expected = (aug.random(4).tolist(), torch.rand(4).tolist(), np.random.rand(4).tolist(), [random.random() for _ in range(4)])
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=True)["rng_state"][0]
    other = np.random.default_rng(99)
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    set_rng_state(restored, other)
    again = (other.random(4).tolist(), torch.rand(4).tolist(), np.random.rand(4).tolist(), [random.random() for _ in range(4)])
    assert again == expected


def test_logit_metrics_and_the_selection_score():
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [3.0, 0.0]])
    labels = np.array([0, 1, 1, 0])
    m = logit_metrics(logits, labels, temperature=2.0, prefix="val_")
    assert m["val_accuracy"] == 0.75 and m["val_confusion"] == [[2, 0], [1, 1]] and m["val_chips"] == 4
    expected = -np.mean(np.log(softmax(logits, 2.0)[np.arange(4), labels]))
    assert m["val_loss"] == pytest.approx(expected)
    assert m["val_ece"] == pytest.approx(expected_calibration_error(softmax(logits), labels))
    assert m["val_ece_calibrated"] == pytest.approx(expected_calibration_error(softmax(logits, 2.0), labels))
    # accuracy first; equal accuracy: the lower loss wins
    assert selection_score(0.8, 5.0) > selection_score(0.79, 0.0)
    assert selection_score(0.8, 0.3) > selection_score(0.8, 0.4)


def test_the_report_gives_ece_before_and_after_the_temperature_and_a_reliability_diagram(tiny_archive, random_checkpoint, tmp_path):
    """`evaluate --catalog`: the catalog holds calibrated probabilities; the report recovers the uncalibrated ones."""
    import pandas as pd

    from ray_hrc.checkpoint import load_checkpoint, save_checkpoint
    from ray_hrc.evaluate import evaluate_checkpoint
    from ray_hrc.manifest import read_manifest

    state = load_checkpoint(random_checkpoint)
    save_checkpoint(str(tmp_path / "ckpt"), {**state, "temperature": 2.0})
    chips = read_manifest(str(tiny_archive))
    logits = np.random.default_rng(0).normal(0, 3, (len(chips), 2))
    p = softmax(logits, 2.0)
    y = (chips["Label"] == "NSC").to_numpy().astype(np.int64)
    catalog = pd.DataFrame(
        {"uri": chips["URI"], "hdu": chips["HDU Index"], "obsid": chips["OBSID"], "body": chips["ID"], "label_true": chips["Label"],
         "label": np.where(p[:, 0] >= 0.5, "galaxy", "NSC"), "p_galaxy": p[:, 0], "p_nsc": p[:, 1], "checkpoint": state["weights_hash"],
         "preprocess_ms": 1.0, "classify_ms": 1.0}
    )  # fmt: skip
    catalog.to_parquet(tmp_path / "catalog.parquet")
    m = evaluate_checkpoint(str(tmp_path / "ckpt"), str(tiny_archive), str(tmp_path / "report"), catalog=str(tmp_path / "catalog.parquet"))
    c = m["calibration"]
    assert c["temperature"] == 2.0
    assert c["ece"] == pytest.approx(expected_calibration_error(softmax(logits), y))
    assert c["ece_calibrated"] == pytest.approx(expected_calibration_error(p, y))
    assert (tmp_path / "report" / "reliability.png").stat().st_size > 0
    assert "Expected calibration error (10 bins)" in (tmp_path / "report" / "metrics.md").read_text()
