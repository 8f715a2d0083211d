"""Profilers measure a built model's latency and energy on a target: one module per runtime,
picked by :func:`get_profiler` from the target's ``runtime``, or a :class:`RemoteProfiler`
reaching the target's own through its profiler service (:func:`serve`).

This package imports ``targets`` and nothing of ``search``: the search hands it what it built, an
ONNX file or a :class:`ModuleArtifact`. Importing it imports neither TensorRT nor CUDA, nor
PyTorch: :func:`get_profiler` does, and only for a target measured by them
(:class:`PyTorchProfiler` loads on first use, with torch).
"""

from profilers._base import TIMING_KNOBS, Measurement, ModuleArtifact, Profiler, random_inputs
from profilers._cpuinfo import cpu_info
from profilers._errors import (
    MeasurementCancelled,
    MeasurementError,
    ProfilerError,
    ProfilerUsageError,
    TargetUnavailableError,
)
from profilers._factory import get_profiler
from profilers._onnxruntime_cpu import OnnxRuntimeCpuProfiler
from profilers._remote import RemoteProfiler
from profilers._service import ServiceLimits, create_app, serve
from profilers._wire import DEFAULT_PORT, TOKEN_ENV
from profilers.energy import RaplReader
from profilers.tensorrt import TensorRTProfiler, default_timing, tensorrt_unavailable_reason

__all__ = [
    "DEFAULT_PORT",
    "Measurement",
    "MeasurementCancelled",
    "MeasurementError",
    "ModuleArtifact",
    "OnnxRuntimeCpuProfiler",
    "Profiler",
    "ProfilerError",
    "ProfilerUsageError",
    "PyTorchProfiler",
    "RaplReader",
    "RemoteProfiler",
    "ServiceLimits",
    "TIMING_KNOBS",
    "TOKEN_ENV",
    "TargetUnavailableError",
    "TensorRTProfiler",
    "cpu_info",
    "create_app",
    "default_timing",
    "get_profiler",
    "random_inputs",
    "serve",
    "tensorrt_unavailable_reason",
]


def __getattr__(name: str) -> object:
    """:class:`PyTorchProfiler` on first use: its module imports torch, which this package
    otherwise never needs."""
    if name == "PyTorchProfiler":
        from profilers._pytorch import PyTorchProfiler

        return PyTorchProfiler
    raise AttributeError(f"module 'profilers' has no attribute {name!r}")
