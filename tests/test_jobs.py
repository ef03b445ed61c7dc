"""`ray job submit` against a real head started with `ray start --head`, with Ray's token authentication."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """A separate local Ray head (not the tests' session Ray), stopped afterwards."""
    gcs, dashboard, agent = _port(), _port(), _port()
    env = {**os.environ, "RAY_ADDRESS": "", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # the job's `python` is this venv's
    temp = Path("/tmp") / f"rayhead{gcs}"  # Ray's socket paths must stay short
    cmd = [str(BIN / "ray"), "start", "--head", f"--port={gcs}", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
           "--num-cpus=2", "--include-dashboard=true", f"--dashboard-agent-listen-port={agent}", f"--temp-dir={temp}", "--disable-usage-stats"]  # fmt: skip
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=180)
    yield f"http://127.0.0.1:{dashboard}", env
    from test_cluster import _kill_processes_under  # `ray stop` would also stop the test session's Ray

    _kill_processes_under(str(temp))


def test_ray_job_submit_trains_smoke_config(ray_head, tmp_path):
    address, env = ray_head
    out = tmp_path / "runs" / "smoke"
    # Ray 2.5x+ heads use token authentication; the client reads the token `ray start` wrote to ~/.ray/auth_token.
    env = {**env, "RAY_AUTH_MODE": "token"}
    cmd = [str(BIN / "ray"), "job", "submit", f"--address={address}", f"--working-dir={ROOT}", "--",
           "python", "jobs/train.py", "--config", "configs/smoke.yaml", "--out", str(out)]  # fmt: skip
    for _ in range(12):  # right after `ray start` the dashboard's job agent may not be up yet
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=800, cwd=ROOT)
        if "No available agent" not in proc.stdout + proc.stderr:
            break
        time.sleep(5)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert re.search(r"Job '\S+' succeeded", log, re.IGNORECASE), log[-4000:]  # Ray prints "Job 'raysubmit_…' succeeded"
    assert (out / "best" / "checkpoint.pt").exists()
    # the job prints the best checkpoint's URI last on its stdout (Ray's progress bars on stderr interleave in job logs)
    assert any(line.rstrip().endswith(str(out / "best")) for line in proc.stdout.splitlines()), proc.stdout[-2000:]
