"""The energy reader of a target: picked by its ``power_sensor``."""

from __future__ import annotations

import logging
from typing import Any

from profilers.energy._base import EnergyReader
from profilers.energy._ina3221 import Ina3221Reader
from profilers.energy._nvml import NvmlReader
from profilers.energy._rapl import RaplReader
from targets import Target

logger = logging.getLogger(__name__)


def energy_reader(target: Target, **options: Any) -> EnergyReader | None:
    """The reader for ``target.power_sensor``, or None for ``"none"``.

    ``options`` go to the reader's constructor: ``root`` for :class:`RaplReader`; ``root``,
    ``rails``, ``interval_s``, ``idle_s`` for :class:`Ina3221Reader`;
    ``index``, ``interval_s`` for :class:`NvmlReader` (which raises
    ImportError naming ``nvidia-ml-py`` when that is not installed). A reader whose sensor is
    absent is still returned: its windows read None, and the profiler estimates the energy.
    """
    sensor = target.power_sensor
    if sensor == "rapl":
        return RaplReader(**options)
    if sensor == "ina3221":
        return Ina3221Reader(**options)
    if sensor == "nvml":
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
