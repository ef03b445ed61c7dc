"""One predictor for batch (Ray Data ``map_batches``) and online (Ray Serve) classification.

Chip rows -> `ray_hrc.preprocess.preprocess_row` (CPU: normalise, drop the raw pixels) -> `ChipClassifier` (loads the checkpoint once;
``__call__`` runs the model under ``torch.inference_mode``) -> catalog rows. Error rows pass through both stages
untouched, so a bad file reaches the catalog's error table instead of disappearing.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from ray_hrc.calibration import softmax
from ray_hrc.checkpoint import CLASS_NAMES, load_checkpoint, model_from_checkpoint, norm_from_checkpoint
from ray_hrc.chips import ERROR_COLUMNS, LABEL_COLUMNS, META_FIELDS  # not ray_hrc.data: the core imports no Ray
from ray_hrc.models import choose_precision, prepare_for_inference

logger = logging.getLogger(__name__)

CATALOG_COLUMNS = [
    "uri", "obsid", "hdu", "ccdchip", "instrument", "detector", "filter", "exptime", "targname", "date_obs", "ra", "dec",
    "label", "p_galaxy", "p_nsc", "model", "checkpoint",
]  # fmt: skip
"""The catalog's columns, in order (plus ``label_true``/``body`` where the input manifest has labels)."""


def _dense(column: np.ndarray) -> np.ndarray:
    return np.stack(list(column)) if column.dtype == object else column


def _ragged(images: list[np.ndarray]) -> np.ndarray:
    arr = np.empty(len(images), dtype=object)
    arr[:] = images
    return arr


def rows_to_batch(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Preprocessed rows (`ray_hrc.preprocess.preprocess_row`) -> a column batch, as Ray Data hands to ``__call__``."""
    batch = {k: np.array([r[k] for r in rows]) for k in rows[0] if k != "image"}
    images = [r["image"] for r in rows]
    batch["image"] = np.stack(images) if len({im.shape for im in images}) == 1 else _ragged(images)
    return batch


def precision_counts(rows) -> dict[str, int]:
    """Chips per forward precision (`ChipClassifier`'s ``precision`` column) in catalog rows (a DataFrame), for run
    summaries; rows from before the column existed, and error rows, are not counted."""
    if "precision" not in rows or not len(rows):
        return {}
    values = rows.loc[rows["error_class"] == "", "precision"] if "error_class" in rows else rows["precision"]
    return {str(k): int(v) for k, v in values.value_counts().items() if k not in ("", "nan", "None")}


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class ChipClassifier:
    """Loads a checkpoint once; ``__call__(batch)`` turns preprocessed chip rows into catalog rows.

    checkpoint: a checkpoint directory or ``checkpoint.pt`` URI (local or ``s3://``).
    device: "auto" (CUDA when there is one), "cpu" or "cuda".
    precision: "auto", "fp32" or "bf16" (`ray_hrc.models.choose_precision`): "auto" runs bf16 weights on a CPU with
        native bf16 matrix instructions (AMX, AVX-512 BF16) and bf16 autocast on a CUDA GPU that supports it, float32
        elsewhere. The choice and the CPU features behind it are logged once, and each catalog row carries it
        (column ``precision``).
    """

    def __init__(
        self, checkpoint: str, device: str = "auto", storage_options: dict | None = None, compile: bool = False, precision: str = "auto"
    ):
        state = load_checkpoint(checkpoint, storage_options)
        self.device = pick_device(device)
        self.model_name = state["model_name"]
        self.checkpoint_id = state.get("weights_hash", "")
        self.norm = norm_from_checkpoint(state)
        self.class_names = tuple(state.get("class_names", CLASS_NAMES))
        self.precision = choose_precision(precision, self.device)
        self.model = prepare_for_inference(
            model_from_checkpoint(state), self.device, channels_last=True, fold_bn=True, compile=compile, dtype=self.precision.dtype
        )
        self.temperature = float(state.get("temperature", 1.0))  # fitted on the validation chips (ray_hrc.calibration)
        logger.info(
            "loaded %s (%s) from %s; precision %s; temperature %.3f",
            self.model_name, self.checkpoint_id, checkpoint, self.precision.describe(), self.temperature,
        )  # fmt: skip

    def logits(self, images: np.ndarray) -> np.ndarray:
        """The model's logits, float64 (B, n_classes), for normalised images (B, H, W); no temperature applied."""
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)[:, None].float()  # the stem runs in float32
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            if self.precision.autocast:
                with torch.autocast(self.device.type, dtype=torch.bfloat16):
                    logits = self.model(x)
            else:
                logits = self.model(x)
            return logits.float().cpu().numpy().astype(np.float64)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Calibrated softmax probabilities, float64 (B, n_classes): ``softmax(logits / temperature)``."""
        return softmax(self.logits(images), self.temperature)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["uri"])
        ok = np.asarray(batch["error_class"] == "")
        probs = np.full((n, len(self.class_names)), np.nan)
        classify_ms = np.zeros(n)
        if ok.any():
            images = _dense(batch["image"][ok])
            t0 = time.perf_counter()
            probs[ok] = self.probabilities(images)
            classify_ms[ok] = (time.perf_counter() - t0) * 1e3 / ok.sum()
        labels = np.where(ok, np.asarray(self.class_names, dtype=object)[np.nan_to_num(probs).argmax(1)], "")
        out: dict[str, Any] = {k: batch[k] for k in META_FIELDS + LABEL_COLUMNS + ERROR_COLUMNS + ["n_in_file"] if k in batch}
        out.update(
            label=labels.astype(str),
            p_galaxy=probs[:, 0],
            p_nsc=probs[:, 1],
            model=np.full(n, self.model_name),
            checkpoint=np.full(n, self.checkpoint_id),
            precision=np.full(n, self.precision.describe()),
            preprocess_ms=np.asarray(batch.get("preprocess_ms", np.zeros(n)), np.float64),
            classify_ms=classify_ms,
        )
        return out
