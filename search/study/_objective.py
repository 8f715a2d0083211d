"""One trial: a plan sampled, built, fine-tuned by distillation, exported, scored and measured."""

from __future__ import annotations

import dataclasses
import math
import socket
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState

from profilers import MeasurementError, Profiler
from search._errors import CandidateError
from search._record import Key
from search.artifacts import OnnxModule, export_candidate, measure_candidate
from search.compress import Finetune, apply_plan, bake, distill, packed_size_bytes
from search.costmodel import CostGate, plan_features
from search.model import EncoderBlocks, LayerInfo, compressible_layers
from search.plan import suggest_plan
from search.study._optuna import report_and_maybe_prune
from search.study._spec import RunSpec
from search.study._workers import claim_slot, measuring_alone, this_worker
from search.tasks import Task

STAGES = ("build", "fine-tune", "export", "evaluate", "measure")
LAYER_TIMES_KEPT = 20  # slowest layers recorded on a trial; a large model has hundreds
OutOfMemory = (MemoryError, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError))
# What fails one candidate's trial and lets the study go on.
CANDIDATE_FAILURES = (CandidateError, MeasurementError)

StageCallback = Callable[[int, str], None]


@dataclasses.dataclass
class Objective:
    """Everything one worker's objective needs, built once before its first trial."""

    task: Task
    spec: RunSpec
    profiler: Profiler
    layers: list[LayerInfo]
    blocks: EncoderBlocks | None  # a Transformer's blocks, heads and FFN layers; None for a CNN
    finetune: Finetune
    budget_ms: float | None
    directory: Path
    on_stage: StageCallback
    gate: CostGate | None
    trials: Callable[[], int]
    current: int | None = None  # the number of the trial this worker runs or ran last

    def __call__(self, study: optuna.Study, trial: optuna.Trial) -> tuple[float, ...]:
        self.current = trial.number
        trial.set_user_attr(Key.WORKER, this_worker())
        claim_slot(study, trial, self.trials())
        try:
            return self._evaluate(study, trial)
        except CANDIDATE_FAILURES as exc:
            trial.set_user_attr(Key.FAIL_REASON, f"{exc} (during {trial.user_attrs.get(Key.STAGE, 'build')})")
            raise
        except OutOfMemory as exc:
            reason = f"out of memory: {exc} (during {trial.user_attrs.get(Key.STAGE, 'build')})"
            trial.set_user_attr(Key.FAIL_REASON, reason)
            raise CandidateError(reason) from exc
        except KeyboardInterrupt:
            trial.set_user_attr(Key.INTERRUPTED, True)
            trial.set_user_attr(Key.FAIL_REASON, f"interrupted during {trial.user_attrs.get(Key.STAGE, 'build')}")
            raise

    def _stage(self, trial: optuna.Trial, stage: str, seconds: dict) -> None:
        seconds[stage] = time.perf_counter()
        trial.set_user_attr(Key.STAGE, stage)  # what a crashed trial was doing
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
            trial.set_user_attr(Key.PRUNED_BY, "cost-model")
            trial.set_user_attr(Key.PRUNED_REASON, reason)
            # TPE ranks a pruned trial with no constraint above every infeasible one: while few measured
            # plans fit the budget, it would steer towards the vetoed plans. Made infeasible, the trial
            # is ranked as its measurement would have ranked it (the constraint is labelled predicted).
            over = prediction[Key.PREDICTED_LATENCY_MS] - self.budget_ms
            trial.set_constraint("predicted_latency_over_budget_ms", over)
            raise optuna.TrialPruned(reason)

    def _evaluate(self, study: optuna.Study, trial: optuna.Trial) -> tuple[float, ...]:
        task, target, seconds = self.task, self.spec.target, {}
        plan = suggest_plan(trial, self.spec.space, self.layers, self.blocks)
        same = _same_plan(study, trial)
        if same is not None:
            return self._reuse(study, trial, same)
        trial.set_user_attr(Key.PLAN, plan.to_dict())
        self._stage(trial, "build", seconds)
        torch.manual_seed(self.spec.seed + trial.number)
        task.reseed(self.spec.seed + trial.number)
        candidate = apply_plan(task.model, plan, task.example_input)
        layers = compressible_layers(candidate)
        trial.set_user_attr(Key.CHANNELS, {name: int(m.weight.shape[0]) for name, m in layers.items()})
        features = plan_features(candidate, plan, task.example_input, target)
        trial.set_user_attr(Key.COST_FEATURES, features)
        if self.gate is not None:
            self._veto_if_over_budget(study, trial, features)

        self._stage(trial, "fine-tune", seconds)

        curve: dict[str, float] = {}

        def on_eval(step: int) -> None:
            report_and_maybe_prune(study, trial, curve, step, task.score(candidate))

        losses = distill(
            candidate, task.model, task.train, self.finetune, on_eval, loss=task.distill_loss, output=task.output
        )
        trial.set_user_attr(Key.FINETUNE_LOSS, [losses[0], losses[-1]] if losses else [])
        metric_torch = task.score(candidate)
        bake(candidate)

        self._stage(trial, "export", seconds)
        trial_dir = self.directory / "trials" / f"{trial.number:05d}"
        trial_dir.mkdir(parents=True, exist_ok=True)
        exported = export_candidate(
            candidate, task.example_input, trial_dir / "model.onnx",
            plan=plan, precisions=target.precisions, calibration=task.calibration or task.train,
            symmetric=target.runtime == "tensorrt", output=task.output,
        )  # fmt: skip
        (trial_dir / "plan.json").write_text(plan.to_json())
        torch.save({"plan": plan.to_json(), "state_dict": candidate.state_dict()}, trial_dir / "checkpoint.pt")

        self._stage(trial, "evaluate", seconds)
        metric = task.score(OnnxModule(exported.path))
        if not math.isfinite(metric):
            raise CandidateError(f"metric is {metric} on the exported model")

        self._stage(trial, "measure", seconds)
        with measuring_alone(target.name):
            measurement = measure_candidate(self.profiler, exported.path, candidate, task.example_input, plan)
        seconds["end"] = time.perf_counter()
        if not measurement.stable:
            raise CandidateError(
                f"latency did not stabilise: in the fastest of {len(measurement.session_medians_ms) or 1} "
                f"sessions the median still moved after {self.profiler.max_time_s:g} s (spread "
                f"{measurement.spread:.1%}); is the machine busy?"
            )

        stages = list(seconds)
        record = {
            Key.METRIC: metric,
            Key.METRIC_SOURCE: "measured:exported-onnx",
            Key.METRIC_TORCH: metric_torch,
            Key.LATENCY_MS: measurement.latency_ms,
            Key.LATENCY_P90_MS: measurement.latency_p90_ms,
            Key.LATENCY_RUNS: measurement.runs,
            Key.LATENCY_SPREAD: measurement.spread,
            Key.LATENCY_STABLE: measurement.stable,
            Key.LATENCY_SESSION_MEDIANS_MS: list(measurement.session_medians_ms),
            Key.LATENCY_QUIET_SHARE: measurement.quiet_share,
            Key.LATENCY_SOURCE: f"{measurement.source}:{measurement.runtime}",
            Key.ENERGY_MJ: measurement.energy_mj,
            Key.ENERGY_SOURCE: measurement.energy_source,
            Key.SIZE_BYTES: packed_size_bytes(candidate, plan),
            Key.SIZE_SOURCE: "counted:packed-bits",
            Key.ONNX_BYTES: exported.onnx_bytes,
            Key.PRECISION: measurement.precision,
            Key.LAYER_PRECISION: dict(exported.layer_precision),
            Key.RUNTIME: f"{measurement.runtime} {measurement.runtime_version}",
            Key.MEASURED_ON: measurement.device.get("host", socket.gethostname()),
            Key.DEVICE: measurement.to_dict()["device"],
            # The runtime's per-layer times (TensorRT), slowest first: why a plan is not faster.
            Key.LAYER_TIMES: measurement.to_dict()["layers"][:LAYER_TIMES_KEPT],
            Key.ARTIFACTS: str(trial_dir),
            Key.SECONDS: {s: round(seconds[n] - seconds[s], 3) for s, n in zip(stages, stages[1:])},
        }
        for key, value in record.items():
            trial.set_user_attr(key, value)
        if self.budget_ms is not None:
            trial.set_constraint("latency_over_budget_ms", measurement.latency_ms - self.budget_ms)
        return tuple(record[name] for name in self.spec.metric_names)

    def _reuse(self, study: optuna.Study, trial: optuna.Trial, same: optuna.trial.FrozenTrial) -> tuple[float, ...]:
        """A plan some trial already evaluated: its results, not a second fine-tune and measurement.

        A plan another worker is evaluating right now is pruned instead (its result is not known yet).
        """
        if same.state == TrialState.RUNNING:
            trial.set_user_attr(Key.PRUNED_BY, "duplicate")
            trial.set_user_attr(Key.PRUNED_REASON, f"same plan as trial {same.number}, running in another worker")
            raise optuna.TrialPruned(f"same plan as running trial {same.number}")
        for key, value in same.user_attrs.items():
            if key not in (Key.WORKER, Key.STAGE):
                trial.set_user_attr(key, value)
        trial.set_user_attr(Key.DUPLICATE_OF, same.number)
        for key, value in same.constraints.items():
            trial.set_constraint(key, value)
        return tuple(same.values)


def _same_plan(study: optuna.Study, trial: optuna.Trial) -> optuna.trial.FrozenTrial | None:
    """An earlier trial, completed or running, with exactly this trial's parameters."""
    for other in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)):
        if other.number != trial.number and other.params == trial.params and Key.DUPLICATE_OF not in other.user_attrs:
            return other
    return None
