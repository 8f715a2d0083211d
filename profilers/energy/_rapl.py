"""Package energy of a CPU, from the RAPL counters the kernel exposes under powercap sysfs."""

from __future__ import annotations

import re
from pathlib import Path

from profilers.energy._base import CounterWindow, EnergyReader

# Top-level zones only: a package's sub-zones (core, uncore) are already inside its counter.
_PACKAGE_ZONE = re.compile(r"intel-rapl:\d+")


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
