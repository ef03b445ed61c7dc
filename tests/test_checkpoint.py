"""Checkpoints load with torch.load(weights_only=True): data round-trips, a pickle that would run code is refused."""

from __future__ import annotations

import os
import random
import re

import numpy as np
import pytest
import torch

from ray_hrc.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint, to_plain
from ray_hrc.models import build_model
from ray_hrc.train import rng_state, set_rng_state

ARGS = {"width": 0.0625, "input_shape": [2048, 4096]}


def _state(**extra) -> dict:
    model = build_model("hrcelestialnet", **ARGS)
    return {"model_name": "hrcelestialnet", "model_args": ARGS, "model_state": model.state_dict(), **extra}


def test_a_training_checkpoint_round_trips_under_weights_only(tmp_path):
    np.random.seed(3)
    random.seed(3)
    torch.manual_seed(3)
    augment = np.random.default_rng(7)  # the augmentation generator goes into the checkpoint too
    rng = rng_state(augment)
    expected = (np.random.random(3), random.random(), torch.rand(2), augment.random(2))
    save_checkpoint(
        str(tmp_path),
        _state(rng_state=rng, history=[{"accuracy": np.float64(0.5), "confusion": np.eye(2, dtype=np.int64)}], epoch=np.int64(4)),
    )
    state = load_checkpoint(str(tmp_path))  # weights_only=True inside
    assert state["epoch"] == 4 and type(state["epoch"]) is int
    assert state["history"][0]["accuracy"] == 0.5 and torch.equal(state["history"][0]["confusion"], torch.eye(2, dtype=torch.int64))
    np.random.seed(0)
    random.seed(0)
    torch.manual_seed(0)
    augment = np.random.default_rng(0)
    set_rng_state(state["rng_state"], augment)  # the saved RNG states give the same draws again
    got = (np.random.random(3), random.random(), torch.rand(2), augment.random(2))
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[3], expected[3])
    assert got[1] == expected[1] and torch.equal(got[2], expected[2])


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_whose_pickle_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil" / CHECKPOINT_FILE
    path.parent.mkdir()
    torch.save({**_state(), "payload": _RunsCode(str(marker))}, path)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} .*run code, so it is refused \(.*GLOBAL (posix|os)\.system"):
        load_checkpoint(str(path.parent))
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the file really does run code when unpickled without the guard
    assert marker.exists()


def test_save_refuses_objects_by_name(tmp_path):
    with pytest.raises(TypeError, match=r"state\['extra'\]\['when'\] is a object"):
        save_checkpoint(str(tmp_path), _state(extra={"when": object()}))
    assert to_plain({"a": (np.float32(1.5), np.arange(2, dtype=np.uint32))}) == {"a": (1.5, [0, 1])}
