"""One trial: a plan sampled, built, exported and measured on the target, then fine-tuned by
distillation (only if it fits the budget), exported again with its fine-tuned weights and scored.

Latency, energy and size depend on the plan's structure and precisions, not on the fine-tuned
weights, so they are measured first: a plan over the budget costs no fine-tune. The graph is
made once per structure in a study, without weights, and traced only where another structure's of
its form does not fit (:class:`~search.artifacts.StructureGraphs`); each trial's weights are written
into it (:func:`~search.artifacts.with_weights`), and a state the fine-tune scored on such a file
and kept is not written again. The fine-tune keeps its best state, scored before the first step
too, so it never ends worse than it started; it runs to the end of the plan's rung, and a promotion
(``continue_from``) goes on from the state its parent trial saved.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState

from profilers import Measurement, MeasurementError, Profiler
from search._errors import CandidateError, UsageError
from search._record import Key, StudyKey
from search.artifacts import OnnxModule, StructureGraphs, measure_candidate
from search.compress import (
    Distillation,
    Finetune,
    add_compression,
    baked_state_dict,
    build_structure,
    calibrate_input_quant,
    packed_size_bytes,
)
from search.costmodel import FEATURE_VERSION, CostGate, plan_features
from search.model import EncoderBlocks, LayerInfo, output_channels
from search.plan import Plan, Quantization, WeightSparsity, suggest_plan
from search.study._baseline import check_measured_alike
from search.study._exclude import merged, quantization_measured_slower
from search.study._optuna import report_and_maybe_prune
from search.study._recipes import combined_rules, enqueue_recipes, recipe_params
from search.study._scoring import FILE, TORCH, FasterScoring, int8_static_only, write_file
from search.study._spec import RunSpec
from search.study._workers import claim_slot, measuring_alone, this_worker
from search.tasks import Task

LAYER_TIMES_KEPT = 100  # slowest layers recorded on a trial: a Transformer block has a dozen; a large model hundreds
OutOfMemory = (MemoryError, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError))
# What fails one candidate's trial and lets the study go on.
CANDIDATE_FAILURES = (CandidateError, MeasurementError)
# A plan measured over the budget by at most this share is measured once more, the faster kept: a
# shared machine slows a whole measurement by as much (interference never makes runs faster), and a
# plan left over the budget is never fine-tuned.
RECHECK_OVER_BUDGET = 0.1
FINETUNE_STATE = "finetune.pt"  # a trial's fine-tune as it stopped, for a promotion to go on with
GRAPHS = "graphs"  # each structure's graph without its weights (Objective._graph)
# What a promotion copies from the trial it continues: the measured record of the same plan.
MEASURED = (
    Key.LATENCY_MS, Key.LATENCY_P90_MS, Key.LATENCY_RUNS, Key.LATENCY_SPREAD,
    Key.LATENCY_STABLE, Key.LATENCY_SESSION_MEDIANS_MS, Key.LATENCY_QUIET_SHARE, Key.LATENCY_MEASUREMENTS,
    Key.LATENCY_SOURCE, Key.ENERGY_MJ,
    Key.ENERGY_SOURCE, Key.PRECISION, Key.LAYER_PRECISION, Key.RUNTIME, Key.MEASURED_ON, Key.DEVICE, Key.LAYER_TIMES,
)  # fmt: skip

StageCallback = Callable[[int, str], None]


@dataclasses.dataclass
class Objective:
    """Everything one worker's objective needs, built once before its first trial.

    ``finetune`` is resolved (its ``steps`` set); ``rungs`` the step each rung's fine-tune ends at
    (one rung, the longest, without successive halving); ``exclude`` the options layer sensitivity
    ruled out, per parameter; ``drops`` what removing each block alone costs (a student keeps the
    costliest, :func:`~search.plan.kept_blocks`), None to keep blocks evenly spread.
    """

    task: Task
    spec: RunSpec
    profiler: Profiler
    layers: list[LayerInfo]
    blocks: EncoderBlocks | None  # a Transformer's blocks, heads and FFN layers; None for a CNN
    finetune: Finetune
    rungs: tuple[int, ...]
    exclude: Mapping[str, Sequence]
    drops: Sequence[float] | None
    budget_ms: float | None
    directory: Path
    on_stage: StageCallback
    gate: CostGate | None
    trials: Callable[[], int]
    deadline: float | None = None  # the run's end (time.monotonic()): no trial starts after it, no fine-tune step
    current: int | None = None  # the number of the trial this worker runs or ran last

    def __call__(self, study: optuna.Study, trial: optuna.Trial) -> tuple[float, ...]:
        self.current = trial.number
        trial.set_user_attr(Key.WORKER, this_worker())
        claim_slot(study, trial, self.trials())
        seconds: dict = {}
        try:
            return self._evaluate(study, trial, seconds)
        except (*CANDIDATE_FAILURES, UsageError) as exc:
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
        finally:  # a pruned or failed trial's time is recorded too: where the study's time went
            self._stage(trial, None, seconds)
            if seconds:
                trial.set_user_attr(Key.SECONDS, {name: round(value, 3) for name, value in seconds.items()})

    def _stage(self, trial: optuna.Trial, stage: str | None, seconds: dict) -> None:
        """Close the stage running (its seconds add up in ``seconds``) and open ``stage``."""
        now = time.perf_counter()
        if "_open" in seconds:
            running, since = seconds.pop("_open")
            seconds[running] = seconds.get(running, 0.0) + now - since
        if stage is not None:
            seconds["_open"] = (stage, now)
            trial.set_user_attr(Key.STAGE, stage)  # what a crashed trial was doing
            self.on_stage(trial.number, stage)

    def _veto_if_over_budget(self, study: optuna.Study, trial: optuna.Trial, features: dict) -> None:
        """Skip exporting, measuring and fine-tuning a plan the cost model predicts over the budget,
        with too little expected headroom under it to be worth it (:meth:`CostGate.veto_reason`)."""
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

    def _exclude(self, study: optuna.Study, trial: optuna.Trial) -> Mapping[str, Sequence]:
        """The options not offered to this trial. A new plan, the sampler's or a recipe's: the
        study's, and what its measurements ruled out since (:func:`quantization_measured_slower`; a
        sensitivity mix queued before int8 was measured slower keeps its pruning, in float). A
        promotion: its parent's plan, whose parameters it was queued with; a bit width its parent was
        not asked (one choice left) stays the one it had. The first time int8 is found measured
        slower, this also records the study's note of it and queues the combined plans
        (:meth:`_queue_combined`): every new plan passes here, so it happens before the next one."""
        spec = self.spec
        if Key.CONTINUE_FROM in trial.user_attrs:
            parent = study.get_trials(deepcopy=False)[trial.user_attrs[Key.CONTINUE_FROM]]
            kept = Plan.from_dict(parent.user_attrs[Key.PLAN]).layers
            return merged(self.exclude, {
                f"{name}.bits": [b for b in spec.space.bits if b != entry.quantization.bits]
                for name, entry in kept.items() if f"{name}.bits" not in parent.params
            })  # fmt: skip
        slower, note = quantization_measured_slower(
            study, spec.space, self.layers, spec.target.precisions, spec.objectives
        )
        exclude = merged(self.exclude, slower)
        if note is not None and study.user_attrs.get(StudyKey.NOT_OFFERED) != note:
            study.set_user_attr(StudyKey.NOT_OFFERED, note)
            self._queue_combined(study, exclude)
        return exclude

    def _queue_combined(self, study: optuna.Study, exclude: Mapping[str, Sequence]) -> None:
        """Where int8 measured no faster than the teacher, queue a Transformer's each FFN pruning on
        each student of fewer blocks (:func:`~search.study._recipes.combined_rules`) in place of the
        structural recipes at int8, which build their float recipes again; no more than the study
        has room for (none with ``recipes`` off)."""
        spec = self.spec
        if not spec.recipes:
            return
        rules = combined_rules(spec.space, self.blocks)
        found = recipe_params(rules, spec.space, self.layers, self.blocks, exclude, self.drops)
        room = max(0, self.trials() - len(study.get_trials(deepcopy=False)))
        enqueue_recipes(study, dict(list(found.items())[:room]))

    def _evaluate(self, study: optuna.Study, trial: optuna.Trial, seconds: dict) -> tuple[float, ...]:
        """The trial's objective values; the seconds each stage took add up in ``seconds``."""
        task, target = self.task, self.spec.target
        plan = suggest_plan(
            trial, self.spec.space, self.layers, self.blocks, self._exclude(study, trial), self.drops
        )
        parent = _parent(study, trial)
        trial.set_user_attr(Key.PLAN, plan.to_dict())
        if parent is None:
            same = _same_plan(study, trial)
            if same is not None:
                return self._reuse(study, trial, same)
        self._stage(trial, "build", seconds)
        saved = self._saved_state(parent)
        # A promotion that goes on from its parent's state loads every weight, mask and quantizer
        # range from it: the channels' ranking and refit, and the quantizers' calibration, would be
        # written over (on MiniLM they take 1-2 s of a promotion's build).
        activity = task.activity() if saved is None else None
        structure = build_structure(task.model, plan, task.example_input, activity)
        dynamic = not int8_static_only(target)
        candidate = add_compression(copy.deepcopy(structure), plan, task.example_input, dynamic_matmuls=dynamic)
        if saved is None:
            calibrate_input_quant(candidate, task.calibration_batches())
        if parent is None:
            digest = build_digest(candidate, plan)
            trial.set_user_attr(Key.BUILD_DIGEST, digest)
            same = _same_build(study, trial, digest)
            if same is not None:  # another plan that builds this very model (prune 0.5 and width 0.5)
                return self._reuse(study, trial, same)
            trial.set_user_attr(Key.CHANNELS, output_channels(candidate))
            features = plan_features(candidate, plan, task.example_input, target)
            trial.set_user_attr(Key.COST_FEATURES, features)
            trial.set_user_attr(Key.COST_FEATURE_VERSION, FEATURE_VERSION)
            if self.gate is not None:
                self._veto_if_over_budget(study, trial, features)

        trial_dir = self._trial_dir(trial.number)
        trial_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="search-trial-") as tmp:
            self._stage(trial, "export", seconds)
            raw = self._graph(structure)
            if parent is None:
                structure.load_state_dict(baked_state_dict(candidate))
                exported = self._export(structure, plan, trial_dir, raw)
                self._stage(trial, "measure", seconds)
                measurement, count = self._measure(exported.path, structure, plan)
                check_measured_alike(study.user_attrs[StudyKey.BASELINE], measurement.setting)
                over = self._record_measurement(trial, measurement, count, exported.layer_precision)
            else:
                over = self._copy_measurement(trial, parent)
            skipped = "measured over the budget" if over else None
            if parent is None and trial.user_attrs.get(Key.POST_TRAINING):
                skipped = skipped or "post-training quantization: scored as calibrated"
            if skipped:  # scored as it is, never promoted either
                trial.set_user_attr(Key.FINETUNE_SKIPPED, skipped)
                self._stage(trial, "evaluate", seconds)
                metric = self._score(exported.path)
                return self._finish(
                    trial, plan, metric, size=packed_size_bytes(structure, plan), metric_torch=None, steps=0,
                    best_step=0, rung=0,
                )  # fmt: skip

            self._stage(trial, "fine-tune", seconds)
            start = exported.path if parent is None else None

            def write() -> Path:  # the student as it is now, in the trial's graph
                structure.load_state_dict(baked_state_dict(candidate))
                return write_file(task, target, structure, plan, Path(tmp, "scored.onnx"), raw).path

            run, rung, curve, on_file = self._finetune(study, trial, candidate, parent, saved, trial_dir, start, write)

            self._stage(trial, "evaluate", seconds)
            structure.load_state_dict(baked_state_dict(candidate))
            path, held = trial_dir / "model.onnx", on_file.get(str(run.best_step))
            if held is None:
                self._export(structure, plan, trial_dir, raw)
            else:  # the kept state was written and scored on its file already: that is the trial's file
                if held != path:
                    shutil.move(held, path)
                self._save_beside(structure, plan, trial_dir)
        metric = self._score(path) if held is None else curve[str(run.best_step)]
        if parent is not None:  # the plan lives on in this trial: the state it went on from is not needed
            self.drop_saved_states([parent])
        trial.set_user_attr(Key.FINETUNE_CURVE, curve)
        return self._finish(
            trial, plan, metric, size=packed_size_bytes(structure, plan),
            metric_torch=None if str(run.best_step) in on_file else run.best_metric,
            steps=run.step, best_step=run.best_step, rung=rung, losses=run.first_last_losses(),
        )  # fmt: skip

    def _trial_dir(self, number: int) -> Path:
        return self.directory / "trials" / f"{number:05d}"

    def drop_saved_states(self, trials: Sequence[optuna.trial.FrozenTrial]) -> None:
        """Delete what ``trials`` saved for a promotion to go on from (its fine-tune state: 330 MB
        for a MiniLM plan): once a promotion has gone on from it, or for plans that could not reach
        the front as it stands (:func:`~search.study._promote.without_promise`). Were such a plan
        promoted after all, its promotion fine-tunes from the start."""
        for trial in trials:
            (self._trial_dir(trial.number) / FINETUNE_STATE).unlink(missing_ok=True)

    def _graph(self, structure: torch.nn.Module) -> Path:
        """The graph of ``structure`` without its weights, for its weights to be written into: one
        per structure in a study (``graphs/``), so that a plan and the same structure at other bit
        widths ("prune 0.25" and "int8 on prune 0.25"), or a promotion and its parent, share it;
        most often reshaped from another structure's rather than traced (:class:`StructureGraphs`)."""
        return StructureGraphs(self.directory / GRAPHS, self.task.example_input, self.task.output)(structure)

    def _export(self, structure: torch.nn.Module, plan: Plan, trial_dir: Path, raw: Path):
        """The trial's ONNX file with ``structure``'s weights, and its plan and checkpoint beside it."""
        exported = write_file(self.task, self.spec.target, structure, plan, trial_dir / "model.onnx", raw)
        self._save_beside(structure, plan, trial_dir)
        return exported

    def _save_beside(self, structure: torch.nn.Module, plan: Plan, trial_dir: Path) -> None:
        """The plan and ``structure``'s weights beside the trial's file."""
        (trial_dir / "plan.json").write_text(plan.to_json())
        torch.save({"plan": plan.to_json(), "state_dict": structure.state_dict()}, trial_dir / "checkpoint.pt")

    def _measure(self, path: Path, structure: torch.nn.Module, plan: Plan) -> tuple[Measurement, int]:
        """The plan's measurement, and how many were taken: where the first is over the budget by at
        most :data:`RECHECK_OVER_BUDGET`, the faster of it and a second one."""
        with measuring_alone(self.spec.target.name):
            taken = [measure_candidate(self.profiler, path, structure, self.task.example_input, plan)]
            budget = self.budget_ms
            if budget is not None and budget < taken[0].latency_ms <= budget * (1 + RECHECK_OVER_BUDGET):
                taken.append(measure_candidate(self.profiler, path, structure, self.task.example_input, plan))
        measurement = min(taken, key=lambda m: m.latency_ms)
        if not measurement.stable:
            raise CandidateError(
                f"latency did not stabilise: in the fastest of {len(measurement.session_medians_ms) or 1} "
                f"sessions the median still moved after {self.profiler.max_time_s:g} s (spread "
                f"{measurement.spread:.1%}); is the machine busy?"
            )
        return measurement, len(taken)

    def _record_measurement(
        self, trial: optuna.Trial, measurement: Measurement, count: int, layer_precision: Mapping
    ) -> bool:
        """Record what was measured (the fastest of ``count`` measurements), with the budget as a
        constraint; whether it is over the budget."""
        summary = measurement.to_dict()
        record = {
            Key.LATENCY_MS: measurement.latency_ms,
            Key.LATENCY_P90_MS: measurement.latency_p90_ms,
            Key.LATENCY_RUNS: measurement.runs,
            Key.LATENCY_SPREAD: measurement.spread,
            Key.LATENCY_STABLE: measurement.stable,
            Key.LATENCY_SESSION_MEDIANS_MS: list(measurement.session_medians_ms),
            Key.LATENCY_QUIET_SHARE: measurement.quiet_share,
            Key.LATENCY_MEASUREMENTS: count,
            Key.LATENCY_SOURCE: f"{measurement.source}:{measurement.runtime}",
            Key.ENERGY_MJ: measurement.energy_mj,
            Key.ENERGY_SOURCE: measurement.energy_source,
            Key.PRECISION: measurement.precision,
            Key.LAYER_PRECISION: dict(layer_precision),
            Key.RUNTIME: f"{measurement.runtime} {measurement.runtime_version}",
            Key.MEASURED_ON: measurement.device.get("host", socket.gethostname()),
            Key.DEVICE: summary["device"],
            # The runtime's per-layer times (TensorRT), slowest first: why a plan is not faster.
            Key.LAYER_TIMES: summary["layers"][:LAYER_TIMES_KEPT],
        }
        for key, value in record.items():
            trial.set_user_attr(key, value)
        return self._constrain(trial, measurement.latency_ms)

    def _copy_measurement(self, trial: optuna.Trial, parent: optuna.trial.FrozenTrial) -> bool:
        """A promotion's plan was measured by the trial it continues: the same figures (not a second
        measurement for the cost model to learn from: no features are recorded)."""
        for key in MEASURED:
            if key in parent.user_attrs:
                trial.set_user_attr(key, parent.user_attrs[key])
        return self._constrain(trial, parent.user_attrs[Key.LATENCY_MS])

    def _constrain(self, trial: optuna.Trial, latency_ms: float) -> bool:
        if self.budget_ms is None:
            return False
        trial.set_constraint("latency_over_budget_ms", latency_ms - self.budget_ms)
        return latency_ms > self.budget_ms

    def _saved_state(self, parent: optuna.trial.FrozenTrial | None) -> dict | None:
        """The fine-tune state ``parent`` saved for its promotion to go on from, if it is here."""
        path = None if parent is None else self._trial_dir(parent.number) / FINETUNE_STATE
        if path is None or not path.exists():
            return None
        return torch.load(path, weights_only=True, map_location="cpu")

    def _finetune(
        self, study, trial, candidate, parent, saved: dict | None, trial_dir: Path, start: Path | None,
        write: Callable[[], Path],
    ) -> tuple[Distillation, int, dict, dict[str, Path | None]]:
        """Fine-tune ``candidate`` to the end of its rung (or the run's deadline), keeping its best
        state (restored into it); a promotion goes on from ``saved``, its parent's saved state,
        emptied once loaded: its weights, and its best state's, are copied (90 MB each on MiniLM). The
        run, the rung, the metric curve, and the curve's steps scored on a file, each with the file
        that still holds that state (None: written over since, or its parent's).

        Along the way the student is scored in PyTorch or on ``write()`` (its weights written into
        the trial's graph, scored by ONNX Runtime), whichever this plan scores faster
        (:class:`~search.study._scoring.FasterScoring`). ``start``: the file a new plan was exported
        to and measured as: it scores step 0 with nothing to write."""
        task = self.task
        run = Distillation(
            candidate, task.model, task.train, self.finetune, loss=task.distill_loss, output=task.output,
            teacher_outputs=task.teacher_outputs(),
        )  # fmt: skip
        curve: dict[str, float] = {}
        on_file: dict[str, Path | None] = {}
        known: Mapping[str, float] = {}
        rung = 0 if parent is None else min(trial.user_attrs[Key.RUNG], len(self.rungs) - 1)
        if saved is not None:
            run.load_state_dict(saved)
            saved.clear()  # the run holds its own copies now: the loaded ones go before the steps
            curve.update(parent.user_attrs.get(Key.FINETUNE_CURVE, {}))
            on_file.update(dict.fromkeys(parent.user_attrs.get(Key.SCORED_ON_FILE, [])))
            known = parent.user_attrs.get(Key.SCORE_SECONDS, {})
            trial.set_user_attr(Key.FINETUNE_FROM, f"trial {parent.number}'s state at step {run.step}")
        written: list[Path] = []  # the file the latest write went to

        def on_written_file() -> float:
            written[:] = [write()]
            return task.score(OnnxModule(written[0]))

        scoring = FasterScoring({FILE: on_written_file, TORCH: lambda: task.score(candidate)}, known)

        def note_source(step: int) -> None:
            if scoring.last == FILE:  # the file now holds this step's state, no earlier one
                on_file.update({key: None for key, path in on_file.items() if path == written[0]})
                on_file[str(step)] = written[0]
            trial.set_user_attr(Key.SCORED_ON_FILE, list(on_file))
            trial.set_user_attr(Key.SCORE_SECONDS, scoring.seconds)

        if start is not None:  # a new plan: its file, as measured
            curve["0"] = run.score(lambda: task.score(OnnxModule(start)))
            on_file["0"] = start
        elif not curve:  # a promotion whose parent ran on another machine: from the start
            curve["0"] = run.score(scoring)
            note_source(0)
            trial.set_user_attr(Key.FINETUNE_FROM, f"the start: trial {parent.number}'s state is not here")
        trial.set_user_attr(Key.RUNG, rung)

        def on_eval(step: int, value: float) -> None:
            note_source(step)
            report_and_maybe_prune(study, trial, curve, step, value)

        run.run(self.rungs[rung], evaluate=scoring, on_eval=on_eval, deadline=self.deadline)
        if run.step < self.rungs[rung]:
            cut = f"stopped at step {run.step} of {self.rungs[rung]}: the run's timeout"
            trial.set_user_attr(Key.FINETUNE_CUT, cut)
        if rung < len(self.rungs) - 1:  # a later promotion goes on from here
            torch.save(run.state_dict(), trial_dir / FINETUNE_STATE)
        run.restore_best()
        return run, rung, curve, on_file

    def _score(self, path: Path) -> float:
        metric = self.task.score(OnnxModule(path))
        if not math.isfinite(metric):
            raise CandidateError(f"metric is {metric} on the exported model")
        return metric

    def _finish(
        self, trial, plan: Plan, metric: float, *, size: int, metric_torch: float | None, steps: int,
        best_step: int | None, rung: int, losses: Sequence[float] = (),
    ) -> tuple[float, ...]:  # fmt: skip
        """Record the scored result; the study's objective values."""
        exported = self._trial_dir(trial.number) / "model.onnx"
        record = {
            Key.METRIC: metric,
            Key.METRIC_SOURCE: "measured:exported-onnx",
            Key.METRIC_TORCH: metric_torch,
            Key.SIZE_BYTES: size,
            Key.FINETUNE_STEPS: steps,
            Key.BEST_STEP: best_step,
            Key.RUNG: rung,
            Key.FINETUNE_LOSS: list(losses),
            Key.SIZE_SOURCE: "counted:packed-bits",
            Key.ONNX_BYTES: exported.stat().st_size,
            Key.ARTIFACTS: str(exported.parent),
        }
        for key, value in record.items():
            trial.set_user_attr(key, value)
        values = {**trial.user_attrs, **record}
        return tuple(values[name] for name in self.spec.metric_names)

    def _reuse(self, study: optuna.Study, trial: optuna.Trial, same: optuna.trial.FrozenTrial) -> tuple[float, ...]:
        """A plan some trial already evaluated: its results, not a second fine-tune and measurement.

        A plan another worker is evaluating right now is pruned instead (its result is not known yet).
        """
        if same.state == TrialState.RUNNING:
            trial.set_user_attr(Key.PRUNED_BY, "duplicate")
            trial.set_user_attr(Key.PRUNED_REASON, f"same plan as trial {same.number}, running in another worker")
            raise optuna.TrialPruned(f"same plan as running trial {same.number}")
        for key, value in same.user_attrs.items():
            if key not in (Key.WORKER, Key.STAGE, Key.RECIPE, Key.PLAN, Key.POST_TRAINING, Key.SECONDS):
                trial.set_user_attr(key, value)
        trial.set_user_attr(Key.DUPLICATE_OF, same.number)
        for key, value in same.constraints.items():
            trial.set_constraint(key, value)
        return tuple(same.values)


def _parent(study: optuna.Study, trial: optuna.Trial) -> optuna.trial.FrozenTrial | None:
    """The trial a promotion continues, or None for a plan screened afresh. A promotion that another
    trial already runs or ran (two workers queued it at once) is pruned as a duplicate."""
    number = trial.user_attrs.get(Key.CONTINUE_FROM)
    if number is None:
        return None
    for other in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)):
        if other.number < trial.number and other.user_attrs.get(Key.CONTINUE_FROM) == number:
            trial.set_user_attr(Key.PRUNED_BY, "duplicate")
            trial.set_user_attr(Key.PRUNED_REASON, f"trial {other.number} already continues trial {number}")
            raise optuna.TrialPruned(f"trial {other.number} already continues trial {number}")
    return study.get_trials(deepcopy=False)[number]


def _same_build(study: optuna.Study, trial: optuna.Trial, digest: str) -> optuna.trial.FrozenTrial | None:
    """An earlier plan, completed or running, whose candidate was built the same (:func:`build_digest`)."""
    for other in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)):
        attrs = other.user_attrs
        if (
            other.number < trial.number and attrs.get(Key.BUILD_DIGEST) == digest
            and Key.DUPLICATE_OF not in attrs and Key.CONTINUE_FROM not in attrs
        ):  # fmt: skip
            return other
    return None


def build_digest(candidate: torch.nn.Module, plan: Plan) -> str:
    """sha256 of a built candidate: its weights, masks and quantizer ranges, and each layer's weight
    sparsity and bit width (which export reads from the plan). Two plans with one digest build,
    export and measure as the same model: the same channels kept, the same precisions."""
    digest = hashlib.sha256()
    for name, tensor in sorted(candidate.state_dict().items()):
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    applied = {
        name: [entry.sparsity.ratio, entry.sparsity.pattern, entry.quantization.bits]
        for name, entry in plan.student().layers.items()
        if (entry.sparsity, entry.quantization) != (WeightSparsity(), Quantization())
    }
    digest.update(json.dumps(applied, sort_keys=True).encode())
    return digest.hexdigest()


def _same_plan(study: optuna.Study, trial: optuna.Trial) -> optuna.trial.FrozenTrial | None:
    """An earlier trial, completed or running, with exactly this trial's parameters: the plan's
    screening trial (a promotion of the same plan is not a second plan)."""
    for other in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)):
        attrs = other.user_attrs
        if (
            other.number != trial.number and other.params == trial.params
            and Key.DUPLICATE_OF not in attrs and Key.CONTINUE_FROM not in attrs
        ):  # fmt: skip
            return other
    return None
