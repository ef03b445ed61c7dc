"""Checkpoints: everything needed to rebuild, resume or serve a model, in one ``checkpoint.pt`` per directory.

Contents: model name and args, weights (of the unwrapped module), optimizer state, epoch, RNG states,
preprocessing parameters, class names, the metrics history, and a content hash of the weights (the catalog's
``checkpoint`` column). Directories may be local or remote (``s3://``): reads and writes go through fsspec.

Checkpoints are loaded with ``torch.load(weights_only=True)``: a checkpoint is data, and a pickle that would build
any other object (and so could run code) is refused. `save_checkpoint` therefore stores tensors and plain Python
types only (numpy arrays become tensors or lists, numpy scalars Python numbers) and refuses anything else by name.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import pickle
from typing import Any

import numpy as np
import torch
from torch import nn

from ray_hrc.models import build_model
from ray_hrc.preprocess import NormConfig
from ray_hrc.storage import Storage, open_uri

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


_TENSOR_DTYPES = {np.dtype(t) for t in ("bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64")}


def to_plain(value: Any, where: str = "state") -> Any:
    """`value` as tensors and plain Python types (what ``torch.load(weights_only=True)`` accepts), recursively.

    numpy arrays -> tensors (lists for dtypes torch does not store, e.g. the uint32 of numpy's RNG state), numpy
    scalars -> Python numbers; anything else that is not a tensor or plain type is an error naming where it is.
    """
    if isinstance(value, np.generic):  # before the plain types: np.float64 is a float, and pickles as a numpy object
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str, bytes, torch.Tensor, torch.dtype, torch.device)):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy()) if value.dtype in _TENSOR_DTYPES else value.tolist()
    if isinstance(value, dict):
        return {k: to_plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [to_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise TypeError(f"{where} is a {type(value).__name__}; a checkpoint holds tensors and plain Python types only (safe loading)")


def save_checkpoint(directory: str, state: dict[str, Any], storage_options: dict | None = None) -> str:
    """Write `state` as ``<directory>/checkpoint.pt`` (+ a human-readable ``meta.json``); returns the file's URI.

    storage_options: fsspec options for `directory` (the output side: your own bucket, never the sources').
    """
    state = to_plain(dict(state))
    state.setdefault("class_names", list(CLASS_NAMES))
    state["weights_hash"] = weights_hash(state["model_state"])
    store = Storage.at(directory, storage_options)
    store.makedirs()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with store.open(CHECKPOINT_FILE, "wb") as fh:
        fh.write(buffer.getvalue())
    meta = {k: v for k, v in state.items() if k not in ("model_state", "optimizer_state", "rng_state", "history")}
    with store.open("meta.json", "w") as fh:
        json.dump(meta, fh, indent=2, default=str)
    return f"{directory.rstrip('/')}/{CHECKPOINT_FILE}"


def load_checkpoint(uri: str, storage_options: dict | None = None) -> dict[str, Any]:
    """Load a checkpoint from a directory or a ``checkpoint.pt`` URI (local or remote) onto the CPU."""
    path = uri if uri.endswith(".pt") else f"{uri.rstrip('/')}/{CHECKPOINT_FILE}"
    try:
        with open_uri(path, "rb", storage_options) as fh:
            data = fh.read()
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"no checkpoint at {path}; expected a directory written by `ray-hrc train` holding {CHECKPOINT_FILE}"
        ) from exc
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = [line.split("error:", 1)[-1] for line in str(exc).splitlines() if "GLOBAL" in line]  # torch names the culprit
        reason = found[0].split(". Please", 1)[0].strip().rstrip(".") if found else type(exc).__name__
        raise ValueError(
            f"{path} holds objects other than tensors and plain Python types, which a checkpoint must not: loading it could "
            f"run code, so it is refused ({reason}). Expected a checkpoint written by ray_hrc's save_checkpoint."
        ) from exc
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}; expected a checkpoint dict written by ray_hrc")
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
