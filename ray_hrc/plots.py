"""Figures people would rather look at than read: chip galleries (and, later, curves and confusion matrices)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ray_hrc.preprocess import NormConfig, normalise, resize  # noqa: E402

logger = logging.getLogger(__name__)

THUMB_SHAPE = (256, 512)


def thumbnail(pixels: np.ndarray, amp_bias: np.ndarray | None = None, shape: tuple[int, int] = THUMB_SHAPE) -> np.ndarray:
    """A display-sized view of a chip with the same normalisation the model sees; float32 (rows, cols) in [0, 1]."""
    return resize(normalise(pixels, amp_bias, NormConfig()), shape)


def chip_gallery(thumbs: Sequence[np.ndarray], titles: Sequence[str], path: str | Path, *, columns: int = 3, suptitle: str = "") -> Path:
    """Write a grid of chip thumbnails with a title under each; returns the PNG path."""
    n = max(1, len(thumbs))
    columns = min(columns, n)
    rows = -(-n // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 2.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, thumbs, titles, strict=False):
        ax.imshow(image, cmap="gray", origin="lower", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=8)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
