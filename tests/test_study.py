"""End-to-end studies on a tiny digits task: every stage for real, a few trials each."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pandas as pd
import pytest

import search
from search import Finetune, SearchSpace, Task, TargetUnavailableError, UsageError, run
from search._study import OBJECTIVES

FAST = dict(finetune=Finetune(steps=6, eval_every=3), pruner=optuna.pruners.NopPruner())


def test_a_study_builds_measures_and_records_every_trial(tiny_task, fast_profiler, tmp_path):
    study = run(tiny_task, budget="0.9x", trials=3, profiler=fast_profiler, results_dir=tmp_path, **FAST)

    frame = search.load_trials(tmp_path / study.study_name)
    assert list(frame["state"]) == ["COMPLETE"] * 3
    baseline = study.user_attrs["baseline"]
    assert study.user_attrs["budget_ms"] == pytest.approx(0.9 * baseline["latency_ms"])
    for _, row in frame.iterrows():
        assert row["latency_source"] == "measured:onnxruntime-cpu"
        assert row["energy_source"].split(":")[0] in ("measured", "estimated")
        assert row["metric_source"] == "measured:exported-onnx"
        assert 0.0 <= row["metric"] <= 1.0 and row["latency_p90_ms"] >= row["latency_ms"] > 0
        assert row["size_bytes"] > 0 and row["onnx_bytes"] > 0
        assert row["feasible"] == (row["latency_ms"] <= study.user_attrs["budget_ms"])
        files = {p.name for p in Path(row["artifacts"]).iterdir()}
        assert {"model.onnx", "plan.json", "checkpoint.pt"} <= files
        plan = search.Plan.from_json(Path(row["artifacts"], "plan.json").read_text())
        assert plan.width == row["params_width"]
    assert frame["pareto"].sum() == len(study.best_trials)
    assert not (frame["pareto"] & ~frame["feasible"]).any()
    parquet = pd.read_parquet(tmp_path / study.study_name / "trials.parquet")
    assert list(parquet["number"]) == [0, 1, 2]


def test_rerunning_resumes_the_study(tiny_task, fast_profiler, tmp_path):
    kwargs = dict(budget="1x", profiler=fast_profiler, results_dir=tmp_path, study_name="resume", **FAST)
    run(tiny_task, trials=2, **kwargs)
    baseline = optuna.load_study(study_name="resume", storage=f"sqlite:///{tmp_path}/resume/study.db").user_attrs[
        "baseline"
    ]
    study = run(tiny_task, trials=3, **kwargs)
    assert len(study.trials) == 3
    assert study.user_attrs["baseline"] == baseline  # measured once, not again on resume
    assert len(run(tiny_task, trials=3, **kwargs).trials) == 3  # already holds 3: nothing to do


@pytest.mark.parametrize(
    "change, setting",
    [({"budget": "0.5x"}, "budget"), ({"objectives": ("metric", "size")}, "objectives")],
)
def test_a_study_refuses_to_mix_settings(tiny_task, fast_profiler, tmp_path, change, setting):
    kwargs = dict(budget="1x", profiler=fast_profiler, results_dir=tmp_path, study_name="mix", **FAST)
    run(tiny_task, trials=1, **kwargs)
    with pytest.raises(UsageError, match=setting):
        run(tiny_task, trials=2, **{**kwargs, **change})


def test_a_budget_no_plan_meets_leaves_the_front_empty(tiny_task, fast_profiler, tmp_path):
    study = run(tiny_task, budget="1us", trials=2, profiler=fast_profiler, results_dir=tmp_path, **FAST)
    frame = search.load_trials(study)
    assert (frame["state"] == "COMPLETE").all()
    assert not frame["feasible"].any() and not frame["pareto"].any()
    assert all(t.constraints["latency_over_budget_ms"] > 0 for t in study.trials)


def test_extra_objectives_are_study_objectives(tiny_task, fast_profiler, tmp_path):
    objectives = ("metric", "latency", "energy", "size")
    study = run(tiny_task, objectives=objectives, trials=1, profiler=fast_profiler, results_dir=tmp_path, **FAST)
    assert study.metric_names == [OBJECTIVES[o][0] for o in objectives]
    trial = study.trials[0]
    assert trial.values == [trial.user_attrs[name] for name in study.metric_names]


def test_a_failing_candidate_fails_its_trial_with_the_reason_and_the_study_goes_on(
    tiny_task, fast_profiler, tmp_path
):
    calls = []

    def nan_on_candidates(model, val):  # the baseline is scored first; candidates get NaN
        calls.append(1)
        return 1.0 if len(calls) == 1 else math.nan

    task = Task(tiny_task.model, tiny_task.train, tiny_task.val, tiny_task.example_input, nan_on_candidates, "nan")
    study = run(task, trials=2, profiler=fast_profiler, results_dir=tmp_path, **FAST)
    frame = search.load_trials(study)
    assert list(frame["state"]) == ["FAIL", "FAIL"]
    assert frame["fail_reason"].str.contains("metric is nan").all()


def test_the_pruner_stops_weak_fine_tunes(tiny_task, fast_profiler, tmp_path):
    class PruneAll(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            return trial.last_step is not None

    study = run(
        tiny_task, trials=2, profiler=fast_profiler, results_dir=tmp_path,
        finetune=Finetune(steps=6, eval_every=3), pruner=PruneAll(),
    )  # fmt: skip
    frame = search.load_trials(study)
    assert list(frame["state"]) == ["PRUNED", "PRUNED"]
    assert frame["user_attrs_pruned_reason"].str.contains("fine-tune step 3").all()
    assert all(t.user_attrs["finetune_curve"].keys() == {"3"} for t in study.trials)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"trials": 0}, UsageError, "trials"),
        ({"objectives": ("metric", "speed")}, UsageError, "metric, latency, energy, size"),
        ({"sampler": "cmaes"}, UsageError, "tpe, nsga2, random"),
        ({"budget": "5 parsecs"}, UsageError, "0.5x"),
        ({"target": "jetson"}, TargetUnavailableError, "TensorRT"),
        ({"space": SearchSpace(layers=("nope",))}, UsageError, "conv1"),
    ],
)
def test_bad_input_stops_before_any_work(tiny_task, tmp_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        run(tiny_task, results_dir=tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())


def test_a_model_without_compressible_layers_is_refused(tiny_task, tmp_path):
    import torch

    task = Task(torch.nn.Sequential(torch.nn.Flatten()), tiny_task.train, tiny_task.val, tiny_task.example_input)
    with pytest.raises(UsageError, match="no Conv1d, Conv2d or Linear"):
        run(task, results_dir=tmp_path)
