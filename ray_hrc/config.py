"""Typed job configuration, loaded once from YAML (plus ``--set key=value`` overrides) and passed down as objects.

Unknown keys are errors that list the known ones: a typo never quietly becomes a default.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ray_hrc.data import ReadConfig
from ray_hrc.preprocess import NormConfig


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class ModelConfig:
    name: str = "hrcelestialnet"  # a name from ray_hrc.models.list_models()
    kwargs: dict = field(default_factory=dict)  # passed to build_model, e.g. {width: 0.0625, input_shape: [2048, 4096]}


@dataclass(frozen=True)
class AugmentConfig:
    """Training-time augmentation; all off in the paper configs."""

    flips: bool = False  # random horizontal/vertical flips (with both: the 180-degree rotation; 90 degrees would change the chip's shape)
    roll: bool = False  # random circular shift in both axes: a body may lie anywhere, and fc1 sees each of conv7's positions apart
    blur_prob: float = 0.0  # probability of a Gaussian blur (the paper's weak point is blurry NSC chips)
    blur_sigma: tuple[float, float] = (1.0, 4.0)  # sigma range in pixels
    noise_prob: float = 0.0  # probability of added Gaussian noise
    noise_std: tuple[float, float] = (0.01, 0.05)  # std range, in normalised units

    @property
    def enabled(self) -> bool:
        return self.flips or self.roll or self.blur_prob > 0 or self.noise_prob > 0


@dataclass(frozen=True)
class DataConfig:
    manifest: str | None = None  # LCID-format CSV (local or s3://); None: synthesize `synth_bodies` bodies into <out>/archive
    test_manifest: str | None = None  # held-out chips, opened only once training has ended; None: split `manifest` by body
    test_fraction: float = 0.2  # share of chips for testing when splitting (the paper's 8:2)
    val_fraction: float = 0.2  # share of the training bodies' chips held out for validation (which chooses best/ and fits the temperature)
    split_seed: int = 0
    synth_bodies: int = 8  # only when manifest is None
    synth_seed: int = 0
    synth_files_per_body: tuple[int, int] = (2, 4)  # raw files per body, at least and at most (1 or 2 chips each)
    cache: bool = False  # read and crop every chip once into Ray's object store (16 MiB a chip) instead of every epoch
    read: ReadConfig = field(default_factory=ReadConfig)

    def synth_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `ray_hrc.synth.synthesize_archive` for the synthetic archive this config asks for."""
        return {"bodies": self.synth_bodies, "seed": self.synth_seed, "files_per_body": tuple(self.synth_files_per_body)}


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20  # the paper: 20
    batch_size: int = 4  # GLOBAL batch size (the paper: 4); each worker gets batch_size / num_workers
    optimizer: str = "sgd"  # "sgd" (the paper) or "adamw"
    lr: float = 1e-4  # the paper: 1e-4
    lr_schedule: str = "constant"  # "constant" (the paper) or "cosine" (annealed to 0 over the epochs, per step)
    warmup_epochs: float = 0.0  # the learning rate rises linearly from 0 over this many epochs of steps before the schedule starts
    momentum: float = 0.0  # SGD only
    weight_decay: float = 0.0
    seed: int = 0
    bf16: bool = True  # bf16 autocast on GPU (on CPU only with cpu_bf16)
    cpu_bf16: bool = False  # bf16 autocast on CPU workers too: 1.5x faster per step at width 1 on an AMX Xeon, 1.06x at width 1/16 (bench/train_precision.py); accuracy not yet checked, so off
    channels_last: bool = True  # channels_last memory format on GPU
    checkpoint_large: bool = False  # activation checkpointing of the large-size component (conv1-conv3)
    shuffle_buffer: int = 8  # chips held per worker for local shuffling
    sync_bn: bool = True  # BatchNorm statistics over every worker's chips of a step (the global batch), not each worker's own: nn.SyncBatchNorm on GPUs, ray_hrc.models.syncbn on CPUs
    precise_bn_chips: int = 0  # before each evaluation, recompute BatchNorm statistics with the epoch's final weights from this many of its last training chips (all workers together); 0 keeps the running averages


@dataclass(frozen=True)
class ScalingConfig:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0  # keep num_workers * cpus_per_worker below the node's CPUs: Ray Data's read tasks need some
    gpus_per_worker: float = 1.0  # only with use_gpu


@dataclass(frozen=True)
class RunConfig:
    storage_path: str = "runs"  # local folder or s3:// URI; the run lives in <storage_path>/<name>
    storage_options: dict = field(
        default_factory=dict
    )  # fsspec options for the run folder (output side; data.read.storage_options are the sources')
    name: str = "train"
    max_failures: int = 2  # worker failures survived (resuming from the last checkpoint) before the run fails
    num_to_keep: int = 2  # checkpoints kept, best by validation accuracy (ties: lower validation loss)
    mlflow_tracking_uri: str | None = None  # log params and per-epoch metrics to MLflow when set


@dataclass(frozen=True)
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    preprocess: NormConfig = field(default_factory=NormConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _build(cls: type, data: Any, where: str) -> Any:
    if not dataclasses.is_dataclass(cls):
        return data
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping; got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where or 'config'}; known keys are {sorted(known)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            value = _build(hint, value, f"{where}.{name}".lstrip("."))
        elif typing.get_origin(hint) is tuple and isinstance(value, list):
            value = tuple(value)
        elif hint is float and isinstance(value, int):
            value = float(value)
        elif typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where or 'config'}: {exc}") from exc


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {key} is not a section")
    node[keys[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Load a YAML config and apply ``key.sub=value`` overrides (values parsed as YAML: numbers, lists, null)."""
    tree: dict = {}
    if path is not None:
        text = Path(path).read_text()
        tree = yaml.safe_load(text) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{path} must hold a mapping of sections {[f.name for f in dataclasses.fields(JobConfig)]}")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.sub=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw))
    return _build(JobConfig, tree, "")


def config_from_dict(d: dict) -> JobConfig:
    """Rebuild a JobConfig from `JobConfig.to_dict()` (what travels to Ray Train workers)."""
    return _build(JobConfig, d, "")
