"""The uncompressed teacher, scored and measured once per study: the budget and every speedup are
relative to it."""

from __future__ import annotations

from pathlib import Path

from profilers import Profiler
from search._errors import CandidateError, UsageError
from search._record import Key
from search.artifacts import OnnxModule, export_float, measure_candidate
from search.compress import packed_size_bytes
from search.model import compressible_layers
from search.plan import Plan
from search.study._workers import measuring_alone
from search.tasks import Task

BASELINE_TRIES = 3  # measurements of the teacher before an unsettled one stops the run


def measure_baseline(task: Task, profiler: Profiler, directory: Path) -> dict:
    """The teacher exported as fp32 to ``directory/baseline/model.onnx``, scored on that file and
    measured on the target (with the runtime's per-layer report, as every trial): the study's
    ``baseline`` record."""
    path = directory / "baseline" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        export_float(task.model, task.example_input, path, task.output)
    except CandidateError as exc:
        raise UsageError(f"the task's model cannot be exported to ONNX: {exc}") from exc
    with measuring_alone(profiler.target.name):
        for _ in range(BASELINE_TRIES):
            measurement = measure_candidate(profiler, path, task.model, task.example_input)
            if measurement.stable:
                break
        else:
            raise UsageError(
                f"the teacher's latency did not stabilise in {BASELINE_TRIES} measurements (spread "
                f"{measurement.spread:.1%}); the budget and every speedup are relative to it. Measure on a "
                "quieter machine, or with a longer --profiler timing"
            )
    return {
        Key.METRIC: task.score(OnnxModule(path)),
        Key.LATENCY_MS: measurement.latency_ms,
        Key.LATENCY_P90_MS: measurement.latency_p90_ms,
        Key.ENERGY_MJ: measurement.energy_mj,
        Key.ENERGY_SOURCE: measurement.energy_source,
        Key.SIZE_BYTES: packed_size_bytes(task.model, Plan()),
        # Every layer a plan can address, with its output channels: the rows of `search show`.
        Key.CHANNELS: {name: int(m.weight.shape[0]) for name, m in compressible_layers(task.model).items()},
        "onnx": str(path),
        "measurement": measurement.to_dict(),
    }
