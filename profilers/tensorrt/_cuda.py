"""TensorRT and cuda-python, imported only here and only when an engine is built or run: the
runtime's availability, CUDA calls, and the backend that builds engines and runs them on a stream."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import numpy as np

from profilers._errors import MeasurementError
from profilers.tensorrt._build import (
    BuildPlan,
    build_serialized_engine,
    capturing_logger,
    logged_text,
    tensorrt_major,
)
from profilers.tensorrt._report import LayerTimes

_MISSING_TENSORRT = (
    "the TensorRT profiler needs the tensorrt package (10 or newer) on the device: "
    "pip install '.[tensorrt]' (on a Jetson, the one JetPack installs)"
)
_MISSING_CUDA = (
    "the TensorRT profiler needs CUDA's Python bindings for memory, streams and events: "
    "pip install cuda-python (a 12.x release on a CUDA 12 device such as a JetPack 6 Jetson)"
)
# Nodes whose weight (input 1) TensorRT can run at a reduced precision, with the axis of that



def import_tensorrt() -> ModuleType:
    """``tensorrt``, or ImportError naming what to install."""
    try:
        import tensorrt
    except ImportError as exc:
        raise ImportError(_MISSING_TENSORRT) from exc
    return tensorrt


def import_cudart() -> ModuleType:
    """CUDA's runtime API from ``cuda-python``: ``cuda.bindings.runtime`` (12.6 and newer) or
    ``cuda.cudart`` (older), or ImportError naming what to install."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError as exc:
            raise ImportError(_MISSING_CUDA) from exc
    return runtime


class CudaError(RuntimeError):
    """A CUDA runtime call that did not succeed."""


def cuda_call(result: Any, what: str) -> Any:
    """The value of a ``cuda-python`` call, which returns ``(error, value...)``; raises
    :class:`CudaError` naming the call and CUDA's error when the error is not success."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if int(error) != 0:
        raise CudaError(f"{what} failed: {getattr(error, 'name', error)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def cuda_device_count(cudart: ModuleType) -> tuple[int, str | None]:
    """How many CUDA GPUs this process sees, and CUDA's error when it cannot tell (no driver)."""
    error, count = cudart.cudaGetDeviceCount()
    if int(error) != 0:
        return 0, getattr(error, "name", str(error))
    return int(count), None


def tensorrt_unavailable_reason() -> str | None:
    """Why the TensorRT profiler cannot run here, or None when it can: tensorrt (10 or newer)
    and cuda-python import, and CUDA sees a GPU. Imports tensorrt and asks CUDA for its devices,
    so it is called only for a TensorRT target, never on ``import profilers``."""
    try:
        import tensorrt as trt
    except ModuleNotFoundError as exc:
        if exc.name != "tensorrt":
            return f"tensorrt cannot be imported: {exc}"
        return "the tensorrt package is not installed"
    except (ImportError, OSError) as exc:  # OSError: the wheel is there, its libraries are not
        return f"tensorrt cannot be imported: {exc}"
    version = getattr(trt, "__version__", "0")
    try:
        if tensorrt_major(version) < 10:
            return f"tensorrt {version} is installed; this profiler needs 10 or newer"
    except ValueError:
        return f"tensorrt reports version {version!r}"
    try:
        cudart = import_cudart()
    except (ImportError, OSError) as exc:
        return str(exc)
    count, error = cuda_device_count(cudart)
    if count == 0:
        return f"CUDA sees no GPU ({error or 'no device'})"
    return None


class Session(Protocol):
    """An engine ready to run on fixed inputs."""

    def run(self) -> float:
        """One inference; its GPU time in ms, from CUDA events around it on the stream."""

    def layer_times(self, runs: int) -> dict[str, float]:
        """``runs`` profiled inferences; each layer's mean ms per inference."""

    def engine_information(self) -> str:
        """The engine inspector's JSON for the whole engine."""

    def close(self) -> None: ...


class Backend(Protocol):
    """What :class:`TensorRTProfiler` needs from TensorRT and CUDA; tests pass a fake."""

    version: str

    def device(self) -> dict[str, object]:
        """At least ``gpu``: the GPU's name (part of the engine cache key)."""

    def build(
        self, onnx_path: Path, plan: BuildPlan, input_shapes: Mapping[str, Sequence[int]],
        *, workspace_bytes: int | None, hint: str,
    ) -> bytes: ...  # fmt: skip

    def session(self, engine: bytes, feeds: Mapping[str, np.ndarray], name: str) -> Session: ...


class TensorRTBackend:
    """The real :class:`Backend`: ``tensorrt`` for building and running, ``cuda-python`` for
    device memory, the stream and the events. Creating it imports both."""

    def __init__(self, device_index: int | None = None) -> None:
        self.trt = import_tensorrt()
        self.cudart = import_cudart()
        self.version = str(self.trt.__version__)
        self._log = capturing_logger(self.trt)  # must outlive every object made with it
        self._runtime = self.trt.Runtime(self._log)
        if device_index is None:
            device_index = cuda_call(self.cudart.cudaGetDevice(), "cudaGetDevice")
        self._device_index = int(device_index)

    def device(self) -> dict[str, object]:
        props = cuda_call(
            self.cudart.cudaGetDeviceProperties(self._device_index), "cudaGetDeviceProperties"
        )
        name = props.name
        name = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
        return {
            "gpu": name.rstrip("\x00").strip(),
            "compute_capability": f"{props.major}.{props.minor}",
            "cuda_device": self._device_index,
        }

    def build(self, onnx_path, plan, input_shapes, *, workspace_bytes, hint) -> bytes:
        self._log.errors.clear()
        return build_serialized_engine(
            self.trt, onnx_path, plan, input_shapes,
            workspace_bytes=workspace_bytes, hint=hint, trt_logger=self._log,
        )  # fmt: skip

    def session(self, engine: bytes, feeds: Mapping[str, np.ndarray], name: str) -> _CudaSession:
        self._log.errors.clear()
        cuda_engine = self._runtime.deserialize_cuda_engine(engine)
        if cuda_engine is None:
            raise MeasurementError(f"{name}: TensorRT cannot load the engine: {logged_text(self._log)}")
        return _CudaSession(self.trt, self.cudart, cuda_engine, feeds, name)


class _CudaSession:
    """One execution context with its inputs copied to the device once, and a stream and two
    events to time each inference with."""

    def __init__(
        self, trt: ModuleType, cudart: ModuleType, engine: Any,
        feeds: Mapping[str, np.ndarray], name: str,
    ) -> None:  # fmt: skip
        self.trt, self.cudart, self.engine, self.name = trt, cudart, engine, name
        self._pointers: list[Any] = []
        self._stream = self._start = self._end = None
        self._profiler: Any = None
        self.context = engine.create_execution_context()
        if self.context is None:
            raise MeasurementError(
                f"{name}: TensorRT cannot create an execution context (out of GPU memory?)"
            )
        try:
            self._stream = cuda_call(cudart.cudaStreamCreate(), "cudaStreamCreate")
            self._start = cuda_call(cudart.cudaEventCreate(), "cudaEventCreate")
            self._end = cuda_call(cudart.cudaEventCreate(), "cudaEventCreate")
            self._bind(feeds)
        except BaseException:
            self.close()
            raise

    def _bind(self, feeds: Mapping[str, np.ndarray]) -> None:
        trt, cudart, engine, context = self.trt, self.cudart, self.engine, self.context
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        missing = [n for n in inputs if n not in feeds]
        if missing:
            raise MeasurementError(
                f"{self.name}: no data for input(s) {missing}; given {sorted(feeds)}"
            )
        arrays = {}
        for n in inputs:
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(n)))
            arrays[n] = np.ascontiguousarray(feeds[n], dtype=dtype)
            if not context.set_input_shape(n, arrays[n].shape):
                raise MeasurementError(
                    f"{self.name}: the engine does not take input {n!r} of shape {arrays[n].shape}"
                )
        copy = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        for n in names:
            shape = tuple(context.get_tensor_shape(n))
            if any(d < 0 for d in shape):
                raise MeasurementError(
                    f"{self.name}: output {n!r} has a data-dependent shape {list(shape)}, which "
                    "this profiler does not allocate for"
                )
            dtype = engine.get_tensor_dtype(n)
            itemsize = getattr(dtype, "itemsize", None) or np.dtype(trt.nptype(dtype)).itemsize
            nbytes = max(1, math.ceil(int(np.prod(shape, dtype=np.int64)) * itemsize))  # int4: 0.5
            pointer = cuda_call(cudart.cudaMalloc(nbytes), "cudaMalloc")
            self._pointers.append(pointer)
            context.set_tensor_address(n, int(pointer))
            if n in arrays:
                array = arrays[n]
                cuda_call(
                    cudart.cudaMemcpyAsync(
                        pointer, array.ctypes.data, array.nbytes, copy, self._stream
                    ),
                    "cudaMemcpyAsync",
                )
        cuda_call(cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")

    def run(self) -> float:
        cudart = self.cudart
        cuda_call(cudart.cudaEventRecord(self._start, self._stream), "cudaEventRecord")
        ok = self.context.execute_async_v3(int(self._stream))
        cuda_call(cudart.cudaEventRecord(self._end, self._stream), "cudaEventRecord")
        cuda_call(cudart.cudaEventSynchronize(self._end), "cudaEventSynchronize")
        if not ok:
            raise MeasurementError(f"{self.name}: TensorRT failed to run the engine")
        elapsed = cudart.cudaEventElapsedTime(self._start, self._end)
        return float(cuda_call(elapsed, "cudaEventElapsedTime"))

    def layer_times(self, runs: int) -> dict[str, float]:
        times = LayerTimes()
        base = self.trt.IProfiler

        class _Profiler(base):
            def __init__(self) -> None:
                base.__init__(self)

            def report_layer_time(self, layer_name: str, ms: float) -> None:
                times.report_layer_time(layer_name, ms)

        # Kept here: the context holds only a pointer to it, and reports to it from now on.
        self._profiler = _Profiler()
        self.context.profiler = self._profiler
        for _ in range(runs):
            self.run()
            times.runs += 1
        return times.per_inference()

    def engine_information(self) -> str:
        inspector = self.engine.create_engine_inspector()
        inspector.execution_context = self.context  # concrete shapes and formats
        return inspector.get_engine_information(self.trt.LayerInformationFormat.JSON)

    def close(self) -> None:
        cudart = self.cudart
        self.context = None
        for pointer in self._pointers:
            with contextlib.suppress(Exception):
                cudart.cudaFree(pointer)
        self._pointers = []
        for event in (self._start, self._end):
            if event is not None:
                with contextlib.suppress(Exception):
                    cudart.cudaEventDestroy(event)
        if self._stream is not None:
            with contextlib.suppress(Exception):
                cudart.cudaStreamDestroy(self._stream)
        self._stream = self._start = self._end = None
