"""Starting or joining Ray, the same way for the CLI, jobs and tests."""

from __future__ import annotations

import logging
import os

import ray

logger = logging.getLogger(__name__)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` (or ``RAY_ADDRESS``, as ``ray job submit`` sets it); else start a local Ray.

    Does nothing when Ray is already initialised (a test's session cluster, or a caller's own ``ray.init``).
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        logger.info("joining Ray at %s", address)
        ray.init(address=address)
    else:
        logger.info("starting a local Ray")
        ray.init(num_cpus=num_cpus, include_dashboard=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
