"""Model registry, as timm does: builders are plain functions recorded by name, built with `build_model`.

model = build_model("hrcelestialnet", width=1 / 16)
model = build_model(name, **checkpoint["model_args"])  # every registered model exposes `model.model_args`
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ray_hrc.models.inference import (
    PRECISIONS,
    Precision,
    choose_precision,
    count_parameters,
    fold_batchnorm,
    pool_before_relu,
    prepare_for_inference,
    size_mib,
)

MODELS: dict[str, Callable[..., nn.Module]] = {}
"""Registered builders by name. A builder takes keyword arguments and returns a module with a `model_args` dict."""


def register_model(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Record `builder` under its function name and return it unchanged."""
    name = builder.__name__
    if name in MODELS and MODELS[name] is not builder:
        raise ValueError(f"model {name!r} is registered twice ({MODELS[name].__module__} and {builder.__module__})")
    MODELS[name] = builder
    return builder


def list_models() -> list[str]:
    """Names of the registered models, sorted."""
    return sorted(MODELS)


def build_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model `name` with the builder's keyword arguments."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of: {', '.join(list_models())}")
    return MODELS[name](**kwargs)


# The model modules register themselves with the decorator above, so they are imported after it is defined.
from ray_hrc.models import baselines, hrcelestialnet  # noqa: E402
from ray_hrc.models.hrcelestialnet import HRCelestialNet  # noqa: E402

__all__ = [
    "MODELS",
    "PRECISIONS",
    "Precision",
    "choose_precision",
    "HRCelestialNet",
    "baselines",
    "build_model",
    "count_parameters",
    "fold_batchnorm",
    "hrcelestialnet",
    "list_models",
    "pool_before_relu",
    "prepare_for_inference",
    "register_model",
    "size_mib",
]
