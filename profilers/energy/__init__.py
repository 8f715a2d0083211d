"""Energy readers: what a profiler wraps around its timed runs to learn the energy they took.

Every reader has :meth:`EnergyReader.window`, a context manager put around the timed runs; after
the ``with`` block its ``energy_mj`` holds the energy in millijoules (None when the sensor could
not be read, so the profiler falls back to an estimate) and its ``source`` the label for
:attr:`~profilers.Measurement.energy_source`. :func:`energy_reader` picks the reader for a
target's ``power_sensor``: RAPL on a CPU, the INA3221 rails on a Jetson, NVML on a GPU.
"""

from profilers.energy._base import Clock, CounterWindow, EnergyReader, EnergyWindow, PowerSampler
from profilers.energy._factory import energy_reader, optional_energy_reader, sensor_device_state
from profilers.energy._ina3221 import Ina3221Reader
from profilers.energy._nvml import NvmlReader, device_state
from profilers.energy._rapl import RaplReader

__all__ = [
    "Clock",
    "CounterWindow",
    "EnergyReader",
    "EnergyWindow",
    "Ina3221Reader",
    "NvmlReader",
    "PowerSampler",
    "RaplReader",
    "device_state",
    "energy_reader",
    "optional_energy_reader",
    "sensor_device_state",
]
