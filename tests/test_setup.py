"""A study's creation (``search/study/_setup.py``, ``_storage.py``): processes that create one study at
once all get it, on SQLite and on PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

import search
from search import UsageError
from search.study import make_storage

ROOT = Path(__file__).resolve().parents[1]
RACER = """
import sys, time
from pathlib import Path
from search.study._setup import Setup

url, folder, start = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
time.sleep(max(0.0, start - time.time()))  # every racer imported, then all at once
study = Setup(url, "race", folder).create(["maximize", "minimize"])
study.set_user_attr(f"racer-{sys.argv[4]}", True)
print("created", study.study_name)
"""
RACERS = 3


def _race(url: str, folder: Path) -> list[subprocess.CompletedProcess]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.time() + 25  # the imports take seconds on a busy machine
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, url, str(folder), str(start), str(n)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        for n in range(RACERS)
    ]
    for racer in racers:
        racer.wait(timeout=180)
    return [subprocess.CompletedProcess(r.args, r.returncode, r.stdout.read(), r.stderr.read()) for r in racers]


def _check(url: str, results: list[subprocess.CompletedProcess]) -> None:
    for result in results:
        assert result.returncode == 0 and result.stdout.strip() == "created race", result.stderr
    study = optuna.load_study(study_name="race", storage=make_storage(url))
    assert set(study.user_attrs) == {f"racer-{n}" for n in range(RACERS)}  # one study, every racer in it
    assert optuna.get_all_study_names(make_storage(url)) == ["race"]


def test_processes_creating_one_sqlite_study_at_once_all_get_it(tmp_path):
    url = f"sqlite:///{tmp_path / 'race' / 'study.db'}"
    _check(url, _race(url, tmp_path / "race"))


def test_processes_creating_one_postgresql_study_at_once_all_get_it(postgres_url, tmp_path):
    _check(postgres_url, _race(postgres_url, tmp_path / "race"))


class _Unmeasurable:
    """A profiler of the cpu target that cannot run any model."""

    def __new__(cls):
        from profilers import MeasurementError, OnnxRuntimeCpuProfiler
        from targets import load_target

        class Unmeasurable(OnnxRuntimeCpuProfiler):
            def measure(self, onnx_path, inputs=None):
                raise MeasurementError(f"ONNX Runtime cannot build a CPU session for {onnx_path}")

        return Unmeasurable(load_target("cpu"))


def test_a_teacher_the_target_cannot_measure_stops_the_run_and_leaves_nothing(tiny_task, tmp_path):
    with pytest.raises(UsageError, match="the teacher cannot be measured on cpu: ONNX Runtime cannot build"):
        search.run(tiny_task, trials=1, profiler=_Unmeasurable(), results_dir=tmp_path / "results", cost_model=False)
    assert not (tmp_path / "results").exists()


def test_a_run_that_fails_after_creating_its_study_removes_it(tiny_task, fast_profiler, tmp_path, monkeypatch):
    """Interrupted while it measures each layer's sensitivity (study, study.db and baseline/ made):
    all of it is removed, and the rerun with another budget is accepted."""
    import search.study._run as run_module

    def interrupted(*args, **kwargs):
        assert (tmp_path / "results" / "s" / "baseline" / "model.onnx").exists()
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "layer_sensitivity", interrupted)
    kwargs = dict(profiler=fast_profiler, results_dir=tmp_path / "results", study_name="s", cost_model=False)
    with pytest.raises(KeyboardInterrupt):
        search.run(tiny_task, trials=1, budget="0.5x", **kwargs)
    assert not (tmp_path / "results").exists()
    monkeypatch.undo()
    study = search.run(
        tiny_task, trials=1, budget="2ms", sensitivity=False, recipes=False, timeout=0.001, **kwargs
    )
    assert study.user_attrs["run_spec"]["budget"] == "2ms"
