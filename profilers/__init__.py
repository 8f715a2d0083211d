"""Profilers measure a built model's latency and energy on a target: one module per runtime,
picked by :func:`get_profiler` from the target's ``runtime``, or a :class:`RemoteProfiler`
reaching the target's own through its profiler service (:func:`serve`).

This package imports ``targets`` and nothing of ``search``: the search hands it what it built, an
ONNX file or a :class:`ModuleArtifact`. Importing it imports neither TensorRT nor CUDA, nor
PyTorch, nor ONNX or ONNX Runtime: the profilers, the service and the energy readers load on
first use (PEP 562), and :func:`get_profiler` loads a runtime only for a target measured by it.
"""

import importlib

from profilers._base import (
    TIMING_KNOBS,
    Measurement,
    ModuleArtifact,
    Profiler,
    measurement_setting,
    random_inputs,
)
from profilers._cpuinfo import cpu_info
from profilers._errors import (
    MeasurementCancelled,
    MeasurementError,
    ProfilerError,
    ProfilerUsageError,
    TargetUnavailableError,
)
from profilers._in_turn import measure_in_turn
from profilers._wire import DEFAULT_PORT, TOKEN_ENV, ServiceLimits

_LAZY = {
    "profilers._factory": ("get_profiler",),
    "profilers._onnxruntime_cpu": ("OnnxRuntimeCpuProfiler",),
    "profilers._onnxruntime_fusions": ("disabled_optimizers",),
    "profilers._pytorch": ("PyTorchProfiler",),
    "profilers._remote": ("RemoteProfiler",),
    "profilers._service": ("create_app", "serve"),
    "profilers.energy": ("RaplReader",),
    "profilers.tensorrt": ("TensorRTProfiler", "default_timing", "tensorrt_unavailable_reason"),
}
_HOME = {name: module for module, names in _LAZY.items() for name in names}

__all__ = sorted(
    [
        *_HOME,
        "DEFAULT_PORT",
        "Measurement",
        "MeasurementCancelled",
        "MeasurementError",
        "ModuleArtifact",
        "Profiler",
        "ProfilerError",
        "ProfilerUsageError",
        "ServiceLimits",
        "TIMING_KNOBS",
        "TOKEN_ENV",
        "TargetUnavailableError",
        "cpu_info",
        "measure_in_turn",
        "measurement_setting",
        "random_inputs",
    ]
)


def __getattr__(name: str) -> object:
    if name not in _HOME:
        raise AttributeError(f"module 'profilers' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
