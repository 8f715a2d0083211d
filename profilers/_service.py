"""The profiler service: a small HTTP server on the device that measures uploaded ONNX models
with the device's own profiler, for a :class:`~profilers._remote.RemoteProfiler` elsewhere.

``POST /measure`` takes the ONNX file as a raw ``application/octet-stream`` body (any other
Content-Type, a form or JSON, gets 415) and answers the :meth:`~profilers.Measurement.to_dict`
summary plus ``host`` and ``profiler`` (the target name). Query parameters, all optional: ``name``
(the client's file name, used in error messages) and the :data:`~profilers.TIMING_KNOBS` as finite numbers,
which override the service's own for that request, within the service's :class:`ServiceLimits`.
``GET /health`` answers the target, its runtime, the versions, the setting its measurements carry
(:func:`~profilers.measurement_setting`), the limits and the queue. Every request needs
``Authorization: Bearer <token>``. One measurement runs at a time, so concurrent clients never
disturb each other's timings.

What a request may cost is set when the service starts, never by a client: the upload is written
to disk as it arrives and refused (413) once over ``max_bytes``; at most ``max_queue`` requests
wait behind the one measured, and the next gets 503 with ``Retry-After``; a model whose tensors
would need more than ``max_model_memory`` is refused before a runtime session is made; timing
above ``max_time_s`` or ``max_sessions`` is refused (400). A measurement whose client has gone,
or that runs when the service is told to stop, ends within one run. Error messages name the
client's file, never a path on this machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import hmac
import importlib.metadata
import logging
import math
import queue
import re
import socket
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path, PurePath

import onnx
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from profilers._base import TIMING_KNOBS, Profiler
from profilers._errors import MeasurementCancelled, MeasurementError, ProfilerUsageError
from profilers._factory import get_profiler
from profilers._wire import DEFAULT_PORT, ServiceLimits
from targets import Target

_BODY_TYPE = "application/octet-stream"
# The Python distribution of each runtime, for /health.
_RUNTIME_PACKAGES = {"onnxruntime-cpu": "onnxruntime", "tensorrt": "tensorrt"}
# How often a waiting request looks whether its client is still there or the service is stopping.
_POLL_S = 0.1
# After a stop (SIGTERM, Ctrl-C), how long uvicorn waits for the requests in progress; each ends
# within one run of its model, so this is only reached while a runtime builds a session.
_STOP_GRACE_S = 5
# An initializer at least this large is left out of shape inference (its values never decide a
# shape; shape tensors are a few int64s), so inferring costs no copy of the weights.
_INFER_SKIP_BYTES = 4096
# Sent with a refusal while the client may still be sending: the connection closes instead of
# the rest of the upload being read and thrown away.
_CLOSE = {"Connection": "close"}
# An absolute path of at least two parts, not inside a word ("application/octet-stream" is not one).
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~-])/(?:[^\s/'\"<>:]+/)+[^\s/'\"<>:,;)\]]*")

logger = logging.getLogger(__name__)


def create_app(profiler: Profiler, token: str, limits: ServiceLimits | None = None) -> FastAPI:
    """The service measuring with ``profiler``, for clients that send ``token``, within ``limits``
    (the defaults of :class:`ServiceLimits` when None). ``app.state.stopping`` is the event that
    cancels every measurement in progress: the server sets it when told to stop."""
    limits = limits or ServiceLimits()
    if not token:
        raise ProfilerUsageError("the profiler service needs a non-empty token")
    if not profiler.measures_onnx:
        raise ProfilerUsageError(
            f"target '{profiler.target.name}' is measured here by {profiler.runtime}, which runs "
            "PyTorch modules, not the ONNX files clients upload: install TensorRT on this machine to serve it"
        )
    for key, (_, highest, flag) in limits.bounds().items():
        if getattr(profiler, key) > highest:
            raise ProfilerUsageError(
                f"the service's own {key}={getattr(profiler, key):g} is above its limit {flag} {highest:g}"
            )
    expected = f"Bearer {token}".encode()
    stopping = threading.Event()
    measurements = _Worker(stopping)
    load = {"in_flight": 0, "measuring": 0}  # admitted requests; the one being measured
    # About one measurement at the service's own timing: when a refused client may try again.
    retry_after = str(max(1, math.ceil(profiler.sessions * profiler.max_time_s)))
    target = profiler.target
    # Once, at the start: ONNX Runtime's profiler probes its fusions for it, which must not run beside
    # a measurement. Clients compare it with their study's before any work (RemoteProfiler.setting).
    setting = profiler.setting()
    app = FastAPI(title=f"compression-search profiler service ({target.name})", docs_url=None,
                  redoc_url=None, openapi_url=None)  # fmt: skip
    app.state.stopping = stopping

    @app.exception_handler(StarletteHTTPException)
    async def no_paths(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Every refusal goes out through here, without a path of this machine in it."""
        detail = _public(exc.detail) if isinstance(exc.detail, str) else exc.detail
        return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=exc.headers)

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
            "setting": setting,
            "version": _version("compression-search"),
            "host": socket.gethostname(),
            "limits": dataclasses.asdict(limits),
            "queue": {"measuring": load["measuring"], "waiting": load["in_flight"] - load["measuring"]},
        }

    @app.post("/measure")
    async def measure(request: Request) -> dict[str, object]:
        authorize(request)  # before reading a byte of the body
        params = dict(request.query_params)
        name = _client_name(params.pop("name", "model.onnx"))
        knobs = _knobs(params, limits)
        _check_content_type(request.headers.get("content-type"))
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limits.max_bytes:
            raise HTTPException(
                413, f"the model is {length} bytes; this service takes at most {limits.max_bytes} "
                     "(search serve --max-upload-mib)", headers=_CLOSE,
            )  # fmt: skip
        if stopping.is_set():
            raise HTTPException(503, "the profiler service is stopping", headers={"Retry-After": retry_after})
        if load["in_flight"] > limits.max_queue:
            raise HTTPException(
                503, f"the profiler service is busy: one model is measured and {limits.max_queue} wait; "
                     f"try again in {retry_after} s",
                headers={"Retry-After": retry_after},
            )  # fmt: skip
        load["in_flight"] += 1
        try:
            with tempfile.TemporaryDirectory(prefix="search-serve-") as tmp:
                path = Path(tmp) / "model.onnx"
                await _receive(request, path, limits)

                def job(should_stop: Callable[[], bool]) -> dict[str, object]:
                    if should_stop():  # its client left, or the service stops, while it waited
                        raise MeasurementCancelled("cancelled while waiting")
                    load["measuring"] += 1
                    try:
                        return _measure(profiler, path, name, knobs, limits, should_stop)
                    finally:
                        load["measuring"] -= 1

                try:
                    measurement = await _run_cancellable(request, job, measurements, stopping)
                except MeasurementCancelled:
                    if stopping.is_set():
                        raise HTTPException(
                            503, "the profiler service is stopping", headers={"Retry-After": retry_after}
                        ) from None
                    logger.info("the measurement of %s was cancelled: its client disconnected", name)
                    raise HTTPException(400, "the client disconnected") from None
        finally:
            load["in_flight"] -= 1
        return {**measurement, "host": socket.gethostname(), "profiler": target.name}

    return app


async def _receive(request: Request, path: Path, limits: ServiceLimits) -> None:
    """Write the request body to ``path`` as it arrives: 413 once over ``limits.max_bytes`` (the
    rest is never read), 408 after ``limits.upload_idle_s`` without a byte, 400 when empty."""
    received = 0
    chunks = request.stream().__aiter__()
    with path.open("wb") as file:
        while True:
            try:
                chunk = await asyncio.wait_for(anext(chunks), limits.upload_idle_s)
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise HTTPException(
                    408, f"the upload stalled for {limits.upload_idle_s:g} s after {received} bytes", headers=_CLOSE
                ) from None
            except ClientDisconnect:
                logger.info("a client disconnected during its upload, after %d bytes", received)
                raise HTTPException(400, "the client disconnected during the upload") from None
            received += len(chunk)
            if received > limits.max_bytes:
                raise HTTPException(
                    413, f"the model is over {limits.max_bytes} bytes, the most this service takes "
                         "(search serve --max-upload-mib)", headers=_CLOSE,
                )  # fmt: skip
            file.write(chunk)
    if not received:
        raise HTTPException(400, "the request body must be the ONNX file (application/octet-stream)")


class _Worker:
    """The one thread that checks and measures uploads, in the order they were queued: one
    measurement at a time, so concurrent clients never disturb each other's timings, and one
    thread, so the memory a runtime frees is reused by the next model (a thread per request
    grows the process by a malloc arena each). A daemon, started on the first job and ended when
    the service stops, so it never holds the process up at exit."""

    def __init__(self, stopping: threading.Event) -> None:
        self._stopping = stopping
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._started = threading.Lock()

    def submit(self, job: Callable[[], None]) -> None:
        self._jobs.put(job)
        with self._started:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="profiler-service-measurements", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=_POLL_S)
            except queue.Empty:
                if self._stopping.is_set():
                    return
                continue
            job()


async def _run_cancellable(
    request: Request, job: Callable[[Callable[[], bool]], dict], worker: _Worker, stopping: threading.Event
) -> dict:
    """``job(should_stop)`` on ``worker``, awaited while checking every ``_POLL_S`` whether the
    client is still there; ``should_stop`` answers True once it is not, or once the service is
    stopping."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    cancel = threading.Event()

    def should_stop() -> bool:
        return cancel.is_set() or stopping.is_set()

    def settle(result: object, error: BaseException | None) -> None:  # in the loop's thread
        if not done.done():
            done.set_result(result) if error is None else done.set_exception(error)

    def work() -> None:
        result, error = None, None
        try:
            result = job(should_stop)
        except BaseException as exc:  # handed to the request, which re-raises it
            # Without the frames it came through: they hold the upload's bytes (onnx.load's), and
            # this frame in its traceback would make a cycle only the garbage collector frees.
            error = exc.with_traceback(None)
            error.__context__ = error.__cause__ = None
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(settle, result, error)

    worker.submit(work)
    try:
        while not done.done():
            await asyncio.wait([done], timeout=_POLL_S)
            if not done.done() and not cancel.is_set() and await request.is_disconnected():
                cancel.set()  # the thread stops at its next run, then answers MeasurementCancelled
    except asyncio.CancelledError:  # uvicorn gave up waiting at shutdown
        cancel.set()
        raise
    return done.result()


def _check_content_type(content_type: str | None) -> None:
    """The body is the ONNX file itself: a form, JSON or any other encoding is refused unread.
    No Content-Type at all is taken as raw bytes."""
    media_type = (content_type or _BODY_TYPE).partition(";")[0].strip().lower()
    if media_type != _BODY_TYPE:
        raise HTTPException(
            415, f"Content-Type {content_type!r}: expected {_BODY_TYPE}, the ONNX file as the raw body "
                 f"(timing options go in the query string: name, {', '.join(TIMING_KNOBS)})",
        )  # fmt: skip


def _client_name(name: str) -> str:
    """The client's file name as error messages show it: its last part, at most 100 characters."""
    return PurePath(name).name[:100] or "model.onnx"


def _knobs(params: dict[str, str], limits: ServiceLimits) -> dict[str, float]:
    unknown = sorted(set(params) - set(TIMING_KNOBS))
    if unknown:
        raise HTTPException(400, f"unknown parameter(s) {', '.join(unknown)}; accepted: name, "
                                 f"{', '.join(TIMING_KNOBS)}")  # fmt: skip
    bounds = limits.bounds()
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
        if key in bounds:
            lowest, highest, flag = bounds[key]
            if not lowest <= value <= highest:
                raise HTTPException(
                    400, f"timing parameter {key}={text!r}: this service allows {lowest:g} to {highest:g} "
                         f"(set by search serve {flag})",
                )  # fmt: skip
        knobs[key] = value
    return knobs


def _measure(
    profiler: Profiler, path: Path, name: str, knobs: dict[str, float], limits: ServiceLimits,
    should_stop: Callable[[], bool],
) -> dict[str, object]:  # fmt: skip
    """Check and measure one model, in a worker thread holding the measurement lock (so the
    parsing that comes with a measurement is one at a time too)."""
    _check_onnx(path, name, limits.max_model_memory)
    # A copy with the client's timing knobs, checked by the base class's own rule, that stops
    # when told to.
    current = profiler.timing()
    profiler = copy.copy(profiler)
    try:
        Profiler.__init__(profiler, profiler.target, **{**current, **knobs})
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None
    profiler.should_stop = should_stop
    try:
        return profiler.measure(path).to_dict()
    except MeasurementCancelled:
        raise
    except MeasurementError as exc:
        raise HTTPException(422, str(exc).replace(str(path), name)) from None
    except Exception as exc:
        logger.exception("the profiler failed on %s", name)
        raise HTTPException(
            500, f"the profiler failed: {type(exc).__name__}: {str(exc).replace(str(path), name)}"
        ) from None


def _check_onnx(path: Path, name: str, max_model_memory: int) -> None:
    """400 unless ``path`` holds a valid, self-contained ONNX model; 413 when its tensors would
    need more than ``max_model_memory`` bytes (see :func:`declared_bytes`)."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise HTTPException(400, f"{name} is not an ONNX model: {exc}") from None
    if any(
        tensor.data_location == onnx.TensorProto.EXTERNAL for tensor in model.graph.initializer
    ):
        raise HTTPException(400, f"{name} keeps weights in external files; send a self-contained model")
    needed = declared_bytes(model)
    del model
    if needed > max_model_memory:
        raise HTTPException(
            413, f"{name} declares {needed} bytes of tensors (inputs, outputs, weights and the shapes "
                 f"inferred between them); this service takes at most {max_model_memory} "
                 "(search serve --max-model-memory-mib)",
        )  # fmt: skip
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # onnx.checker.ValidationError and protobuf errors
        raise HTTPException(400, f"{name} is not a valid ONNX model: {exc}") from None


def declared_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the tensors ``model`` declares, summed: its graph inputs, outputs and
    initializers, and every tensor whose shape ONNX shape inference (with constant folding of
    shapes) finds. Unknown or symbolic dimensions count 1, as :func:`~profilers.random_inputs`
    makes them. The sum is an upper bound of what the runtime holds at once (it reuses buffers),
    and it catches a tiny file that declares a huge input, or a ``ConstantOfShape`` that would
    make one. ``model`` loses the data of its large initializers (it is read for sizes only).
    """
    graph = model.graph
    sized = {tensor.name: _tensor_bytes(tensor.data_type, tensor.dims) for tensor in graph.initializer}
    for value in (*graph.input, *graph.output):
        sized.setdefault(value.name, _value_bytes(value))
    # Weights leave the copy shape inference makes, marked external so their absence is not an error.
    for tensor in graph.initializer:
        if tensor.ByteSize() > _INFER_SKIP_BYTES:
            tensor.ClearField("raw_data")
            for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                tensor.ClearField(field)
            tensor.data_location = onnx.TensorProto.EXTERNAL
            tensor.external_data.add(key="location", value="weights")
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True).graph
    except Exception:  # the checker refuses what inference cannot read; count what is declared
        inferred = graph
    for value in (*inferred.value_info, *inferred.output):
        sized[value.name] = max(sized.get(value.name, 0), _value_bytes(value))
    return sum(sized.values())


def _value_bytes(value: onnx.ValueInfoProto) -> int:
    if not value.type.HasField("tensor_type"):  # a sequence or map: sized where its tensors are
        return 0
    tensor = value.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else 1 for d in tensor.shape.dim]
    return _tensor_bytes(tensor.elem_type, dims)


def _tensor_bytes(elem_type: int, dims) -> int:
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(elem_type).itemsize
    except Exception:  # an undefined or unusual element type: as wide as the widest
        itemsize = 8
    return math.prod(max(int(d), 1) for d in dims) * max(itemsize, 1)


def _public(text: str) -> str:
    """``text`` without the absolute paths of this machine (a temporary folder, an install)."""
    return _ABSOLUTE_PATH.sub("<path>", text)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _server(profiler: Profiler, token: str, *, host: str, port: int, limits: ServiceLimits | None = None,
            **config: object):  # fmt: skip
    """An unstarted ``uvicorn.Server`` for the service (tests start it on a free port). Told to
    stop (SIGTERM, Ctrl-C, ``should_exit``), it cancels the measurements in progress first, so it
    stops within seconds whatever a client asked for."""
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            app.state.stopping.set()
            await super().shutdown(sockets)

    app = create_app(profiler, token, limits)
    config.setdefault("timeout_graceful_shutdown", _STOP_GRACE_S)
    return Server(uvicorn.Config(app, host=host, port=port, lifespan="off", **config))


def serve(
    target: Target,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    token: str | None = None,
    *,
    limits: ServiceLimits | None = None,
    **timing: float,
) -> None:
    """Run the profiler service for ``target`` with its local profiler until interrupted.

    Listens on ``host`` (127.0.0.1 unless told otherwise: pass the device's address, or
    0.0.0.0, to let another machine in). ``limits`` bounds what one request may cost (see
    :class:`ServiceLimits`). ``timing`` sets the Profiler knobs used when a request
    sends none. Raises :class:`~profilers.ProfilerUsageError` for an empty token.
    """
    if not token:
        raise ProfilerUsageError(
            "the profiler service needs a token: pass --token or set SEARCH_PROFILER_TOKEN "
            "(clients send the same one)"
        )
    # The device's own profiler, even when the target file names a service (this one).
    local = get_profiler(dataclasses.replace(target, service=None), **timing)
    server = _server(local, token, host=host, port=port, limits=limits)
    logging.getLogger("uvicorn.error").info(  # uvicorn's Config has set up its loggers
        "profiler service for %s; from the workstation: search run --target %s "
        "--profiler <this device>:%d --token <token>%s",
        target.name, target.name, port,
        "" if host not in ("127.0.0.1", "localhost", "::1") else
        f" (listening on {host} only: forward the port, or pass --host)",
    )  # fmt: skip
    server.run()
