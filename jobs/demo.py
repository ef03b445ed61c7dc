"""`make demo`: synthesize an archive, crop it on Ray Data, train HR-CelestialNet with Ray Train, classify and report.

Runs on a local Ray (or the cluster in RAY_ADDRESS). `python jobs/demo.py --out demo_out [--set train.epochs=2]`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ray_hrc.demo import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
