"""`make demo`: the whole pipeline end to end on a local Ray and a synthetic archive on local disk.

1. synthesize a survey archive of raw ACS/WFC and WFC3/UVIS files with an LCID manifest;
2. read and crop every chip in parallel on Ray Data; print a summary and write a preview of a few chips;
3. train a narrow HR-CelestialNet at full 2048 x 4096 resolution with two Ray Train workers, validating every epoch
   on held-out training bodies (which choose best/ and fit a temperature), then score the test bodies once;
4. classify the whole archive into a catalog, and write the evaluation report (Table 4 row, confusion matrix,
   calibration and reliability diagram, misclassified chips) for the test bodies.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def thumbnail_row(row: dict) -> dict:
    """A chip row -> a small row with a display thumbnail (so the driver never holds full chips)."""
    from ray_hrc.plots import thumbnail

    out = {k: v for k, v in row.items() if k not in ("pixels", "amp_bias")}
    out["thumb"] = thumbnail(row["pixels"], row["amp_bias"]) if not row["error_class"] else np.zeros((0, 0), np.float32)
    return out


def ingest_preview(manifest: str, out: Path) -> dict:
    """Read and crop every chip in parallel; print a summary; write ``preview.png`` with a few chips of each label."""
    import pandas as pd

    from ray_hrc.data import read_chips, summarize
    from ray_hrc.plots import chip_gallery

    t0 = time.perf_counter()
    rows = read_chips(manifest).map(thumbnail_row).to_pandas()
    summary = summarize(rows) | {"wall_s": round(time.perf_counter() - t0, 1)}
    good = rows[rows["error_class"] == ""]
    picks = pd.concat([good[good["label_true"] == lab].drop_duplicates("body").head(3) for lab in ("galaxy", "NSC")])
    titles = [f"{r.label_true}: {r.body}\n{r.obsid} HDU {r.hdu} {r.instrument} {r.filter} {r.exptime:.0f}s" for r in picks.itertuples()]
    chip_gallery(list(picks["thumb"]), titles, out / "preview.png", suptitle="synthetic archive: cropped 2048 x 4096 chips")
    print(f"[ingest] {summary['chips']} chips from {summary['files']} files ({summary['errors']} errors) by label {summary.get('by_label')}, "
          f"read and cropped in {summary['wall_s']} s -> {out / 'preview.png'}")  # fmt: skip
    return summary


def sky_of_archive(catalog: str, out: Path) -> None:
    """The whole archive's catalog on the sky (``sky.png``) and per target (``targets.md``, ``targets.csv``)."""
    from ray_hrc.catalog_formats import read_table
    from ray_hrc.evaluate import sky_report

    targets = sky_report(read_table(catalog, "parquet"), out, title="the synthetic archive's chips on the sky, by predicted label")
    top = ", ".join(f"{r.targname} {r.chips} chips {100 * r.share_galaxy:.0f}% galaxy" for r in targets.head(3).itertuples())
    print(f"[sky] {len(targets)} targets ({top}, ...) -> {out / 'sky.png'}, {out / 'targets.md'}")


def run_demo(out: str = "demo_out", config: str | Path = DEMO_CONFIG, overrides: list[str] | None = None) -> dict:
    from ray_hrc.classify import ClassifyConfig, classify_archive
    from ray_hrc.config import load_config
    from ray_hrc.evaluate import evaluate_checkpoint
    from ray_hrc.runtime import init_ray
    from ray_hrc.synth import synthesize_archive
    from ray_hrc.train import run_training

    start = time.perf_counter()
    out_path = Path(out).resolve()
    out_path.mkdir(parents=True, exist_ok=True)
    cfg = load_config(config, [f"run.storage_path={out_path / 'runs'}", *(overrides or [])])
    init_ray(num_cpus=os.cpu_count())

    t0 = time.perf_counter()
    manifest = synthesize_archive(out_path / "archive", **cfg.data.synth_kwargs())
    print(f"[synth] {manifest.parent}: {len(list(manifest.parent.glob('*_raw.fits')))} raw files in {time.perf_counter() - t0:.1f} s")
    ingest_preview(str(manifest), out_path)

    run = cfg.run.name
    cfg = load_config(config, [f"run.storage_path={out_path / 'runs'}", f"data.manifest={manifest}", *(overrides or [])])
    shutil.rmtree(out_path / "runs" / run, ignore_errors=True)  # the demo always trains afresh
    t0 = time.perf_counter()
    outcome = run_training(cfg)
    m, t, last = outcome.best_metrics, outcome.test_metrics["best"], outcome.test_metrics["last"]
    h = outcome.history[-1]
    print(f"[train] {time.perf_counter() - t0:.0f} s, {len(outcome.history)} epochs, final training loss {h['train_loss']:.3f}; "
          f"best epoch {m['epoch']} by validation accuracy ({m['val_accuracy']:.4f} on {m['val_chips']} chips), temperature "
          f"{m['temperature']:.3f} -> {outcome.best_checkpoint}")  # fmt: skip
    print(f"[test] {t['chips']} chips, scored once with best/: accuracy {t['accuracy']:.4f}, F1 galaxy {t['f1_galaxy']:.4f}, "
          f"F1 NSC {t['f1_nsc']:.4f}, confusion [true x predicted; galaxy, NSC] {t['confusion']}, ECE {t['ece']:.3f} -> "
          f"{t['ece_calibrated']:.3f}; the last epoch's weights: {last['accuracy']:.4f} (a stability check, not a choice)")  # fmt: skip

    t0 = time.perf_counter()
    summary = classify_archive([str(manifest)], outcome.best_checkpoint, str(out_path / "catalog"), config=ClassifyConfig(), overwrite=True)
    print(f"[classify] {summary['chips']} chips, {summary['failed']} failed, by label {summary['by_label']}, "
          f"{summary['chips_per_s']} chips/s -> {summary['catalog']} ({time.perf_counter() - t0:.0f} s)")  # fmt: skip
    sky_of_archive(summary["catalog"], out_path / "catalog")

    t0 = time.perf_counter()
    report = evaluate_checkpoint(outcome.best_checkpoint, f"{outcome.run_dir}/test.csv", str(out_path / "report"), overwrite=True,
                                 catalog=summary["catalog"])  # fmt: skip  # the held-out chips are in the archive's catalog
    c = report["calibration"]
    print(f"[report] test bodies from the catalog: accuracy {report['accuracy']:.4f}, F1 galaxy {report['f1_galaxy']:.4f}, F1 NSC "
          f"{report['f1_nsc']:.4f}, ECE {c['ece']:.3f} -> {c['ece_calibrated']:.3f} -> {out_path / 'report'} ({time.perf_counter() - t0:.0f} s)")  # fmt: skip
    result = {
        "train": m,
        "test": outcome.test_metrics,
        "classify": summary,
        "evaluate": report,
        "wall_s": round(time.perf_counter() - start, 1),
    }
    (out_path / "demo_summary.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"[demo] done in {result['wall_s']:.0f} s: test accuracy {t['accuracy']:.4f} on {t['chips']} chips of held-out bodies "
          f"(best epoch {m['epoch']} of {len(outcome.history)}, chosen on validation). Outputs under {out_path}:")  # fmt: skip
    for name in ("preview.png", f"runs/{run}/metrics.csv", f"runs/{run}/training_curves.png", f"runs/{run}/best", f"runs/{run}/test_metrics.json",
                 f"runs/{run}/reliability.png", "catalog/catalog.parquet", "catalog/errors.parquet", "report/metrics.md", "report/confusion.png",
                 "report/reliability.png", "report/misclassified.png", "catalog/sky.png", "catalog/targets.md"):  # fmt: skip
        path = out_path / name
        print(f"  {'ok ' if path.exists() else '-- '} {path}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out")
    parser.add_argument("--config", default=str(DEMO_CONFIG))
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress lines appear as they happen, also in logs and `ray job logs`
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_demo(args.out, args.config, args.set)
    return 0
