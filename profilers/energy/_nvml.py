"""NVIDIA GPU energy and state through NVML (``nvidia-ml-py``, imported only when used)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from types import ModuleType

from profilers.energy._base import Clock, CounterWindow, EnergyReader, EnergyWindow, PowerSampler

_MISSING = (
    "reading NVIDIA GPU energy needs NVML's Python bindings, which are not installed: "
    "pip install nvidia-ml-py"
)
_PSTATE_UNKNOWN = 32


def _import_pynvml() -> ModuleType:
    try:
        import pynvml
    except ImportError as exc:
        raise ImportError(_MISSING) from exc
    return pynvml


class NvmlReader(EnergyReader):
    """Energy of one NVIDIA GPU, by NVML.

    ``index`` is NVML's device index or a ``GPU-…`` UUID; by default the first device in
    ``CUDA_VISIBLE_DEVICES`` (NVML numbers devices ignoring that variable), else 0. Creating the
    reader imports ``pynvml`` (ImportError naming ``nvidia-ml-py`` when missing) and initialises
    NVML; when that fails (no driver, no such GPU) ``error`` says why and every window reads None.

    :meth:`window` reads the total-energy counter (millijoules, Volta and newer) before and after,
    labelled ``measured:nvml``. Where the counter is not supported it samples the board power
    every ``interval_s`` instead and integrates it, labelled ``measured:nvml-power``. Both give
    the gross energy of the board, idle draw included. The counter advances in steps (tens of
    ms on recent boards), so a window should last far longer than that.
    """

    source = "measured:nvml"
    sampled_source = "measured:nvml-power"

    def __init__(
        self,
        index: int | str | None = None,
        *,
        interval_s: float = 0.01,
        clock: Clock = time.perf_counter,
    ) -> None:
        self._nvml = _import_pynvml()
        self.interval_s = interval_s
        self._clock = clock
        self._handle: object | None = None
        self._initialised = False
        self.error: str | None = None
        self.counter_supported: bool | None = None
        try:
            self._nvml.nvmlInit()
            self._initialised = True
            self._handle = _device_handle(self._nvml, index)
        except self._nvml.NVMLError as exc:
            self.error = f"NVML cannot read the GPU: {exc}"

    def read_energy_mj(self) -> int | None:
        """The device's total-energy counter in millijoules, or None when it cannot be read."""
        return self._query(self._nvml.nvmlDeviceGetTotalEnergyConsumption)

    def read_power_w(self) -> float | None:
        """The board power in watts, or None when it cannot be read."""
        milliwatts = self._query(self._nvml.nvmlDeviceGetPowerUsage)
        return None if milliwatts is None else milliwatts / 1000

    def window(self) -> EnergyWindow:
        if self._handle is not None and self.counter_supported is None:
            try:
                self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
                self.counter_supported = True
            except self._nvml.NVMLError_NotSupported:
                self.counter_supported = False
            except self._nvml.NVMLError:
                pass  # unreadable for now: this window reads None, the next one asks again
        if self.counter_supported is False:
            return PowerSampler(
                self.read_power_w,
                source=self.sampled_source,
                interval_s=self.interval_s,
                clock=self._clock,
            )
        return CounterWindow(
            self.read_energy_mj,
            lambda before, after: after - before,
            source=self.source,
            clock=self._clock,
        )

    def device_state(self) -> dict[str, object]:
        """What the GPU reports now: name, driver, SM and memory clocks (MHz), temperature (°C),
        enforced power limit (W) and performance state (``"P0"`` is the fastest). A query the
        device does not support gives None; no device gives an empty dict."""
        if self._handle is None:
            return {}
        nvml, handle = self._nvml, self._handle
        queries: dict[str, Callable[[], object]] = {
            "name": lambda: _text(nvml.nvmlDeviceGetName(handle)),
            "driver_version": lambda: _text(nvml.nvmlSystemGetDriverVersion()),
            "sm_clock_mhz": lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM),
            "memory_clock_mhz": lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_MEM),
            "temperature_c": lambda: nvml.nvmlDeviceGetTemperature(
                handle, nvml.NVML_TEMPERATURE_GPU
            ),
            "power_limit_w": lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000,
            "performance_state": lambda: _pstate(nvml.nvmlDeviceGetPerformanceState(handle)),
        }
        return {key: _call(query, nvml) for key, query in queries.items()}

    def close(self) -> None:
        """Releases this reader's hold on NVML (which counts its initialisations)."""
        if self._initialised:
            self._initialised = False
            self._handle = None
            self._nvml.nvmlShutdown()

    def _query(self, function: Callable[[object], object]) -> object | None:
        if self._handle is None:
            return None
        return _call(lambda: function(self._handle), self._nvml)


def device_state(index: int | str | None = None) -> dict[str, object]:
    """:meth:`NvmlReader.device_state` of the GPU ``index`` (as :class:`NvmlReader` reads it),
    to record with a measurement. Raises ImportError naming ``nvidia-ml-py`` when missing."""
    reader = NvmlReader(index)
    try:
        return reader.device_state()
    finally:
        reader.close()


def _device_handle(nvml: ModuleType, index: int | str | None) -> object:
    if index is None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
        index = visible if visible.isdigit() or visible.startswith("GPU-") else 0
    if isinstance(index, str) and index.startswith("GPU-"):
        return nvml.nvmlDeviceGetHandleByUUID(index)
    return nvml.nvmlDeviceGetHandleByIndex(int(index))


def _call(query: Callable[[], object], nvml: ModuleType) -> object | None:
    try:
        return query()
    except nvml.NVMLError:
        return None


def _pstate(value: int) -> str | None:
    return None if value == _PSTATE_UNKNOWN else f"P{value}"


def _text(value: object) -> object:
    return value.decode() if isinstance(value, bytes) else value
