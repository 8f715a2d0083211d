"""The uncompressed teacher, scored and measured once per study: the budget and every speedup are
relative to it."""

from __future__ import annotations

import functools
import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path

from profilers import Measurement, MeasurementError, Profiler, measurement_setting
from search._errors import CandidateError, UsageError, first_line
from search._record import Key
from search.artifacts import OnnxModule, export_float, measure_candidate
from search.compress import packed_size_bytes
from search.model import output_channels, packed_projections, planned_with
from search.plan import Plan
from search.study._workers import measuring_alone
from search.tasks import METRIC_WINDOW, Task

BASELINE_TRIES = 3  # measurements of the teacher before an unsettled one stops the run


def measure_baseline(task: Task, profiler: Profiler, directory: Path) -> dict:
    """The teacher exported as fp32 to ``directory/baseline/model.onnx``, scored on that file and
    measured on the target (with the runtime's per-layer report, as every trial): the study's
    ``baseline`` record.

    It is also the check of the task that :func:`search.run` makes before it writes anything of a
    new study: the teacher exports, its metric on the exported file is a finite number, and the
    target measures it. Each failure is a :class:`UsageError` saying which of these went wrong."""
    path = directory / "baseline" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        export_float(task.model, task.example_input, path, task.output)
    except CandidateError as exc:
        raise UsageError(f"the task's model cannot be exported to ONNX: {first_line(str(exc))}") from exc
    try:
        metric = task.score(OnnxModule(path))
    except UsageError:
        raise
    except Exception as exc:  # the task's own code: its error, in one line
        raise UsageError(f"the task's metric raised {first_line(exc)} on the teacher") from exc
    if not math.isfinite(metric):
        raise UsageError(
            f"the task's metric is {metric} on the teacher (its exported ONNX model); every trial would "
            "fail: check the metric and the task's val data"
        )
    with measuring_alone(profiler.target.name):
        for _ in range(BASELINE_TRIES):
            try:
                measurement = measure_candidate(profiler, path, task.model, task.example_input)
            except (MeasurementError, CandidateError) as exc:
                raise UsageError(
                    f"the teacher cannot be measured on {profiler.target.name}: {first_line(str(exc))}"
                ) from exc
            if measurement.stable:
                break
        else:
            raise UsageError(
                f"the teacher's latency did not stabilise in {BASELINE_TRIES} measurements (spread "
                f"{measurement.spread:.1%}); the budget and every speedup are relative to it. Measure on a "
                "quieter machine, or with a longer --profiler timing"
            )
    return {
        Key.METRIC: metric,
        Key.LATENCY_MS: measurement.latency_ms,
        Key.LATENCY_P90_MS: measurement.latency_p90_ms,
        Key.ENERGY_MJ: measurement.energy_mj,
        Key.ENERGY_SOURCE: measurement.energy_source,
        Key.SIZE_BYTES: packed_size_bytes(task.model, Plan()),
        # Every layer a plan can address (and every packed projection), with its output channels:
        # the rows of `search show`.
        Key.CHANNELS: output_channels(task.model),
        Key.PACKED: {name: planned_with(name) for name in packed_projections(task.model)},
        "onnx": str(path),
        "measurement": measurement.to_dict(),
    }


def teacher_measurer(baseline: dict, profiler: Profiler, task: Task | None) -> Callable[[], Measurement] | None:
    """What measures the study's teacher (its file, or ``task``'s model for a profiler of PyTorch
    modules); None where its file is gone (a study folder copied without ``baseline/``)."""
    path = Path(baseline.get("onnx", ""))
    if profiler.measures_onnx:
        return functools.partial(profiler.measure, path) if path.is_file() else None
    return functools.partial(measure_candidate, profiler, path, task.model, task.example_input)


def teacher_again(task: Task, profiler: Profiler, baseline: dict) -> dict | None:
    """The study's teacher measured once more, as a run ends: its latency, and its change since the
    baseline's (the host's drift over the run, which the trials' latencies carry too); None where
    it cannot be measured now (the run's results stand without it)."""
    measure = teacher_measurer(baseline, profiler, task)
    if measure is None:
        return None
    try:
        with measuring_alone(profiler.target.name):
            measurement = measure()
    except (MeasurementError, CandidateError, OSError):
        return None
    return {Key.LATENCY_MS: measurement.latency_ms, "change": measurement.latency_ms / baseline[Key.LATENCY_MS] - 1}


def warn_of_metric_scale(task: Task, metric: float) -> None:
    """Warn where the teacher's ``metric`` lies outside [-1, 1] and the task sets no
    ``metric_window``: the default window is then likely a sliver of the metric's scale (a tenth of
    a point of a percentage), and the study would judge its front, and rule bit widths out, by it."""
    if task.metric_window is None and abs(metric) > 1:
        warnings.warn(
            f"the teacher's metric is {metric:.4g}, outside [-1, 1], and the task sets no metric_window: the "
            f"front is judged within {METRIC_WINDOW:g} of the teacher's metric, and a bit width that alone drops "
            "it by more is not offered to that layer. For a metric in percent set Task(metric_window=10); in "
            "other units, the drop worth judging in them",
            UserWarning,
            stacklevel=2,
        )


def setting_differences(baseline: dict, setting: str) -> list[str]:
    """How ``setting`` (a measurement's or a profiler's :func:`profilers.measurement_setting`)
    differs from the one the study's teacher (its ``baseline`` record) was measured under, one
    phrase per key: none where their latencies compare."""
    recorded = baseline["measurement"]
    study = json.loads(measurement_setting(f"{recorded['runtime']} {recorded['runtime_version']}", recorded["device"]))
    here = json.loads(setting)
    return [
        f"{key} {here.get(key)!r} here, {study.get(key)!r} for the study"
        for key in sorted(set(study) | set(here))
        if here.get(key) != study.get(key)
    ]


def check_measured_alike(baseline: dict, setting: str | None) -> None:
    """Raise :class:`UsageError` when ``setting`` (None: not known yet) is not the one the study's
    teacher was measured under (:func:`setting_differences`): a study resumed after a runtime
    upgrade, or a worker on another kind of machine, would put latencies of another cost function on
    the study's front and divide them by the teacher's."""
    if setting is None:
        return
    differences = setting_differences(baseline, setting)
    if differences:
        raise UsageError(
            f"this process measures under another setting than the study's teacher was measured: "
            f"{'; '.join(differences)}. Its latencies would not compare with the study's: go on where the "
            "study was measured (or through its profiler service, --profiler HOST:PORT), or start a new "
            "study (--study-name)"
        )
