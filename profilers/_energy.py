"""Energy readers: what a profiler wraps around its timed runs to learn how much energy they took.

Every reader has :meth:`EnergyReader.window`, a context manager put around the timed runs; after
the ``with`` block its ``energy_mj`` holds the energy in millijoules (None when the sensor could
not be read, so the profiler falls back to an estimate) and its ``source`` the label for
:attr:`~profilers.Measurement.energy_source`. :func:`energy_reader` picks the reader for a
target's ``power_sensor``. Two ways to get the energy are written here once:

- :class:`CounterWindow` reads a cumulative energy counter before and after (RAPL, NVML's
  total-energy counter);
- :class:`PowerSampler` samples a power sensor in a background thread and integrates it
  (INA3221 rails on a Jetson, NVML power when its counter is not supported).

This module holds the RAPL reader; the INA3221 reader is in ``_ina3221.py``, the NVML one in
``_nvml.py``.
"""

from __future__ import annotations

import abc
import itertools
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from targets import Target

if TYPE_CHECKING:
    from typing_extensions import Self

Clock = Callable[[], float]
logger = logging.getLogger(__name__)
Reading = TypeVar("Reading")

# Top-level zones only: a package's sub-zones (core, uncore) are already inside its counter.
_PACKAGE_ZONE = re.compile(r"intel-rapl:\d+")


class EnergyWindow(abc.ABC):
    """A context manager around the timed runs; after it exits, ``energy_mj`` is the energy they
    took in millijoules (None when the sensor could not be read) and ``duration_s`` how long the
    window was open by ``clock``. An exception in the ``with`` block is never suppressed."""

    def __init__(self, source: str, clock: Clock = time.perf_counter) -> None:
        self.source = source
        self.energy_mj: float | None = None
        self.duration_s: float | None = None
        self._clock = clock

    @abc.abstractmethod
    def __enter__(self) -> Self: ...

    @abc.abstractmethod
    def __exit__(self, *exc_info: object) -> None: ...


class CounterWindow(EnergyWindow, Generic[Reading]):
    """Reads a cumulative counter on entry and on exit; ``difference(before, after)`` turns the two
    reads into millijoules. A read of None (sensor unreadable) leaves ``energy_mj`` None."""

    def __init__(
        self,
        read: Callable[[], Reading | None],
        difference: Callable[[Reading, Reading], float],
        *,
        source: str,
        clock: Clock = time.perf_counter,
    ) -> None:
        super().__init__(source, clock)
        self._read = read
        self._difference = difference
        self._before: Reading | None = None
        self._start = 0.0

    def __enter__(self) -> Self:
        self.energy_mj = self.duration_s = None
        self._before = self._read()
        self._start = self._clock()
        return self

    def __exit__(self, *exc_info: object) -> None:
        after = self._read()
        self.duration_s = self._clock() - self._start
        if self._before is not None and after is not None:
            self.energy_mj = float(self._difference(self._before, after))


class PowerSampler(EnergyWindow):
    """Samples ``read_power_w`` (watts, or None when the sensor cannot be read) every
    ``interval_s`` in a background thread while the ``with`` block runs, and integrates it.

    On entry it first measures the idle power for ``idle_s`` seconds (in the calling thread,
    before the timed runs start), then samples once, starts the thread, and samples once more on
    exit, so the integral spans the whole window. After exit:

    - ``samples``: ``(time_s, watts)`` pairs, in order, from the entry sample to the exit one;
    - ``idle_w``: the mean power over the idle window (time-weighted), or 0.0 when ``idle_s``
      is 0, which gives the gross energy;
    - ``duration_s``: the time between the first and the last sample;
    - ``energy_mj``: ∫ P dt over ``samples`` by the trapezoid rule, minus ``idle_w ×
      duration_s``: the energy the timed runs added to what the device draws anyway. None when
      fewer than two samples (or no idle sample) could be read.

    The thread holds the GIL only to read the sensor, a few tens of microseconds per sample, so
    it barely disturbs runtimes that release the GIL while they run (ONNX Runtime, TensorRT).
    ``clock`` is injectable so tests need not sleep.
    """

    def __init__(
        self,
        read_power_w: Callable[[], float | None],
        *,
        source: str,
        interval_s: float = 0.01,
        idle_s: float = 0.0,
        clock: Clock = time.perf_counter,
    ) -> None:
        if not interval_s > 0 or not idle_s >= 0:
            raise ValueError(
                f"power sampling needs interval_s > 0 and idle_s >= 0, "
                f"got interval_s={interval_s}, idle_s={idle_s}"
            )
        super().__init__(source, clock)
        self.interval_s = interval_s
        self.idle_s = idle_s
        self.idle_w: float | None = None
        self.idle_samples: tuple[tuple[float, float], ...] = ()
        self.samples: tuple[tuple[float, float], ...] = ()
        self._read_power_w = read_power_w
        self._samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: Exception | None = None

    def __enter__(self) -> Self:
        self.energy_mj = self.duration_s = None
        self.idle_w = self._idle_power()
        self._samples = []
        self._error = None
        self._stop.clear()
        self._sample(self._samples)
        self._thread = threading.Thread(target=self._run, name="power-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            self.samples = tuple(self._samples)
            if exc_info[0] is None:
                raise RuntimeError("the power sampling thread failed") from self._error
            return
        self._sample(self._samples)
        self.samples = tuple(self._samples)
        if len(self.samples) < 2 or self.idle_w is None:
            return
        self.duration_s = self.samples[-1][0] - self.samples[0][0]
        self.energy_mj = (_integral_j(self.samples) - self.idle_w * self.duration_s) * 1000

    def _idle_power(self) -> float | None:
        if self.idle_s == 0:
            self.idle_samples = ()
            return 0.0
        samples: list[tuple[float, float]] = []
        start = self._clock()
        while True:
            now = self._sample(samples)
            if now - start >= self.idle_s:
                break
            time.sleep(self.interval_s)
        self.idle_samples = tuple(samples)
        if not samples:
            return None
        span = samples[-1][0] - samples[0][0]
        if span <= 0:
            return sum(watts for _, watts in samples) / len(samples)
        return _integral_j(samples) / span

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.interval_s):
                self._sample(self._samples)
        except Exception as exc:  # noqa: BLE001 (re-raised on exit, in the caller's thread)
            self._error = exc

    def _sample(self, into: list[tuple[float, float]]) -> float:
        now = self._clock()
        watts = self._read_power_w()
        if watts is not None:
            into.append((now, float(watts)))
        return now


def _integral_j(samples: Sequence[tuple[float, float]]) -> float:
    """∫ P dt in joules over ``(time_s, watts)`` samples, by the trapezoid rule."""
    return sum((t1 - t0) * (p0 + p1) / 2 for (t0, p0), (t1, p1) in itertools.pairwise(samples))


class EnergyReader(abc.ABC):
    """A power sensor. :meth:`window` is put around the timed runs."""

    source: str

    @abc.abstractmethod
    def window(self) -> EnergyWindow:
        """A fresh :class:`EnergyWindow` for one measurement."""


class RaplReader(EnergyReader):
    """Reads the package energy counters under ``root`` (``/sys/class/powercap`` by default).

    The counters are cumulative microjoules that wrap at ``max_energy_range_uj``. Reading
    ``energy_uj`` needs root on most kernels, so a domain that cannot be read is left out, and
    :meth:`read` returns None when none can be.
    """

    source = "measured:rapl"

    def __init__(self, root: str | Path = "/sys/class/powercap") -> None:
        root = Path(root)
        zones = sorted(root.glob("intel-rapl:*")) if root.is_dir() else []
        self._zones = [zone for zone in zones if _PACKAGE_ZONE.fullmatch(zone.name)]

    def read(self) -> dict[str, tuple[int, int]] | None:
        """``{zone: (energy_uj, max_energy_range_uj)}`` for each readable zone, or None."""
        counters = {}
        for zone in self._zones:
            try:
                energy = int((zone / "energy_uj").read_text())
                max_range = int((zone / "max_energy_range_uj").read_text())
            except (OSError, ValueError):
                continue
            counters[zone.name] = (energy, max_range)
        return counters or None

    @staticmethod
    def energy_mj(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> float:
        """Energy between two reads, in millijoules, summed over the zones both reads saw."""
        total_uj = 0
        for zone in before.keys() & after.keys():
            start, max_range = before[zone]
            end = after[zone][0]
            total_uj += end - start if end >= start else end + max_range - start
        return total_uj / 1000

    def window(self) -> CounterWindow[dict[str, tuple[int, int]]]:
        return CounterWindow(self.read, self.energy_mj, source=self.source)


def energy_reader(target: Target, **options: Any) -> EnergyReader | None:
    """The reader for ``target.power_sensor``, or None for ``"none"``.

    ``options`` go to the reader's constructor: ``root`` for :class:`RaplReader`; ``root``,
    ``rails``, ``interval_s``, ``idle_s`` for :class:`~profilers._ina3221.Ina3221Reader`;
    ``index``, ``interval_s`` for :class:`~profilers._nvml.NvmlReader` (which raises
    ImportError naming ``nvidia-ml-py`` when that is not installed). A reader whose sensor is
    absent is still returned: its windows read None, and the profiler estimates the energy.
    """
    sensor = target.power_sensor
    if sensor == "rapl":
        return RaplReader(**options)
    if sensor == "ina3221":
        from profilers._ina3221 import Ina3221Reader

        return Ina3221Reader(**options)
    if sensor == "nvml":
        from profilers._nvml import NvmlReader

        return NvmlReader(**options)
    if sensor == "none":
        return None
    raise ValueError(f"unknown power_sensor {sensor!r}; known: rapl, ina3221, nvml, none")


def optional_energy_reader(target: Target) -> EnergyReader | None:
    """:func:`energy_reader`, or None (energy estimated from the spec) when its Python package is
    missing: a GPU without ``nvidia-ml-py`` still gets measured, its energy labelled estimated."""
    try:
        return energy_reader(target)
    except ImportError as exc:
        logger.warning("energy of target %s will be estimated: %s", target.name, exc)
        return None


def sensor_device_state(reader: EnergyReader | None) -> dict[str, object]:
    """The GPU's clocks, temperature and power state through NVML, where the energy reader is
    NVML's (a Jetson's and a CPU's are not): recorded with each measurement."""
    state = getattr(reader, "device_state", None)
    return dict(state()) if callable(state) else {}
