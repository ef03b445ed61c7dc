"""The demo's training recipe in a plain one-process loop, to compare recipes and seeds without Ray.

It trains HR-CelestialNet on the demo's synthetic archive and split (by body: `test_fraction` 0.33, then
`val_fraction` 0.2 of the training bodies, split seed 0, as `configs/demo.yaml`) the way two Ray Train workers do: batches of 4 chips as two halves of 2 (BatchNorm sees 2 chips,
the gradients are averaged), the same `normalise`, `augment`, `lr_scheduler` and `recalibrate_batchnorm`. Only the data
order differs from a Ray run (numpy's permutation instead of Ray Data's block order), so a recipe that is robust here
over seeds is the one to try in `make demo`. Each epoch prints the validation accuracy and ROC AUC (the test part is
never looked at here: recipes are compared on validation); the last line of a run is appended to ``--results`` as JSON.

    python bench/recipe_study.py --archive demo_out/archive --seed 1 --stem-init dct --roll --lr 2e-3 --warmup 1

Normalised chips are kept in ``<archive>/study_{train,val}.npy`` (float16, 16 MiB a chip) so later runs skip the
reads. The seed study in the README ran two of these at once with ``--threads 1``; each took about 9 minutes.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ray_hrc.chips import Chip, read_fits
from ray_hrc.config import AugmentConfig, TrainConfig
from ray_hrc.manifest import read_manifest, split_three
from ray_hrc.models import build_model
from ray_hrc.preprocess import NormConfig, normalise
from ray_hrc.synth import synthesize_archive
from ray_hrc.train import augment, label_index, lr_scheduler, recalibrate_batchnorm, selection_score


def load_split(archive: Path, part, name: str) -> tuple[np.ndarray, np.ndarray]:
    """The normalised chips of a manifest part (memory-mapped float16 (N, H, W)) and their label indices."""
    cache = archive / f"study_{name}.npy"
    if not cache.exists():
        images = None
        for i, (_, row) in enumerate(part.iterrows()):
            record = read_fits(row["URI"], hdus=[int(row["HDU Index"])])[0]
            if not isinstance(record, Chip):
                raise RuntimeError(f"{row['URI']} HDU {row['HDU Index']}: {record.message}")
            image = normalise(record.pixels, record.amp_bias, NormConfig())
            if images is None:
                images = np.empty((len(part), *image.shape), image.dtype)
            images[i] = image
        np.save(cache, images)
    return np.load(cache, mmap_mode="r"), label_index(part["Label"].to_numpy())


def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> tuple[float, float, float]:
    """(accuracy, ROC AUC of p(NSC), cross-entropy) in eval mode."""
    model.eval()
    with torch.inference_mode():
        p = np.concatenate(
            [
                torch.softmax(model(torch.from_numpy(np.asarray(images[i : i + 2], np.float32)[:, None])), 1)[:, 1].numpy()
                for i in range(0, len(images), 2)
            ]
        )
    pos, neg = p[labels == 1], p[labels == 0]
    auc = float(np.mean((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])))
    loss = float(-np.mean(np.log(np.clip(np.where(labels == 1, p, 1 - p), 1e-12, None))))
    return float(np.mean((p > 0.5) == labels)), auc, loss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archive", default="demo_out/archive", help="a synthetic archive (synthesized here if it has no manifest)")
    p.add_argument("--bodies", type=int, default=80, help="only when the archive is synthesized")
    p.add_argument("--files-per-body", type=int, nargs=2, default=[1, 2])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=float, default=1.0, help="warmup epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=float, default=1 / 16)
    p.add_argument("--stem-init", default="dct", choices=["default", "dct"])
    p.add_argument("--roll", action="store_true")
    p.add_argument("--no-flips", action="store_true")
    p.add_argument("--bn-chips", type=int, default=16, help="precise BatchNorm chips (0: running averages)")
    p.add_argument(
        "--freeze-bn-epochs", type=int, default=0, help="train the last N epochs with BatchNorm in eval mode (its statistics fixed)"
    )
    p.add_argument(
        "--bn-batch", type=int, default=2, help="chips per forward pass (BatchNorm batch): 2 as two workers of the demo, 4 as one"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--results", default="recipe_study.jsonl")
    p.add_argument(
        "--test", action="store_true", help="after the last epoch, score the test part once (validation-chosen and last weights)"
    )
    p.add_argument("--archive-seed", type=int, default=0, help="only when the archive is synthesized")
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    archive = Path(a.archive)
    if not (archive / "manifest.csv").exists():
        synthesize_archive(archive, bodies=a.bodies, seed=a.archive_seed, files_per_body=tuple(a.files_per_body))
    train_df, val_df, test_df = split_three(read_manifest(str(archive / "manifest.csv")), val_fraction=0.2, test_fraction=0.33, seed=0)
    x_train, y_train = load_split(archive, train_df, "train")
    x_val, y_val = load_split(archive, val_df, "val")
    print(
        f"train {len(y_train)} chips of {train_df['ID'].nunique()} bodies, validation {len(y_val)} of {val_df['ID'].nunique()}", flush=True
    )

    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    model = build_model("hrcelestialnet", width=a.width, input_shape=x_train.shape[1:], stem_init=a.stem_init)
    optimizer = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.weight_decay)
    schedule = TrainConfig(epochs=a.epochs, lr_schedule="cosine", warmup_epochs=a.warmup)
    scheduler = lr_scheduler(optimizer, schedule, steps_per_epoch=math.ceil(len(y_train) / 4))
    aug = AugmentConfig(flips=not a.no_flips, roll=a.roll)

    history, best_score, best_state = [], -1.0, None
    for epoch in range(1, a.epochs + 1):
        t0, losses, last = time.perf_counter(), [], deque(maxlen=max(1, a.bn_chips // 2))
        model.train()
        frozen = epoch > a.epochs - a.freeze_bn_epochs
        for module in model.modules():
            if frozen and isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()  # normalise with the statistics evaluation uses, and keep them
        order = rng.permutation(len(y_train))
        for start in range(0, len(order), 4):
            idx = order[start : start + 4]
            halves = [idx[j : j + a.bn_batch] for j in range(0, len(idx), a.bn_batch)]
            optimizer.zero_grad(set_to_none=True)
            for half in halves:  # data-parallel workers of bn_batch chips each (the demo: two of 2)
                x = torch.from_numpy(np.stack([augment(np.asarray(x_train[i], np.float32), aug, rng) for i in half])[:, None])
                loss = nn.functional.cross_entropy(model(x), torch.from_numpy(y_train[half])) / len(halves)
                loss.backward()
                losses.append(float(loss.detach()) * len(halves))
                last.append(x)
            optimizer.step()
            scheduler.step()
        if a.bn_chips and not frozen:
            recalibrate_batchnorm(model, list(last))
        accuracy, auc, val_loss = evaluate(model, x_val, y_val)
        history.append(
            {
                "epoch": epoch,
                "train_loss": float(np.mean(losses)),
                "val_loss": val_loss,
                "accuracy": accuracy,
                "auc": auc,
                "s": time.perf_counter() - t0,
            }
        )
        print(json.dumps(history[-1]), flush=True)
        if selection_score(accuracy, val_loss) > best_score:  # chosen on validation, as run_training chooses best/
            best_score, best_state = selection_score(accuracy, val_loss), {"epoch": epoch, **copy.deepcopy(model.state_dict())}
    # the final weights on the training chips, without augmentation, in eval mode (BatchNorm's recomputed statistics)
    # against the training loss above (train mode: each forward's BatchNorm statistics from its bn_batch chips)
    train_accuracy, _, train_loss_eval = evaluate(model, x_train, y_train)
    print(json.dumps({"train_loss_eval_mode": train_loss_eval, "train_accuracy_eval_mode": train_accuracy}), flush=True)
    result = {"args": vars(a), "best_accuracy": max(h["accuracy"] for h in history), "history": history,
              "train_loss_eval_mode": train_loss_eval, "train_accuracy_eval_mode": train_accuracy}  # fmt: skip
    if a.test:  # scored once, at the end: the validation-chosen epoch's weights, and the last epoch's for comparison
        x_test, y_test = load_split(archive, test_df, "test")
        result["test_last"] = evaluate(model, x_test, y_test)[0]
        best_epoch = best_state.pop("epoch")
        model.load_state_dict(best_state)
        result["test_best"], result["best_epoch"], result["test_chips"] = evaluate(model, x_test, y_test)[0], best_epoch, len(y_test)
        print(json.dumps({k: result[k] for k in ("best_epoch", "test_best", "test_last", "test_chips")}), flush=True)
    with open(a.results, "a") as fh:
        fh.write(json.dumps(result) + "\n")
    print("accuracy by epoch", [round(h["accuracy"], 3) for h in history])


if __name__ == "__main__":
    main()
