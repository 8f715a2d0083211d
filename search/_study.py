"""``search.run``: one Optuna study over compression plans, every candidate built and measured for real."""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import optuna
import torch
from optuna.storages import RDBStorage
from optuna.study import StudyDirection
from optuna.trial import TrialState

from profilers import Profiler, RemoteProfiler, get_profiler
from profilers._service import TIMING_KNOBS
from search._budget import Budget, parse_budget
from search._costgate import CostGate
from search._costmodel import plan_features
from search._distill import Finetune, distill
from search._errors import CandidateError, SearchError, UsageError
from search._export import OnnxModule, export_candidate, export_float
from search._layers import LayerInfo, compressible_layers, describe_layers
from search._plan import Plan
from search._quant import bake
from search._results import locate_study, storage_url, write_parquet
from search._size import packed_size_bytes
from search._space import SearchSpace, suggest_plan
from search._task import Task, task_of_study
from search._transformer import EncoderBlocks, find_blocks
from search._transforms import apply_plan
from search._workers import (
    WORKER_ATTR,
    RetryOnce,
    Surplus,
    claim_slot,
    measuring_alone,
    retry_interrupted,
    spawn_workers,
    stop_workers,
    this_worker,
    threads_per_worker,
    work_loop,
)
from targets import Target, load_target

# objective name (--objectives) -> (study metric name and trial user attr, direction)
OBJECTIVES = {
    "metric": ("metric", StudyDirection.MAXIMIZE),
    "latency": ("latency_ms", StudyDirection.MINIMIZE),
    "energy": ("energy_mj", StudyDirection.MINIMIZE),
    "size": ("size_bytes", StudyDirection.MINIMIZE),
}
SAMPLERS = ("tpe", "nsga2", "random")
STAGES = ("build", "fine-tune", "export", "evaluate", "measure")
HEARTBEAT_S = 30
LAYER_TIMES_KEPT = 20  # slowest layers recorded on a trial; a large model has hundreds
BASELINE_TRIES = 3  # measurements of the teacher before an unsettled one stops the run
BASELINE_WAIT_S = 600  # how long a joining worker waits for the first process to measure the teacher
OutOfMemory = (MemoryError, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError))

StageCallback = Callable[[int, str], None]


def _check_objectives(objectives: Sequence[str]) -> tuple[str, ...]:
    objectives = tuple(objectives)
    unknown = [o for o in objectives if o not in OBJECTIVES]
    if unknown or not objectives or len(set(objectives)) != len(objectives):
        raise UsageError(
            f"objectives {','.join(objectives)!r}: expected distinct names from {', '.join(OBJECTIVES)}"
        )
    return objectives


def _sampler(name: str, seed: int | None) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        # Categorical, conditional space, a few hundred trials at most: what AutoSampler picks too.
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise UsageError(f"sampler {name!r}: expected one of {', '.join(SAMPLERS)}")


def _storage(url: str) -> optuna.storages.BaseStorage:
    url = storage_url(url)
    if url.startswith(("sqlite:", "postgresql", "mysql")):
        # Heartbeats: a trial whose process died is failed and its plan retried once.
        return RDBStorage(
            url,
            heartbeat_interval=HEARTBEAT_S,
            grace_period=4 * HEARTBEAT_S,
            heartbeat_stale_trial_callback=RetryOnce(),
        )
    return optuna.storages.get_storage(url)


def _curve_trial(trial: optuna.trial.FrozenTrial | None, curve: dict | None = None) -> optuna.trial.FrozenTrial:
    """A trial as a single-objective pruner sees it: its fine-tune curve of the metric, nothing else."""
    curve = curve if curve is not None else trial.user_attrs.get("finetune_curve", {})
    return optuna.trial.create_trial(
        state=TrialState.RUNNING if trial is None else trial.state,
        values=trial.values if trial is not None and trial.state == TrialState.COMPLETE else None,
        intermediate_values={int(step): value for step, value in curve.items()},
    )


class _MetricView:
    """The study as Optuna's single-objective pruners see it: the metric's fine-tune curves, maximised.

    Optuna's pruners, and ``Trial.report``, reject multi-objective studies (and intermediate values
    stored in one break TPE's handling of pruned trials), so the curves live in a user attr and the
    pruner judges them here. A fine-tune that is hopeless is hopeless on the metric, whatever its latency.
    """

    direction = StudyDirection.MAXIMIZE

    def __init__(self, study: optuna.Study) -> None:
        self._study = study

    def get_trials(self, deepcopy: bool = False, states=None) -> list[optuna.trial.FrozenTrial]:
        return [_curve_trial(t) for t in self._study.get_trials(deepcopy=False, states=states)]


def _report_and_maybe_prune(study: optuna.Study, trial: optuna.Trial, curve: dict, step: int, value: float) -> None:
    curve[str(step)] = value
    trial.set_user_attr("finetune_curve", curve)
    if study.pruner.prune(_MetricView(study), _curve_trial(None, curve)):
        reason = f"metric {value:.4f} at fine-tune step {step} is below the pruner's bar"
        trial.set_user_attr("pruned_by", "pruner")
        trial.set_user_attr("pruned_reason", reason)
        raise optuna.TrialPruned(reason)


@dataclasses.dataclass
class _Search:
    """Everything one worker's objective needs, built once before its first trial."""

    task: Task
    target: Target
    profiler: Profiler
    space: SearchSpace
    layers: list[LayerInfo]
    blocks: EncoderBlocks | None  # a Transformer's blocks, heads and FFN layers; None for a CNN
    objectives: tuple[str, ...]
    finetune: Finetune
    budget_ms: float | None
    directory: Path
    seed: int
    on_stage: StageCallback
    gate: CostGate | None
    trials: Callable[[], int]
    current: int | None = None  # the number of the trial this worker runs or ran last

    def objective(self, study: optuna.Study, trial: optuna.Trial) -> tuple[float, ...]:
        self.current = trial.number
        trial.set_user_attr(WORKER_ATTR, this_worker())
        claim_slot(study, trial, self.trials())
        try:
            return self._evaluate(study, trial)
        except CandidateError as exc:
            trial.set_user_attr("fail_reason", f"{exc} (during {trial.user_attrs.get('stage', 'build')})")
            raise
        except OutOfMemory as exc:
            reason = f"out of memory: {exc} (during {trial.user_attrs.get('stage', 'build')})"
            trial.set_user_attr("fail_reason", reason)
            raise CandidateError(reason) from exc
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            trial.set_user_attr("fail_reason", f"interrupted during {trial.user_attrs.get('stage', 'build')}")
            raise

    def _stage(self, trial: optuna.Trial, stage: str, seconds: dict) -> None:
        seconds[stage] = time.perf_counter()
        trial.set_user_attr("stage", stage)  # what a crashed trial was doing
        self.on_stage(trial.number, stage)

    def _veto_if_over_budget(self, study: optuna.Study, trial: optuna.Trial, features: dict) -> None:
        """Skip fine-tuning and measuring a plan the cost model predicts over the budget, with too
        little expected headroom under it to be worth it (:meth:`CostGate.veto_reason`)."""
        prediction = self.gate.predict(study, features, self.budget_ms)
        if prediction is None:
            return
        for key, value in prediction.items():
            trial.set_user_attr(key, value)
        reason = self.gate.veto_reason(prediction, self.budget_ms)
        if reason is not None:
            trial.set_user_attr("pruned_by", "cost-model")
            trial.set_user_attr("pruned_reason", reason)
            # TPE ranks a pruned trial with no constraint above every infeasible one: while few measured
            # plans fit the budget, it would steer towards the vetoed plans. Made infeasible, the trial
            # is ranked as its measurement would have ranked it (the constraint is labelled predicted).
            over = prediction["predicted_latency_ms"] - self.budget_ms
            trial.set_constraint("predicted_latency_over_budget_ms", over)
            raise optuna.TrialPruned(reason)

    def _evaluate(self, study: optuna.Study, trial: optuna.Trial) -> tuple[float, ...]:
        task, seconds = self.task, {}
        plan = suggest_plan(trial, self.space, self.layers, self.blocks)
        same = _same_plan(study, trial)
        if same is not None:
            return self._reuse(study, trial, same)
        trial.set_user_attr("plan", plan.to_dict())
        self._stage(trial, "build", seconds)
        torch.manual_seed(self.seed + trial.number)
        task.reseed(self.seed + trial.number)
        candidate = apply_plan(task.model, plan, task.example_input)
        layers = compressible_layers(candidate)
        trial.set_user_attr("channels", {name: int(m.weight.shape[0]) for name, m in layers.items()})
        features = plan_features(candidate, plan, task.example_input, self.target)
        trial.set_user_attr("cost_features", features)
        if self.gate is not None:
            self._veto_if_over_budget(study, trial, features)

        self._stage(trial, "fine-tune", seconds)

        curve: dict[str, float] = {}

        def on_eval(step: int) -> None:
            _report_and_maybe_prune(study, trial, curve, step, task.score(candidate))

        losses = distill(
            candidate, task.model, task.train, self.finetune, on_eval, loss=task.distill_loss, output=task.output
        )
        trial.set_user_attr("finetune_loss_first_last", [losses[0], losses[-1]] if losses else [])
        metric_torch = task.score(candidate)
        bake(candidate)

        self._stage(trial, "export", seconds)
        trial_dir = self.directory / "trials" / f"{trial.number:05d}"
        trial_dir.mkdir(parents=True, exist_ok=True)
        exported = export_candidate(
            candidate, task.example_input, trial_dir / "model.onnx",
            plan=plan, precisions=self.target.precisions, calibration=task.calibration or task.train,
            symmetric=self.target.runtime == "tensorrt", output=task.output,
        )  # fmt: skip
        (trial_dir / "plan.json").write_text(plan.to_json())
        torch.save({"plan": plan.to_json(), "state_dict": candidate.state_dict()}, trial_dir / "checkpoint.pt")

        self._stage(trial, "evaluate", seconds)
        metric = task.score(OnnxModule(exported.path))
        if not math.isfinite(metric):
            raise CandidateError(f"metric is {metric} on the exported model")

        self._stage(trial, "measure", seconds)
        with measuring_alone(self.target.name):
            measurement = self.profiler.measure_candidate(
                exported.path, candidate, task.example_input, plan.student()
            )
        seconds["end"] = time.perf_counter()
        if not measurement.stable:
            raise CandidateError(
                f"latency did not stabilise: in the fastest of {len(measurement.session_medians_ms) or 1} "
                f"sessions the median still moved after {self.profiler.max_time_s:g} s (spread "
                f"{measurement.spread:.1%}); is the machine busy?"
            )

        stages = list(seconds)
        record = {
            "metric": metric,
            "metric_source": "measured:exported-onnx",
            "metric_torch": metric_torch,
            "latency_ms": measurement.latency_ms,
            "latency_p90_ms": measurement.latency_p90_ms,
            "latency_runs": measurement.runs,
            "latency_spread": measurement.spread,
            "latency_stable": measurement.stable,
            "latency_session_medians_ms": list(measurement.session_medians_ms),
            "latency_quiet_share": measurement.quiet_share,
            "latency_source": f"{measurement.source}:{measurement.runtime}",
            "energy_mj": measurement.energy_mj,
            "energy_source": measurement.energy_source,
            "size_bytes": packed_size_bytes(candidate, plan),
            "size_source": "counted:packed-bits",
            "onnx_bytes": exported.onnx_bytes,
            "precision": measurement.precision,
            "layer_precision": dict(exported.layer_precision),
            "runtime": f"{measurement.runtime} {measurement.runtime_version}",
            "measured_on": measurement.device.get("host", socket.gethostname()),
            "device": measurement.to_dict()["device"],
            # The runtime's per-layer times (TensorRT), slowest first: why a plan is not faster.
            "layer_times": measurement.to_dict()["layers"][:LAYER_TIMES_KEPT],
            "artifacts": str(trial_dir),
            "seconds": {s: round(seconds[n] - seconds[s], 3) for s, n in zip(stages, stages[1:])},
        }
        for key, value in record.items():
            trial.set_user_attr(key, value)
        if self.budget_ms is not None:
            trial.set_constraint("latency_over_budget_ms", measurement.latency_ms - self.budget_ms)
        return tuple(record[OBJECTIVES[o][0]] for o in self.objectives)

    def _reuse(self, study: optuna.Study, trial: optuna.Trial, same: optuna.trial.FrozenTrial) -> tuple[float, ...]:
        """A plan some trial already evaluated: its results, not a second fine-tune and measurement.

        A plan another worker is evaluating right now is pruned instead (its result is not known yet).
        """
        if same.state == TrialState.RUNNING:
            trial.set_user_attr("pruned_by", "duplicate")
            trial.set_user_attr("pruned_reason", f"same plan as trial {same.number}, running in another worker")
            raise optuna.TrialPruned(f"same plan as running trial {same.number}")
        for key, value in same.user_attrs.items():
            if key not in (WORKER_ATTR, "stage"):
                trial.set_user_attr(key, value)
        trial.set_user_attr("duplicate_of", same.number)
        for key, value in same.constraints.items():
            trial.set_constraint(key, value)
        return tuple(same.values)


def _same_plan(study: optuna.Study, trial: optuna.Trial) -> optuna.trial.FrozenTrial | None:
    """An earlier trial, completed or running, with exactly this trial's parameters."""
    for other in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)):
        if other.number != trial.number and other.params == trial.params and "duplicate_of" not in other.user_attrs:
            return other
    return None


def _baseline(task: Task, target: Target, profiler: Profiler, directory: Path) -> dict:
    """The uncompressed teacher exported as fp32, scored and measured on the target, once per study."""
    path = directory / "baseline" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        export_float(task.model, task.example_input, path, task.output)
    except CandidateError as exc:
        raise UsageError(f"the task's model cannot be exported to ONNX: {exc}") from exc
    with measuring_alone(target.name):
        for _ in range(BASELINE_TRIES):
            measurement = profiler.measure_candidate(path, task.model, task.example_input)
            if measurement.stable:
                break
        else:
            raise UsageError(
                f"the teacher's latency did not stabilise in {BASELINE_TRIES} measurements (spread "
                f"{measurement.spread:.1%}); the budget and every speedup are relative to it. Measure on a "
                "quieter machine, or with a longer --profiler timing"
            )
    return {
        "metric": task.score(OnnxModule(path)),
        "latency_ms": measurement.latency_ms,
        "latency_p90_ms": measurement.latency_p90_ms,
        "energy_mj": measurement.energy_mj,
        "energy_source": measurement.energy_source,
        "size_bytes": packed_size_bytes(task.model, Plan()),
        "onnx": str(path),
        "measurement": measurement.to_dict(),
    }


def _claim(study: optuna.Study, key: str, value, hint: str | None = None) -> None:
    """Record a setting on a new study; refuse to resume or join one made with another setting."""
    stored = study.user_attrs.get(key)
    if stored is None:
        study.set_user_attr(key, value)
    elif stored != value:
        raise UsageError(
            f"study {study.study_name!r} was made with {key} {stored!r}, not {value!r}; "
            + (hint or "resume it with the same settings or choose another --study-name")
        )


def _claim_teacher(study: optuna.Study, task: Task) -> None:
    """Every process of a study compresses the same teacher: the first records its weights' sha256."""
    _claim(
        study, "teacher_sha256", task.fingerprint(),
        "every worker must load the same trained teacher (copy its weights file to this machine)",
    )  # fmt: skip


def default_study_name(task: Task, target: Target) -> str:
    return f"{task.name}-{target.name}"


def _pruner(name: str, finetune: Finetune) -> optuna.pruners.BasePruner:
    if name == "none":
        return optuna.pruners.NopPruner()
    # Keep the top 80 %: prune a fine-tune whose metric from half-way on is in the bottom fifth.
    return optuna.pruners.PercentilePruner(80.0, n_startup_trials=8, n_warmup_steps=finetune.steps // 2)


def _pruner_name(pruner: optuna.pruners.BasePruner | None) -> str:
    if pruner is None:
        return "percentile"
    return "none" if isinstance(pruner, optuna.pruners.NopPruner) else "custom"


def _trials_wanted(study: optuna.Study) -> Callable[[], int]:
    """The study's ``--trials``, read afresh: a later ``search run --trials N`` raises it for every worker."""
    return lambda: study.user_attrs["run_spec"]["trials"]


def _work(study: optuna.Study, search: _Search, timeout: float | None, callbacks: Sequence[Callable]) -> None:
    """This process's share of the study's trials; Ctrl-C queues the interrupted trial to run again."""
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        work_loop(
            study,
            lambda: study.optimize(
                lambda trial: search.objective(study, trial),
                n_trials=1,
                catch=(CandidateError, Surplus),
                callbacks=list(callbacks),
            ),
            search.trials,
            deadline,
        )
    except KeyboardInterrupt:
        retry_interrupted(study, search.current)
        raise


def _searcher(
    study: optuna.Study,
    task: Task,
    target: Target,
    profiler: Profiler,
    directory: Path,
    on_stage: StageCallback | None,
    *,
    space: SearchSpace,
    layers: list[LayerInfo],
    finetune: Finetune,
    gate: CostGate | None,
    seed: int,
) -> _Search:
    """The objective of one worker of ``study``, which already holds its settings and baseline."""
    if gate is not None:
        study.set_user_attr("cost_model_warm_start", gate.warm_start)
    budget = study.user_attrs["budget"]
    budget_ms = parse_budget(budget).resolve(study.user_attrs["baseline"]["latency_ms"]) if budget != "none" else None
    return _Search(
        task, target, profiler, space, layers, find_blocks(task.model), tuple(study.user_attrs["objectives"]),
        finetune, budget_ms,
        directory, seed, on_stage or (lambda number, stage: None), gate, _trials_wanted(study),
    )  # fmt: skip


def _gate(on: bool, results_dir: Path, study_name: str, target: Target, task: Task) -> CostGate | None:
    """The cost model's gate; it reads earlier studies' measurements, so a stale file stops the run here."""
    if not on:
        return None
    return CostGate(results_dir / "costmodel" / target.name / task.name, study_name, target.name, task.name)


def _after_trial(directory: Path, gate: CostGate | None) -> Callable:
    def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial | None) -> None:
        write_parquet(study, directory)
        if gate is not None:
            gate.save(study)

    return after_trial


def run(
    task: Task,
    *,
    target: str | Target = "cpu",
    budget: str | Budget | None = None,
    objectives: Sequence[str] = ("metric", "latency"),
    trials: int = 20,
    timeout: float | None = None,
    sampler: str = "tpe",
    seed: int = 0,
    space: SearchSpace | None = None,
    finetune: Finetune | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
    profiler: Profiler | None = None,
    cost_model: bool = True,
    storage: str | None = None,
    study_name: str | None = None,
    results_dir: str | Path = "results",
    workers: int = 1,
    on_stage: StageCallback | None = None,
    callbacks: Sequence[Callable] = (),
) -> optuna.Study:
    """Search compression plans for ``task`` on ``target`` until the study holds ``trials`` finished trials.

    Re-running with the same study resumes it. Returns the Optuna study; :func:`search.load_trials`
    gives its DataFrame. User errors raise :class:`~search.UsageError` before any work starts.
    ``profiler`` defaults to the target's own (:func:`profilers.get_profiler`). ``cost_model``: predict
    each plan's latency before fine-tuning it and skip plans predicted over the budget and not worth
    measuring (:meth:`CostGate.veto_reason`).
    ``workers``: this process plus ``workers - 1`` ``search worker`` processes on this machine share
    the study (the task must come from :func:`search.load_task`, so that they can load it too);
    other machines join with :func:`work` on the same ``storage``.
    """
    if trials < 1:
        raise UsageError(f"trials must be at least 1, got {trials}")
    if timeout is not None and timeout <= 0:
        raise UsageError(f"timeout must be positive seconds, got {timeout}")
    if workers < 1:
        raise UsageError(f"workers must be at least 1, got {workers}")
    if workers > 1 and task.spec is None:
        raise UsageError(
            "workers > 1 needs a task loaded by 'module:function' (search.load_task or --task), "
            "so that every worker process can load it"
        )
    if workers > 1 and _pruner_name(pruner) == "custom":
        raise UsageError("workers > 1 runs the default pruner or none: pass pruner=None or NopPruner()")
    target = target if isinstance(target, Target) else load_target(target)
    profiler = profiler or get_profiler(target)
    budget = parse_budget(budget) if isinstance(budget, str) else budget
    objectives = _check_objectives(objectives)
    sampler_obj = _sampler(sampler, seed)
    space = space or SearchSpace()
    finetune = finetune or task.finetune or Finetune()
    layers = describe_layers(task.model, task.example_input)
    unknown = sorted(set(space.layers) - {layer.name for layer in layers})
    if unknown:
        raise UsageError(
            f"search space names layers the model lacks: {', '.join(unknown)}; "
            f"known: {', '.join(layer.name for layer in layers)}"
        )

    study_name = study_name or default_study_name(task, target)
    results_dir = Path(results_dir)
    gate = _gate(cost_model, results_dir, study_name, target, task)
    directory = results_dir / study_name
    directory.mkdir(parents=True, exist_ok=True)
    url = storage or f"sqlite:///{directory.resolve() / 'study.db'}"
    study = optuna.create_study(
        storage=_storage(url),
        study_name=study_name,
        directions=[OBJECTIVES[o][1] for o in objectives],
        sampler=sampler_obj,
        pruner=pruner or _pruner("percentile", finetune),
        load_if_exists=True,
    )
    _claim(study, "task", task.name)
    _claim(study, "target", target.name)
    study.set_user_attr("target_file", target.path)
    _claim(study, "objectives", list(objectives))
    _claim(study, "budget", str(budget) if budget else "none")
    _claim_teacher(study, task)
    study.set_metric_names([OBJECTIVES[o][0] for o in objectives])
    # A resumed study must not replay the first session's random start-up plans.
    study.sampler = _sampler(sampler, seed + len(study.trials)) if study.trials else sampler_obj
    study.set_user_attr("results_dir", str(directory.resolve()))
    study.set_user_attr(
        "run_spec",
        {
            "task": task.spec, "task_options": task.options, "trials": trials, "sampler": sampler, "seed": seed,
            "space": space.to_dict(), "finetune": dataclasses.asdict(finetune), "pruner": _pruner_name(pruner),
            "cost_model": cost_model,
            "timing": {key: getattr(profiler, key) for key in TIMING_KNOBS},
        },
    )  # fmt: skip

    if "baseline" not in study.user_attrs:
        study.set_user_attr("baseline", _baseline(task, target, profiler, directory))
    budget_ms = budget.resolve(study.user_attrs["baseline"]["latency_ms"]) if budget else None
    study.set_user_attr("budget_ms", budget_ms)

    search = _searcher(
        study, task, target, profiler, directory, on_stage, space=space, layers=layers, finetune=finetune,
        gate=gate, seed=seed,
    )  # fmt: skip
    after_trial = _after_trial(directory, search.gate)
    helpers, threads = [], torch.get_num_threads()
    if workers > 1:
        env = {"OMP_NUM_THREADS": str(threads_per_worker(workers))}
        if isinstance(profiler, RemoteProfiler):
            env["SEARCH_PROFILER_TOKEN"] = profiler.token
        helpers = spawn_workers(
            workers - 1, url, study_name, results_dir.resolve(), seed, getattr(profiler, "address", None), env
        )
        torch.set_num_threads(threads_per_worker(workers))
    interrupted = False
    try:
        _work(study, search, timeout, [after_trial, *callbacks])
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        torch.set_num_threads(threads)
        failed = [code for code in stop_workers(helpers, interrupted) if code not in (0, 130)]
        after_trial(study, None)
    if failed:
        raise SearchError(
            f"{len(failed)} of {workers - 1} worker processes failed (exit codes {failed}); "
            f"see {directory / 'workers'}/*.log"
        )
    return study


def work(
    study: str | Path,
    study_name: str | None = None,
    *,
    profiler: Profiler | None = None,
    service: str | None = None,
    token: str | None = None,
    results_dir: str | Path = "results",
    seed: int | None = None,
    timeout: float | None = None,
    on_stage: StageCallback | None = None,
    callbacks: Sequence[Callable] = (),
) -> optuna.Study:
    """Join a study that :func:`run` started (a results folder, a name under ``results/``, or a
    storage URL such as ``postgresql://…``) as one more worker, with the study's own settings, until
    it holds its trials.

    The task is loaded by the ``module:function`` the study was started with; its teacher must be the
    same (same weights) as the first process's. Measurements go to ``profiler``, or to the target's
    own (a profiler service with ``service`` and ``token``), timed as the first process timed them.
    """
    url, study_name = locate_study(study, study_name)
    opened = optuna.load_study(study_name=study_name, storage=_storage(url))
    spec = opened.user_attrs.get("run_spec")
    if spec is None:
        raise UsageError(f"study {opened.study_name!r} was not started by `search run`; start it that way first")
    if spec["pruner"] == "custom":
        raise UsageError(f"study {opened.study_name!r} was started with a custom pruner; workers cannot rebuild it")
    task = task_of_study(spec, opened.study_name, "join it with search.run(the same task, storage=..., study_name=...)")
    target_file = opened.user_attrs["target_file"]
    target = load_target(target_file if Path(target_file).exists() else opened.user_attrs["target"])
    profiler = profiler or get_profiler(target, service=service, token=token, **spec["timing"])
    _claim_teacher(opened, task)
    waited = time.monotonic()
    while "baseline" not in opened.user_attrs:  # the first process is still measuring the teacher
        if time.monotonic() - waited > BASELINE_WAIT_S:
            raise UsageError(f"study {opened.study_name!r} has no baseline after {BASELINE_WAIT_S} s; is its first process running?")
        time.sleep(1.0)
    finetune = Finetune(**spec["finetune"])
    seed = seed if seed is not None else int.from_bytes(os.urandom(4), "little")
    opened.sampler = _sampler(spec["sampler"], seed)
    opened.pruner = _pruner(spec["pruner"], finetune)
    results_dir = Path(results_dir)
    gate = _gate(spec["cost_model"], results_dir, opened.study_name, target, task)
    directory = results_dir / opened.study_name
    directory.mkdir(parents=True, exist_ok=True)
    search = _searcher(
        opened, task, target, profiler, directory, on_stage, space=SearchSpace.from_dict(spec["space"]),
        layers=describe_layers(task.model, task.example_input), finetune=finetune, gate=gate, seed=seed,
    )  # fmt: skip
    after_trial = _after_trial(directory, gate)
    try:
        _work(opened, search, timeout, [after_trial, *callbacks])
    finally:
        after_trial(opened, None)
    return opened
