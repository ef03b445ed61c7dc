"""Scale-out: cluster.yaml validated by Ray's own schema and matched to the jobs' requests; autoscaling from a head
alone (Ray's fake multi-node provider); a node lost mid-classification loses no chip."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import psutil
import pytest
import yaml

from ray_hrc.checkpoint import load_checkpoint
from ray_hrc.classify import load_classify_config
from ray_hrc.config import load_config
from ray_hrc.manifest import read_manifest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_cluster_yaml_is_valid_and_fits_the_jobs():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(cluster))  # Ray's own cluster-config schema, after Ray fills in the AWS defaults
    assert cluster["provider"]["region"] == "us-east-1"
    types = cluster["available_node_types"]
    assert types[cluster["head_node_type"]]["resources"].get("CPU", 1) == 0  # the head runs no heavy tasks
    gpu_nodes = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
    cpu_nodes = [t for t in types.values() if t["resources"].get("GPU", 0) == 0 and t["resources"].get("CPU", 0) > 0]
    assert gpu_nodes and cpu_nodes and all(t["min_workers"] == 0 for t in gpu_nodes + cpu_nodes)  # both scale from zero
    assert all("IamInstanceProfile" in t["node_config"] for t in types.values())
    assert any("constraints.txt" in cmd and "pip install" in cmd for cmd in cluster["setup_commands"])

    train = load_config(ROOT / "configs/paper/hrcelestialnet_lcid.yaml")  # the default training config
    fits_gpu_node = [
        t
        for t in gpu_nodes
        if t["resources"]["GPU"] >= train.scaling.gpus_per_worker and t["resources"]["CPU"] >= train.scaling.cpus_per_worker
    ]
    assert train.scaling.use_gpu and fits_gpu_node
    assert sum(t["max_workers"] for t in fits_gpu_node) >= train.scaling.num_workers
    job = load_classify_config(str(ROOT / "configs/classify_cluster.yaml"))
    assert job.model_stage.use_gpu and any(
        t["resources"]["GPU"] >= job.model_stage.gpus_per_actor for t in gpu_nodes
    )  # inference actors ask for GPUs
    assert job.model_stage.max_actors <= sum(t["max_workers"] for t in gpu_nodes)
    assert any(t["resources"]["CPU"] >= job.read.num_cpus for t in cpu_nodes)  # preprocessing tasks: CPU only
    assert not job.read.storage_options.get("anon")  # the instance profile reads stpubdata and writes your bucket
    starts = [cmd for cmd in cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"] if "ray start" in cmd]
    assert starts and all("RAY_AUTH_MODE=token" in cmd for cmd in starts)  # token auth on every node ...
    assert "~/.ray/auth_token" in cluster["file_mounts"]  # ... with one token, the one `ray job submit` sends
    serve = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    assert serve["applications"][0]["import_path"] == "ray_hrc.serve:build_app"


def _quantity(value) -> float:
    """A Kubernetes CPU/GPU quantity ("15", "500m", 1) as a number."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def test_kuberay_rayjob_matches_the_configs():
    import shlex

    from ray_hrc.cli import build_parser

    rayjob = yaml.safe_load((ROOT / "k8s/rayjob.yaml").read_text())
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[0] == "python" and (ROOT / argv[1]).is_file(), argv[:2]  # the entrypoint's script is in the repo
    command = {"jobs/classify.py": "classify", "jobs/train.py": "train"}[argv[1]]
    args = build_parser().parse_args([command, *argv[2:]])  # every flag is one the CLI knows
    assert args.config and (ROOT / args.config).is_file()

    spec = rayjob["spec"]["rayClusterSpec"]
    image = yaml.safe_load((ROOT / "cluster.yaml").read_text())["docker"]["image"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # the head runs no heavy tasks
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    for pod in [head["template"]["spec"]] + [g["template"]["spec"] for g in groups.values()]:
        assert all(c["image"] == image for c in pod["containers"])  # the same Ray image as cluster.yaml
    assert spec["enableInTreeAutoscaling"] and all(g["minReplicas"] == 0 for g in groups.values())  # both scale from zero

    def requests(group: dict) -> dict:
        return group["template"]["spec"]["containers"][0]["resources"]["requests"]

    gpu_groups = [g for g in groups.values() if _quantity(requests(g).get("nvidia.com/gpu", 0)) > 0]
    cpu_groups = [g for g in groups.values() if g not in gpu_groups]
    assert gpu_groups and cpu_groups
    job = load_classify_config(str(ROOT / "configs/classify_cluster.yaml"))
    train = load_config(ROOT / "configs/paper/hrcelestialnet_lcid.yaml")
    assert any(_quantity(requests(g)["cpu"]) >= job.read.num_cpus for g in cpu_groups)  # read tasks: CPU only
    for g in gpu_groups:
        gpus, cpus = _quantity(requests(g)["nvidia.com/gpu"]), _quantity(requests(g)["cpu"])
        assert gpus >= job.model_stage.gpus_per_actor and cpus >= job.model_stage.cpus_per_actor  # a model actor fits
        assert gpus >= train.scaling.gpus_per_worker and cpus >= train.scaling.cpus_per_worker  # a training worker fits
    assert sum(g["maxReplicas"] for g in gpu_groups) >= max(job.model_stage.max_actors, train.scaling.num_workers)

    pins = dict(line.strip().split("==") for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line)
    runtime_env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    for requirement in runtime_env["pip"]["packages"]:
        name, version = requirement.split("==")
        assert pins.get(name) == version, f"{requirement} in k8s/rayjob.yaml; constraints.txt pins {name}=={pins.get(name)}"
    assert image.startswith(f"rayproject/ray:{pins['ray']}-") and spec["rayVersion"] == pins["ray"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_processes_under(path: str) -> None:
    """Stop only the Ray processes of one cluster (their command lines name its temp dir); `ray stop` would stop all."""
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(path in part for part in proc.info["cmdline"] or []):
                proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def _run_driver(*args: str, timeout: int = 600) -> dict:
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "token"}  # heads started by `ray start` use token auth
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests/cluster_driver.py"), *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (proc.stdout[-3000:], proc.stderr[-3000:])
    return json.loads(lines[-1][len("RESULT ") :])


@contextlib.contextmanager
def _autoscaling_head(tmp_path: Path, worker_cpus: int):
    """A head with no CPU under Ray's fake multi-node autoscaler, whose CPU workers scale from zero: yields its address."""
    import ray._private.services as services

    port = _port()
    temp = f"/tmp/rayas{port}"
    address = f"{services.get_node_ip_address()}:{port}"
    config = {
        "cluster_name": "fake_multinode",
        "max_workers": 2,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": address},  # fmt: skip
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "cpu_worker": {"resources": {"CPU": worker_cpus}, "node_config": {}, "min_workers": 0, "max_workers": 2},
        },
        "head_node_type": "ray.head.default",
        "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 1, "docker": {}, "initialization_commands": [],
        "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
    }  # fmt: skip
    path = tmp_path / "autoscaling.json"
    path.write_text(json.dumps(config))
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_ADDRESS": ""}
    cmd = [str(BIN / "ray"), "start", "--head", f"--port={port}", "--num-cpus=0", f"--autoscaling-config={path}", f"--temp-dir={temp}",
           "--include-dashboard=false", "--disable-usage-stats"]  # fmt: skip
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=180)
    try:
        yield address
    finally:
        _kill_processes_under(temp)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_autoscaling_brings_up_workers_from_a_head_alone(tiny_archive, random_checkpoint, tmp_path):
    manifest = read_manifest(str(tiny_archive))
    small = tmp_path / "small.csv"
    manifest.iloc[:4].to_csv(small)
    with _autoscaling_head(tmp_path, worker_cpus=1) as address:
        result = _run_driver("autoscale", address, str(small), random_checkpoint, str(tmp_path / "cat"))
    assert result["nodes_before"] == 1  # the head alone, with no CPU for the job
    assert result["nodes_peak"] >= 2  # the job's requests brought up worker nodes
    assert result["summary"]["chips"] == 4 and result["summary"]["failed"] == 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_training_waits_for_workers_on_a_head_with_no_cpu(tmp_path):
    """The README's cluster shape: `ray job submit` of a training job to a head with CPU 0, workers scaling from zero.
    The job joins the cluster (as a submitted job does) and must wait for the autoscaler's worker, not refuse to run."""
    out = tmp_path / "runs"
    with _autoscaling_head(tmp_path, worker_cpus=2) as address:
        result = _run_driver("train", address, str(ROOT / "configs/smoke.yaml"), "", str(out), timeout=540)
    assert result["nodes_before"] == 1 and result["cpus_before"] == 0  # the head alone, no CPU for the job at submit time
    assert result["nodes_peak"] >= 2  # a worker node joined for it
    assert result["epochs"] == [1]
    state = load_checkpoint(result["best_checkpoint"])
    assert state["epoch"] == 0 and state["model_name"] == "hrcelestialnet"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_lost_node_loses_no_chip(tiny_archive, random_checkpoint, tmp_path):
    manifest = read_manifest(str(tiny_archive))
    result = _run_driver("node_loss", str(tiny_archive), random_checkpoint, str(tmp_path / "cat"))
    assert result["removed"], "the worker node was never removed: the fault was not exercised"
    # Nothing silent: every chip is catalogued or, where Ray Data did not rebuild what the node held, a transient
    # `lost` row of the errors table (exit code 3) ...
    first = result["summary"]
    assert set(first.get("failed_by_class", {})) <= {"lost"}, first
    assert first["chips"] + first["failed"] == len(manifest), first
    # ... and a rerun on the same --out retries exactly those, so no chip is lost for good.
    rerun = result["rerun"]
    assert rerun["files_planned"] <= first["failed"] and rerun["failed"] == 0, rerun
    catalog = pd.read_parquet(tmp_path / "cat" / "catalog.parquet")
    assert len(catalog) == len(manifest)
    assert not catalog.duplicated(["uri", "hdu"]).any()
    expected = set(zip(manifest["URI"], manifest["HDU Index"], strict=True))
    assert set(zip(catalog["uri"], catalog["hdu"], strict=True)) == expected  # every chip exactly once


def test_gpu_auto_with_no_gpu_visible_warns_naming_the_key(ray_session, caplog):
    """On a cluster whose GPU nodes scale from zero, `auto` sees no GPU: the model would quietly run on CPU actors."""
    from ray_hrc.classify import ClassifyConfig, _use_gpu

    assert ray_session.cluster_resources().get("GPU", 0) == 0
    with caplog.at_level("WARNING", logger="ray_hrc.classify"):
        assert _use_gpu(ClassifyConfig()) is False
    assert "model_stage.use_gpu is auto" in caplog.text and "--gpu yes" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ray_hrc.classify"):
        assert _use_gpu(ClassifyConfig(use_gpu=False)) is False
    assert not caplog.text  # an explicit choice is not warned about
