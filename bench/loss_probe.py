"""Why the demo's training loss stays high: one checkpoint's loss on its own training chips, four ways.

The training loss that `metrics.csv` reports is measured in train mode, on augmented chips, with BatchNorm's
statistics taken from each forward's own chips (2 per worker in the demo). This scores a checkpoint's final weights on
the same training chips with each of those two conditions switched on or off, without changing any weight:

- BatchNorm in train mode over batches of `--bn-batch` chips (statistics of those chips), or in eval mode (the
  checkpoint's recomputed statistics, as validation, test and the catalog use them);
- chips augmented as in training (flips and circular shifts, a fixed generator), or as they are.

    python bench/loss_probe.py --checkpoint demo_out/runs/demo/best --archive demo_out/archive

It reads the chips through ``bench/recipe_study.py``'s cache (``<archive>/study_train.npy``) and the demo's split.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ray_hrc.checkpoint import load_checkpoint, model_from_checkpoint
from ray_hrc.config import AugmentConfig
from ray_hrc.manifest import read_manifest, split_three
from ray_hrc.train import augment


def losses(model: nn.Module, images, labels: np.ndarray, train_mode: bool, bn_batch: int, aug: AugmentConfig | None, seed: int) -> dict:
    """Mean cross-entropy and accuracy over the chips, in batches of `bn_batch`, without touching the model."""
    model = copy.deepcopy(model)  # train mode would update the running statistics
    model.train(train_mode)
    rng = np.random.default_rng(seed)
    total, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for start in range(0, len(labels), bn_batch):
            idx = np.arange(start, min(len(labels), start + bn_batch))
            if train_mode and len(idx) < 2:
                continue  # BatchNorm in train mode needs two chips
            x = np.stack([np.asarray(images[i], np.float32) for i in idx])
            if aug is not None:
                x = np.stack([augment(im, aug, rng) for im in x])
            logits = model(torch.from_numpy(x[:, None]))
            y = torch.from_numpy(labels[idx])
            total += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            count += len(idx)
    return {"loss": total / count, "accuracy": correct / count, "chips": count}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--archive", required=True, help="the synthetic archive the checkpoint was trained on")
    p.add_argument("--bn-batch", type=int, default=2, help="chips per forward in train mode (the demo: 2 per worker)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from recipe_study import load_split

    archive = Path(a.archive)
    train_df, _, _ = split_three(read_manifest(str(archive / "manifest.csv")), val_fraction=0.2, test_fraction=0.33, seed=0)
    images, labels = load_split(archive, train_df, "train")
    model = model_from_checkpoint(load_checkpoint(a.checkpoint))
    aug = AugmentConfig(flips=True, roll=True)
    out = {}
    for mode in ("train", "eval"):
        for augmented in (True, False):
            key = f"{mode}_mode_{'augmented' if augmented else 'plain'}"
            out[key] = losses(model, images, labels, mode == "train", a.bn_batch, aug if augmented else None, a.seed)
            print(key, json.dumps(out[key]), flush=True)
    print(json.dumps({"checkpoint": a.checkpoint, "chips": len(labels), "bn_batch": a.bn_batch, **out}))


if __name__ == "__main__":
    main()
