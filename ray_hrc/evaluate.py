"""`ray-hrc evaluate`: Table-4-style reports (accuracy, F1 per class, ms per chip), confusion matrices (Figure 3) and
a gallery of misclassified chips (Figure 4), for one checkpoint or a comparison of several.

Evaluation classifies the labelled manifest with the same pipeline as `ray-hrc classify` (so its timings are the
pipeline's own), then scores the catalog.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ray_hrc.checkpoint import CLASS_NAMES
from ray_hrc.classify import FORMATS, ClassifyConfig, classify_archive
from ray_hrc.data import ReadConfig
from ray_hrc.manifest import read_manifest
from ray_hrc.storage import OutputConfig
from ray_hrc.train import classification_metrics, confusion_matrix

logger = logging.getLogger(__name__)

TABLE_HEADER = "| Model | Data set | Chips | Accuracy | F1 (Galaxy) | F1 (NSC) | Preprocessing (ms/chip) | Classification (ms/chip) | Total (ms/chip) |"


def score(catalog: pd.DataFrame) -> dict[str, Any]:
    """Metrics of a catalog with ``label_true``: the paper's accuracy and F1 per class, plus mean timings."""
    labelled = catalog[catalog["label_true"].isin(CLASS_NAMES) & catalog["label"].isin(CLASS_NAMES)]
    index = {name: i for i, name in enumerate(CLASS_NAMES)}
    y_true = np.array([index[v] for v in labelled["label_true"]], dtype=np.int64)
    y_pred = np.array([index[v] for v in labelled["label"]], dtype=np.int64)
    confusion = confusion_matrix(y_true, y_pred)
    pre = float(np.mean(labelled["preprocess_ms"])) if len(labelled) else float("nan")
    cls = float(np.mean(labelled["classify_ms"])) if len(labelled) else float("nan")
    return {
        "chips": int(len(labelled)),
        **classification_metrics(confusion),
        "confusion": confusion.tolist(),
        "preprocess_ms": pre,
        "classify_ms": cls,
        "total_ms": pre + cls,
    }


def table_row(name: str, dataset: str, m: dict[str, Any]) -> str:
    return (
        f"| {name} | {dataset} | {m['chips']} | {100 * m['accuracy']:.2f}% | {100 * m['f1_galaxy']:.2f}% | {100 * m['f1_nsc']:.2f}% | "
        f"{m['preprocess_ms']:.1f} | {m['classify_ms']:.1f} | {m['total_ms']:.1f} |"
    )


def misclassified_gallery(catalog: pd.DataFrame, path: Path, read: ReadConfig, limit: int = 12) -> Path | None:
    """Figure 4: thumbnails of wrongly labelled chips with true and predicted labels and probabilities."""
    from ray_hrc.chips import Chip, read_fits
    from ray_hrc.plots import chip_gallery, thumbnail

    wrong = catalog[(catalog["label_true"].isin(CLASS_NAMES)) & (catalog["label"] != catalog["label_true"])]
    if wrong.empty:
        return None
    thumbs, titles = [], []
    for _, row in wrong.head(limit).iterrows():
        (chip,) = read_fits(row["uri"], hdus=[int(row["hdu"])], storage_options=read.storage_options or None)
        if not isinstance(chip, Chip):
            continue
        thumbs.append(thumbnail(chip.pixels, chip.amp_bias))
        body = f"{row['body']} " if row.get("body") else ""
        titles.append(
            f"{body}{row['obsid']} HDU {row['hdu']}\ntrue {row['label_true']}, predicted {row['label']} (p_galaxy {row['p_galaxy']:.2f})"
        )
    return chip_gallery(thumbs, titles, path, suptitle=f"{len(wrong)} misclassified chips (first {len(thumbs)})")


def evaluate_checkpoint(
    checkpoint: str,
    manifest: str,
    out: str,
    *,
    read: ReadConfig = ReadConfig(),
    config: ClassifyConfig = ClassifyConfig(),
    blurry: str | None = None,
    overwrite: bool = False,
    catalog: str | None = None,
    output: OutputConfig = OutputConfig(),
) -> dict[str, Any]:
    """Classify a labelled manifest and write ``metrics.json``, ``metrics.md``, ``confusion.png``, ``misclassified.png``,
    ``sky.png`` and the per-target summary ``targets.md``/``targets.csv``.

    catalog: a catalog that `classify_archive` already wrote with this checkpoint for a superset of the manifest's
    chips (``make demo`` classifies the whole archive first); its rows for the manifest's chips are scored instead
    of classifying them again. Every chip of the manifest must be in it.
    """
    from ray_hrc.checkpoint import load_checkpoint
    from ray_hrc.plots import confusion_plot

    out_path = Path(out)
    out_path.mkdir(parents=True, exist_ok=True)
    state = load_checkpoint(checkpoint, output.storage_options or None)  # checkpoints live on the output side
    resize = (state.get("preprocess") or {}).get("resize")
    dataset = "LCID-Resize" if resize else "LCID"
    name = state["model_name"]
    if catalog is None:
        summary = classify_archive(
            [manifest], checkpoint, str(out_path / "catalog"), read=read, config=config, overwrite=overwrite, output=output
        )
        table = _read_any(summary["catalog"], config.format, output.storage_options)
        failed = summary["failed"]
        precision = summary.get("precision")
    else:
        keys = chip_keys(manifest, read)
        table = chips_of(_read_any(catalog, _format_of(catalog), output.storage_options), keys)
        wanted = len(keys)
        if len(table) < wanted:
            raise ValueError(
                f"{catalog} holds {len(table)} of the {wanted} chips of {manifest}; classify them first or evaluate without catalog"
            )
        other = sorted(set(table["checkpoint"]) - {state.get("weights_hash", "")})
        if other:
            raise ValueError(f"{catalog} was classified with weights {other}, not those of {checkpoint} ({state.get('weights_hash', '')})")
        failed = 0
        precision = None  # scored from an existing catalog: its run's summary.json says how it was classified
    metrics: dict[str, Any] = {
        "model": name,
        "dataset": dataset,
        "checkpoint": checkpoint,
        "weights": state.get("weights_hash", ""),
        **score(table),
    }
    metrics["failed_chips"] = failed
    metrics["precision"] = precision
    rows = [table_row(name, dataset, metrics)]
    confusion_plot(
        metrics["confusion"], CLASS_NAMES, out_path / "confusion.png", title=f"{name} on {dataset}: {100 * metrics['accuracy']:.1f}%"
    )
    if blurry:
        metrics["blurry"] = score(chips_of(table, chip_keys(blurry, read)))
        rows.append(table_row(name, f"{dataset}-Blurry", metrics["blurry"]))
        confusion_plot(metrics["blurry"]["confusion"], CLASS_NAMES, out_path / "confusion_blurry.png", title=f"{name} on blurry chips")
    misclassified_gallery(table, out_path / "misclassified.png", read)
    sky_report(table, out_path, title=f"{name}: {len(table)} evaluated chips on the sky, by predicted label")
    metrics["calibration"] = calibration_report(table, float(state.get("temperature", 1.0)), out_path / "reliability.png", title=name)
    rows.append(calibration_row(metrics["calibration"]))
    (out_path / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out_path / "metrics.md").write_text("\n".join([TABLE_HEADER, "|" + "---|" * 9, *rows]) + "\n")
    return metrics


def calibration_report(catalog: pd.DataFrame, temperature: float, path: Path, *, title: str = "") -> dict[str, Any]:
    """ECE of a catalog's labelled chips before and after the checkpoint's temperature, and ``reliability.png``.

    The catalog holds the calibrated probabilities (`ray_hrc.predict.ChipClassifier` applies the temperature); the
    uncalibrated ones follow from them and the temperature exactly (`logits_from_probabilities`).
    """
    from ray_hrc.calibration import expected_calibration_error, logits_from_probabilities, reliability_bins, softmax
    from ray_hrc.plots import reliability_diagram

    labelled = catalog[catalog["label_true"].isin(CLASS_NAMES) & catalog["label"].isin(CLASS_NAMES)]
    after = labelled[["p_galaxy", "p_nsc"]].to_numpy(np.float64).reshape(-1, 2)
    before = softmax(logits_from_probabilities(after, temperature)) if len(after) else after
    y = np.array([CLASS_NAMES.index(v) for v in labelled["label_true"]], dtype=np.int64)
    out = {
        "temperature": temperature,
        "ece": expected_calibration_error(before, y),
        "ece_calibrated": expected_calibration_error(after, y),
        "reliability": {"before": reliability_bins(before, y), "after": reliability_bins(after, y)},
    }
    reliability_diagram(
        out["reliability"]["before"], out["reliability"]["after"], path,
        title=f"{title}: ECE {out['ece']:.3f} -> {out['ece_calibrated']:.3f} (temperature {temperature:.2f})",
    )  # fmt: skip
    return out


def calibration_row(c: dict[str, Any]) -> str:
    """The line under the table: ECE before and after the temperature."""
    return f"\nExpected calibration error (10 bins): {c['ece']:.4f} before, {c['ece_calibrated']:.4f} after temperature {c['temperature']:.3f}."


def chip_keys(manifest: str, read: ReadConfig) -> pd.DataFrame:
    """The chips a manifest lists, once each: columns ``uri`` and ``hdu`` as catalogs name them."""
    keys = read_manifest(manifest, template=read.template, storage_options=read.storage_options or None)
    return keys[["URI", "HDU Index"]].rename(columns={"URI": "uri", "HDU Index": "hdu"}).drop_duplicates()


def chips_of(catalog: pd.DataFrame, keys: pd.DataFrame) -> pd.DataFrame:
    """The rows of `catalog` for the chips in `keys` (`chip_keys`), matched on URI and HDU."""
    return catalog.merge(keys.astype({"hdu": catalog["hdu"].dtype}), on=["uri", "hdu"])


def _format_of(path: str) -> str:
    """A catalog's format from its extension (the names `classify_archive` writes)."""
    by_ext = {ext: fmt for fmt, ext in FORMATS.items()}
    ext = path.rsplit(".", 1)[-1].lower()
    if ext not in by_ext:
        raise ValueError(f"{path}: cannot tell the catalog's format from its extension; expected one of {sorted(by_ext)}")
    return by_ext[ext]


def _read_any(path: str, fmt: str, storage_options: dict | None = None) -> pd.DataFrame:
    """A catalog written by `classify_archive` (output side: `storage_options` are the output's)."""
    from ray_hrc.catalog_formats import read_table

    return read_table(path, fmt, storage_options)


def compare(checkpoints: list[str], manifest: str, out: str, **kwargs: Any) -> str:
    """Evaluate several checkpoints on one manifest; write ``table4.md`` (the paper's Table 4 layout) and return it."""
    rows = []
    for i, checkpoint in enumerate(checkpoints):
        metrics = evaluate_checkpoint(checkpoint, manifest, str(Path(out) / f"model_{i + 1}"), **kwargs)
        rows.append(table_row(metrics["model"], metrics["dataset"], metrics))
        if "blurry" in metrics:
            rows.append(table_row(metrics["model"], f"{metrics['dataset']}-Blurry", metrics["blurry"]))
    text = "\n".join([TABLE_HEADER, "|" + "---|" * 9, *rows]) + "\n"
    Path(out, "table4.md").write_text(text)
    return text


def target_summary(catalog: pd.DataFrame) -> pd.DataFrame:
    """Per TARGNAME: chips, share labelled galaxy and mean p_galaxy; the busiest targets first."""
    if catalog.empty:
        return pd.DataFrame(columns=["targname", "chips", "share_galaxy", "mean_p_galaxy"])
    summary = (
        catalog.assign(targname=catalog["targname"].replace("", "(none)"), galaxy=catalog["label"] == "galaxy")
        .groupby("targname")
        .agg(chips=("label", "size"), share_galaxy=("galaxy", "mean"), mean_p_galaxy=("p_galaxy", "mean"))
        .reset_index()
    )
    return summary.sort_values(["chips", "targname"], ascending=[False, True], ignore_index=True)


def sky_report(catalog: pd.DataFrame, out: str | Path, *, title: str = "") -> pd.DataFrame:
    """Write ``sky.png`` (where the chips are, by predicted label) and ``targets.csv``/``targets.md`` under `out`."""
    from ray_hrc.plots import sky_map

    out = Path(out)
    # a catalog written without the file metadata (by hand, or an older run) has chips with no target and no position
    defaults = {"targname": "", "ra": np.nan, "dec": np.nan}
    catalog = catalog.assign(**{k: v for k, v in defaults.items() if k not in catalog})
    targets = target_summary(catalog)
    sky_map(catalog, out / "sky.png", title=title)
    targets.to_csv(out / "targets.csv", index=False)
    lines = ["| Target | Chips | Labelled galaxy | Mean p_galaxy |", "|---|---|---|---|"]
    lines += [f"| {r.targname} | {r.chips} | {100 * r.share_galaxy:.1f}% | {r.mean_p_galaxy:.3f} |" for r in targets.itertuples()]
    (out / "targets.md").write_text("\n".join(lines) + "\n")
    return targets
