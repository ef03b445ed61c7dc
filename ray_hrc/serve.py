"""Real-time classification on Ray Serve: ``POST /classify`` with a FITS file as the body.

The answer is JSON with one entry per chip carrying the catalog's fields, and one per chip that could not be read.
Requests are batched dynamically (``@serve.batch``) into the same `ChipClassifier` that batch classification uses,
after the same read, crop and normalisation (`ray_hrc.data.chip_rows`). Bad requests get a 4xx with a JSON error,
never a 500, and the service stays up. The service only ever reads the request's bytes: it never opens a path or
URI named in a request.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from ray_hrc.data import chip_rows
from ray_hrc.predict import CATALOG_COLUMNS, ChipClassifier, rows_to_batch

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_MB = 200.0
STATUS_BY_ERROR = {  # when no chip of the file could be read
    "not_fits": 415,
    "truncated": 400,
    "unsupported_instrument": 422,
    "missing_sci": 422,
    "bad_shape": 422,
    "all_nan": 422,
    "unreadable": 400,
}


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


@serve.deployment(
    name="ChipClassifier",
    autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8},
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=32,
)
class ClassifierDeployment:
    """A thin wrapper around `ChipClassifier` that adds HTTP handling and dynamic batching."""

    def __init__(
        self,
        checkpoint: str,
        max_body_mb: float = DEFAULT_MAX_BODY_MB,
        device: str = "auto",
        storage_options: dict | None = None,
        precision: str = "auto",
    ):
        self.classifier = ChipClassifier(checkpoint, device=device, storage_options=storage_options, precision=precision)
        self.max_bytes = int(max_body_mb * 1024 * 1024)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def classify_rows(self, requests: list[list[dict]]) -> list[list[dict]]:
        """Chips of several requests in one model call; each request gets its own chips back."""
        flat = [row for rows in requests for row in rows]
        results: list[dict] = []
        if flat:
            out = self.classifier(rows_to_batch(flat))
            results = [{k: _jsonable(out[k][i]) for k in out} for i in range(len(flat))]
        answers, start = [], 0
        for rows in requests:
            answers.append(results[start : start + len(rows)])
            start += len(rows)
        return answers

    async def _body(self, request: Request) -> bytes | JSONResponse:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            return error(413, f"body of {int(declared)} bytes is over the limit of {self.max_bytes} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_bytes:
                return error(413, f"body is over the limit of {self.max_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def __call__(self, request: Request) -> JSONResponse:
        try:
            if request.url.path.rstrip("/") not in ("/classify", ""):
                return error(404, f"no route {request.url.path}; POST a FITS file to /classify")
            if request.url.path.rstrip("/") == "":
                return JSONResponse(
                    {
                        "model": self.classifier.model_name,
                        "checkpoint": self.classifier.checkpoint_id,
                        "usage": "POST a FITS file to /classify",
                    }
                )
            if request.method != "POST":
                return error(405, f"{request.method} is not allowed; POST a FITS file to /classify")
            body = await self._body(request)
            if isinstance(body, JSONResponse):
                return body
            if not body:
                return error(400, "empty body; expected a Hubble raw or calibrated FITS file")
            name = request.headers.get("x-filename") or "request"  # a label for the answer, never opened
            rows = chip_rows({"uri": name, "hdus": [], "labels": [], "bodies": []}, norm=self.classifier.norm, data=body)
            good = [r for r in rows if not r["error_class"]]
            errors = [{k: _jsonable(r[k]) for k in ("uri", "hdu", "error_class", "error")} for r in rows if r["error_class"]]
            if not good:
                first = errors[0] if errors else {"error_class": "not_fits", "error": "no chip found"}
                return error(
                    STATUS_BY_ERROR.get(first["error_class"], 400), first["error"], error_class=first["error_class"], errors=errors
                )
            chips = await self.classify_rows(good)
            return JSONResponse({"chips": [{k: c.get(k) for k in CATALOG_COLUMNS} for c in chips], "errors": errors})
        except Exception as exc:  # noqa: BLE001 - a request must never take the service down or answer 500 for bad input
            logger.exception("request failed")
            return error(400, f"the request could not be processed: {type(exc).__name__}: {exc}")


def build_app(args: dict) -> serve.Application:
    """Application builder for ``serve run`` / ``serve deploy`` (``import_path: ray_hrc.serve:build_app``).

    args: ``checkpoint`` (required), ``max_body_mb`` (default 200), ``device`` ("auto"), ``precision`` ("auto": bf16 on
    CPUs with AMX or AVX-512 BF16, see `ray_hrc.models.choose_precision`), ``storage_options``, and
    ``num_cpus``/``num_gpus`` per replica (otherwise the deployment's defaults or the config file's ray_actor_options).
    """
    if "checkpoint" not in args:
        raise ValueError("the Serve application needs args.checkpoint: a checkpoint directory (local or s3://)")
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
    blocking: bool = True,
) -> str:
    """Start Serve on `host`:`port` with the classifier at ``/``; returns the base URL (blocks until Ctrl-C if `blocking`).

    num_cpus/num_gpus: resources per replica.
    """
    import time

    serve.start(http_options={"host": host, "port": port})
    app = build_app({"checkpoint": checkpoint, "max_body_mb": max_body_mb, "num_cpus": num_cpus, "num_gpus": num_gpus})
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
