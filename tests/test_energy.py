from pathlib import Path

import pytest

from profilers import RaplReader


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
