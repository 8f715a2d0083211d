"""Models measured in turn, so that their latencies compare; the export's front measured so, with
the teacher."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import optuna
import pytest

import profilers
import search
from profilers import MeasurementError, measure_in_turn
from search._record import StudyKey


def _measurement(latency_ms: float, **device) -> profilers.Measurement:
    return profilers.Measurement(
        latency_ms=latency_ms, latency_p90_ms=latency_ms * 1.1, runs=10, spread=0.01, stable=True, energy_mj=None,
        energy_source="estimated:spec-power", runtime="onnxruntime-cpu", runtime_version="1.0", precision="mixed",
        device=device, samples_ms=(latency_ms,),
    )  # fmt: skip


def test_each_model_is_measured_once_a_round_in_turn_and_its_median_measurement_kept():
    calls, readings = [], {"a": iter([3.0, 1.0, 2.0, 9.0]), "b": iter([5.0, 7.0, 6.0, 4.0])}

    def measurer(key):
        def measure():
            calls.append(key)
            return _measurement(next(readings[key]))

        return measure

    heard = []
    measured, failed = measure_in_turn({"a": measurer("a"), "b": measurer("b")}, 3, lambda *said: heard.append(said))
    assert calls == ["a", "b", "a", "b", "a", "b"] and not failed
    assert heard == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    assert measured["a"].latency_ms == 2.0 and measured["b"].latency_ms == 6.0
    assert measured["a"].latency_p90_ms == pytest.approx(2.2)  # the median measurement whole, not a mix
    readings = {"a": iter([3.0, 1.0]), "b": iter([5.0, 7.0])}
    measured, _ = measure_in_turn({"a": measurer("a"), "b": measurer("b")}, rounds=2)
    assert measured["a"].latency_ms == 3.0 and measured["b"].latency_ms == 7.0  # of two, the slower: one taken


def test_a_model_that_fails_is_measured_no_more_and_its_error_returned():
    calls = []

    def broken():
        calls.append("broken")
        raise MeasurementError("no kernel")

    def sound():
        calls.append("sound")
        return _measurement(1.0)

    measured, failed = measure_in_turn({"broken": broken, "sound": sound}, rounds=3)
    assert calls == ["broken", "sound", "sound", "sound"]
    assert list(measured) == ["sound"] and str(failed["broken"]) == "no kernel"
    with pytest.raises(ValueError, match="rounds 0: expected a whole number of at least 1"):
        measure_in_turn({"sound": sound}, rounds=0)


class _Drifting:
    """An ONNX profiler on a machine that slows down by 20 % with every measurement: the teacher
    takes 4 ms and each exported model 1 ms on it at first. It measures under the setting the
    study's teacher was measured (``baseline``), or with ``threads`` another."""

    measures_onnx = True

    def __init__(self, baseline: dict, threads: int | None = None) -> None:
        recorded = baseline["measurement"]
        self.teacher, self.paths = Path(baseline["onnx"]), []
        self.version, self.device = recorded["runtime_version"], dict(recorded["device"])
        if threads is not None:
            self.device["threads"] = threads

    def measure(self, onnx_path, inputs=None) -> profilers.Measurement:
        self.paths.append(Path(onnx_path))
        latency = (4.0 if Path(onnx_path) == self.teacher else 1.0) * 1.2 ** (len(self.paths) - 1)
        return dataclasses.replace(_measurement(latency, **self.device), runtime_version=self.version)


def test_export_measures_the_front_in_turn_with_the_teacher_and_says_their_speedup(finished, tmp_path):
    study, _ = finished
    profiler = _Drifting(study.user_attrs[StudyKey.BASELINE])
    heard = []
    rows = search.export(study, tmp_path / "deploy", profiler=profiler, rounds=3, progress=heard.append)
    files = 1 + len(rows)
    first = rows["number"].iloc[0]
    assert heard[:2] == ["measuring the teacher, round 1 of 3", f"measuring trial {first}, round 1 of 3"]
    assert len(heard) == 3 * files and heard[-1].endswith("round 3 of 3")
    assert len(profiler.paths) == 3 * files
    assert profiler.paths[:files] == profiler.paths[files : 2 * files] == profiler.paths[2 * files :]
    assert profiler.paths[0] == profiler.teacher  # then each exported model, in the front's order
    for _, row in rows.iterrows():
        assert row["teacher_latency_ms"] == pytest.approx(4.0 * 1.2**files)  # the median: its second round
        assert row["export_latency_ms"] >= 1.2**files and row["setting_differences"] == []
        # Measured minutes apart, the drift would be in the ratio; in turn, it is at most a round's.
        assert 4.0 / 1.2**files <= row["speedup"] <= 4.0
        assert row["speedup"] == pytest.approx(row["teacher_latency_ms"] / row["export_latency_ms"])


def test_export_says_where_its_measurement_setting_is_not_the_studys(finished, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from search import cli

    study, results = finished
    baseline = study.user_attrs[StudyKey.BASELINE]
    threads = baseline["measurement"]["device"]["threads"]
    other = _Drifting(baseline, threads=threads + 6)
    expected = f"threads {threads + 6} here, {threads} for the study"
    rows = search.export(study, tmp_path / "direct", profiler=other, rounds=1)
    assert list(rows["setting_differences"]) == [[expected]] * len(rows)
    monkeypatch.setattr(profilers, "get_profiler", lambda *args, **kwargs: other)
    result = CliRunner().invoke(cli.app, ["export", str(results / "done"), "--out", str(tmp_path / "cli")])
    words = " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    assert f"re-measured under another setting than the study's ({expected})" in words
    assert "speedup" in words and "re-measured in turn with the teacher, median of 3" in words


def test_a_study_without_its_teachers_measurement_or_file_exports_without_them(finished, fast_profiler, tmp_path):
    """A study from before the teacher's measurement was recorded, its folder copied without
    ``baseline/``: the front is exported and measured, the teacher's columns empty."""
    study, results = finished
    storage = optuna.storages.InMemoryStorage()
    source = f"sqlite:///{results / 'done' / 'study.db'}"
    optuna.copy_study(from_study_name=study.study_name, from_storage=source, to_storage=storage)
    old = optuna.load_study(study_name=study.study_name, storage=storage)
    baseline = {k: v for k, v in old.user_attrs[StudyKey.BASELINE].items() if k != "measurement"}
    old.set_user_attr(StudyKey.BASELINE, {**baseline, "onnx": str(tmp_path / "gone" / "model.onnx")})
    rows = search.export(old, tmp_path / "deploy", profiler=fast_profiler, rounds=1)
    assert len(rows) and all(row == [] for row in rows["setting_differences"])
    assert rows["teacher_latency_ms"].isna().all() and rows["speedup"].isna().all()
    assert (rows["export_latency_ms"] > 0).all()
