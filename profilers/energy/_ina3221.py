"""Power rails of a Jetson module, read from its INA3221 monitors through hwmon sysfs."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from profilers._errors import ProfilerUsageError
from profilers.energy._base import Clock, EnergyReader, PowerSampler

DEFAULT_ROOT = "/sys/bus/i2c/drivers/ina3221"
# The module's own input rail on Orin Nano and Orin NX: everything the module draws.
MODULE_RAIL = "VDD_IN"
# AGX Orin has no input rail; these three add up to the module's power. Its second monitor's
# VDDQ_VDD2_1V8AO (memory) is fed from VIN_SYS_5V0, so adding it would count it twice.
AGX_ORIN_RAILS = ("VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0")
_LABEL = re.compile(r"in(\d+)_label")
# Labels of channels wired to nothing.
_NOT_CONNECTED = frozenset({"NC", ""})


@dataclass(frozen=True)
class Rail:
    """One INA3221 channel: its label and the files holding its bus voltage (mV) and current
    (mA)."""

    label: str
    voltage: Path
    current: Path

    def read_w(self) -> float | None:
        try:
            millivolts = int(self.voltage.read_text())
            milliamps = int(self.current.read_text())
        except (OSError, ValueError):
            return None
        return millivolts * milliamps / 1e6


class Ina3221Reader(EnergyReader):
    """The power of a Jetson module, from the INA3221 channels under ``root``
    (``/sys/bus/i2c/drivers/ina3221/<i2c-device>/hwmon/hwmon<N>/``).

    Each labelled channel ``N`` is a rail: ``in<N>_label`` its name, ``in<N>_input`` its bus
    voltage in mV, ``curr<N>_input`` its current in mA; its power is V × I. ``rails`` picks what
    to add up: by default ``VDD_IN``, the module's input, where there is one (Orin Nano, Orin
    NX); else AGX Orin's ``VDD_GPU_SOC`` + ``VDD_CPU_CV`` + ``VIN_SYS_5V0`` where those are
    found; else every labelled rail. Channels labelled ``NC`` or empty, or disabled
    (``in<N>_enable`` = 0), are left out. Naming a rail that
    is not there raises :class:`~profilers.ProfilerUsageError` (a ValueError) listing those found;
    where no rail is found at all (not a Jetson), :meth:`read_power_w` returns None instead.

    :meth:`window` is a :class:`PowerSampler` sampling every ``interval_s``,
    after an idle window of ``idle_s`` whose mean power is subtracted: the energy is what the
    timed runs added on top of the module's draw at rest (at the clocks left by the warm-up).
    """

    source = "measured:ina3221"

    def __init__(
        self,
        root: str | Path = DEFAULT_ROOT,
        rails: Iterable[str] | None = None,
        *,
        interval_s: float = 0.01,
        idle_s: float = 0.2,
        clock: Clock = time.perf_counter,
    ) -> None:
        self.interval_s = interval_s
        self.idle_s = idle_s
        self._clock = clock
        self._found = _find_rails(Path(root))
        labels = [rail.label for rail in self._found]
        if rails is None:
            if MODULE_RAIL in labels:
                wanted = [MODULE_RAIL]
            elif set(AGX_ORIN_RAILS) <= set(labels):
                wanted = list(AGX_ORIN_RAILS)
            else:
                wanted = labels
        else:
            wanted = list(dict.fromkeys(rails))
            unknown = [name for name in wanted if name not in labels]
            if self._found and unknown:
                raise ProfilerUsageError(
                    f"unknown INA3221 rail {', '.join(map(repr, unknown))}; "
                    f"found under {root}: {', '.join(labels)}"
                )
        self._rails = [rail for rail in self._found if rail.label in wanted]

    @property
    def available_rails(self) -> tuple[str, ...]:
        """Every rail found, by label."""
        return tuple(rail.label for rail in self._found)

    @property
    def rails(self) -> tuple[str, ...]:
        """The rails :meth:`read_power_w` adds up."""
        return tuple(rail.label for rail in self._rails)

    def read_power_w(self) -> float | None:
        """The summed power of the selected rails in watts, or None when there are none or one
        cannot be read (a partial sum would be wrong, not just noisy)."""
        if not self._rails:
            return None
        total = 0.0
        for rail in self._rails:
            watts = rail.read_w()
            if watts is None:
                return None
            total += watts
        return total

    def window(self) -> PowerSampler:
        return PowerSampler(
            self.read_power_w,
            source=self.source,
            interval_s=self.interval_s,
            idle_s=self.idle_s,
            clock=self._clock,
        )


def _find_rails(root: Path) -> list[Rail]:
    rails = []
    for label_file in sorted(root.glob("*/hwmon/hwmon*/in*_label")):
        match = _LABEL.fullmatch(label_file.name)
        if match is None:
            continue
        channel, folder = match.group(1), label_file.parent
        try:
            label = label_file.read_text().strip()
        except OSError:
            continue
        try:
            enabled = (folder / f"in{channel}_enable").read_text().strip() != "0"
        except OSError:  # older kernels have no enable file
            enabled = True
        voltage, current = folder / f"in{channel}_input", folder / f"curr{channel}_input"
        if label in _NOT_CONNECTED or not enabled or not current.exists():
            continue
        rails.append(Rail(label, voltage, current))
    return rails
