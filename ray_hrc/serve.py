"""Real-time classification on Ray Serve: ``POST /classify`` with a FITS file as the body.

The answer is JSON with one entry per chip carrying the catalog's fields, and one per chip that could not be read.
A replica cannot be stalled by what a request holds:

- the body is read under a size cap (413) and refused if compressed (415); reading, cropping and normalising
  (`ray_hrc.data.chip_rows`) run in a small thread pool, off the event loop, so the replica keeps accepting,
  batching and answering while a file is parsed;
- chips, not requests, are batched (``@serve.batch``): the model sees at most ``batch_size`` chips per forward
  pass, whatever the requests hold, and the forward pass runs in its own thread; a body with more SCI chips than
  its instrument has is a 422 before any chip is cropped;
- client faults answer 4xx with a JSON error, server faults 500 (503 when out of memory) with a JSON error that is
  logged with the request's label;
- `check_health` fails when a read or a forward pass has run past ``stall_s`` (the replica stopped making
  progress), so Serve replaces the replica.

The same `ChipClassifier` as batch classification, after the same read, crop and normalisation. The service only
ever reads the request's bytes: it never opens a path or URI named in a request.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from ray_hrc.chips import GZIP_MAGIC, FitsStructureError, expected_chips, map_fits
from ray_hrc.data import chip_rows
from ray_hrc.predict import CATALOG_COLUMNS, ChipClassifier, rows_to_batch

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_MB = 200.0  # a calibrated (flt) file is 168 MB, a raw one 34 MB
DEFAULT_BATCH_SIZE = 8  # chips per forward pass, at most
DEFAULT_READ_THREADS = 2  # files read, cropped and normalised at once per replica
DEFAULT_STALL_S = 120.0  # a read or forward pass running longer fails the health check
STATUS_BY_ERROR = {  # when no chip of the file could be read
    "not_fits": 415,
    "bad_header": 422,
    "over_limit": 422,
    "truncated": 400,
    "unsupported_instrument": 422,
    "missing_sci": 422,
    "bad_shape": 422,
    "all_nan": 422,
    "unreadable": 400,
    "internal": 500,
}


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


class ClientError(Exception):
    """A request the client must change: answered with `status` and a JSON error."""

    def __init__(self, status: int, message: str, **extra: Any):
        super().__init__(message)
        self.status, self.extra = status, extra


@serve.deployment(
    name="ChipClassifier",
    autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 4},
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=8,
    health_check_period_s=10,
    health_check_timeout_s=30,
)
class ClassifierDeployment:
    """A thin wrapper around `ChipClassifier` that adds HTTP handling, worker threads and dynamic batching of chips."""

    def __init__(
        self,
        checkpoint: str,
        max_body_mb: float = DEFAULT_MAX_BODY_MB,
        device: str = "auto",
        storage_options: dict | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        read_threads: int = DEFAULT_READ_THREADS,
        stall_s: float = DEFAULT_STALL_S,
        precision: str = "auto",
    ):
        self.classifier = ChipClassifier(checkpoint, device=device, storage_options=storage_options, precision=precision)
        self.max_bytes = int(max_body_mb * 1024 * 1024)
        self.batch_size, self.stall_s = int(batch_size), float(stall_s)
        self.read_pool = ThreadPoolExecutor(read_threads, thread_name_prefix="read")
        self.model_pool = ThreadPoolExecutor(1, thread_name_prefix="model")
        self.running: dict[int, tuple[str, float]] = {}  # job -> (what, when it started), for check_health
        self.jobs = itertools.count()
        self.stats = {"requests": 0, "forward_passes": 0, "chips": 0, "largest_batch": 0}
        self.classify_chips.set_max_batch_size(self.batch_size)

    async def _in_pool(self, pool: ThreadPoolExecutor, what: str, fn, *args):
        """Run ``fn(*args)`` in `pool`, timed from when a thread picks it up (queueing is not a stall)."""
        job = next(self.jobs)

        def timed():
            self.running[job] = (what, time.monotonic())
            try:
                return fn(*args)
            finally:
                self.running.pop(job, None)

        return await asyncio.get_running_loop().run_in_executor(pool, timed)

    async def check_health(self) -> None:
        """Fails (Serve then replaces the replica) when a read or forward pass has run past ``stall_s``."""
        now = time.monotonic()
        for what, started in list(self.running.values()):
            if now - started > self.stall_s:
                raise RuntimeError(f"no progress: {what} has run for {now - started:.0f} s (the limit is {self.stall_s:.0f} s)")

    @serve.batch(max_batch_size=DEFAULT_BATCH_SIZE, batch_wait_timeout_s=0.02)
    async def classify_chips(self, rows: list[dict]) -> list[dict]:
        """One forward pass over chips from any number of requests (at most ``batch_size``); each gets its answer."""
        self.stats["forward_passes"] += 1
        self.stats["chips"] += len(rows)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(rows))
        return await self._in_pool(self.model_pool, f"a forward pass of {len(rows)} chips", self._forward, rows)

    def _forward(self, rows: list[dict]) -> list[dict]:
        out = self.classifier(rows_to_batch(rows))
        return [{k: _jsonable(out[k][i]) for k in CATALOG_COLUMNS if k in out} for i in range(len(rows))]

    def _read(self, body: bytearray, name: str) -> list[dict]:
        """Body -> normalised chip rows and error rows (a worker thread). More SCI chips than the instrument has: 422."""
        try:
            mapped = map_fits(body, name)
        except FitsStructureError:
            mapped = None  # chip_rows turns it into the same error rows
        if mapped is not None:
            primary, scis = mapped
            allowed = expected_chips(primary)
            if allowed and len(scis) > allowed:
                raise ClientError(
                    422, f"{name} has {len(scis)} SCI extensions; its instrument has {allowed} chips", error_class="over_limit"
                )
        return chip_rows({"uri": name, "hdus": [], "labels": [], "bodies": []}, norm=self.classifier.norm, data=body)

    async def _body(self, request: Request) -> bytearray:
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise ClientError(415, f"Content-Encoding {encoding} is not accepted; send the FITS file uncompressed")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            raise ClientError(413, f"body of {int(declared)} bytes is over the limit of {self.max_bytes} bytes")
        body = bytearray()
        async for chunk in request.stream():
            if len(body) + len(chunk) > self.max_bytes:
                raise ClientError(413, f"body is over the limit of {self.max_bytes} bytes")
            body += chunk
        if not body:
            raise ClientError(400, "empty body; expected a Hubble raw or calibrated FITS file")
        if body[:2] == GZIP_MAGIC:
            raise ClientError(415, "the body is gzip-compressed; send the FITS file uncompressed")
        return body

    async def __call__(self, request: Request) -> JSONResponse:
        name = request.headers.get("x-filename") or "request"  # a label for the answer, never opened
        label = f"{name} [{request.headers.get('x-request-id') or uuid.uuid4().hex[:12]}]"
        try:
            path = request.url.path.rstrip("/")
            if path not in ("/classify", ""):
                return error(404, f"no route {request.url.path}; POST a FITS file to /classify")
            if path == "":
                usage = {
                    "model": self.classifier.model_name,
                    "checkpoint": self.classifier.checkpoint_id,
                    "usage": "POST a FITS file to /classify",
                }
                return JSONResponse({**usage, "batch_size": self.batch_size, "torch_threads": torch.get_num_threads(), **self.stats})
            if request.method != "POST":
                return error(405, f"{request.method} is not allowed; POST a FITS file to /classify")
            self.stats["requests"] += 1
            body = await self._body(request)
            rows = await self._in_pool(self.read_pool, f"reading {label}", self._read, body, name)
            del body
            good = [r for r in rows if not r["error_class"]]
            errors = [{k: _jsonable(r[k]) for k in ("uri", "hdu", "error_class", "error")} for r in rows if r["error_class"]]
            if any(e["error_class"] == "internal" for e in errors):
                logger.error("request %s: %s", label, errors)
            if not good:
                first = errors[0] if errors else {"error_class": "not_fits", "error": "no chip found"}
                status = STATUS_BY_ERROR.get(first["error_class"], 400)
                return error(status, first["error"], error_class=first["error_class"], errors=errors)
            chips = await asyncio.gather(*(self.classify_chips(row) for row in good))
            return JSONResponse({"chips": chips, "errors": errors})
        except ClientError as exc:
            return error(exc.status, str(exc), **exc.extra)
        except MemoryError:
            logger.exception("request %s: out of memory", label)
            return error(503, f"the replica ran out of memory on {label}; retry later", request=label)
        except Exception as exc:  # noqa: BLE001 - a server fault: logged with the request's label, answered 500
            logger.exception("request %s failed", label)
            return error(500, f"internal error on {label}: {type(exc).__name__}", request=label)


def build_app(args: dict) -> serve.Application:
    """Application builder for ``serve run`` / ``serve deploy`` (``import_path: ray_hrc.serve:build_app``).

    args: ``checkpoint`` (required), ``max_body_mb`` (default 200), ``device`` ("auto"), ``precision`` ("auto": bf16 on
    CPUs with AMX or AVX-512 BF16, see `ray_hrc.models.choose_precision`), ``storage_options``, ``batch_size`` (chips
    per forward pass, 8), ``read_threads`` (2), ``stall_s`` (120), and ``num_cpus``/``num_gpus`` per replica
    (otherwise the deployment's defaults or the config file's ray_actor_options).
    """
    if "checkpoint" not in args:
        raise ValueError("the Serve application needs args.checkpoint: a checkpoint directory (local or s3://)")
    known = {"checkpoint", "max_body_mb", "device", "storage_options", "batch_size", "read_threads", "stall_s", "num_cpus", "num_gpus"}
    if set(args) - known:
        raise ValueError(f"unknown Serve application args {sorted(set(args) - known)}; expected some of {sorted(known)}")
    deployment = ClassifierDeployment
    if "num_cpus" in args or "num_gpus" in args:
        deployment = deployment.options(
            ray_actor_options={"num_cpus": float(args.get("num_cpus", 1)), "num_gpus": float(args.get("num_gpus", 0))}
        )
    return deployment.bind(
        checkpoint=args["checkpoint"],
        max_body_mb=float(args.get("max_body_mb", DEFAULT_MAX_BODY_MB)),
        device=args.get("device", "auto"),
        storage_options=args.get("storage_options"),
        batch_size=int(args.get("batch_size", DEFAULT_BATCH_SIZE)),
        read_threads=int(args.get("read_threads", DEFAULT_READ_THREADS)),
        stall_s=float(args.get("stall_s", DEFAULT_STALL_S)),
        precision=args.get("precision", "auto"),
    )


def run_server(
    checkpoint: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_body_mb: float = DEFAULT_MAX_BODY_MB,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    stall_s: float = DEFAULT_STALL_S,
    blocking: bool = True,
) -> str:
    """Start Serve on `host`:`port` with the classifier at ``/``; returns the base URL (blocks until Ctrl-C if `blocking`).

    num_cpus/num_gpus: resources per replica.
    """
    serve.start(http_options={"host": host, "port": port})
    args = {"checkpoint": checkpoint, "max_body_mb": max_body_mb, "num_cpus": num_cpus, "num_gpus": num_gpus}
    app = build_app({**args, "batch_size": batch_size, "stall_s": stall_s})
    serve.run(app, name="ray_hrc", route_prefix="/")
    url = f"http://{host}:{port}"
    logger.info("classifier ready: POST a FITS file to %s/classify", url)
    if blocking:
        print(f"POST FITS files to {url}/classify (Ctrl-C to stop)")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.shutdown()
    return url
