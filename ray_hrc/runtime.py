"""Starting or joining Ray, the same way for the CLI, jobs and tests."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import ray
from ray.util.annotations import RayDeprecationWarning

logger = logging.getLogger(__name__)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` (or ``RAY_ADDRESS``, as ``ray job submit`` sets it); else start a local Ray.

    Does nothing when Ray is already initialised (a test's session cluster, or a caller's own ``ray.init``).
    On a terminal, the workers' and actors' output is shown here as Ray does by default; otherwise (a log file, CI,
    ``ray job logs``) it stays in the session's log files (``<session>/logs/worker-*``), so that Ray Train's and Ray
    Data's internal actors (their health checks and retries) do not flood the log: training prints its epochs from
    this process (`ray_hrc.train`), and a failed task's error still reaches it as an exception.
    """
    import sys

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    terminal = sys.stderr.isatty()
    if address:
        logger.info("joining Ray at %s", address)
        ray.init(address=address, log_to_driver=terminal)
    else:
        logger.info("starting a local Ray")
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=terminal)
    quiet_console(terminal)


def quiet_console(terminal: bool | None = None) -> None:
    """What Ray writes to this process's console: progress bars on a terminal; otherwise (a log file, ``ray job logs``,
    CI) no progress bars and only Ray Data's warnings, so a log holds one line per stage and epoch. Ray Data's full
    log stays in its file (``<session>/logs/ray-data/ray-data.log``).
    """
    import sys

    terminal = sys.stderr.isatty() if terminal is None else terminal
    ray.data.DataContext.get_current().enable_progress_bars = terminal
    for handler in logging.getLogger("ray.data").handlers:
        if type(handler).__name__ == "PlainRayHandler":  # the console handler; its file handler keeps everything
            handler.setLevel(logging.INFO if terminal else logging.WARNING)


@contextmanager
def retry_bounds_as_remote_args() -> Iterator[None]:
    """Around a Ray Data call that bounds its retries through ``**ray_remote_args``.

    Ray 2.60 deprecates ``**ray_remote_args`` in favour of named parameters, but it has none for ``max_retries`` (how
    often a lost read task runs again; Ray Data's default is forever) or ``max_task_retries`` (how often an actor's
    batch is retried). Those bounds are what turns a file that kills its worker into an error row
    (`tests/test_poisoned_file.py`), so they stay; only that one deprecation warning is silenced, here, so that a
    run's console is not four copies of it. When Ray removes the argument, the call raises instead of warning.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", category=RayDeprecationWarning)
        yield
