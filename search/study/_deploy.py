"""``search.export``: write the Pareto-optimal models as deployable files, then re-measure them."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnxruntime
import optuna
import pandas as pd
import torch

from profilers import Measurement, MeasurementError, Profiler, get_profiler
from search._errors import UsageError, first_line
from search._record import Key
from search.artifacts import OnnxModule, measure_candidate
from search.compress import build_structure
from search.plan import Plan
from search.study._results import load_trials, open_study, pareto_front
from search.study._setup import writable_folder
from search.study._spec import spec_of, task_of_study
from search.tasks import Task

FILES = ("model.onnx", "plan.json", "checkpoint.pt")


def export(
    study: str | Path | optuna.Study,
    out: str | Path,
    study_name: str | None = None,
    profiler: Profiler | None = None,
    task: Task | None = None,
    skip_broken: bool = False,
) -> pd.DataFrame:
    """Copy each Pareto-optimal trial's ONNX file, plan JSON and PyTorch checkpoint to
    ``out/trial-<number>/``, score the copied ONNX file on the task's data and re-measure it on the
    study's target. Each front plan is its longest fine-tune (a plan promoted to a longer one is
    represented by that promotion, see :func:`search.load_trials`).

    Each file is checked before it is copied (:func:`broken`): the plan parses, the checkpoint loads
    with ``weights_only=True`` and ONNX Runtime loads the model. A broken trial stops the export
    (:class:`UsageError`), or with ``skip_broken`` is left out and listed in the result's
    ``attrs["skipped"]`` (``"trial 7: checkpoint.pt …"``). Everything is written into a hidden
    sibling folder of ``out`` first and moved into place at the end: a failure leaves ``out`` as it
    was. A new ``out`` appears whole; in an existing one each ``trial-<number>`` folder is replaced
    whole and nothing else is touched.

    Returns one row per exported model: search-time and export-time metric and latency side by
    side (``export_metric`` is None where no task could be had: a study started with a Task object,
    exported without ``task``), and the ``disabled_optimizers`` ONNX Runtime's session measured it
    with (None for another runtime): a deployment's session takes the same.
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
    out = Path(out)
    writable_folder(out, "export folder", "--out")
    spec = spec_of(study)
    profiler = profiler or get_profiler(spec.target)
    if task is None and (spec.task is not None or not profiler.measures_onnx):
        task = task_of_study(
            spec, study.study_name,
            "it is measured on PyTorch, which re-measures the checkpoint rebuilt on the teacher: pass the task "
            "(search.export(..., task=...))",
        )  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    rows, skipped = [], []
    try:
        for _, trial in front.iterrows():
            number, source = trial["number"], Path(str(trial[Key.ARTIFACTS]))
            problem = broken(source)
            if problem is None:
                folder = staging / f"trial-{number:05d}"
                folder.mkdir()
                for name in FILES:
                    shutil.copy2(source / name, folder / name)
                try:
                    row = _remeasure(trial, folder, out / folder.name, profiler, task)
                except MeasurementError as exc:
                    problem = f"model.onnx cannot be measured on {spec.target.name} ({first_line(str(exc))})"
                    shutil.rmtree(folder)
            if problem is None:
                rows.append(row)
            elif skip_broken:
                skipped.append(f"trial {number}: {problem}")
            else:
                raise UsageError(f"trial {number}: {problem}; pass --skip-broken to export the other trials")
        if not rows:
            raise UsageError(f"no trial of the front could be exported: {'; '.join(skipped)}")
        _move_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    frame = pd.DataFrame(rows)
    frame.attrs["skipped"] = skipped
    return frame


def broken(folder: Path) -> str | None:
    """What is wrong with a trial's files in ``folder`` (the first problem found), or None: each
    is there, ``plan.json`` is a plan, ``checkpoint.pt`` loads with ``weights_only=True`` and
    holds a plan and weights, and ONNX Runtime loads ``model.onnx``."""
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        return f"{', '.join(missing)} missing from {folder}"
    try:
        Plan.from_json((folder / "plan.json").read_text(encoding="utf-8"))
    except Exception as exc:  # noqa: BLE001 (JSON, a type tag, a version, a field: any of them)
        return f"{folder / 'plan.json'} is not a plan ({first_line(exc)})"
    try:
        checkpoint = torch.load(folder / "checkpoint.pt", weights_only=True, map_location="cpu")
        if not isinstance(checkpoint, dict) or not {"plan", "state_dict"} <= set(checkpoint):
            raise ValueError("it holds no plan and state_dict")
        Plan.from_json(checkpoint["plan"])
    except Exception as exc:  # noqa: BLE001 (a truncated zip, a pickle weights_only refuses, …)
        return f"{folder / 'checkpoint.pt'} cannot be loaded ({first_line(exc)})"
    try:
        onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 (ONNX Runtime raises its own types)
        return f"{folder / 'model.onnx'} cannot be loaded by ONNX Runtime ({first_line(exc)})"
    return None


def _remeasure(trial: pd.Series, folder: Path, final: Path, profiler: Profiler, task: Task | None) -> dict:
    """One exported trial's row: its copied files in ``folder`` scored and measured; its path
    where it will be (``final``)."""
    if profiler.measures_onnx:
        measurement = profiler.measure(folder / "model.onnx")
    else:
        measurement = _measure_checkpoint(profiler, task, folder)
    return {
        "number": trial["number"],
        "path": str(final / "model.onnx"),
        Key.METRIC: trial[Key.METRIC],
        "export_metric": task.score(OnnxModule(folder / "model.onnx")) if task is not None else None,
        Key.SIZE_BYTES: trial[Key.SIZE_BYTES],
        "search_latency_ms": trial[Key.LATENCY_MS],
        "export_latency_ms": measurement.latency_ms,
        "export_latency_p90_ms": measurement.latency_p90_ms,
        Key.LATENCY_SOURCE: f"{measurement.source}:{measurement.runtime}",
        Key.ENERGY_MJ: measurement.energy_mj,
        Key.ENERGY_SOURCE: measurement.energy_source,
        "disabled_optimizers": measurement.device.get("disabled_optimizers"),  # ONNX Runtime's, to deploy with
    }


def _move_into_place(staging: Path, out: Path) -> None:
    """``staging`` becomes ``out`` in one rename; into an existing ``out`` each of its folders is
    renamed in, the one it replaces set aside first and put back if the rename fails."""
    if not out.exists():
        os.rename(staging, out)
        return
    for folder in sorted(staging.iterdir()):
        target = out / folder.name
        aside = None
        if target.exists():
            aside = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".old", dir=out))
            os.rename(target, aside / folder.name)
        try:
            os.rename(folder, target)
        except OSError:
            if aside is not None:
                os.rename(aside / folder.name, target)
            raise
        finally:
            if aside is not None:
                shutil.rmtree(aside, ignore_errors=True)


def _measure_checkpoint(profiler: Profiler, task: Task, folder: Path) -> Measurement:
    """The exported checkpoint rebuilt on ``task``'s teacher (weights only) and measured."""
    checkpoint = torch.load(folder / "checkpoint.pt", weights_only=True, map_location="cpu")
    plan = Plan.from_json(checkpoint["plan"])
    model = build_structure(task.model, plan, task.example_input)  # the shapes; the checkpoint has the weights
    model.load_state_dict(checkpoint["state_dict"])
    return measure_candidate(profiler, folder / "model.onnx", model, task.example_input, plan)
