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


LABEL_STYLE = {"galaxy": ("tab:orange", "o", 34), "NSC": ("tab:blue", "^", 14)}
"""Predicted label -> (colour, marker, size) on sky maps: NSC markers sit smaller on top, so a target with both shows both."""


def _mollweide_x(ra_deg: np.ndarray) -> np.ndarray:
    """RA (deg) -> Mollweide longitude (rad), east to the left as on the sky: RA 0 at the centre, RA 90 left of it."""
    return -np.radians((np.asarray(ra_deg, dtype=float) + 180.0) % 360.0 - 180.0)


def sky_map(catalog, path: str | Path, *, title: str = "", order: int = 3, annotate: int = 8) -> Path:
    """All-sky Mollweide map of where the chips are, coloured by predicted label.

    catalog: rows with ``ra``/``dec`` (deg, ICRS), ``label`` and ``p_galaxy``; ``targname`` names the busiest
    targets on the map. The HEALPix cells of `order` (3: cells of about 7.3 deg) that hold chips are filled by the
    share of their chips labelled galaxy; each chip centre is a marker in its label's colour.
    """
    import cdshealpix.nested as healpix
    from astropy import units as u
    from matplotlib.collections import PolyCollection
    from matplotlib.colors import LinearSegmentedColormap

    placed = catalog[np.isfinite(catalog["ra"].astype(float)) & np.isfinite(catalog["dec"].astype(float))]
    fig = plt.figure(figsize=(10, 5.6))
    ax = fig.add_subplot(111, projection="mollweide")
    ax.grid(alpha=0.35)
    ticks = np.arange(-150, 181, 30)
    ax.set_xticks(np.radians(ticks), [f"{(-t) % 360}°" for t in ticks], fontsize=7)
    ax.tick_params(axis="y", labelsize=7)
    if len(placed):
        ra, dec = placed["ra"].to_numpy(float), placed["dec"].to_numpy(float)
        cells = healpix.lonlat_to_healpix(ra * u.deg, dec * u.deg, order).astype(np.int64)
        galaxy = (placed["label"].to_numpy() == "galaxy").astype(float)
        ids, inverse = np.unique(cells, return_inverse=True)
        share = np.bincount(inverse, weights=galaxy) / np.bincount(inverse)
        lon, lat = healpix.vertices(ids, order, step=8)
        polygons, values = [], []
        share_map = LinearSegmentedColormap.from_list("nsc_to_galaxy", [LABEL_STYLE["NSC"][0], "white", LABEL_STYLE["galaxy"][0]])
        for k in range(len(ids)):
            x, y = _mollweide_x(lon[k].to_value(u.deg)), lat[k].to_value(u.rad)
            if x.max() - x.min() > np.pi:  # a cell across RA 180 deg: draw it on both edges, the axes clip each copy
                polygons += [np.c_[np.where(x < 0, x + 2 * np.pi, x), y], np.c_[np.where(x > 0, x - 2 * np.pi, x), y]]
                values += [share[k], share[k]]
            else:
                polygons.append(np.c_[x, y])
                values.append(share[k])
        cells_art = PolyCollection(
            polygons, array=np.asarray(values), cmap=share_map, clim=(0, 1), alpha=0.45, edgecolor="0.4", linewidth=0.4
        )
        ax.add_collection(cells_art)
        fig.colorbar(
            cells_art,
            ax=ax,
            orientation="horizontal",
            shrink=0.5,
            pad=0.08,
            label=f"share labelled galaxy per HEALPix cell (order {order})",
        )
        for label, (colour, marker, size) in LABEL_STYLE.items():
            mine = placed["label"].to_numpy() == label
            ax.scatter(_mollweide_x(ra[mine]), np.radians(dec[mine]), s=size, c=colour, marker=marker, edgecolors="k", linewidths=0.3,
                       label=f"{label} ({mine.sum()} chips)", zorder=3)  # fmt: skip
        if "targname" in placed and annotate:
            busiest = placed.groupby("targname").agg(n=("ra", "size"), ra=("ra", "median"), dec=("dec", "median")).nlargest(annotate, "n")
            for row in busiest.itertuples():
                where = (_mollweide_x(row.ra), np.radians(row.dec))
                ax.annotate(f"{row.Index} ({row.n})", where, xytext=(4, 4), textcoords="offset points", fontsize=6)
        ax.legend(loc="lower right", fontsize=7, bbox_to_anchor=(1.02, -0.02))
    missing = len(catalog) - len(placed)
    ax.set_title(
        (title or f"{len(placed)} chips on the sky (ICRS)") + (f"; {missing} without a position" if missing else ""), fontsize=9, pad=14
    )
    return _save(fig, path)
