"""Many workers on one study, crash recovery and resuming: the trial count, retries, dead workers,
worker processes on PostgreSQL, SIGKILL and Ctrl-C mid-trial."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnxruntime as ort
import optuna
import pytest
import torch
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

import search
from profilers import get_profiler
from search import Finetune, SearchSpace, UsageError, run
from search.study import make_storage, work
from search.study._workers import (
    RetryOnce,
    Surplus,
    _start_time,
    claim_slot,
    counted,
    fail_dead_trials,
    finished_count,
    spawn_workers,
    this_worker,
    threads_per_worker,
)
from targets import load_target

TESTS = Path(__file__).resolve().parent
FAST = dict(
    finetune=Finetune(steps=6, eval_every=3), pruner=optuna.pruners.NopPruner(), cost_model=False, recipes=False,
    sensitivity=False,
)


def _study(tmp_path, name="s") -> optuna.Study:
    return optuna.create_study(storage=make_storage(f"sqlite:///{tmp_path / 'study.db'}"), study_name=name)


def _running(study: optuna.Study, **user_attrs) -> optuna.trial.FrozenTrial:
    trial = study.ask({"x": FloatDistribution(0, 1)})
    for key, value in user_attrs.items():
        trial.set_user_attr(key, value)
    return study.get_trials(deepcopy=False)[trial.number]


def _tolerant_profiler(**timing):
    """Short timing that settles on a busy 2-core machine: numbers for plumbing, not for claims."""
    knobs = dict(warmup_runs=2, warmup_s=0.01, min_runs=20, min_time_s=0.02, max_time_s=0.5, tolerance=0.5)
    return get_profiler(load_target("cpu"), **{**knobs, **timing})


def test_a_retried_trial_starts_clean_counts_once_and_is_retried_only_once(tmp_path):
    study = _study(tmp_path)
    first = _running(study, stage="fine-tune", fail_reason="x")
    study.tell(first.number, state=TrialState.FAIL)
    RetryOnce()(study, study.trials[first.number])
    retry = study.trials[-1]
    assert retry.state == TrialState.WAITING and retry.params == first.params
    assert retry.user_attrs == {} and retry.system_attrs["failed_trial"] == first.number
    assert [t.number for t in counted(study.trials)] == [retry.number]

    popped = study.ask()  # the retry, with the failed trial's plan
    assert popped.number == retry.number and popped.params == first.params
    study.tell(popped, state=TrialState.FAIL)
    RetryOnce()(study, study.trials[popped.number])
    assert len(study.trials) == 2  # max one retry
    assert finished_count(study) == 1


def test_when_two_trials_want_the_last_slot_the_later_gives_way(tmp_path):
    study = _study(tmp_path)
    first, second, third = (study.ask() for _ in range(3))
    for trial in (first, second):
        claim_slot(study, trial, trials=2)
    with pytest.raises(Surplus):
        claim_slot(study, third, trials=2)
    study.tell(third, state=TrialState.FAIL)
    assert study.trials[2].user_attrs["surplus"] is True
    assert "already held its 2 trials" in study.trials[2].user_attrs["fail_reason"]
    assert [t.number for t in counted(study.trials)] == [0, 1]


def test_a_dead_local_worker_s_trial_is_failed_and_retried_at_once(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    record = {**this_worker(), "pid": dead.pid, "started": _start_time(dead.pid)}
    dead.kill()
    dead.wait()
    study = _study(tmp_path)
    orphan = _running(study, worker=record, stage="measure")
    alive = _running(study, worker=this_worker())
    elsewhere = _running(study, worker={**record, "host": "another-host"})

    assert fail_dead_trials(study) == [orphan.number]
    states = {t.number: t.state for t in study.trials}
    assert states[orphan.number] == TrialState.FAIL
    assert states[alive.number] == states[elsewhere.number] == TrialState.RUNNING  # heartbeats decide there
    retry = study.trials[-1]
    assert retry.state == TrialState.WAITING and retry.system_attrs["failed_trial"] == orphan.number
    reason = search.load_trials(study).set_index("number").loc[orphan.number, "fail_reason"]
    assert reason == f"its worker stopped (killed, crashed or lost) during measure; retried as trial {retry.number}"


def test_a_plan_already_evaluated_is_not_evaluated_again(tiny_task, fast_profiler, tmp_path):
    one_plan = SearchSpace(width=(1.0,), pruning=(0.0,), bits=(8,), sparsity=(0.0,), two_four=False)
    study = run(tiny_task, trials=2, space=one_plan, profiler=fast_profiler, results_dir=tmp_path, **FAST)
    first, second = study.trials
    assert first.state == second.state == TrialState.COMPLETE
    assert second.user_attrs["duplicate_of"] == 0 and second.values == first.values
    assert second.user_attrs["artifacts"] == first.user_attrs["artifacts"]
    assert second.user_attrs["plan"] == first.user_attrs["plan"]
    assert not (tmp_path / study.study_name / "trials" / "00001").exists()  # nothing built for it
    frame = search.load_trials(study).set_index("number")
    assert frame.loc[1, "duplicate_of"] == 0 and not frame.loc[1, "pareto"]


def test_workers_need_a_task_they_can_load(tiny_task, tmp_path):
    with pytest.raises(UsageError, match="module:function"):
        run(tiny_task, workers=2, results_dir=tmp_path)
    study = run(tiny_task, trials=1, profiler=_tolerant_profiler(), results_dir=tmp_path, **FAST)
    with pytest.raises(UsageError, match="not started with a .module:function. task.*join it with search.run"):
        work(tmp_path / study.study_name)


def test_a_worker_with_another_teacher_is_refused(worker_env, tmp_path, monkeypatch):
    study = run(worker_env, trials=1, profiler=_tolerant_profiler(), results_dir=tmp_path, **FAST)
    other = tmp_path / "other.pt"
    torch.save({k: v + 0.01 for k, v in worker_env.model.state_dict().items()}, other)
    monkeypatch.setenv("SEARCH_TEST_TEACHER", str(other))
    with pytest.raises(UsageError, match="same trained teacher"):
        work(tmp_path / study.study_name)


def test_a_worker_on_a_machine_that_measures_otherwise_is_refused(worker_env, tmp_path):
    study = run(worker_env, trials=1, profiler=_tolerant_profiler(), results_dir=tmp_path, **FAST)
    baseline = study.user_attrs["baseline"]
    measurement = {**baseline["measurement"], "runtime_version": "0.1"}  # the teacher measured by another ORT
    study.set_user_attr("baseline", {**baseline, "measurement": measurement})
    with pytest.raises(UsageError, match=r"runtime 'onnxruntime-cpu .+' here, 'onnxruntime-cpu 0\.1' for the study"):
        work(tmp_path / study.study_name)
    assert len(study.trials) == 1  # refused before any trial


def test_a_late_worker_uses_the_study_s_baseline_and_its_cost_model_so_far(worker_env, tmp_path):
    kwargs = {**FAST, "cost_model": True}
    study = run(worker_env, trials=1, budget="2x", profiler=_tolerant_profiler(), results_dir=tmp_path, **kwargs)
    baseline = study.user_attrs["baseline"]
    measured = study.trials[0]
    for i in range(11):  # measurements other workers made: the model needs 5 before it predicts
        features = {k: v * (1 + 0.05 * i) for k, v in measured.user_attrs["cost_features"].items()}
        latency = measured.user_attrs["latency_ms"] * (1 + 0.05 * i)
        study.add_trial(
            optuna.create_trial(
                state=TrialState.COMPLETE, values=[measured.values[0], latency],
                user_attrs={"cost_features": features, "latency_ms": latency,
                            # the same machine and feature layout
                            **{key: measured.user_attrs[key] for key in ("runtime", "device", "cost_feature_version")}},
            )
        )  # fmt: skip
    study.set_user_attr("run_spec", {**study.user_attrs["run_spec"], "trials": 13})
    # A plan other than trial 0's: the same plan would reuse its results, which hold no prediction.
    name, choices = next((n, d.choices) for n, d in measured.distributions.items() if hasattr(d, "choices"))
    study.enqueue_trial({**measured.params, name: next(c for c in choices if c != measured.params[name])})

    joined = work(tmp_path / study.study_name, results_dir=tmp_path / "elsewhere")
    late = joined.trials[-1]
    assert late.params != measured.params
    assert late.state in (TrialState.COMPLETE, TrialState.PRUNED) and finished_count(joined) == 13
    assert late.user_attrs["predicted_source"] == "predicted:cost-model(n=12)"
    assert "predicted_energy_mj" not in late.user_attrs  # estimated energy never trains a model
    assert joined.user_attrs["baseline"] == baseline
    assert not (tmp_path / "elsewhere" / study.study_name / "baseline").exists()  # not measured again


@pytest.mark.postgres
@pytest.mark.slow
def test_four_workers_share_one_postgresql_study(worker_env, postgres_url, tmp_path):
    study = run(
        worker_env, trials=10, workers=4, storage=postgres_url, study_name="four", profiler=_tolerant_profiler(),
        results_dir=tmp_path, finetune=Finetune(steps=30, eval_every=10), pruner=optuna.pruners.NopPruner(),
        cost_model=False,
    )  # fmt: skip
    trials = study.get_trials(deepcopy=False)
    assert all(t.state.is_finished() for t in trials), [t.state for t in trials]  # none RUNNING or WAITING
    extra = [t for t in trials if t.user_attrs.get("surplus")]
    assert all(t.state == TrialState.FAIL for t in extra)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    # A plan that builds the model another worker is running (width 0.5 and prune 0.5) is pruned.
    copies = [t for t in trials if t.state == TrialState.PRUNED and t.user_attrs.get("pruned_by") == "duplicate"]
    finished = len(complete) + len(copies)
    assert finished == finished_count(study) == 10, [t.user_attrs.get("fail_reason") for t in trials]
    evaluated = [tuple(sorted(t.params.items())) for t in complete if "duplicate_of" not in t.user_attrs]
    assert len(evaluated) == len(set(evaluated))  # no plan fine-tuned and measured twice
    assert len({t.user_attrs["worker"]["pid"] for t in complete}) >= 2
    assert sorted(p.name for p in (tmp_path / "four" / "workers").iterdir()) == ["1.log", "2.log", "3.log"]

    frame = search.load_trials(postgres_url, "four")
    assert (frame["state"] == "COMPLETE").sum() == len(complete)
    exported = search.export(postgres_url, tmp_path / "deploy", study_name="four", profiler=_tolerant_profiler())
    assert len(exported) == frame["pareto"].sum() > 0
    assert all(Path(p).exists() for p in exported["path"])


def _wait_for_stage(database: Path, stage: str, process: subprocess.Popen, limit_s: float = 240) -> int:
    """The number of the trial that reached ``stage`` in the study that ``process`` runs."""
    start = time.monotonic()
    while time.monotonic() - start < limit_s:
        assert process.poll() is None, process.stdout.read()
        # Opening a storage creates its tables: wait until the process has made them (it has once
        # it exported the baseline), or both would.
        if (database.parent / "baseline" / "model.onnx").exists():
            for name in optuna.get_all_study_names(f"sqlite:///{database}"):
                study = optuna.load_study(study_name=name, storage=f"sqlite:///{database}")
                for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                    if trial.user_attrs.get("stage") == stage:
                        return trial.number
        time.sleep(0.2)
    raise AssertionError(f"no trial reached {stage} in {limit_s} s")


KILLED_RUN = """
import optuna, search
from profilers import get_profiler
from targets import load_target
slow = {stage!r}
timing = dict(warmup_runs=2, warmup_s=0.01, min_runs=20, min_time_s=0.02, max_time_s=0.5, tolerance=0.5)
if slow == "measure":
    timing.update(min_time_s=300, max_time_s=300)
if slow == "export":  # the trial's file is half written when the process dies
    import time, search.artifacts as artifacts
    real = artifacts.export_candidate
    def export_candidate(*args, **kwargs):
        exported = real(*args, **kwargs)
        if exported.path.name == "model.onnx":  # not the layer-sensitivity pass's files
            exported.path.write_bytes(exported.path.read_bytes()[:100])
            time.sleep(300)
        return exported
    artifacts.export_candidate = export_candidate
search.run(
    search.load_task("worker_task:tiny"), trials=3, results_dir={results!r}, study_name="killed",
    profiler=get_profiler(load_target("cpu"), **timing), cost_model=False, pruner=optuna.pruners.NopPruner(),
    finetune=search.Finetune(steps=10**6 if slow == "fine-tune" else 6, eval_every=10**6),
)
"""


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["fine-tune", "export", "measure"])
def test_a_run_killed_mid_trial_resumes_with_that_plan_retried_and_nothing_lost(worker_env, tmp_path, stage):
    kwargs = dict(profiler=_tolerant_profiler(), results_dir=tmp_path, study_name="killed", **FAST)
    before = run(worker_env, trials=1, **kwargs).trials[0]
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_RUN.format(stage=stage, results=str(tmp_path))],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        killed = _wait_for_stage(tmp_path / "killed" / "study.db", stage, process)
    finally:
        process.kill()
        process.wait()

    study = run(worker_env, trials=3, **kwargs)
    trials = study.get_trials(deepcopy=False)
    assert trials[0].values == before.values and trials[0].user_attrs == before.user_attrs
    ort.InferenceSession(str(Path(before.user_attrs["artifacts"]) / "model.onnx"))  # its files are intact
    assert trials[killed].state == TrialState.FAIL
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == killed)
    assert retry.params == trials[killed].params and retry.state == TrialState.COMPLETE
    frame = search.load_trials(study).set_index("number")
    assert frame.loc[killed, "fail_reason"] == (
        f"its worker stopped (killed, crashed or lost) during {stage}; retried as trial {retry.number}"
    )
    assert frame.loc[retry.number, "retry_of"] == killed
    ort.InferenceSession(str(Path(retry.user_attrs["artifacts"]) / "model.onnx"))  # its own, whole file
    assert finished_count(study) == 3 and all(t.state.is_finished() for t in trials)


def _default_sigint() -> None:
    """In the child, before exec: SIGINT as a terminal gives it. In a full-suite run this process's
    SIGINT was once ignored or blocked (by a library; not found), the child inherited that, and a
    run that never saw the Ctrl-C went on fine-tuning (the faulthandler dump below showed it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])


@pytest.mark.slow
def test_ctrl_c_marks_the_running_trial_and_the_same_command_resumes(worker_env, tmp_path):
    command = [
        sys.executable, "-X", "faulthandler", "-m", "search", "run", "--task", "worker_task:tiny", "--trials", "2",
        "--steps", "1000000", "--cost-model", "off", "--no-pruner", "--results-dir", str(tmp_path),
        "--study-name", "stopped",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=_default_sigint
    )
    try:
        number = _wait_for_stage(tmp_path / "stopped" / "study.db", "fine-tune", process)
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)  # faulthandler prints where every thread is stuck
        raise AssertionError("Ctrl-C did not stop the run in 60 s:\n" + process.communicate()[0]) from None
    finally:
        process.kill()
    assert process.returncode == 130, output
    assert "Run the same command again to resume" in output

    study = optuna.load_study(study_name="stopped", storage=f"sqlite:///{tmp_path}/stopped/study.db")
    interrupted = study.trials[number]
    assert interrupted.state == TrialState.FAIL and interrupted.user_attrs["interrupted"] is True
    queued = study.trials[-1]
    assert queued.state == TrialState.WAITING and queued.params == interrupted.params

    resumed = run(
        worker_env, trials=2, profiler=_tolerant_profiler(), results_dir=tmp_path, study_name="stopped", **FAST
    )
    frame = search.load_trials(resumed).set_index("number")
    assert frame.loc[number, "fail_reason"] == f"interrupted during fine-tune; retried as trial {queued.number}"
    assert resumed.trials[queued.number].state == TrialState.COMPLETE
    assert finished_count(resumed) == 2


def test_local_workers_measure_through_the_same_profiler_service(monkeypatch, tmp_path):
    started = []

    class Popen:
        def __init__(self, command, stdout, stderr, env):
            started.append((command, env))

    monkeypatch.setattr("search.study._workers.subprocess.Popen", Popen)
    spawn_workers(2, "sqlite:///x.db", "s", tmp_path, 7, "device:8765", {"SEARCH_PROFILER_TOKEN": "T"})
    (first, env), (second, _) = started
    assert first[1:4] == ["-m", "search", "worker"] and first[first.index("--profiler") + 1] == "device:8765"
    assert env["SEARCH_PROFILER_TOKEN"] == "T"
    assert [c[c.index("--seed") + 1] for c, _ in started] == ["8", "9"]  # a seed of its own each
    assert sorted(p.name for p in (tmp_path / "s" / "workers").iterdir()) == ["1.log", "2.log"]
    assert "--timeout" not in first  # a run without one: the workers have none either


def test_local_workers_stop_where_the_run_does(monkeypatch, tmp_path):
    """The seconds the run has left are each worker's timeout: its fine-tune stops with the run's."""
    started = []
    monkeypatch.setattr(
        "search.study._workers.subprocess.Popen", lambda command, stdout, stderr, env: started.append(command)
    )
    spawn_workers(2, "sqlite:///x.db", "s", tmp_path, 7, None, {}, 41.5)
    assert [c[c.index("--timeout") + 1] for c in started] == ["41.500", "41.500"]


def test_a_run_s_local_workers_get_the_time_it_has_left(worker_env, tmp_path, monkeypatch):
    from search.study import _run

    given = []
    monkeypatch.setattr(_run, "spawn_workers", lambda *args: given.append(args[-1]) or [])
    run(worker_env, trials=1, workers=2, timeout=300, profiler=_tolerant_profiler(), results_dir=tmp_path, **FAST)
    assert len(given) == 1 and 0 < given[0] < 300  # the baseline's time is spent already


def test_local_workers_share_the_cores_out(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    assert [threads_per_worker(n) for n in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]
