"""Packaging metadata that setuptools and Ray would otherwise stop accepting: an SPDX license, a pinned backend."""

from __future__ import annotations

import ast
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_license_is_spdx_and_the_build_backend_is_pinned_like_every_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "BSD-3-Clause"  # a table-valued license stops building after 2027-02-18
    pins = dict(line.strip().split("==") for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line)
    (requirement,) = project["build-system"]["requires"]
    name, version = requirement.split("==")
    assert name == "setuptools" and pins["setuptools"] == version


def test_no_ray_remote_args_fn():
    """Ray 2.60 removes `ray_remote_args_fn` in 2.64."""
    for path in sorted((ROOT / "ray_hrc").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword):
                assert node.arg != "ray_remote_args_fn", f"{path.name}:{node.value.lineno} passes ray_remote_args_fn"


def test_the_core_imports_no_ray():
    """chips, preprocess, models, predict (and the checkpoint and storage modules they use) run without Ray."""
    import subprocess
    import sys

    code = (
        "import sys; import ray_hrc.chips, ray_hrc.preprocess, ray_hrc.models, ray_hrc.predict, ray_hrc.checkpoint, ray_hrc.storage; "
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip()
    assert out == "[]", f"the core imported Ray modules: {out}"
