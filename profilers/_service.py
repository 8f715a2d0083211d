"""The profiler service: a small HTTP server on the device that measures uploaded ONNX models
with the device's own profiler, for a :class:`~profilers._remote.RemoteProfiler` elsewhere.

``POST /measure`` takes the ONNX file as a raw ``application/octet-stream`` body (any other
Content-Type, a form or JSON, gets 415) and answers the :meth:`~profilers.Measurement.to_dict`
summary plus ``host`` and ``profiler`` (the target name). Query parameters, all optional: ``name``
(the client's file name, used in error messages) and the :data:`~profilers.TIMING_KNOBS` as finite numbers,
which override the service's own for that request.
``GET /health`` answers the target, its runtime and the versions. Every request needs
``Authorization: Bearer <token>``. One measurement runs at a time, so concurrent clients never
disturb each other's timings.
"""

from __future__ import annotations

import copy
import dataclasses
import hmac
import importlib.metadata
import logging
import math
import socket
import tempfile
import threading
from pathlib import Path

import onnx
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from profilers._base import TIMING_KNOBS, Profiler
from profilers._errors import MeasurementError, ProfilerUsageError
from profilers._factory import get_profiler
from profilers._wire import DEFAULT_PORT
from targets import Target

MAX_BYTES = 256 * 2**20
_BODY_TYPE = "application/octet-stream"
# The Python distribution of each runtime, for /health.
_RUNTIME_PACKAGES = {"onnxruntime-cpu": "onnxruntime", "tensorrt": "tensorrt"}

logger = logging.getLogger(__name__)


def create_app(profiler: Profiler, token: str, max_bytes: int = MAX_BYTES) -> FastAPI:
    """The service measuring with ``profiler``, for clients that send ``token``, taking models of
    at most ``max_bytes`` bytes."""
    if not token:
        raise ProfilerUsageError("the profiler service needs a non-empty token")
    if not profiler.measures_onnx:
        raise ProfilerUsageError(
            f"target '{profiler.target.name}' is measured here by {profiler.runtime}, which runs "
            "PyTorch modules, not the ONNX files clients upload: install TensorRT on this machine to serve it"
        )
    expected = f"Bearer {token}".encode()
    lock = threading.Lock()
    target = profiler.target
    app = FastAPI(title=f"compression-search profiler service ({target.name})", docs_url=None,
                  redoc_url=None, openapi_url=None)  # fmt: skip

    def authorize(request: Request) -> None:
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise HTTPException(
                401, "missing or wrong token", headers={"WWW-Authenticate": "Bearer"}
            )

    @app.get("/health")
    def health(request: Request) -> dict[str, object]:
        authorize(request)
        return {
            "status": "ok",
            "target": target.name,
            "runtime": target.runtime,
            "runtime_version": _version(_RUNTIME_PACKAGES.get(target.runtime, target.runtime)),
            "version": _version("compression-search"),
            "host": socket.gethostname(),
        }

    @app.post("/measure")
    async def measure(request: Request) -> dict[str, object]:
        authorize(request)  # before reading a byte of the body
        params = dict(request.query_params)
        name = params.pop("name", "model.onnx")
        knobs = _knobs(params)
        _check_content_type(request.headers.get("content-type"))
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            raise HTTPException(413, f"the model is {length} bytes; this service takes at most {max_bytes}")
        chunks, received = [], 0
        try:
            async for chunk in request.stream():
                received += len(chunk)
                if received > max_bytes:
                    raise HTTPException(413, f"the model is over {max_bytes} bytes, the most this service takes")
                chunks.append(chunk)
        except ClientDisconnect:
            logger.info("a client disconnected during its upload, after %d bytes", received)
            raise HTTPException(400, "the client disconnected during the upload") from None
        if not received:
            raise HTTPException(400, "the request body must be the ONNX file (application/octet-stream)")
        data = b"".join(chunks)
        del chunks
        measurement = await run_in_threadpool(_measure, profiler, lock, data, name, knobs)
        return {**measurement, "host": socket.gethostname(), "profiler": target.name}

    return app


def _check_content_type(content_type: str | None) -> None:
    """The body is the ONNX file itself: a form, JSON or any other encoding is refused unread.
    No Content-Type at all is taken as raw bytes."""
    media_type = (content_type or _BODY_TYPE).partition(";")[0].strip().lower()
    if media_type != _BODY_TYPE:
        raise HTTPException(
            415, f"Content-Type {content_type!r}: expected {_BODY_TYPE}, the ONNX file as the raw body "
                 f"(timing options go in the query string: name, {', '.join(TIMING_KNOBS)})",
        )  # fmt: skip


def _knobs(params: dict[str, str]) -> dict[str, float]:
    unknown = sorted(set(params) - set(TIMING_KNOBS))
    if unknown:
        raise HTTPException(400, f"unknown parameter(s) {', '.join(unknown)}; accepted: name, "
                                 f"{', '.join(TIMING_KNOBS)}")  # fmt: skip
    knobs = {}
    for key, text in params.items():
        kind = TIMING_KNOBS[key]
        try:
            value = kind(text)
        except ValueError:
            value = None
        # an infinite time limit could let one request hold the measurement lock for ever
        if value is None or not math.isfinite(value):
            raise HTTPException(
                400, f"timing parameter {key}={text!r}: expected a finite "
                     f"{'whole number' if kind is int else 'number'}",
            )  # fmt: skip
        knobs[key] = value
    return knobs


def _measure(
    profiler: Profiler, lock: threading.Lock, data: bytes, name: str, knobs: dict[str, float]
) -> dict[str, object]:
    """Check and measure one model, in a worker thread; the lock keeps measurements (and the
    parsing that comes with them) one at a time."""
    with lock, tempfile.TemporaryDirectory(prefix="search-serve-") as tmp:
        path = Path(tmp) / "model.onnx"
        _check_onnx(data, path, name)
        if knobs:
            # A copy with the client's timing knobs, checked by the base class's own rule.
            current = profiler.timing()
            profiler = copy.copy(profiler)
            try:
                Profiler.__init__(profiler, profiler.target, **{**current, **knobs})
            except ValueError as exc:
                raise HTTPException(400, str(exc)) from None
        try:
            return profiler.measure(path).to_dict()
        except MeasurementError as exc:
            raise HTTPException(422, str(exc).replace(str(path), name)) from None
        except Exception as exc:
            logger.exception("the profiler failed on %s", name)
            raise HTTPException(500, f"the profiler failed: {type(exc).__name__}: {exc}") from None


def _check_onnx(data: bytes, path: Path, name: str) -> None:
    """Write ``data`` to ``path`` if it is a valid, self-contained ONNX model; 400 otherwise."""
    try:
        model = onnx.load_from_string(data)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise HTTPException(400, f"{name} is not an ONNX model: {exc}") from None
    if any(
        tensor.data_location == onnx.TensorProto.EXTERNAL for tensor in model.graph.initializer
    ):
        raise HTTPException(400, f"{name} keeps weights in external files; send a self-contained model")
    del model
    path.write_bytes(data)
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # onnx.checker.ValidationError and protobuf errors
        raise HTTPException(400, f"{name} is not a valid ONNX model: {exc}") from None


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _server(profiler: Profiler, token: str, *, host: str, port: int, max_bytes: int = MAX_BYTES,
            **config: object):  # fmt: skip
    """An unstarted ``uvicorn.Server`` for the service (tests start it on a free port)."""
    import uvicorn

    app = create_app(profiler, token, max_bytes)
    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, lifespan="off", **config))


def serve(
    target: Target,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    token: str | None = None,
    *,
    max_bytes: int = MAX_BYTES,
    **timing: float,
) -> None:
    """Run the profiler service for ``target`` with its local profiler until interrupted.

    Listens on ``host`` (127.0.0.1 unless told otherwise: pass the device's address, or
    0.0.0.0, to let another machine in). ``timing`` sets the Profiler knobs used when a request
    sends none. Raises :class:`~profilers.ProfilerUsageError` for an empty token.
    """
    if not token:
        raise ProfilerUsageError(
            "the profiler service needs a token: pass --token or set SEARCH_PROFILER_TOKEN "
            "(clients send the same one)"
        )
    # The device's own profiler, even when the target file names a service (this one).
    local = get_profiler(dataclasses.replace(target, service=None), **timing)
    server = _server(local, token, host=host, port=port, max_bytes=max_bytes)
    logging.getLogger("uvicorn.error").info(  # uvicorn's Config has set up its loggers
        "profiler service for %s; from the workstation: search run --target %s "
        "--profiler <this device>:%d --token <token>%s",
        target.name, target.name, port,
        "" if host not in ("127.0.0.1", "localhost", "::1") else
        f" (listening on {host} only: forward the port, or pass --host)",
    )  # fmt: skip
    server.run()
