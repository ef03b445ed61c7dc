"""Classify an archive into a labelled catalog: `ray job submit --working-dir . -- python jobs/classify.py --checkpoint CKPT
--input s3://bucket/prefix/ --out s3://bucket/catalog`. The same as `ray-hrc classify`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir, when submitted without installing

from ray_hrc.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["classify", *sys.argv[1:]]))
