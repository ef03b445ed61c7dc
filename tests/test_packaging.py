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
