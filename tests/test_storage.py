"""Input and output storage apart: sources read anonymously from a public bucket, results written with credentials to
a bucket that refuses anonymous writes.

Two real S3-protocol servers (moto): the session's server plays the public archive (a bucket policy lets anyone read,
as s3://stpubdata does); a second server, in its own process with moto's IAM authentication turned on, plays your
bucket: it refuses unknown keys and accepts one IAM user's access key, and answers anonymous requests 403 as S3 does
(`tests/private_s3_server.py`: moto itself fails on them with a 500).
"""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pandas as pd
import pytest
import requests
import s3fs
import yaml

from ray_hrc.checkpoint import load_checkpoint
from ray_hrc.cli import build_parser, main, train_config_from_args
from ray_hrc.manifest import read_manifest, write_manifest
from ray_hrc.storage import OutputConfig, Storage, merge_options

PUBLIC, PRIVATE = "archive-public", "results-private"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def private_s3():
    """Your bucket: a moto server with IAM authentication on. Yields (endpoint, the writer's storage options)."""
    port = _port()
    endpoint = f"http://127.0.0.1:{port}"
    server = Path(__file__).with_name("private_s3_server.py")
    proc = subprocess.Popen([sys.executable, str(server), str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                requests.get(f"{endpoint}/moto-api/", timeout=1)
                break
            except requests.ConnectionError:
                time.sleep(0.1)
        admin = {"endpoint_url": endpoint, "region_name": "us-east-1", "aws_access_key_id": "admin", "aws_secret_access_key": "admin"}
        boto3.client("s3", **admin).create_bucket(Bucket=PRIVATE)
        iam = boto3.client("iam", **admin)
        iam.create_user(UserName="writer")
        key = iam.create_access_key(UserName="writer")["AccessKey"]
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        iam.put_user_policy(UserName="writer", PolicyName="own-bucket", PolicyDocument=json.dumps(policy))
        requests.post(f"{endpoint}/moto-api/reset-auth", data=b"0", timeout=5).raise_for_status()  # authenticate from now on
        yield endpoint, {"key": key["AccessKeyId"], "secret": key["SecretAccessKey"]}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def public_s3(s3_server):
    """The public archive on the session's S3 server: anyone may read (a bucket policy, as on s3://stpubdata)."""
    endpoint = s3_server["client_kwargs"]["endpoint_url"]
    client = boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing"
    )
    client.create_bucket(Bucket=PUBLIC)
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": "*",
                "Action": ["s3:GetObject", "s3:HeadObject", "s3:ListBucket"],
                "Resource": [f"arn:aws:s3:::{PUBLIC}", f"arn:aws:s3:::{PUBLIC}/*"],
            }
        ],
    }  # fmt: skip  (moto names HEAD requests s3:HeadObject; AWS counts them as s3:GetObject)
    client.put_bucket_policy(Bucket=PUBLIC, Policy=json.dumps(policy))
    yield endpoint, s3_server
    s3fs.S3FileSystem(**s3_server).rm(PUBLIC, recursive=True)


def _fs(endpoint: str, **opts) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(skip_instance_cache=True, client_kwargs={"endpoint_url": endpoint}, **opts)


def test_the_servers_behave_as_a_public_archive_and_a_private_bucket(public_s3, private_s3):
    pub_endpoint, admin = public_s3
    out_endpoint, writer = private_s3
    s3fs.S3FileSystem(**admin).pipe(f"{PUBLIC}/probe.txt", b"public")
    assert _fs(pub_endpoint, anon=True).cat(f"{PUBLIC}/probe.txt") == b"public"  # anonymous reads of the archive
    with pytest.raises(PermissionError):
        _fs(out_endpoint, anon=True).pipe(f"{PRIVATE}/anonymous.txt", b"x")  # your bucket refuses anonymous writes ...
    with pytest.raises(PermissionError):
        _fs(out_endpoint, key="testing", secret="testing").pipe(f"{PRIVATE}/stranger.txt", b"x")  # ... and unknown keys
    _fs(out_endpoint, **writer).pipe(f"{PRIVATE}/probe.txt", b"mine")
    assert _fs(out_endpoint, **writer).cat(f"{PRIVATE}/probe.txt") == b"mine"
    with pytest.raises(PermissionError):
        _fs(out_endpoint, anon=True).cat(f"{PRIVATE}/probe.txt")


def test_flags_configure_each_side_apart(tmp_path):
    config = tmp_path / "classify.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "read": {"storage_options": {"client_kwargs": {"region_name": "us-east-1"}}},
                "output": {"storage_options": {"key": "k", "secret": "s"}},
            }
        )  # fmt: skip
    )
    args = build_parser().parse_args(
        [
            "classify",
            "--checkpoint",
            "c",
            "--input",
            "i",
            "--out",
            "o",
            "--config",
            str(config),
            "--anon",
            "--s3-endpoint",
            "http://in",
            "--out-s3-endpoint",
            "http://out",
        ]  # fmt: skip
    )
    from ray_hrc.cli import _classify_configs

    read, _, output = _classify_configs(args)
    assert read.storage_options == {"anon": True, "client_kwargs": {"region_name": "us-east-1", "endpoint_url": "http://in"}}
    assert output == OutputConfig({"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": "http://out"}})  # no anon

    args = build_parser().parse_args(
        ["train", "--config", "configs/paper/hrcelestialnet_lcid.yaml", "--out", "s3://mine/runs/r", "--out-s3-endpoint", "http://out"]
    )
    cfg = train_config_from_args(args)
    assert cfg.data.read.storage_options == {"anon": True}  # the paper configs read MAST's public bucket anonymously
    assert cfg.run.storage_options == {"client_kwargs": {"endpoint_url": "http://out"}}  # and write the run with credentials
    assert merge_options({"client_kwargs": {"a": 1}}, {"client_kwargs": {"b": 2}, "anon": True}) == {
        "client_kwargs": {"a": 1, "b": 2},
        "anon": True,
    }
    store = Storage.at("s3://mine/runs/r", {"anon": True})
    assert (store.path("x"), store.uri_of("x"), store.remote) == ("mine/runs/r/x", "s3://mine/runs/r/x", True)


@pytest.mark.timeout(300)
def test_classify_reads_anonymously_and_writes_where_anonymous_writes_are_refused(
    ray_session, tiny_archive, random_checkpoint, public_s3, private_s3, tmp_path
):
    pub_endpoint, admin = public_s3
    out_endpoint, writer = private_s3
    source = s3fs.S3FileSystem(**admin)
    manifest = read_manifest(str(tiny_archive))
    files = sorted(set(manifest["URI"]))[:2]
    for uri in files:
        source.put(uri, f"{PUBLIC}/raw/{uri.rsplit('/', 1)[-1]}")
    rows = manifest[manifest["URI"].isin(files)].assign(URI=lambda d: [f"s3://{PUBLIC}/raw/{u.rsplit('/', 1)[-1]}" for u in d["URI"]])
    with source.open(f"{PUBLIC}/lists/test.csv", "w") as fh:
        write_manifest(rows, fh)
    mine = _fs(out_endpoint, **writer)
    mine.put(random_checkpoint, f"{PRIVATE}/ckpt", recursive=True)  # the checkpoint lives with your results
    published = sorted(source.find(PUBLIC))

    config = tmp_path / "classify.yaml"
    config.write_text(yaml.safe_dump({"output": {"storage_options": writer}, "model_stage": {"use_gpu": False}}))
    argv = ["classify", "--config", str(config), "--checkpoint", f"s3://{PRIVATE}/ckpt", "--input", f"s3://{PUBLIC}/lists/test.csv",
            "--out", f"s3://{PRIVATE}/catalog", "--anon", "--s3-endpoint", pub_endpoint, "--out-s3-endpoint", out_endpoint]  # fmt: skip
    assert main(argv) == 0
    with mine.open(f"{PRIVATE}/catalog/catalog.parquet", "rb") as fh:
        catalog = pd.read_parquet(fh)
    assert len(catalog) == len(rows) and set(catalog["label_true"]) <= {"galaxy", "NSC"}
    assert mine.exists(f"{PRIVATE}/catalog/summary.json") and mine.find(f"{PRIVATE}/catalog/_parts")
    assert sorted(source.find(PUBLIC)) == published  # nothing was written next to the sources

    # one set of options for both sides, as before: the anonymous reader cannot even open the checkpoint
    from ray_hrc.classify import classify_archive
    from ray_hrc.data import ReadConfig

    anonymous = {"anon": True, "client_kwargs": {"endpoint_url": out_endpoint}}
    with pytest.raises(PermissionError):
        classify_archive([f"s3://{PUBLIC}/lists/test.csv"], f"s3://{PRIVATE}/ckpt", f"s3://{PRIVATE}/catalog2",
                         read=ReadConfig(storage_options={"anon": True, "client_kwargs": {"endpoint_url": pub_endpoint}}),
                         output=OutputConfig(anonymous))  # fmt: skip
    assert load_checkpoint(f"s3://{PRIVATE}/ckpt", writer | {"client_kwargs": {"endpoint_url": out_endpoint}})["model_name"]


@pytest.mark.timeout(600)
def test_training_writes_its_run_to_a_bucket_that_refuses_anonymous_writes(ray_session, private_s3, tmp_path):
    """The run folder, Ray Train's checkpoints (through the same filesystem object), the split's manifests and the
    report go to your bucket with run.storage_options; the sources are read with data.read's (here: local files)."""
    from ray_hrc.config import load_config
    from ray_hrc.synth import synthesize_archive
    from ray_hrc.train import run_training

    out_endpoint, writer = private_s3
    out = {**writer, "client_kwargs": {"endpoint_url": out_endpoint}}
    smoke = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
    archive = synthesize_archive(tmp_path / "archive", **load_config(smoke).data.synth_kwargs())  # 6 bodies: train, val, test
    cfg = load_config(smoke, [f"data.manifest={archive}", f"run.storage_path=s3://{PRIVATE}/runs", "run.name=smoke",
                              "data.read.storage_options={anon: true}"])  # fmt: skip
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, storage_options=out))
    outcome = run_training(cfg)
    assert outcome.best_checkpoint == f"s3://{PRIVATE}/runs/smoke/best"
    mine = _fs(out_endpoint, **writer)
    names = {p.rsplit("/", 1)[-1] for p in mine.ls(f"{PRIVATE}/runs/smoke")}
    assert {"train.csv", "val.csv", "test.csv", "metrics.csv", "training_curves.png", "best", "epoch_001"} <= names, names
    assert load_checkpoint(outcome.best_checkpoint, out)["epoch"] == 0
