"""``search.export``: write the Pareto-optimal models as deployable files, then re-measure them."""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import onnxruntime
import optuna
import pandas as pd
import torch

from profilers import Measurement, Profiler, get_profiler, measure_in_turn
from profilers.tensorrt import trtexec_command
from search._errors import UsageError, first_line
from search._record import Key, StudyKey
from search.artifacts import OnnxModule, measure_candidate
from search.compress import build_structure
from search.plan import Plan
from search.study._baseline import setting_differences, teacher_measurer
from search.study._results import load_trials, open_study, pareto_front
from search.study._setup import writable_folder
from search.study._spec import spec_of, task_of_study
from search.tasks import Task

FILES = ("model.onnx", "plan.json", "checkpoint.pt")
TABLE = "front.csv"  # the exported rows, beside the models
ROUNDS = 3  # each model measured this many times, in turn with the others and the teacher
TEACHER = "teacher"


def export(
    study: str | Path | optuna.Study,
    out: str | Path,
    study_name: str | None = None,
    profiler: Profiler | None = None,
    task: Task | None = None,
    skip_broken: bool = False,
    rounds: int = ROUNDS,
    progress: Callable[[str], None] | None = None,
) -> pd.DataFrame:
    """Copy each Pareto-optimal trial's ONNX file, plan JSON and PyTorch checkpoint to
    ``out/trial-<number>/``, score the copied ONNX file on the task's data and re-measure it on the
    study's target. Each front plan is its longest fine-tune (a plan promoted to a longer one is
    represented by that promotion, see :func:`search.load_trials`).

    The exported models and the study's teacher are measured in turn, ``rounds`` times each
    (:func:`profilers.measure_in_turn`): each row's ``export_latency_ms`` is its median measurement,
    ``teacher_latency_ms`` the teacher's, taken in the same stretch, and ``speedup`` their ratio.
    These compare with each other; the search-time latencies, measured minutes or days apart, carry
    the machine's drift between them. ``setting_differences`` lists how the export's measurement
    setting differs from the study's (a runtime upgraded since, another machine); empty where the
    search-time latency is of the same cost function.

    Each file is checked before it is copied (:func:`broken`): the plan parses, the checkpoint loads
    with ``weights_only=True`` and ONNX Runtime loads the model. A broken trial stops the export
    (:class:`UsageError`), or with ``skip_broken`` is left out and listed in the result's
    ``attrs["skipped"]`` (``"trial 7: checkpoint.pt …"``). Everything is written into a hidden
    sibling folder of ``out`` first and moved into place at the end: a failure leaves ``out`` as it
    was. A new ``out`` appears whole; in an existing one each ``trial-<number>`` folder and
    ``front.csv`` (this export's rows, each file's path relative to ``out``) are replaced whole and
    nothing else is touched.

    Returns one row per exported model: search-time and export-time metric and latency side by
    side (``export_metric`` is None where no task could be had: a study started with a Task object,
    exported without ``task``; the teacher's columns are None where its file is gone), and the
    ``disabled_optimizers`` ONNX Runtime's session measured it with (None for another runtime): a
    deployment's session takes the same; for a TensorRT measurement, ``trtexec``: the command that
    builds, in the model's folder, the engine it measured (None for another runtime).
    The checkpoint holds ``{"plan": json, "state_dict": ...}``; load it with ``weights_only=True``
    into ``search.build_structure(teacher, Plan.from_json(plan), example_input)``.
    ``profiler`` defaults to the study's target's own (a :class:`~profilers.RemoteProfiler` measures
    on the device). A profiler that runs PyTorch modules (the ``gpu`` target on PyTorch CUDA)
    measures the checkpoint instead, rebuilt on the study's task (``task``, or the one the study
    was started with by ``module:function``), and the teacher's module. ``progress(text)``, where
    given, hears what is being measured or scored.
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
    baseline = study.user_attrs.get(StudyKey.BASELINE, {})
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    rows, skipped = [], []
    say = progress or (lambda text: None)

    def left_out(number: int, problem: str) -> None:
        if not skip_broken:
            raise UsageError(f"trial {number}: {problem}; pass --skip-broken to export the other trials")
        skipped.append(f"trial {number}: {problem}")

    def measuring(key, round_: int) -> None:
        which = "the teacher" if key == TEACHER else f"trial {key}"
        say(f"measuring {which}, round {round_ + 1} of {rounds}")

    try:
        copied = {}
        for _, trial in front.iterrows():
            number, source = trial["number"], Path(str(trial[Key.ARTIFACTS]))
            problem = broken(source)
            if problem is not None:
                left_out(number, problem)
                continue
            folder = copied[number] = staging / f"trial-{number:05d}"
            folder.mkdir()
            for name in FILES:
                shutil.copy2(source / name, folder / name)
        measures = {number: _measurer(profiler, task, folder) for number, folder in copied.items()}
        teacher = teacher_measurer(baseline, profiler, task)
        measured, failed = measure_in_turn({TEACHER: teacher, **measures} if teacher else measures, rounds, measuring)
        if TEACHER in failed:
            raise UsageError(
                f"the study's teacher cannot be measured on {spec.target.name} now "
                f"({first_line(str(failed[TEACHER]))}): the exported models' speed-ups are measured against it"
            )
        teacher_measured = measured.get(TEACHER)
        for _, trial in front.iterrows():
            number = trial["number"]
            if number in failed:
                shutil.rmtree(copied[number])
                problem = first_line(str(failed[number]))
                left_out(number, f"model.onnx cannot be measured on {spec.target.name} ({problem})")
            elif number in measured:
                if task is not None:
                    say(f"scoring trial {number}")
                folder = copied[number]
                rows.append(_row(trial, folder, out / folder.name, measured[number], teacher_measured, task, baseline))
        if not rows:
            raise UsageError(f"no trial of the front could be exported: {'; '.join(skipped)}")
        frame = pd.DataFrame(rows)
        _write_table(frame, out, staging / TABLE)
        _move_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    frame.attrs["skipped"] = skipped
    return frame


def _write_table(frame: pd.DataFrame, out: Path, path: Path) -> None:
    """The export's rows as CSV beside the models: each file's path relative to ``out`` (the folder
    moves whole), lists as JSON."""
    table = frame.assign(path=[str(Path(p).relative_to(out)) for p in frame["path"]])
    for column in ("setting_differences", "disabled_optimizers"):
        table[column] = [json.dumps(value) for value in table[column]]
    table.to_csv(path, index=False)


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


def _measurer(profiler: Profiler, task: Task | None, folder: Path) -> Callable[[], Measurement]:
    """What measures an exported trial's model: its ONNX file, or for a profiler of PyTorch modules
    its checkpoint rebuilt on ``task``'s teacher (weights only), built once."""
    if profiler.measures_onnx:
        return functools.partial(profiler.measure, folder / "model.onnx")
    checkpoint = torch.load(folder / "checkpoint.pt", weights_only=True, map_location="cpu")
    plan = Plan.from_json(checkpoint["plan"])
    model = build_structure(task.model, plan, task.example_input)  # the shapes; the checkpoint has the weights
    model.load_state_dict(checkpoint["state_dict"])
    return functools.partial(measure_candidate, profiler, folder / "model.onnx", model, task.example_input, plan)


def _row(
    trial: pd.Series, folder: Path, final: Path, measurement: Measurement, teacher: Measurement | None,
    task: Task | None, baseline: dict,
) -> dict:  # fmt: skip
    """One exported trial's row: its copied files in ``folder`` scored, its measurement and the
    teacher's taken in turn with it; its path where it will be (``final``)."""
    return {
        "number": trial["number"],
        "path": str(final / "model.onnx"),
        Key.METRIC: trial[Key.METRIC],
        "export_metric": task.score(OnnxModule(folder / "model.onnx")) if task is not None else None,
        Key.SIZE_BYTES: trial[Key.SIZE_BYTES],
        "search_latency_ms": trial[Key.LATENCY_MS],
        "export_latency_ms": measurement.latency_ms,
        "export_latency_p90_ms": measurement.latency_p90_ms,
        "teacher_latency_ms": teacher.latency_ms if teacher else None,
        "speedup": teacher.latency_ms / measurement.latency_ms if teacher else None,
        # Where the setting differs (ONNX Runtime upgraded since the search), the search-time latency
        # is of another cost function: only the export's own columns compare. (A study from before
        # the teacher's measurement was recorded says nothing.)
        "setting_differences": setting_differences(baseline, measurement.setting) if "measurement" in baseline else [],
        Key.LATENCY_SOURCE: f"{measurement.source}:{measurement.runtime}",
        Key.ENERGY_MJ: measurement.energy_mj,
        Key.ENERGY_SOURCE: measurement.energy_source,
        "disabled_optimizers": measurement.device.get("disabled_optimizers"),  # ONNX Runtime's, to deploy with
        "trtexec": trtexec_command("model.onnx", measurement.device),  # TensorRT's engine, built as measured
    }


def _move_into_place(staging: Path, out: Path) -> None:
    """``staging`` becomes ``out`` in one rename; into an existing ``out`` each of its entries (the
    trials' folders, the table) is renamed in, the one it replaces set aside first and put back if
    the rename fails."""
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
