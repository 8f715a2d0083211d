"""What an energy reader is: a window put around the timed runs, and the two ways a window gets
the energy, written here once:

- :class:`CounterWindow` reads a cumulative energy counter before and after (RAPL, NVML's
  total-energy counter);
- :class:`PowerSampler` samples a power sensor in a background thread and integrates it
  (INA3221 rails on a Jetson, NVML power when its counter is not supported).
"""

from __future__ import annotations

import abc
import itertools
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from typing_extensions import Self

Clock = Callable[[], float]
Reading = TypeVar("Reading")


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
