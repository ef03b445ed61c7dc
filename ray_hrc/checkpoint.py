"""Checkpoints: everything needed to rebuild, resume or serve a model, in one ``checkpoint.pt`` per directory.

Contents: model name and args, weights (of the unwrapped module), optimizer state, epoch, RNG states,
preprocessing parameters, class names, the metrics history, and a content hash of the weights (the catalog's
``checkpoint`` column). Directories may be local or remote (``s3://``): reads and writes go through fsspec.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from typing import Any

import fsspec
import torch
from torch import nn

from ray_hrc.models import build_model
from ray_hrc.preprocess import NormConfig

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
CLASS_NAMES = ("galaxy", "NSC")  # index 0 and 1 of every model's output


def weights_hash(state_dict: dict[str, torch.Tensor]) -> str:
    """A short content hash of the weights: the same weights give the same hash wherever they were saved."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        h.update(key.encode())
        h.update(state_dict[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def save_checkpoint(directory: str, state: dict[str, Any]) -> str:
    """Write `state` as ``<directory>/checkpoint.pt`` (+ a human-readable ``meta.json``); returns the file's URI."""
    state = dict(state)
    state.setdefault("class_names", list(CLASS_NAMES))
    state["weights_hash"] = weights_hash(state["model_state"])
    fs, root = fsspec.core.url_to_fs(directory)
    fs.makedirs(root, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with fs.open(f"{root}/{CHECKPOINT_FILE}", "wb") as fh:
        fh.write(buffer.getvalue())
    meta = {k: v for k, v in state.items() if k not in ("model_state", "optimizer_state", "rng_state", "history")}
    with fs.open(f"{root}/meta.json", "w") as fh:
        json.dump(meta, fh, indent=2, default=str)
    return f"{directory.rstrip('/')}/{CHECKPOINT_FILE}"


def load_checkpoint(uri: str, storage_options: dict | None = None) -> dict[str, Any]:
    """Load a checkpoint from a directory or a ``checkpoint.pt`` URI (local or remote) onto the CPU."""
    path = uri if uri.endswith(".pt") else f"{uri.rstrip('/')}/{CHECKPOINT_FILE}"
    try:
        with fsspec.open(path, "rb", **(storage_options or {})) as fh:
            data = fh.read()
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"no checkpoint at {path}; expected a directory written by `ray-hrc train` holding {CHECKPOINT_FILE}"
        ) from exc
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    for key in ("model_name", "model_args", "model_state"):
        if key not in state:
            raise ValueError(f"{path} lacks '{key}'; expected a checkpoint written by ray_hrc")
    return state


def model_from_checkpoint(state: dict[str, Any]) -> nn.Module:
    """Rebuild the model a checkpoint describes and load its weights (strict)."""
    model = build_model(state["model_name"], **state["model_args"])
    model.load_state_dict(state["model_state"], strict=True)
    return model.eval()


def norm_from_checkpoint(state: dict[str, Any]) -> NormConfig:
    return NormConfig.from_dict(state.get("preprocess"))
