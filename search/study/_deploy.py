"""``search.export``: write the Pareto-optimal models as deployable files, then re-measure them."""

from __future__ import annotations

import shutil
from pathlib import Path

import optuna
import pandas as pd
import torch

from profilers import Measurement, Profiler, get_profiler
from search._errors import UsageError
from search._record import Key
from search.artifacts import OnnxModule, measure_candidate
from search.compress import build_structure
from search.plan import Plan
from search.study._results import load_trials, open_study, pareto_front
from search.study._spec import spec_of, task_of_study
from search.tasks import Task

FILES = ("model.onnx", "plan.json", "checkpoint.pt")


def export(
    study: str | Path | optuna.Study,
    out: str | Path,
    study_name: str | None = None,
    profiler: Profiler | None = None,
    task: Task | None = None,
) -> pd.DataFrame:
    """Copy each Pareto-optimal trial's ONNX file, plan JSON and PyTorch checkpoint to
    ``out/trial-<number>/``, score the copied ONNX file on the task's data and re-measure it on the
    study's target. Each front plan is its longest fine-tune (a plan promoted to a longer one is
    represented by that promotion, see :func:`search.load_trials`).

    Returns one row per exported model: search-time and export-time metric and latency side by
    side (``export_metric`` is None where no task could be had: a study started with a Task object,
    exported without ``task``).
    The checkpoint holds ``{"plan": json, "state_dict": ...}``; load it with ``weights_only=True``
    into ``search.build_structure(teacher, Plan.from_json(plan), example_input)``.
    ``profiler`` defaults to the study's target's own (a :class:`~profilers.RemoteProfiler` measures
    on the device). A profiler that runs PyTorch modules (the ``gpu`` target on PyTorch CUDA)
    measures the checkpoint instead, rebuilt on the study's task (``task``, or the one the study
    was started with by ``module:function``).
    """
    if not isinstance(study, optuna.Study):
        study = open_study(study, study_name)
    front = pareto_front(load_trials(study))
    if front.empty:
        raise UsageError(f"study {study.study_name!r} has no feasible completed trial to export yet")
    spec = spec_of(study)
    profiler = profiler or get_profiler(spec.target)
    if task is None and (spec.task is not None or not profiler.measures_onnx):
        task = task_of_study(
            spec, study.study_name,
            "it is measured on PyTorch, which re-measures the checkpoint rebuilt on the teacher: pass the task "
            "(search.export(..., task=...))",
        )  # fmt: skip
    rows = []
    for _, trial in front.iterrows():
        source, destination = Path(trial[Key.ARTIFACTS]), Path(out) / f"trial-{trial['number']:05d}"
        missing = [f for f in FILES if not (source / f).exists()]
        if missing:
            raise UsageError(f"trial {trial['number']}: {', '.join(missing)} missing from {source}")
        destination.mkdir(parents=True, exist_ok=True)
        for name in FILES:
            shutil.copy2(source / name, destination / name)
        if profiler.measures_onnx:
            measurement = profiler.measure(destination / "model.onnx")
        else:
            measurement = _measure_checkpoint(profiler, task, destination)
        rows.append(
            {
                "number": trial["number"],
                "path": str(destination / "model.onnx"),
                Key.METRIC: trial[Key.METRIC],
                "export_metric": task.score(OnnxModule(destination / "model.onnx")) if task is not None else None,
                Key.SIZE_BYTES: trial[Key.SIZE_BYTES],
                "search_latency_ms": trial[Key.LATENCY_MS],
                "export_latency_ms": measurement.latency_ms,
                "export_latency_p90_ms": measurement.latency_p90_ms,
                Key.LATENCY_SOURCE: f"{measurement.source}:{measurement.runtime}",
                Key.ENERGY_MJ: measurement.energy_mj,
                Key.ENERGY_SOURCE: measurement.energy_source,
            }
        )
    return pd.DataFrame(rows)


def _measure_checkpoint(profiler: Profiler, task: Task, folder: Path) -> Measurement:
    """The exported checkpoint rebuilt on ``task``'s teacher (weights only) and measured."""
    checkpoint = torch.load(folder / "checkpoint.pt", weights_only=True, map_location="cpu")
    plan = Plan.from_json(checkpoint["plan"])
    model = build_structure(task.model, plan, task.example_input)
    model.load_state_dict(checkpoint["state_dict"])
    return measure_candidate(profiler, folder / "model.onnx", model, task.example_input, plan)
