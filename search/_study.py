"""``search.run``: one Optuna study over compression plans, every candidate built and measured for real."""

from __future__ import annotations

import dataclasses
import math
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import optuna
import torch
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.study import StudyDirection
from optuna.trial import TrialState

from profilers import Profiler, get_profiler
from search._budget import Budget, parse_budget
from search._costgate import CostGate
from search._costmodel import plan_features
from search._distill import Finetune, distill
from search._errors import CandidateError, UsageError
from search._export import OnnxModule, export_candidate, export_float
from search._layers import LayerInfo, compressible_layers, describe_layers
from search._plan import Plan
from search._quant import bake
from search._results import write_parquet
from search._size import packed_size_bytes
from search._space import SearchSpace, suggest_plan
from search._task import Task
from search._transforms import apply_plan
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
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)  # count towards --trials

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
    if url.startswith(("sqlite:", "postgresql", "mysql")):
        # Heartbeats: a trial whose process died is failed and its plan retried once.
        return RDBStorage(
            url,
            heartbeat_interval=HEARTBEAT_S,
            grace_period=4 * HEARTBEAT_S,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
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
    """Everything one study's objective needs, built once before the first trial."""

    task: Task
    target: Target
    profiler: Profiler
    space: SearchSpace
    layers: list[LayerInfo]
    objectives: tuple[str, ...]
    finetune: Finetune
    budget_ms: float | None
    directory: Path
    seed: int
    on_stage: StageCallback
    gate: CostGate | None

    def objective(self, study: optuna.Study, trial: optuna.Trial) -> tuple[float, ...]:
        try:
            return self._evaluate(study, trial)
        except CandidateError as exc:
            trial.set_user_attr("fail_reason", str(exc))
            raise

    def _stage(self, trial: optuna.Trial, stage: str, seconds: dict) -> None:
        seconds[stage] = time.perf_counter()
        self.on_stage(trial.number, stage)

    def _veto_if_over_budget(self, study: optuna.Study, trial: optuna.Trial, features: dict) -> None:
        """Skip fine-tuning and measuring a plan the cost model is confident will miss the budget."""
        prediction = self.gate.predict(study, features)
        if prediction is None:
            return
        for key, value in prediction.items():
            trial.set_user_attr(key, value)
        low = prediction["predicted_latency_low_ms"]
        if self.budget_ms is not None and low > self.budget_ms:
            reason = (
                f"cost model predicts {prediction['predicted_latency_ms']:.4g} ms (lower bound {low:.4g} ms), "
                f"over the {self.budget_ms:.4g} ms budget"
            )
            trial.set_user_attr("pruned_by", "cost-model")
            trial.set_user_attr("pruned_reason", reason)
            raise optuna.TrialPruned(reason)

    def _evaluate(self, study: optuna.Study, trial: optuna.Trial) -> tuple[float, ...]:
        task, seconds = self.task, {}
        plan = suggest_plan(trial, self.space, self.layers)
        trial.set_user_attr("plan", plan.to_dict())
        self._stage(trial, "build", seconds)
        torch.manual_seed(self.seed + trial.number)
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

        losses = distill(candidate, task.model, task.train, self.finetune, on_eval)
        trial.set_user_attr("finetune_loss_first_last", [losses[0], losses[-1]] if losses else [])
        metric_torch = task.score(candidate)
        bake(candidate)

        self._stage(trial, "export", seconds)
        trial_dir = self.directory / "trials" / f"{trial.number:05d}"
        trial_dir.mkdir(parents=True, exist_ok=True)
        exported = export_candidate(
            candidate, task.example_input, trial_dir / "model.onnx",
            plan=plan, precisions=self.target.precisions, calibration=task.train,
        )  # fmt: skip
        (trial_dir / "plan.json").write_text(plan.to_json())
        torch.save({"plan": plan.to_json(), "state_dict": candidate.state_dict()}, trial_dir / "checkpoint.pt")

        self._stage(trial, "evaluate", seconds)
        metric = task.score(OnnxModule(exported.path))
        if not math.isfinite(metric):
            raise CandidateError(f"metric is {metric} on the exported model")

        self._stage(trial, "measure", seconds)
        measurement = self.profiler.measure(exported.path)
        seconds["end"] = time.perf_counter()

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
            "artifacts": str(trial_dir),
            "seconds": {s: round(seconds[n] - seconds[s], 3) for s, n in zip(stages, stages[1:])},
        }
        for key, value in record.items():
            trial.set_user_attr(key, value)
        if self.budget_ms is not None:
            trial.set_constraint("latency_over_budget_ms", measurement.latency_ms - self.budget_ms)
        return tuple(record[OBJECTIVES[o][0]] for o in self.objectives)


def _baseline(task: Task, profiler: Profiler, directory: Path) -> dict:
    """The uncompressed teacher exported as fp32, scored and measured on the target, once per study."""
    path = directory / "baseline" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        export_float(task.model, task.example_input, path)
    except CandidateError as exc:
        raise UsageError(f"the task's model cannot be exported to ONNX: {exc}") from exc
    measurement = profiler.measure(path)
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


def _claim(study: optuna.Study, key: str, value) -> None:
    """Record a setting on a new study; refuse to resume one made with another setting."""
    stored = study.user_attrs.get(key)
    if stored is None:
        study.set_user_attr(key, value)
    elif stored != value:
        raise UsageError(
            f"study {study.study_name!r} was made with {key} {stored!r}, not {value!r}; "
            "resume it with the same settings or choose another --study-name"
        )


def default_study_name(task: Task, target: Target) -> str:
    return f"{task.name}-{target.name}"


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
    on_stage: StageCallback | None = None,
    callbacks: Sequence[Callable] = (),
) -> optuna.Study:
    """Search compression plans for ``task`` on ``target`` until the study holds ``trials`` finished trials.

    Re-running with the same study resumes it. Returns the Optuna study; :func:`search.load_trials`
    gives its DataFrame. User errors raise :class:`~search.UsageError` before any work starts.
    ``profiler`` defaults to the target's own (:func:`profilers.get_profiler`). ``cost_model``: predict
    each plan's latency before fine-tuning it and skip plans confidently over the budget.
    """
    if trials < 1:
        raise UsageError(f"trials must be at least 1, got {trials}")
    if timeout is not None and timeout <= 0:
        raise UsageError(f"timeout must be positive seconds, got {timeout}")
    target = target if isinstance(target, Target) else load_target(target)
    profiler = profiler or get_profiler(target)
    budget = parse_budget(budget) if isinstance(budget, str) else budget
    objectives = _check_objectives(objectives)
    sampler_obj = _sampler(sampler, seed)
    space = space or SearchSpace()
    finetune = finetune or Finetune()
    layers = describe_layers(task.model, task.example_input)
    unknown = sorted(set(space.layers) - {layer.name for layer in layers})
    if unknown:
        raise UsageError(
            f"search space names layers the model lacks: {', '.join(unknown)}; "
            f"known: {', '.join(layer.name for layer in layers)}"
        )

    study_name = study_name or default_study_name(task, target)
    gate = None
    if cost_model:  # reads earlier studies' measurements: a stale file stops the run here
        gate = CostGate(Path(results_dir) / "costmodel" / target.name / task.name, study_name, target.name, task.name)
    directory = Path(results_dir) / study_name
    directory.mkdir(parents=True, exist_ok=True)
    storage_url = storage or f"sqlite:///{directory.resolve() / 'study.db'}"
    study = optuna.create_study(
        storage=_storage(storage_url),
        study_name=study_name,
        directions=[OBJECTIVES[o][1] for o in objectives],
        sampler=sampler_obj,
        # Keep the top 80 %: prune a fine-tune whose metric from half-way on is in the bottom fifth.
        pruner=pruner
        or optuna.pruners.PercentilePruner(80.0, n_startup_trials=8, n_warmup_steps=finetune.steps // 2),
        load_if_exists=True,
    )
    _claim(study, "task", task.name)
    _claim(study, "target", target.name)
    study.set_user_attr("target_file", target.path)
    _claim(study, "objectives", list(objectives))
    _claim(study, "budget", str(budget) if budget else "none")
    study.set_metric_names([OBJECTIVES[o][0] for o in objectives])
    # A resumed study must not replay the first session's random start-up plans.
    study.sampler = _sampler(sampler, seed + len(study.trials)) if study.trials else sampler_obj
    study.set_user_attr("results_dir", str(directory.resolve()))

    if "baseline" not in study.user_attrs:
        study.set_user_attr("baseline", _baseline(task, profiler, directory))
    baseline = study.user_attrs["baseline"]
    budget_ms = budget.resolve(baseline["latency_ms"]) if budget else None
    study.set_user_attr("budget_ms", budget_ms)

    if gate is not None:
        study.set_user_attr("cost_model_warm_start", gate.warm_start)
    search = _Search(
        task, target, profiler, space, layers, objectives, finetune, budget_ms, directory, seed,
        on_stage or (lambda number, stage: None), gate,
    )  # fmt: skip

    def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        write_parquet(study)
        if gate is not None:
            gate.save(study)

    done = len(study.get_trials(deepcopy=False, states=FINISHED))
    if trials > done:
        study.optimize(
            lambda trial: search.objective(study, trial),
            n_trials=trials - done,
            timeout=timeout,
            catch=(CandidateError,),
            callbacks=[after_trial, *callbacks],
        )
    after_trial(study, None)
    return study
