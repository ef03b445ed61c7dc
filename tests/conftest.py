"""Shared fixtures: one local Ray for the session, a real S3-protocol server (moto) on localhost."""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/rawfits.py


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every test that needs it: 2 CPUs, like the CI machine."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """moto's standalone S3 server on a free localhost port; yields fsspec storage options for it."""
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    yield {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the local S3 server: yields (bucket URI, storage options)."""
    import boto3
    import s3fs

    name = f"bucket-{_free_port()}"
    client = boto3.client(
        "s3",
        endpoint_url=s3_server["client_kwargs"]["endpoint_url"],
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    client.create_bucket(Bucket=name)
    yield f"s3://{name}", s3_server
    s3fs.S3FileSystem(**s3_server).rm(name, recursive=True)


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory, request):
    """A folder for one module's shared files (synthetic archives of hundreds of MB), removed when the module ends, so
    that a full run never holds every module's archives on disk at once."""
    directory = tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2])
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_archive(tmp_path_factory):
    """A synthetic archive of 4 bodies (both classes, both instruments): its manifest path."""
    from ray_hrc.synth import synthesize_archive

    return synthesize_archive(tmp_path_factory.mktemp("tiny_archive"), bodies=4, seed=1, workers=2)


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory):
    """A real checkpoint of a narrow HR-CelestialNet with seeded random weights (for pipeline tests, not accuracy)."""
    import torch

    from ray_hrc.checkpoint import save_checkpoint
    from ray_hrc.models import build_model
    from ray_hrc.preprocess import NormConfig

    torch.manual_seed(0)
    args = {"width": 0.0625, "input_shape": [2048, 4096]}
    model = build_model("hrcelestialnet", **args)
    directory = tmp_path_factory.mktemp("checkpoint")
    save_checkpoint(str(directory), {"model_name": "hrcelestialnet", "model_args": args, "model_state": model.state_dict(),
                                     "epoch": 0, "preprocess": NormConfig().to_dict()})  # fmt: skip
    return str(directory)
