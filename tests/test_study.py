"""End-to-end studies on a tiny digits task: every stage for real, a few trials each."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
from loopback import TOKEN, serving
from models import Conv1dNet, ResidualNet, TinyText, resnet18, settle, text_task

import search
from profilers import OnnxRuntimeCpuProfiler, RemoteProfiler
from search import Finetune, SearchSpace, Task, TargetUnavailableError, UsageError, run
from search.study import OBJECTIVES
from targets import load_target

FAST = dict(finetune=Finetune(steps=6, eval_every=3), pruner=optuna.pruners.NopPruner(), recipes=False, sensitivity=False)


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
        # a plan measured over the budget is scored as it is: no fine-tune stage
        tuned = {"fine-tune"} if not isinstance(row["finetune_skipped"], str) else set()
        assert row["seconds"].keys() == {"build", "export", "measure", "evaluate"} | tuned
        assert all(s > 0 for s in row["seconds"].values())
    assert frame["pareto"].sum() == len(study.best_trials)
    assert not (frame["pareto"] & ~frame["feasible"]).any()
    parquet = pd.read_parquet(tmp_path / study.study_name / "trials.parquet")
    assert list(parquet["number"]) == [0, 1, 2]


def test_a_plan_is_fine_tuned_on_the_same_batches_whatever_ran_before(tiny_task, fast_profiler, tmp_path):
    kwargs = dict(trials=2, seed=5, profiler=fast_profiler, results_dir=tmp_path, **FAST)
    first = run(tiny_task, study_name="first", **kwargs)
    again = run(tiny_task, study_name="again", **kwargs)  # the task's loader was iterated meanwhile
    for before, after in zip(first.trials, again.trials):
        assert after.params == before.params
        assert after.user_attrs["finetune_loss_first_last"] == before.user_attrs["finetune_loss_first_last"]
        assert after.user_attrs["metric"] == before.user_attrs["metric"]


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


class _SaysNoSetting(OnnxRuntimeCpuProfiler):
    """A profiler that knows its setting only once it measured, as a client of a service from before
    services said it."""

    def setting(self):
        return None


def test_a_study_measured_elsewhere_is_not_resumed_here(tiny_task, fast_profiler, tmp_path):
    """Resumed after a runtime upgrade, or joined from another kind of machine, a study would put
    latencies of another cost function on its front: refused before any work where the profiler
    knows its setting (a profiler service says it too), else at the first measurement, its trial
    failed with the differences."""
    kwargs = dict(profiler=fast_profiler, results_dir=tmp_path, study_name="moved", **FAST)
    study = run(tiny_task, trials=1, **kwargs)
    baseline = study.user_attrs["baseline"]
    device = {**baseline["measurement"]["device"], "cpu": "Another CPU", "pinned_cpus": [7]}
    study.set_user_attr("baseline", {**baseline, "measurement": {**baseline["measurement"], "device": device}})
    differences = r"cpu '.+' here, 'Another CPU' for the study\. Its latencies would not"
    with pytest.raises(UsageError, match=differences):
        run(tiny_task, trials=3, **kwargs)
    assert list(search.load_trials(study)["state"]) == ["COMPLETE"]  # nothing ran
    with serving(fast_profiler) as (_, address):  # a profiler service says its setting up front
        remote = RemoteProfiler(fast_profiler.target, address, TOKEN, **fast_profiler.timing())
        with pytest.raises(UsageError, match=differences):
            run(tiny_task, trials=3, **{**kwargs, "profiler": remote})
    assert list(search.load_trials(study)["state"]) == ["COMPLETE"]

    remote = _SaysNoSetting(fast_profiler.target, **fast_profiler.timing())
    with pytest.raises(UsageError, match=differences):
        run(tiny_task, trials=3, **{**kwargs, "profiler": remote})
    frame = search.load_trials(study)
    assert list(frame["state"]) == ["COMPLETE", "FAIL"]
    assert frame["fail_reason"].iloc[1].endswith("start a new study (--study-name) (during measure)")
    assert "pinned_cpus" not in frame["fail_reason"].iloc[1]  # which CPU a run was pinned to is not a setting

    study.set_user_attr("baseline", baseline)  # back where it was measured: it goes on
    assert list(search.load_trials(run(tiny_task, trials=3, **kwargs))["state"]) == ["COMPLETE", "FAIL", "COMPLETE"]


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


def _refuse_a_second_scoring(monkeypatch):
    from search.study._objective import Objective

    def refuse(self, path):
        raise AssertionError(f"{path} was scored again")

    monkeypatch.setattr(Objective, "_score", refuse)


def test_a_new_plans_step_0_is_scored_on_the_file_it_was_measured_as(tiny_task, fast_profiler, tmp_path, monkeypatch):
    """ONNX Runtime scores a new plan before its first step (the file exported and measured then);
    the scores after are the file's or PyTorch's, each recorded where it was made (here the file
    scores higher: the fine-tune keeps step 0, the file is the trial's as it was, not written or
    scored again, and the kept state has no PyTorch score)."""
    from search.artifacts import OnnxModule

    def by_runtime(model, val):
        return 0.5 if isinstance(model, OnnxModule) else 0.1

    task = Task(tiny_task.model, tiny_task.train, tiny_task.val, tiny_task.example_input, by_runtime, "by-runtime")
    _refuse_a_second_scoring(monkeypatch)
    study = run(task, trials=2, profiler=fast_profiler, results_dir=tmp_path, **FAST)
    for trial in study.trials:
        assert trial.state == optuna.trial.TrialState.COMPLETE, trial.user_attrs.get("fail_reason")
        curve, on_file = trial.user_attrs["finetune_curve"], trial.user_attrs["scored_on_file"]
        assert curve.keys() == {"0", "3", "6"} and "0" in on_file
        assert all((value == 0.5) == (step in on_file) for step, value in curve.items())
        assert trial.user_attrs["best_step"] == 0 and trial.user_attrs["metric"] == 0.5
        assert trial.user_attrs["metric_torch"] is None  # the kept state's score was the file's


def test_a_state_kept_as_scored_on_its_file_is_the_trials_file(tiny_task, fast_profiler, tmp_path, monkeypatch):
    """The fine-tune scores step 3 on a file written with its weights, and keeps it (the file's
    scores rise here): that file becomes the trial's, with no second write and scoring, and it
    holds the state the checkpoint beside it holds."""
    from search.artifacts import OnnxModule

    file_scores = []

    def rising_on_file(model, val):
        if isinstance(model, OnnxModule):
            file_scores.append(model(tiny_task.example_input))
            return 0.5 + 0.01 * len(file_scores)
        return 0.1

    task = Task(tiny_task.model, tiny_task.train, tiny_task.val, tiny_task.example_input, rising_on_file, "rising")
    _refuse_a_second_scoring(monkeypatch)
    float_plans = SearchSpace(bits=(32,))  # the file computes as PyTorch does, to compare the two
    study = run(task, trials=2, space=float_plans, profiler=fast_profiler, results_dir=tmp_path, **FAST)
    for trial in study.trials:
        assert trial.state == optuna.trial.TrialState.COMPLETE, trial.user_attrs.get("fail_reason")
        assert trial.user_attrs["scored_on_file"] == ["0", "3"] and trial.user_attrs["best_step"] == 3
        assert trial.user_attrs["metric"] == trial.user_attrs["finetune_curve"]["3"]
        _assert_the_file_holds_the_checkpoints_state(task, Path(trial.user_attrs["artifacts"]))


def _assert_the_file_holds_the_checkpoints_state(task, folder: Path) -> None:
    from search.artifacts import OnnxModule
    from search.compress import build_structure
    from search.plan import Plan

    checkpoint = torch.load(folder / "checkpoint.pt", weights_only=True)
    model = build_structure(task.model, Plan.from_json(checkpoint["plan"]), task.example_input)
    model.load_state_dict(checkpoint["state_dict"])
    with torch.no_grad():
        expected = model.eval()(task.example_input)
    torch.testing.assert_close(OnnxModule(folder / "model.onnx")(task.example_input), expected, atol=1e-4, rtol=1e-4)


def test_a_kept_state_whose_file_was_written_over_is_written_again(tiny_task, fast_profiler, tmp_path):
    """Step 2 scores best, on a file; steps 6 and 8 are scored on the file too (PyTorch is made
    slow), which then holds step 8's weights: the trial's file is written again with step 2's."""
    from search.artifacts import OnnxModule

    file_scores = []

    def best_at_step_2(model, val):
        if not isinstance(model, OnnxModule):
            time.sleep(0.3)
            return 0.1
        file_scores.append(model)
        return {1: 1.0, 2: 0.5, 3: 0.9}.get(len(file_scores), 0.6)  # the baseline, step 0, step 2, later

    task = Task(tiny_task.model, tiny_task.train, tiny_task.val, tiny_task.example_input, best_at_step_2, "step-2")
    float_plans = SearchSpace(bits=(32,))
    options = dict(FAST, finetune=Finetune(steps=8, eval_every=2))
    study = run(task, trials=1, space=float_plans, profiler=fast_profiler, results_dir=tmp_path, **options)
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.COMPLETE, trial.user_attrs.get("fail_reason")
    assert trial.user_attrs["scored_on_file"] == ["0", "2", "6", "8"] and trial.user_attrs["best_step"] == 2
    assert len(file_scores) == 6  # the baseline, four scores along the fine-tune, and the file written again
    _assert_the_file_holds_the_checkpoints_state(task, Path(trial.user_attrs["artifacts"]))


def test_the_pruner_stops_weak_fine_tunes(tiny_task, fast_profiler, tmp_path):
    class PruneAll(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            return trial.last_step is not None

    study = run(
        tiny_task, trials=2, profiler=fast_profiler, results_dir=tmp_path,
        finetune=Finetune(steps=6, eval_every=3), pruner=PruneAll(), recipes=False,  # int8 PTQ is not fine-tuned
    )  # fmt: skip
    frame = search.load_trials(study)
    assert list(frame["state"]) == ["PRUNED", "PRUNED"]
    assert frame["pruned_reason"].str.contains("fine-tune step 3").all()
    assert all(t.user_attrs["finetune_curve"].keys() == {"0", "3"} for t in study.trials)  # scored before step 1 too
    assert all(t.user_attrs["seconds"]["fine-tune"] > 0 for t in study.trials)  # a pruned trial's time is kept too


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
    task = Task(torch.nn.Sequential(torch.nn.Flatten()), tiny_task.train, tiny_task.val, tiny_task.example_input)
    with pytest.raises(UsageError, match="no Conv1d, Conv2d or Linear"):
        run(task, results_dir=tmp_path)


def _random_task(model, input_shape, classes, name):
    generator = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(8, *input_shape[1:], generator=generator), torch.randint(0, classes, (8,), generator=generator))
        for _ in range(2)
    ]
    return Task(model.eval(), batches, batches[:1], batches[0][0][:1], name=name)


@pytest.mark.parametrize(
    "make, space",
    [
        # Conv1d with a grouped conv: pruning its 16-channel input layer is impossible (see
        # test_transforms), so this space compresses it by int8 and sparsity.
        (lambda: _random_task(settle(Conv1dNet()), Conv1dNet.input_shape, 5, "conv1d"),
         SearchSpace(width=(1.0,), pruning=(0.0,), bits=(8,), sparsity=(0.5,), two_four=False)),
        # Residual adds couple the blocks' channels: dependency-aware pruning must keep them equal.
        (lambda: _random_task(settle(ResidualNet()), ResidualNet.input_shape, 10, "residual"),
         SearchSpace(width=(0.75,), pruning=(0.5,), bits=(8,), sparsity=(0.0,), two_four=False)),
        # ResNet-18, random weights, 32×32: latency only.
        (lambda: _random_task(resnet18(), (1, 3, 32, 32), 1000, "resnet18"),
         SearchSpace(width=(0.5,), pruning=(0.0,), bits=(8,), sparsity=(0.0,), two_four=False)),
    ],
    ids=["conv1d", "residual", "resnet18"],
)  # fmt: skip
def test_other_architectures_run_end_to_end(make, space, fast_profiler, tmp_path):
    task = make()
    study = run(
        task, trials=1, space=space, profiler=fast_profiler, results_dir=tmp_path,
        finetune=Finetune(steps=2, eval_every=1), pruner=optuna.pruners.NopPruner(),
    )  # fmt: skip
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.COMPLETE, trial.user_attrs.get("fail_reason")
    assert set(trial.user_attrs["layer_precision"].values()) == {"int8"}
    assert "int8" in trial.user_attrs["precision"]
    baseline = study.user_attrs["baseline"]
    assert trial.user_attrs["size_bytes"] < baseline["size_bytes"] / 3  # int8 (+ pruning) vs fp32



# Per trial: a candidate that fails at any stage fails only its own trial, with the reason in the
# DataFrame's fail_reason, and the next trial runs. Each case breaks the first candidate only.


def _unrunnable_onnx(path: Path) -> None:
    """Overwrite ``path`` with a valid ONNX file whose one op no ONNX Runtime build has a kernel for."""
    from onnx import TensorProto, helper, save

    node = helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example")
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    save(helper.make_model(graph, opset_imports=opsets, ir_version=9), path)


def _sabotaged_profiler(sabotage):
    """The cpu target's ONNX Runtime profiler (fast_profiler's timing) that, for the first trial's
    file, returns ``sabotage(profiler, path, measure)``; ``measure()`` measures it for real."""
    from profilers import OnnxRuntimeCpuProfiler
    from targets import load_target

    class Sabotaged(OnnxRuntimeCpuProfiler):
        done = False

        def measure(self, onnx_path, inputs=None):
            if "trials" in Path(onnx_path).parts and not self.done:  # not the baseline
                self.done = True
                real = super().measure
                return sabotage(self, Path(onnx_path), lambda: real(onnx_path, inputs))
            return super().measure(onnx_path, inputs)

    timing = dict(warmup_runs=2, warmup_s=0.01, min_runs=20, min_time_s=0.02, max_time_s=0.5)
    return Sabotaged(load_target("cpu"), **timing)


def _first_fails_next_completes(study: optuna.Study) -> str:
    """The first trial FAILed and a later one COMPLETEd; returns the first one's fail_reason."""
    frame = search.load_trials(study)
    assert frame["state"].iloc[0] == "FAIL", frame[["state", "fail_reason"]]
    assert (frame["state"].iloc[1:] == "COMPLETE").any(), frame[["state", "fail_reason"]]
    return frame["fail_reason"].iloc[0]


def _first_loss(monkeypatch, change) -> None:
    """The first candidate's first fine-tune step computes ``change(loss)`` instead of its loss."""
    from search.compress import _distill

    real, calls = _distill.distillation_loss, []

    def loss(*args):
        calls.append(1)
        return change(real(*args)) if len(calls) == 1 else real(*args)

    monkeypatch.setattr(_distill, "distillation_loss", loss)


def test_an_onnx_export_failure_fails_its_trial_and_the_study_goes_on(
    tiny_task, fast_profiler, tmp_path, monkeypatch
):
    real_export, broken = torch.onnx.export, []

    def export(model, *args, **kwargs):  # the exporter gives up on the first candidate, as on an op it lacks
        if model is not tiny_task.model and not broken:
            broken.append(model)
            raise RuntimeError("no ONNX translation for aten::frobnicate")
        return real_export(model, *args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", export)
    study = run(tiny_task, trials=2, profiler=fast_profiler, results_dir=tmp_path, **FAST)
    reason = _first_fails_next_completes(study)
    assert "ONNX export failed: RuntimeError: no ONNX translation for aten::frobnicate" in reason


def test_a_file_the_runtime_cannot_load_fails_its_trial_and_the_study_goes_on(tiny_task, tmp_path):
    """The runtime's session build fails (a custom op with no kernel) when the profiler loads the file."""

    def unloadable(profiler, path, measure):
        _unrunnable_onnx(path)
        return measure()

    study = run(tiny_task, trials=2, profiler=_sabotaged_profiler(unloadable), results_dir=tmp_path, **FAST)
    reason = _first_fails_next_completes(study)
    assert "ONNX Runtime cannot build a CPU session" in reason and "Frobnicate" in reason


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_diverging_fine_tune_fails_its_trial_and_the_study_goes_on(
    tiny_task, fast_profiler, tmp_path, monkeypatch, value
):
    _first_loss(monkeypatch, lambda loss: loss + value)
    study = run(tiny_task, trials=2, profiler=fast_profiler, results_dir=tmp_path, **FAST)
    assert f"fine-tuning diverged: loss is {value} at step 1" in _first_fails_next_completes(study)


def test_a_measurement_that_never_stabilises_fails_its_trial_and_the_study_goes_on(tiny_task, tmp_path):
    """The median still moves at the time limit: not a figure to rank plans by."""

    def unstable(profiler, path, measure):
        profiler.min_runs, profiler.max_time_s = 10**9, 0.05  # cannot settle in time
        try:
            measurement = measure()
        finally:
            profiler.min_runs, profiler.max_time_s = 20, 0.5
        assert not measurement.stable
        return measurement

    study = run(tiny_task, trials=2, profiler=_sabotaged_profiler(unstable), results_dir=tmp_path, **FAST)
    assert "did not stabilise" in _first_fails_next_completes(study)


def test_out_of_memory_fails_its_trial_with_the_stage_and_the_study_goes_on(
    tiny_task, fast_profiler, tmp_path, monkeypatch
):
    # torch's error, as a GPU raises it mid-step, in the first candidate's fine-tune
    def cuda_out_of_memory(loss):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    _first_loss(monkeypatch, cuda_out_of_memory)
    study = run(tiny_task, trials=2, profiler=fast_profiler, results_dir=tmp_path / "gpu", **FAST)
    reason = _first_fails_next_completes(study)
    assert reason.startswith("out of memory") and "fine-tune" in reason and "Tried to allocate" in reason, reason

    # Python's, as the host runs out while the runtime builds its session
    def host_out_of_memory(profiler, path, measure):
        raise MemoryError("std::bad_alloc")

    profiler = _sabotaged_profiler(host_out_of_memory)
    study = run(tiny_task, trials=2, profiler=profiler, results_dir=tmp_path / "host", **FAST)
    reason = _first_fails_next_completes(study)
    assert reason.startswith("out of memory") and "measure" in reason, reason


def test_an_embedding_model_on_dict_inputs_runs_end_to_end(fast_profiler, tmp_path):
    import onnx

    space = SearchSpace(width=(1.0, 0.5), pruning=(0.0,), bits=(8,), sparsity=(0.0,), two_four=False)
    task = text_task(TinyText().eval())
    study = run(task, trials=2, space=space, profiler=fast_profiler, results_dir=tmp_path, **FAST)
    assert study.user_attrs["baseline"]["metric"] == pytest.approx(1.0, abs=1e-4)  # the teacher vs itself
    assert any(trial.user_attrs["metric_torch"] is not None for trial in study.trials)
    for trial in study.trials:
        assert trial.state == optuna.trial.TrialState.COMPLETE, trial.user_attrs.get("fail_reason")
        assert trial.user_attrs["metric"] > 0.9, trial.user_attrs["metric"]
        if trial.user_attrs["metric_torch"] is None:  # the kept state was scored on its file
            assert str(trial.user_attrs["best_step"]) in trial.user_attrs["scored_on_file"]
            assert trial.user_attrs["metric"] == trial.user_attrs["finetune_curve"][str(trial.user_attrs["best_step"])]
        else:  # the file scores as the PyTorch model it was exported from
            assert trial.user_attrs["metric"] == pytest.approx(trial.user_attrs["metric_torch"], abs=0.02)
        assert "int8" in trial.user_attrs["precision"]
        graph = onnx.load(str(Path(trial.user_attrs["artifacts"], "model.onnx"))).graph
        assert [value.name for value in graph.input] == ["input_ids", "attention_mask"]
        int8_weights = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2]
        assert len(int8_weights) == 2  # fc1 and fc2


def test_the_run_s_timeout_stops_a_fine_tune_where_it_is(tiny_task, fast_profiler, tmp_path):
    """A fine-tune of 20,000 steps (minutes) in a run of 20 s: it stops at the timeout, and the trial
    completes with its best state scored on its file, saying where it stopped."""
    finetune = Finetune(steps=20_000, eval_every=100)
    study = run(
        tiny_task, trials=1, timeout=20, profiler=fast_profiler, results_dir=tmp_path,
        **{**FAST, "finetune": finetune},
    )  # fmt: skip
    (trial,) = study.get_trials(deepcopy=False)
    steps = trial.user_attrs["finetune_steps"]
    assert trial.state == optuna.trial.TrialState.COMPLETE and 0 < steps < 20_000
    assert trial.user_attrs["finetune_cut"] == f"stopped at step {steps} of 20000: the run's timeout"
    assert str(steps) in trial.user_attrs["finetune_curve"]
    assert (Path(trial.user_attrs["artifacts"]) / "model.onnx").exists()
    assert search.load_trials(study).loc[0, "finetune_cut"] == trial.user_attrs["finetune_cut"]


def test_plans_quantize_matmul_inputs_per_call_unless_the_target_takes_static_int8_only(
    tiny_task, fast_profiler, tmp_path, monkeypatch
):
    """ONNX Runtime quantizes a MatMul's input per call, TensorRT only statically: the study builds
    its plans' quantizers as the target's runtime runs them."""
    from search.study import _objective
    from search.study._scoring import int8_static_only
    from targets import load_target

    given, add = [], _objective.add_compression

    def add_compression(model, plan, example_input, **kwargs):
        given.append(kwargs)
        return add(model, plan, example_input, **kwargs)

    monkeypatch.setattr(_objective, "add_compression", add_compression)
    run(tiny_task, trials=2, profiler=fast_profiler, results_dir=tmp_path, **FAST)
    assert given == [{"dynamic_matmuls": True}] * 2
    assert not int8_static_only(load_target("cpu")) and int8_static_only(load_target("jetson"))


def test_every_plan_is_built_with_the_teachers_activity_measured_once(
    tiny_task, fast_profiler, tmp_path, activities_built_with
):
    """The trials rank a Transformer's heads and FFN channels by Task.activity, and refit by it."""
    given = activities_built_with
    run(tiny_task, trials=2, profiler=fast_profiler, results_dir=tmp_path, **FAST)
    assert len(given) == 2 and all(activity is tiny_task.activity() for activity in given)


def test_a_plan_over_the_budget_is_measured_but_never_fine_tuned(tiny_task, fast_profiler, tmp_path, monkeypatch):
    """Latency does not depend on the fine-tuned weights: a plan measured over the budget is scored
    as it is, and no fine-tune starts."""
    from search.compress import Distillation

    def refuse(*args, **kwargs):
        raise AssertionError("an over-budget plan was fine-tuned")

    monkeypatch.setattr(Distillation, "run", refuse)
    study = run(tiny_task, budget="1us", trials=2, profiler=fast_profiler, results_dir=tmp_path, **FAST)
    for trial in study.trials:
        assert trial.state == optuna.trial.TrialState.COMPLETE
        assert trial.user_attrs["finetune_steps"] == 0 and trial.user_attrs["finetune_skipped"] == "measured over the budget"
        assert 0.0 <= trial.user_attrs["metric"] <= 1.0 and trial.constraints["latency_over_budget_ms"] > 0


def test_the_exported_file_is_the_fine_tuned_one_and_export_scores_it_again(tiny_task, fast_profiler, tmp_path):
    """Measured before the fine-tune, the trial's file is written again with the fine-tuned weights:
    its metric is what the study recorded, and search.export scores it once more."""
    study = run(tiny_task, trials=2, profiler=fast_profiler, results_dir=tmp_path, **FAST)
    exported = search.export(study, tmp_path / "deploy", profiler=fast_profiler, task=tiny_task)
    assert len(exported) >= 1
    for _, row in exported.iterrows():
        assert row["export_metric"] == pytest.approx(row["metric"], abs=1e-9)
    for trial in study.trials:
        assert trial.user_attrs["finetune_steps"] == 6
        if trial.user_attrs["metric_torch"] is not None:  # the kept state was scored in PyTorch
            assert trial.user_attrs["metric"] == pytest.approx(trial.user_attrs["metric_torch"], abs=0.02)


class _Slowed(OnnxRuntimeCpuProfiler):
    """The teacher at 2 ms; each plan's first measurement slowed to ``first`` ms (a busy host),
    any later one 0.9 ms."""

    def __init__(self, first: float) -> None:
        super().__init__(load_target("cpu"), warmup_runs=1, warmup_s=0.0, min_runs=2, min_time_s=0.0, max_time_s=0.1)
        self.first, self.seen = first, []

    def measure(self, onnx_path, inputs=None):
        path = Path(onnx_path)
        latency = 2.0 if path.parent.name == "baseline" else self.first if path not in self.seen else 0.9
        self.seen.append(path)
        return dataclasses.replace(super().measure(onnx_path, inputs), latency_ms=latency)


@pytest.mark.parametrize(("first", "measured", "tuned"), [(1.05, 2, True), (1.2, 1, False), (0.95, 1, True)])
def test_a_plan_measured_just_over_the_budget_is_measured_again(tiny_task, tmp_path, first, measured, tuned):
    """Over the 1 ms budget by at most a tenth, a plan is measured once more and the faster kept
    (then it is within the budget, and fine-tuned); further over, or within it, once."""
    profiler = _Slowed(first)
    study = run(tiny_task, budget="1ms", trials=1, profiler=profiler, results_dir=tmp_path, **FAST)
    trial = study.trials[0]
    plan_seen = [path for path in profiler.seen if path.parent.name != "baseline"]  # the teacher: first and last
    assert trial.user_attrs["latency_measurements"] == measured and len(plan_seen) == measured
    assert trial.user_attrs["latency_ms"] == (0.9 if measured == 2 else first)
    assert (trial.user_attrs["finetune_steps"] > 0) == tuned
    assert search.load_trials(study)["latency_measurements"].tolist() == [measured]
