"""Train a model with Ray Train: `ray job submit --working-dir . -- python jobs/train.py --config configs/smoke.yaml`.

The same as `ray-hrc train`; the last line printed is the best checkpoint's URI.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir, when submitted without installing

from ray_hrc.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
