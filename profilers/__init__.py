"""Profilers measure a model's latency and energy on a target: one module per runtime,
picked by :func:`get_profiler` from the target's ``runtime``."""

from profilers._base import Measurement, Profiler, random_inputs
from profilers._energy import RaplReader
from profilers._onnxruntime_cpu import OnnxRuntimeCpuProfiler
from search._errors import TargetUnavailableError
from targets import Target, list_targets

__all__ = [
    "Measurement",
    "OnnxRuntimeCpuProfiler",
    "Profiler",
    "RaplReader",
    "get_profiler",
    "random_inputs",
]

_LOCAL_PROFILERS: dict[str, type[Profiler]] = {"onnxruntime-cpu": OnnxRuntimeCpuProfiler}


def get_profiler(target: Target, **timing: float) -> Profiler:
    """The profiler for ``target.runtime``, given the :class:`Profiler` ``timing`` knobs.

    Raises :class:`~search._errors.TargetUnavailableError` for a target this build cannot
    measure from here: one measured with TensorRT, or one that names a profiler service.
    """
    local = ", ".join(
        t.name for t in list_targets() if t.runtime in _LOCAL_PROFILERS and t.service is None
    )
    if target.service is not None:
        raise TargetUnavailableError(
            f"target '{target.name}' names the profiler service {target.service}, and this build "
            f"has no client for one yet. Remove `service` from {target.path} to measure locally, "
            f"or use a local target: {local}"
        )
    if target.runtime not in _LOCAL_PROFILERS:
        raise TargetUnavailableError(
            f"target '{target.name}' is measured with TensorRT on the device itself; this machine "
            f"cannot reach one. Run on the device with `pip install '.[tensorrt]'`, or run the "
            f'profiler service there and set `service = "host:port"` in the target file. '
            f"Known local targets: {local}"
        )
    return _LOCAL_PROFILERS[target.runtime](target, **timing)
