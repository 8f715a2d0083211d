"""One factory for every profiler: the target's runtime picks the module that measures it."""

from __future__ import annotations

import os
from collections.abc import Callable

from profilers._base import Profiler
from profilers._errors import TargetUnavailableError
from profilers._onnxruntime_cpu import OnnxRuntimeCpuProfiler
from profilers._remote import RemoteProfiler
from profilers._wire import TOKEN_ENV
from profilers.tensorrt import TensorRTProfiler, default_timing, tensorrt_unavailable_reason
from targets import Target, list_targets


def _pytorch(runtime: str) -> Callable[..., Profiler]:
    def make(target: Target, **timing: float) -> Profiler:
        from profilers._pytorch import PyTorchProfiler  # imports torch: only for a PyTorch runtime

        return PyTorchProfiler(target, runtime=runtime, **timing)

    return make


_LOCAL_PROFILERS: dict[str, Callable[..., Profiler]] = {
    "onnxruntime-cpu": OnnxRuntimeCpuProfiler,
    "pytorch-cpu": _pytorch("pytorch-cpu"),
    "pytorch-cuda": _pytorch("pytorch-cuda"),
}


def get_profiler(
    target: Target, *, service: str | None = None, token: str | None = None, **timing: float
) -> Profiler:
    """The profiler for ``target.runtime``, given the :class:`Profiler` ``timing`` knobs.

    With a ``service`` address (``host:port``), or a target file that names one, a
    :class:`RemoteProfiler` measuring through that profiler service, with ``token`` or else
    the ``SEARCH_PROFILER_TOKEN`` environment variable.

    A TensorRT target (``gpu``, ``jetson*``) is measured here by a :class:`TensorRTProfiler`
    when ``tensorrt`` and ``cuda-python`` import and CUDA sees a GPU, else by its
    ``fallback_runtime`` where it names one (``gpu``: a :class:`PyTorchProfiler` on PyTorch CUDA);
    its timing knobs default to :func:`~profilers.tensorrt.default_timing`'s, remotely too.

    Raises :class:`~profilers.TargetUnavailableError` for a target this machine cannot
    measure itself (a TensorRT one without TensorRT or a GPU, and without a fallback that runs
    here) and for a service without a token.
    """
    if target.runtime == "tensorrt":
        timing = default_timing(target, **timing)
    address = service or target.service
    if address is not None:
        token = token or os.environ.get(TOKEN_ENV)
        if not token:
            raise TargetUnavailableError(
                f"target '{target.name}' is measured by the profiler service at {address}, which "
                f"needs its token: pass --token or set {TOKEN_ENV}"
            )
        return RemoteProfiler(target, address, token, **timing)
    reasons = []
    if target.runtime == "tensorrt":
        reason = tensorrt_unavailable_reason()  # imports tensorrt, asks CUDA for its GPUs
        if reason is None:
            return TensorRTProfiler(target, **timing)
        reasons.append(reason)
    for runtime in (target.runtime, target.fallback_runtime):
        if runtime in _LOCAL_PROFILERS:
            try:
                return _LOCAL_PROFILERS[runtime](target, **timing)
            except TargetUnavailableError as exc:  # PyTorch without CUDA
                reasons.append(str(exc))
    why = f" ({'; '.join(reasons)})" if reasons else ""
    local = ", ".join(t.name for t in list_targets() if t.runtime in _LOCAL_PROFILERS and t.service is None)
    fallback = f" or {target.fallback_runtime}" if target.fallback_runtime else ""
    raise TargetUnavailableError(
        f"target '{target.name}' is measured with TensorRT{fallback} on the device itself; this "
        f"machine cannot reach one{why}. Run on the device with `pip install '.[tensorrt]'`, or "
        f"run `search serve --target {target.name} --port N --token T` on the device and pass "
        f"`--profiler host:port` (and the same `--token`) here. Known local targets: {local}"
    )
