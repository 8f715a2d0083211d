"""Successive halving over a study's plans: which plan is promoted, and a promoted trial going on
from the state its parent saved, through a kill -9 too."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

import search
from profilers import OnnxRuntimeCpuProfiler
from search._record import Key
from search.compress import Finetune
from search.study import next_promotion
from search.study._promote import promote, without_promise

FINETUNE = Finetune(steps=9, rungs=3, reduction=3)  # rungs end at steps 1, 3, 9


def _study() -> optuna.Study:
    return optuna.create_study(directions=["maximize", "minimize"])


def _trial(
    study: optuna.Study, metric: float, latency: float, rung: int = 0, parent: int | None = None, **extra
) -> int:
    """A completed trial at ``rung`` (a promotion of ``parent`` when given); its number."""
    attrs = {Key.METRIC: metric, Key.LATENCY_MS: latency, Key.RUNG: rung, **extra}
    if parent is not None:
        attrs[Key.CONTINUE_FROM] = parent
    study.add_trial(
        optuna.trial.create_trial(
            values=[metric, latency], params={"x": float(len(study.trials))},
            distributions={"x": FloatDistribution(0, 1000)}, user_attrs=attrs,
        )
    )  # fmt: skip
    return study.trials[-1].number


TEACHER = (1.0, 4.0)  # metric, latency: the front's box spans metrics 0.9 to 1.0, latencies 0 to 4


def test_no_plan_is_promoted_before_reduction_plans_reached_its_rung():
    study = _study()
    _trial(study, 0.95, 1.0)
    _trial(study, 0.93, 0.5)
    assert next_promotion(study, FINETUNE, TEACHER) is None


def test_the_plan_that_could_add_most_to_the_front_is_promoted_and_one_in_reduction_at_most():
    """Three plans at rung 0: the fast one at 0.92 could add more hypervolume by recovering half its
    gap (to 0.96 at 0.5) than the slow one at 0.97 could (to 0.985 at 3.0)."""
    study = _study()
    _trial(study, 0.97, 3.0)
    fast = _trial(study, 0.92, 0.5)
    _trial(study, 0.91, 2.0)
    assert next_promotion(study, FINETUNE, TEACHER).number == fast
    study.enqueue_trial({"x": 0.0}, user_attrs={Key.CONTINUE_FROM: fast, Key.RUNG: 1})  # queued: it counts
    assert next_promotion(study, FINETUNE, TEACHER) is None
    for metric in (0.91, 0.905, 0.902):
        _trial(study, metric, 3.5)
    assert next_promotion(study, FINETUNE, TEACHER) is not None  # six at rung 0: a second slot


def test_no_promotion_is_queued_past_the_study_s_trials():
    """Queued when the study's trials are all run or queued, a promotion would be left waiting when
    the study ends: a resumed study with more trials queues it then."""
    study = _study()
    _trial(study, 0.97, 3.0)
    fast = _trial(study, 0.92, 0.5)
    _trial(study, 0.91, 2.0)
    study.enqueue_trial({"x": 0.0}, user_attrs={Key.RECIPE: "int8 on prune 0.5"})  # a queued recipe: it counts
    assert promote(study, FINETUNE, TEACHER, trials=4) is None
    assert promote(study, FINETUNE, TEACHER, trials=5) == fast
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    assert [t.user_attrs.get(Key.CONTINUE_FROM) for t in waiting] == [None, fast]


def test_a_plan_that_cannot_reach_the_front_at_its_latency_is_not_promoted():
    """Promotions from rung 0 closed a tenth of their gap to the teacher; plans at 0.91 could reach
    0.919 at most, under the 0.985 a faster plan already has: they add nothing, and wait, though
    there is a slot for one. A plan that could add is promoted to it."""
    study, halving = _study(), Finetune(steps=4, rungs=2, reduction=2)
    for metric, latency in ((0.93, 3.5), (0.94, 3.6), (0.98, 0.5)):
        parent = _trial(study, metric, latency)
        _trial(study, metric + 0.1 * (1.0 - metric), latency, rung=1, parent=parent)
    for latency in (1.0, 1.1, 1.2, 1.3, 1.4, 1.5):
        _trial(study, 0.91, latency)  # nine plans at rung 0, three moved on: one slot left
    assert next_promotion(study, halving, TEACHER) is None
    hopeful = _trial(study, 0.97, 0.4)
    assert next_promotion(study, halving, TEACHER).number == hopeful


def test_a_recipe_s_plan_is_promoted_rung_by_rung_without_a_slot_while_it_could_be_on_the_front():
    """One plan of the study's own at rung 0 leaves no slot (one in three), yet the recipe that could
    still add to the front's box goes on, and on again from rung 1; then the recipe below the box
    (0.5 could reach 0.875 with half its gap closed twice), which no plan as fast could match: the
    front must dominate it at its longest fine-tune too. A recipe that a faster plan already beats
    at what it could reach waits, and takes no sampled plan's slot."""
    study = _study()
    below = _trial(study, 0.5, 0.3, **{Key.RECIPE: "prune 0.5"})
    recipe = _trial(study, 0.92, 0.5, **{Key.RECIPE: "prune 0.25"})
    _trial(study, 0.5, 3.0, **{Key.RECIPE: "width 0.75"})  # 0.875 at most, where 0.95 runs faster
    _trial(study, 0.95, 1.0)
    assert next_promotion(study, FINETUNE, TEACHER).number == recipe
    once = _trial(study, 0.95, 0.5, rung=1, parent=recipe, **{Key.RECIPE: "prune 0.25"})
    assert next_promotion(study, FINETUNE, TEACHER).number == once
    _trial(study, 0.97, 0.5, rung=2, parent=once, **{Key.RECIPE: "prune 0.25"})
    assert next_promotion(study, FINETUNE, TEACHER).number == below
    below_once = _trial(study, 0.6, 0.3, rung=1, parent=below, **{Key.RECIPE: "prune 0.5"})
    study.enqueue_trial({"x": 0.0}, user_attrs={Key.CONTINUE_FROM: below_once, Key.RUNG: 2})  # queued: it counts
    assert next_promotion(study, FINETUNE, TEACHER) is None
    for latency in (1.1, 1.2):
        _trial(study, 0.95, latency)  # three plans of the study's own at rung 0: a slot, for one of them
    assert Key.RECIPE not in next_promotion(study, FINETUNE, TEACHER).user_attrs


@pytest.mark.parametrize(
    "names", [("sensitivity mix (mild)", "sensitivity mix (medium)"), ("int8 on prune 0.25", "int8 on 2 of 4 blocks")]
)
def test_the_study_s_own_recipes_wait_for_a_slot_as_a_sampled_plan_does(names):
    """The sensitivity mixes and the recipes stacked on int8 are the study's own plans, not recipes
    users know: one of three takes the slot."""
    study = _study()
    mixes = [_trial(study, 0.92, 0.5, **{Key.RECIPE: name}) for name in names]
    assert next_promotion(study, FINETUNE, TEACHER) is None
    _trial(study, 0.91, 0.6)
    assert next_promotion(study, FINETUNE, TEACHER).number in mixes


def test_the_highest_rung_promotes_first():
    study = _study()
    points = ((0.95, 1.0), (0.94, 0.9), (0.93, 0.8))
    lines = [_trial(study, m, l) for m, l in points]
    ones = [_trial(study, m + 0.01, l, rung=1, parent=p) for p, (m, l) in zip(lines, points)]
    for metric, latency in ((0.92, 2.0), (0.91, 2.1), (0.905, 2.2)):
        _trial(study, metric, latency)  # six at rung 0, two slots there, one still free
    promoted = next_promotion(study, FINETUNE, TEACHER)
    assert promoted is not None and promoted.number in ones


def test_a_plan_scored_without_a_fine_tune_and_a_copy_of_another_plan_are_not_promoted():
    """The fast plans are a PTQ recipe and a copy of the slow plan: only the slow one can move on."""
    study = _study()
    slow = _trial(study, 0.97, 3.0)
    _trial(study, 0.92, 0.5, **{Key.FINETUNE_SKIPPED: "post-training quantization: scored as calibrated"})
    _trial(study, 0.97, 3.0, **{Key.DUPLICATE_OF: slow})
    _trial(study, 0.91, 0.6, **{Key.FINETUNE_SKIPPED: "post-training quantization: scored as calibrated"})
    assert next_promotion(study, FINETUNE, TEACHER).number == slow


def test_the_plans_that_could_not_reach_the_front_as_it_stands_are_listed_to_give_up_their_state():
    """Promotions closed a tenth of their gap: the plans at 0.91 behind the faster 0.982 could reach
    0.919 at most; the fast 0.97 plan could still add to the front; the promoted plans' lines
    waiting at rung 1 are at the last rung (nothing to go on from); a PTQ plan saved nothing."""
    study, halving = _study(), Finetune(steps=4, rungs=2, reduction=2)
    for metric, latency in ((0.93, 3.5), (0.94, 3.6), (0.98, 0.5)):
        parent = _trial(study, metric, latency)
        _trial(study, metric + 0.1 * (1.0 - metric), latency, rung=1, parent=parent)
    hopeless = {_trial(study, 0.91, latency) for latency in (1.0, 1.1)}
    _trial(study, 0.97, 0.4)
    _trial(study, 0.90, 3.9, **{Key.FINETUNE_SKIPPED: "post-training quantization: scored as calibrated"})
    assert {t.number for t in without_promise(study, halving, TEACHER)} == hopeless


def test_a_plan_that_gave_up_its_saved_state_is_promoted_from_the_start(tiny_task, sized, tmp_path, monkeypatch):
    """Every screened plan gives up its state here, the one promoted later too: its promotion
    fine-tunes from step 0 to the rung's end, and completes."""
    from search.study import _run

    def every_screened(study, finetune, teacher, window):
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        return [t for t in complete if t.user_attrs[Key.RUNG] == 0]

    monkeypatch.setattr(_run, "without_promise", every_screened)
    study = search.run(tiny_task, trials=4, profiler=sized, results_dir=tmp_path, **ASHA)
    trials = study.get_trials(deepcopy=False)
    child = trials[3]
    parent = trials[child.user_attrs[Key.CONTINUE_FROM]]
    assert child.state == TrialState.COMPLETE and child.user_attrs[Key.FINETUNE_STEPS] == 9
    assert child.user_attrs[Key.FINETUNE_FROM] == f"the start: trial {parent.number}'s state is not here"
    for trial in trials[:3]:
        assert "finetune.pt" not in {p.name for p in Path(trial.user_attrs[Key.ARTIFACTS]).iterdir()}


ASHA = dict(
    finetune=Finetune(steps=9, eval_every=2, rungs=2, reduction=3), recipes=False, sensitivity=False,
    cost_model=False, sampler="random",
)  # fmt: skip


class SizedProfiler(OnnxRuntimeCpuProfiler):
    """The cpu profiler with each latency set to the file's size (1 ms a MB): which plan is promoted
    depends on the plans alone, not on how a tiny model's timings fell on a busy machine."""

    def measure(self, path):
        measurement = super().measure(path)
        ms = Path(path).stat().st_size / 1e6
        return dataclasses.replace(
            measurement, latency_ms=ms, latency_p90_ms=ms, samples_ms=(ms,), session_medians_ms=(ms,), spread=0.0
        )


@pytest.fixture(scope="module")
def sized():
    from targets import load_target

    return SizedProfiler(load_target("cpu"), warmup_runs=1, warmup_s=0.0, min_runs=2, min_time_s=0.0, max_time_s=0.1)


def test_a_promoted_trial_goes_on_from_its_parent_s_saved_state(tiny_task, sized, tmp_path):
    """Three plans screened with 3 steps; the fourth trial fine-tunes the best of them on to step 9
    from the state its trial saved: its step count grows, and its curve starts with its parent's."""
    study = search.run(tiny_task, trials=4, profiler=sized, results_dir=tmp_path, **ASHA)
    trials = study.get_trials(deepcopy=False)
    assert [t.user_attrs[Key.RUNG] for t in trials] == [0, 0, 0, 1]
    child = trials[3]
    parent = trials[child.user_attrs[Key.CONTINUE_FROM]]
    assert child.params == parent.params and child.state == parent.state == TrialState.COMPLETE
    assert parent.user_attrs[Key.FINETUNE_STEPS] == 3 and child.user_attrs[Key.FINETUNE_STEPS] == 9
    parent_curve, child_curve = parent.user_attrs[Key.FINETUNE_CURVE], child.user_attrs[Key.FINETUNE_CURVE]
    assert child_curve.items() >= parent_curve.items() and max(map(int, child_curve)) == 9
    assert child.user_attrs[Key.FINETUNE_FROM] == f"trial {parent.number}'s state at step 3"
    parent_files = {path.name for path in Path(parent.user_attrs[Key.ARTIFACTS]).iterdir()}
    assert "finetune.pt" not in parent_files  # handed on, then let go
    other = next(t for t in trials[:3] if t.number != parent.number)  # screened, not promoted (yet)
    assert "finetune.pt" in {path.name for path in Path(other.user_attrs[Key.ARTIFACTS]).iterdir()}
    assert child.user_attrs[Key.LATENCY_MS] == parent.user_attrs[Key.LATENCY_MS]  # measured once, by the parent
    best = child_curve[str(child.user_attrs[Key.BEST_STEP])]
    assert best == max(child_curve.values())  # its best includes the parent's
    frame = search.load_trials(study).set_index("number")
    if child.values[0] >= parent.values[0]:
        assert frame.loc[parent.number, "superseded_by"] == child.number and not frame.loc[parent.number, "pareto"]


def test_a_promotion_that_loads_its_parent_s_state_neither_ranks_channels_nor_calibrates(
    tiny_task, sized, tmp_path, monkeypatch, activities_built_with
):
    """The saved state holds every weight and quantizer range: the promotion's build leaves out
    what it would write over, and the promotion still goes on from its parent's step."""
    from search.study import _objective

    builds, calibrations = activities_built_with, []
    calibrate = _objective.calibrate_input_quant

    def calibrate_input_quant(*args, **kwargs):
        calibrations.append(args)
        return calibrate(*args, **kwargs)

    monkeypatch.setattr(_objective, "calibrate_input_quant", calibrate_input_quant)
    study = search.run(tiny_task, trials=4, profiler=sized, results_dir=tmp_path, **ASHA)
    trials = study.get_trials(deepcopy=False)
    assert [t.user_attrs[Key.RUNG] for t in trials] == [0, 0, 0, 1]
    assert [activity is None for activity in builds] == [False, False, False, True] and len(calibrations) == 3
    child = trials[3]
    assert child.user_attrs[Key.FINETUNE_FROM] == f"trial {child.user_attrs[Key.CONTINUE_FROM]}'s state at step 3"


def test_a_promotion_lets_its_parent_s_loaded_state_go_before_it_fine_tunes(tiny_task, sized, tmp_path, monkeypatch):
    """The run copies the loaded weights into the student and its best state: the loaded tensors
    are not held through the fine-tune (a MiniLM plan's weights are 90 MB)."""
    import gc
    import weakref

    from search.compress import Distillation
    from search.study import _objective

    loaded, held_at_start = [], []
    load, go = _objective.Objective._saved_state, Distillation.run

    def saved_state(self, parent):
        state = load(self, parent)
        if state is not None:
            loaded.extend(weakref.ref(tensor) for tensor in state["student"].values())
        return state

    def run(self, *args, **kwargs):
        gc.collect()
        held_at_start.append(sum(ref() is not None for ref in loaded))
        return go(self, *args, **kwargs)

    monkeypatch.setattr(_objective.Objective, "_saved_state", saved_state)
    monkeypatch.setattr(Distillation, "run", run)
    study = search.run(tiny_task, trials=4, profiler=sized, results_dir=tmp_path, **ASHA)
    assert study.get_trials(deepcopy=False)[3].user_attrs[Key.CONTINUE_FROM] is not None
    assert len(loaded) > 0 and held_at_start[-1] == 0


def test_the_fine_tune_scores_the_student_the_faster_way_it_timed(tiny_task, sized, tmp_path):
    """After step 0 the file is tried first, PyTorch next; from then on the faster of the two (here
    PyTorch: the file's metric is made slow). A promotion inherits the timings and goes on the faster way."""
    from search.artifacts import OnnxModule
    from search.tasks import top1_accuracy

    def slow_on_file(model, val):
        if isinstance(model, OnnxModule):
            time.sleep(0.05)
        return top1_accuracy(model, val)

    task = search.Task(
        tiny_task.model, tiny_task.train, tiny_task.val, tiny_task.example_input, slow_on_file, "slow-file"
    )
    study = search.run(task, trials=4, profiler=sized, results_dir=tmp_path, **ASHA)
    trials = study.get_trials(deepcopy=False)
    for trial in trials[:3]:  # screened: step 0 and 2 on the file, 3 in PyTorch
        assert trial.user_attrs[Key.SCORED_ON_FILE] == ["0", "2"]
        assert trial.user_attrs[Key.FINETUNE_CURVE].keys() == {"0", "2", "3"}
        assert trial.user_attrs[Key.SCORE_SECONDS]["file"] > trial.user_attrs[Key.SCORE_SECONDS]["torch"]
    child = trials[3]
    assert child.user_attrs[Key.CONTINUE_FROM] in (0, 1, 2) and child.user_attrs[Key.FINETUNE_STEPS] == 9
    assert child.user_attrs[Key.SCORED_ON_FILE] == ["0", "2"]  # the parent's; the steps after it went on in PyTorch
    assert child.user_attrs[Key.FINETUNE_CURVE].keys() == {"0", "2", "3", "4", "6", "8", "9"}
    for trial in trials:
        kept_on_file = str(trial.user_attrs[Key.BEST_STEP]) in trial.user_attrs[Key.SCORED_ON_FILE]
        assert (trial.user_attrs[Key.METRIC_TORCH] is None) == kept_on_file


PROMOTION_KILLED = """
import time
import search, search.study._objective as objective
from search.compress import Finetune
from profilers import get_profiler
from targets import load_target
real = objective.Distillation.run
def run(self, until, *args, **kwargs):
    if self.step >= 3:  # a promotion, going on from its parent's state: stays here until killed
        time.sleep(300)
    return real(self, until, *args, **kwargs)
objective.Distillation.run = run
timing = dict(warmup_runs=2, warmup_s=0.01, min_runs=20, min_time_s=0.02, max_time_s=0.5, tolerance=0.5)
search.run(
    search.load_task("worker_task:tiny"), trials=4, results_dir={results!r}, study_name="promoted",
    profiler=get_profiler(load_target("cpu"), **timing), cost_model=False, recipes=False, sensitivity=False,
    sampler="random", finetune=Finetune(steps=9, eval_every=2, rungs=2, reduction=3),
)
"""


@pytest.mark.slow
def test_a_promoted_trial_killed_mid_fine_tune_is_retried_from_its_parent_s_state(worker_env, tmp_path):
    """The promotion is killed (kill -9) in its fine-tune. The same study run again retries it: the
    retry is still the promotion, and goes on from the state the parent saved at step 3 to step 9."""
    kwargs = dict(profiler=_tolerant(), results_dir=tmp_path, study_name="promoted", **ASHA)
    search.run(worker_env, trials=3, **kwargs)
    process = subprocess.Popen(
        [sys.executable, "-c", PROMOTION_KILLED.format(results=str(tmp_path))],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        killed = _wait_for_promotion(tmp_path / "promoted" / "study.db", process)
    finally:
        process.kill()
        process.wait()
    study = search.run(worker_env, trials=4, **kwargs)
    trials = study.get_trials(deepcopy=False)
    assert trials[killed].state == TrialState.FAIL
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == killed)
    parent = trials[trials[killed].user_attrs[Key.CONTINUE_FROM]]
    assert retry.state == TrialState.COMPLETE and retry.user_attrs[Key.CONTINUE_FROM] == parent.number
    assert retry.user_attrs[Key.RUNG] == 1
    assert retry.user_attrs[Key.FINETUNE_STEPS] == 9 > parent.user_attrs[Key.FINETUNE_STEPS]
    assert retry.user_attrs[Key.FINETUNE_CURVE].items() >= parent.user_attrs[Key.FINETUNE_CURVE].items()
    assert retry.user_attrs[Key.FINETUNE_FROM] == f"trial {parent.number}'s state at step 3"  # no restart


def _tolerant():
    from profilers import get_profiler
    from targets import load_target

    return get_profiler(
        load_target("cpu"), warmup_runs=2, warmup_s=0.01, min_runs=20, min_time_s=0.02, max_time_s=0.5, tolerance=0.5
    )


def _wait_for_promotion(database: Path, process: subprocess.Popen, limit_s: float = 240) -> int:
    """The number of the promotion that reached its fine-tune in the study ``process`` runs."""
    start = time.monotonic()
    while time.monotonic() - start < limit_s:
        assert process.poll() is None, process.stdout.read()
        study = optuna.load_study(study_name="promoted", storage=f"sqlite:///{database}")
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if Key.CONTINUE_FROM in trial.user_attrs and trial.user_attrs.get(Key.STAGE) == "fine-tune":
                return trial.number
        time.sleep(0.2)
    raise AssertionError(f"no promotion reached its fine-tune in {limit_s} s")
