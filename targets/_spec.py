"""The :class:`Target` dataclass: what a target file holds, checked as it is built."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from targets._errors import TargetFileError

RUNTIMES = ("onnxruntime-cpu", "tensorrt", "pytorch-cuda", "pytorch-cpu")
PRECISIONS = ("fp32", "fp16", "int8", "int4-weight-only", "sparse-2:4")
POWER_SENSORS = ("rapl", "ina3221", "nvml", "none")


@dataclass(frozen=True)
class Target:
    """A device to measure on, as described by one TOML file in ``targets/`` or a user's own.

    ``precisions`` lists what the runtime *accelerates* there, not everything it can run.
    ``power_w`` is used only to estimate energy when ``power_sensor`` cannot be read.
    ``fallback_runtime`` measures the target where ``runtime`` cannot run on this machine (the
    ``gpu`` target: PyTorch CUDA where TensorRT is not installed). ``disabled_optimizers`` (ONNX
    Runtime CPU only) names the graph optimizations its sessions run without, as the deployment's
    do; absent, the fusions measured slower on the machine are left out
    (:func:`profilers.disabled_optimizers`).
    """

    name: str
    description: str
    runtime: str
    precisions: tuple[str, ...]
    threads: int
    power_sensor: str
    power_w: float
    peak: Mapping[str, float] = field(hash=False)
    service: str | None
    source: str
    path: str
    fallback_runtime: str | None = None
    disabled_optimizers: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for key in ("name", "description", "source"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                self._fail(key, "a non-empty string")
        self._check_choice("runtime", self.runtime, RUNTIMES)
        if self.fallback_runtime is not None:
            self._check_choice("fallback_runtime", self.fallback_runtime, RUNTIMES)
        self._check_choice("power_sensor", self.power_sensor, POWER_SENSORS)
        if not isinstance(self.precisions, (list, tuple)) or not self.precisions:
            self._fail("precisions", f"a non-empty list drawn from {', '.join(PRECISIONS)}")
        for precision in self.precisions:
            self._check_choice("precisions", precision, PRECISIONS)
        object.__setattr__(self, "precisions", tuple(self.precisions))
        if type(self.threads) is not int or self.threads < 1:
            self._fail("threads", "an integer >= 1")
        if not _is_number(self.power_w) or self.power_w <= 0:
            self._fail("power_w", "a number of watts > 0")
        object.__setattr__(self, "power_w", float(self.power_w))
        if not isinstance(self.peak, Mapping) or not all(
            _is_number(v) and v >= 0 for v in self.peak.values()
        ):
            self._fail("peak", "a table of figures >= 0, such as { fp32_gflops = 96.0 }")
        peak = MappingProxyType({key: float(value) for key, value in self.peak.items()})
        object.__setattr__(self, "peak", peak)
        if self.disabled_optimizers is not None:
            names = self.disabled_optimizers
            if not isinstance(names, (list, tuple)) or not all(isinstance(name, str) and name for name in names):
                self._fail("disabled_optimizers", 'a list of ONNX Runtime optimizers, such as ["SkipLayerNormFusion"]')
            if self.runtime != "onnxruntime-cpu":
                self._fail("disabled_optimizers", "absent: it sets ONNX Runtime's sessions, and runtime is not "
                           '"onnxruntime-cpu"')  # fmt: skip
            object.__setattr__(self, "disabled_optimizers", tuple(names))
        if self.service is not None and not _is_host_port(self.service):
            self._fail("service", 'a "host:port" string such as "192.168.1.20:7777", or absent')

    def _check_choice(self, key: str, value: object, accepted: tuple[str, ...]) -> None:
        if value not in accepted:
            raise TargetFileError(
                f"{self.path}: field '{key}' has {value!r}; accepted: {', '.join(accepted)}"
            )

    def _fail(self, key: str, expected: str) -> None:
        value = getattr(self, key)
        raise TargetFileError(
            f"{self.path}: field '{key}' must be {expected}, got {value!r} ({type(value).__name__})"
        )


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_host_port(value: object) -> bool:
    if not isinstance(value, str):
        return False
    host, _, port = value.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536
