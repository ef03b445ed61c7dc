"""Figures people would rather look at than read: chip galleries, training curves, confusion matrices, reliability diagrams."""

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


def _save(fig, path: str | Path) -> Path:
    """Lay out, write as PNG (creating the folder) and close a figure; returns the path."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def thumbnail(pixels: np.ndarray, amp_bias: np.ndarray | None = None, shape: tuple[int, int] = THUMB_SHAPE) -> np.ndarray:
    """A display-sized view of a chip with the same normalisation the model sees; float32 (rows, cols) in [0, 1]."""
    return resize(normalise(pixels, amp_bias, NormConfig()).astype(np.float32), shape)


def chip_gallery(thumbs: Sequence[np.ndarray], titles: Sequence[str], path: str | Path, *, columns: int = 3, suptitle: str = "") -> Path:
    """Write a grid of chip thumbnails with a title under each; returns the PNG path."""
    n = max(1, len(thumbs))
    columns = min(columns, n)
    rows = -(-n // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 2.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, thumbs, titles, strict=False):
        ax.imshow(image, cmap="gray", origin="lower", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=8)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    return _save(fig, path)


def training_curves(history, path: str | Path, *, title: str = "") -> Path:
    """Loss and validation metrics per epoch from a DataFrame with the columns of `ray_hrc.train` reports."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6))
    epochs = history["epoch"]
    ax_loss.plot(epochs, history["train_loss"], "o-", label="train")
    ax_loss.plot(epochs, history["val_loss"], "s-", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_loss.legend()
    for column, label in (("val_accuracy", "accuracy"), ("val_f1_galaxy", "F1 galaxy"), ("val_f1_nsc", "F1 NSC")):
        ax_acc.plot(epochs, history[column], "o-", label=label)
    ax_acc.set(xlabel="epoch", ylim=(0, 1.02), title="validation metrics")
    ax_acc.legend(loc="lower right")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def reliability_diagram(before: Sequence[dict], after: Sequence[dict], path: str | Path, *, title: str = "") -> Path:
    """Accuracy against mean confidence per confidence bin, before and after temperature scaling, with the chips per bin.

    before, after: `ray_hrc.calibration.reliability_bins` tables. A calibrated model lies on the diagonal.
    """
    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(4.6, 5.2), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], "k:", lw=1, label="calibrated")
    width = 1 / max(1, len(before))
    for table, style, label, shift in ((before, "o-", "before", -0.2), (after, "s-", "after (temperature)", 0.2)):
        used = [b for b in table if b["chips"]]
        ax.plot([b["confidence"] for b in used], [b["accuracy"] for b in used], style, label=label)
        ax_n.bar([(b["low"] + b["high"]) / 2 + shift * width for b in table], [b["chips"] for b in table], width=0.4 * width, label=label)
    ax.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1.02), title=title)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    ax_n.set(xlabel="confidence (largest class probability)", ylabel="chips")
    ax.title.set_fontsize(8)
    return _save(fig, path)


def confusion_plot(confusion, class_names: Sequence[str], path: str | Path, *, title: str = "") -> Path:
    """A confusion matrix like the paper's Figure 3: counts and row percentages, true labels on the rows."""
    confusion = np.asarray(confusion)
    fig, ax = plt.subplots(figsize=(3.8, 3.4))
    ax.imshow(confusion, cmap="Blues")
    rows = confusion.sum(axis=1, keepdims=True).clip(min=1)
    for i in range(confusion.shape[0]):
        for j in range(confusion.shape[1]):
            dark = confusion[i, j] > confusion.max() / 2
            ax.text(
                j,
                i,
                f"{confusion[i, j]}\n{100 * confusion[i, j] / rows[i, 0]:.1f}%",
                ha="center",
                va="center",
                color="white" if dark else "black",
            )
    ax.set_xticks(range(len(class_names)), class_names)
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    return _save(fig, path)
