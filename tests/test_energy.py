import itertools
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from profilers import RaplReader
from profilers.energy import PowerSampler, energy_reader
from profilers.energy import Ina3221Reader
from profilers.energy import NvmlReader, device_state
from targets import load_target


def zone(root: Path, name: str, energy_uj: int, max_range_uj: int = 1_000_000) -> Path:
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    (path / "energy_uj").write_text(f"{energy_uj}\n")
    (path / "max_energy_range_uj").write_text(f"{max_range_uj}\n")
    return path


def test_two_reads_sum_the_package_zones(tmp_path):
    zone(tmp_path, "intel-rapl:0", 100_000)
    zone(tmp_path, "intel-rapl:1", 200_000)
    zone(tmp_path, "intel-rapl:0:0", 50_000)  # a sub-zone: already inside package 0
    reader = RaplReader(tmp_path)
    before = reader.read()
    assert set(before) == {"intel-rapl:0", "intel-rapl:1"}
    zone(tmp_path, "intel-rapl:0", 150_000)
    zone(tmp_path, "intel-rapl:1", 230_000)
    zone(tmp_path, "intel-rapl:0:0", 90_000)
    assert reader.energy_mj(before, reader.read()) == pytest.approx(80.0)


def test_counter_wrap_around(tmp_path):
    zone(tmp_path, "intel-rapl:0", 990_000, max_range_uj=1_000_000)
    reader = RaplReader(tmp_path)
    before = reader.read()
    zone(tmp_path, "intel-rapl:0", 15_000, max_range_uj=1_000_000)
    assert reader.energy_mj(before, reader.read()) == pytest.approx(25.0)


def test_no_readable_zone_reads_none(tmp_path):
    assert RaplReader(tmp_path).read() is None
    assert RaplReader(tmp_path / "missing").read() is None
    (tmp_path / "intel-rapl:0").mkdir()  # a zone without counters, as when unreadable
    assert RaplReader(tmp_path).read() is None


def test_rapl_window_reads_the_counters_around_the_block(tmp_path):
    zone(tmp_path, "intel-rapl:0", 100_000)
    reader = RaplReader(tmp_path)
    with reader.window() as window:
        zone(tmp_path, "intel-rapl:0", 142_000)
    assert window.source == "measured:rapl"
    assert window.energy_mj == pytest.approx(42.0)
    assert window.duration_s >= 0
    with RaplReader(tmp_path / "missing").window() as window:
        pass
    assert window.energy_mj is None


# --- INA3221 (Jetson) ----------------------------------------------------------------------------


def ina3221(root: Path, device: str, rails: dict[str, tuple[int, int] | None]) -> Path:
    """One INA3221 laid out as the hwmon driver does: ``in<N>_label``/``in<N>_input`` (mV)/
    ``curr<N>_input`` (mA) per channel, plus the unlabelled shunt and sum channels. A rail of
    None is a disabled channel."""
    folder = root / device / "hwmon" / f"hwmon{3 + int(device[-1])}"
    folder.mkdir(parents=True, exist_ok=True)
    for channel, (label, reading) in enumerate(rails.items(), start=1):
        (folder / f"in{channel}_label").write_text(f"{label}\n")
        (folder / f"in{channel}_enable").write_text("0\n" if reading is None else "1\n")
        millivolts, milliamps = reading or (0, 0)
        (folder / f"in{channel}_input").write_text(f"{millivolts}\n")
        (folder / f"curr{channel}_input").write_text(f"{milliamps}\n")
        (folder / f"in{channel + 3}_input").write_text("12\n")  # shunt voltage, no label
    (folder / "curr4_input").write_text("0\n")  # the summation channel, no label
    (folder / "name").write_text("ina3221\n")
    return folder


def orin_nano(root: Path) -> Path:
    return ina3221(
        root,
        "1-0040",
        {"VDD_IN": (5000, 1200), "VDD_CPU_GPU_CV": (5000, 400), "VDD_SOC": (5000, 300)},
    )


def agx_orin(root: Path) -> None:
    ina3221(
        root,
        "1-0040",
        {"VDD_GPU_SOC": (20_000, 250), "VDD_CPU_CV": (20_000, 100), "VIN_SYS_5V0": (5000, 600)},
    )
    ina3221(root, "1-0041", {"NC": (0, 0), "VDDQ_VDD2_1V8AO": (1800, 340), "": (0, 0)})


class FakeClock:
    """Advances ``step`` seconds at every call, from any thread; ``now`` is the last time told."""

    def __init__(self, step: float = 0.001) -> None:
        self._ticks = itertools.count()
        self.step = step
        self.now = 0.0

    def __call__(self) -> float:
        self.now = next(self._ticks) * self.step
        return self.now


def test_orin_nano_reads_the_module_input_rail(tmp_path):
    orin_nano(tmp_path)
    reader = Ina3221Reader(tmp_path)
    assert reader.available_rails == ("VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC")
    assert reader.rails == ("VDD_IN",)
    assert reader.read_power_w() == pytest.approx(6.0)  # 5 V x 1.2 A


def test_agx_orin_adds_its_three_module_rails(tmp_path):
    agx_orin(tmp_path)
    reader = Ina3221Reader(tmp_path)
    assert "VDDQ_VDD2_1V8AO" in reader.available_rails
    assert "NC" not in reader.available_rails
    assert sorted(reader.rails) == ["VDD_CPU_CV", "VDD_GPU_SOC", "VIN_SYS_5V0"]
    assert reader.read_power_w() == pytest.approx(5.0 + 2.0 + 3.0)


def test_an_unknown_board_adds_every_enabled_rail(tmp_path):
    ina3221(tmp_path, "1-0040", {"RAIL_A": (12_000, 500), "RAIL_B": (3300, 1000), "OFF": None})
    reader = Ina3221Reader(tmp_path)
    assert reader.rails == ("RAIL_A", "RAIL_B")
    assert reader.read_power_w() == pytest.approx(6.0 + 3.3)


def test_explicit_rails(tmp_path):
    orin_nano(tmp_path)
    reader = Ina3221Reader(tmp_path, rails=["VDD_CPU_GPU_CV", "VDD_SOC"])
    assert reader.rails == ("VDD_CPU_GPU_CV", "VDD_SOC")
    assert reader.read_power_w() == pytest.approx(2.0 + 1.5)


def test_an_unknown_rail_lists_the_rails_found(tmp_path):
    orin_nano(tmp_path)
    with pytest.raises(ValueError, match=r"'VDD_GPU_SOC'.*found.*VDD_IN, VDD_CPU_GPU_CV, VDD_SOC"):
        Ina3221Reader(tmp_path, rails=["VDD_IN", "VDD_GPU_SOC"])


def test_no_ina3221_reads_none(tmp_path):
    assert Ina3221Reader(tmp_path / "missing").read_power_w() is None
    # Not a Jetson: a configured rail list is not an error, there is just nothing to read.
    reader = Ina3221Reader(tmp_path / "missing", rails=["VDD_IN"], idle_s=0, clock=FakeClock())
    with reader.window() as window:
        pass
    assert window.energy_mj is None
    folder = orin_nano(tmp_path)
    reader = Ina3221Reader(tmp_path)
    (folder / "curr1_input").unlink()  # a rail that stops being readable
    assert reader.read_power_w() is None


def test_sampler_integrates_constant_power(tmp_path):
    orin_nano(tmp_path)
    reader = Ina3221Reader(tmp_path, interval_s=0.001, idle_s=0, clock=FakeClock())
    with reader.window() as window:
        time.sleep(0.01)
    assert window.source == "measured:ina3221"
    assert window.idle_w == 0.0
    assert len(window.samples) >= 2
    assert window.duration_s == pytest.approx(window.samples[-1][0] - window.samples[0][0])
    assert window.duration_s > 0
    assert window.energy_mj == pytest.approx(6.0 * window.duration_s * 1000)


def test_sampler_subtracts_the_idle_power():
    clock = FakeClock(step=0.001)
    # The idle window reads at t = 1..5 ms in the calling thread; the runs start at 6 ms.
    sampler = PowerSampler(
        lambda: 2.0 if clock.now < 0.0055 else 6.0,
        source="measured:test",
        interval_s=0.001,
        idle_s=0.005,
        clock=clock,
    )
    with sampler:
        time.sleep(0.01)
    assert [watts for _, watts in sampler.idle_samples] == [2.0] * 5
    assert sampler.idle_w == pytest.approx(2.0)
    assert all(watts == 6.0 for _, watts in sampler.samples)
    assert sampler.energy_mj == pytest.approx((6.0 - 2.0) * sampler.duration_s * 1000)
    assert sampler.energy_mj > 0


def test_sampler_integrates_by_trapezoids():
    clock = FakeClock(step=0.001)
    sampler = PowerSampler(lambda: 1.0 + 100 * clock.now, source="t", interval_s=0.001, clock=clock)
    with sampler:
        time.sleep(0.01)
    (t0, _), (t1, _) = sampler.samples[0], sampler.samples[-1]
    exact_j = (t1 - t0) + 50 * (t1**2 - t0**2)  # ∫ 1 + 100 t dt: exact for a linear power
    assert sampler.energy_mj == pytest.approx(exact_j * 1000)


def test_sampler_samples_in_the_background_with_the_real_clock():
    sampler = PowerSampler(lambda: 3.0, source="t", interval_s=0.002, idle_s=0.01)
    with sampler:
        time.sleep(0.05)
    assert len(sampler.samples) > 5
    assert sampler.idle_w == pytest.approx(3.0)
    assert sampler.duration_s >= 0.05
    assert sampler.energy_mj == pytest.approx(0.0, abs=1e-9)


def test_sampler_reports_a_failing_sensor():
    calls = itertools.count()

    def read() -> float:
        if next(calls) > 0:
            raise OSError("i2c bus error")
        return 1.0

    sampler = PowerSampler(read, source="t", interval_s=0.001)
    with pytest.raises(RuntimeError, match="sampling thread") as caught, sampler:
        time.sleep(0.02)
    assert isinstance(caught.value.__cause__, OSError)


@pytest.mark.parametrize("interval_s, idle_s", [(0, 0.2), (0.01, -1)])
def test_sampler_rejects_bad_timing(interval_s, idle_s):
    with pytest.raises(ValueError, match=f"interval_s={interval_s}, idle_s={idle_s}"):
        PowerSampler(lambda: 1.0, source="t", interval_s=interval_s, idle_s=idle_s)


# --- NVML (NVIDIA GPUs) --------------------------------------------------------------------------


class NVMLError(Exception):
    pass


class NVMLError_NotSupported(NVMLError):  # pynvml's name
    pass


class NVMLError_DriverNotLoaded(NVMLError):
    pass


class FakeNvml:
    """The part of ``pynvml`` the reader uses, with the real module's names and units."""

    NVMLError = NVMLError
    NVMLError_NotSupported = NVMLError_NotSupported
    NVML_CLOCK_SM = 1
    NVML_CLOCK_MEM = 2
    NVML_TEMPERATURE_GPU = 0

    def __init__(self, *, counter: bool = True, driver: bool = True) -> None:
        self.counter, self.driver = counter, driver
        self.energy_mj = 9_000_000_000  # since the driver loaded
        self.power_mw = 150_000
        self.pstate_supported = True
        self.references = 0
        self.handles: list[object] = []

    def nvmlInit(self):
        if not self.driver:
            raise NVMLError_DriverNotLoaded("Driver Not Loaded")
        self.references += 1

    def nvmlShutdown(self):
        self.references -= 1

    def nvmlDeviceGetHandleByIndex(self, index):
        self.handles.append(index)
        return ("gpu", index)

    def nvmlDeviceGetHandleByUUID(self, uuid):
        self.handles.append(uuid)
        return ("gpu", uuid)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        if not self.counter:
            raise NVMLError_NotSupported("Not Supported")
        return self.energy_mj

    def nvmlDeviceGetPowerUsage(self, handle):
        return self.power_mw

    def nvmlDeviceGetClockInfo(self, handle, clock):
        return {self.NVML_CLOCK_SM: 1980, self.NVML_CLOCK_MEM: 2619}[clock]

    def nvmlDeviceGetTemperature(self, handle, sensor):
        assert sensor == self.NVML_TEMPERATURE_GPU
        return 41

    def nvmlDeviceGetEnforcedPowerLimit(self, handle):
        return 700_000

    def nvmlDeviceGetPerformanceState(self, handle):
        if not self.pstate_supported:
            raise NVMLError_NotSupported("Not Supported")
        return 0

    def nvmlDeviceGetName(self, handle):
        return b"NVIDIA H100 80GB HBM3"  # older bindings return bytes

    def nvmlSystemGetDriverVersion(self):
        return "550.54.15"


@pytest.fixture
def nvml(monkeypatch):
    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return fake


def test_nvml_reads_the_energy_counter(nvml):
    reader = NvmlReader()
    with reader.window() as window:
        nvml.energy_mj += 2_500
    assert reader.counter_supported is True
    assert window.source == "measured:nvml"
    assert window.energy_mj == pytest.approx(2_500)
    assert nvml.handles == [0]


def test_nvml_samples_the_power_without_a_counter(nvml):
    nvml.counter = False
    reader = NvmlReader(interval_s=0.001, clock=FakeClock())
    with reader.window() as window:
        time.sleep(0.01)
    assert reader.counter_supported is False
    assert window.source == "measured:nvml-power"
    assert window.idle_w == 0.0  # the gross energy, like the counter's
    assert window.energy_mj == pytest.approx(150.0 * window.duration_s * 1000)
    assert window.energy_mj > 0


def test_nvml_without_a_driver_reads_none(nvml):
    nvml.driver = False
    reader = NvmlReader()
    assert "Driver Not Loaded" in reader.error
    with reader.window() as window:
        pass
    assert window.energy_mj is None
    assert reader.device_state() == {}


def test_nvml_picks_the_first_visible_device(nvml, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    NvmlReader()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-5b1e")
    NvmlReader()
    NvmlReader(index=1)
    assert nvml.handles == [2, "GPU-5b1e", 1]


def test_nvml_device_state(nvml):
    assert device_state() == {
        "name": "NVIDIA H100 80GB HBM3",
        "driver_version": "550.54.15",
        "sm_clock_mhz": 1980,
        "memory_clock_mhz": 2619,
        "temperature_c": 41,
        "power_limit_w": 700.0,
        "performance_state": "P0",
    }
    assert nvml.references == 0  # NVML released again
    nvml.pstate_supported = False
    assert device_state()["performance_state"] is None


def test_nvml_missing_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` fail
    for make in (NvmlReader, device_state, lambda: energy_reader(load_target("gpu"))):
        with pytest.raises(ImportError, match="pip install nvidia-ml-py"):
            make()


# --- one place to ask ----------------------------------------------------------------------------


def test_energy_reader_follows_the_power_sensor(tmp_path, nvml):
    assert isinstance(energy_reader(load_target("cpu")), RaplReader)
    assert isinstance(energy_reader(load_target("gpu")), NvmlReader)
    assert energy_reader(replace(load_target("cpu"), power_sensor="none")) is None
    orin_nano(tmp_path)
    jetson = energy_reader(load_target("jetson"), root=tmp_path, idle_s=0, clock=FakeClock())
    assert isinstance(jetson, Ina3221Reader)
    with jetson.window() as window:
        pass
    assert window.source == "measured:ina3221"
    assert window.energy_mj == pytest.approx(6.0 * window.duration_s * 1000)
