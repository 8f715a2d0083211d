"""``search.run`` and ``search.work``: one Optuna study over compression plans, started, resumed or
joined, every candidate built and measured for real."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
import torch

from profilers import TOKEN_ENV, Profiler, RemoteProfiler, get_profiler
from search._errors import SearchError, UsageError
from search._record import Key, StudyKey
from search.compress import Finetune
from search.costmodel import CostGate
from search.model import describe_layers, find_blocks
from search.study._baseline import check_measured_alike, measure_baseline, teacher_again, warn_of_metric_scale
from search.study._exclude import exclusions
from search.study._fidelity import resolve_finetune
from search.study._front import study_window
from search.study._objective import CANDIDATE_FAILURES, Objective, StageCallback
from search.study._optuna import make_sampler, rung_ends
from search.study._promote import promote, without_promise
from search.study._recipes import enqueue_recipes, recipe_params, recipe_rules, stacked_rules
from search.study._results import SQLITE_FILE, locate_study, write_parquet
from search.study._sensitivity import block_drops, layer_sensitivity, mixed_rules
from search.study._setup import Setup, check_results_dir
from search.study._storage import make_storage
from search.study._spec import SPEC_VERSION, RunSpec, pruner_name, spec_of, task_of_study
from search.study._workers import (
    Surplus,
    retry_interrupted,
    spawn_workers,
    stop_workers,
    threads_per_worker,
    work_loop,
)
from search.tasks import Task
from targets import Target

BASELINE_WAIT_S = 600  # how long a joining worker waits for the first process to measure the teacher
CLAIMED = ("target", "objectives", "budget")  # settings a resumed study must keep
SENSITIVITY_SHARE = 0.1  # with a timeout, layer sensitivity takes at most this share of it


def run(
    task: Task,
    spec: RunSpec | None = None,
    *,
    profiler: Profiler | None = None,
    pruner: optuna.pruners.BasePruner | str | None = None,
    on_stage: StageCallback | None = None,
    on_setup: Callable[[str], None] | None = None,
    callbacks: Sequence[Callable] = (),
    **settings: Any,
) -> optuna.Study:
    """Search compression plans for ``task`` until the study holds ``spec.trials`` finished trials.

    ``spec`` is the run's :class:`RunSpec`; without one, ``settings`` are its fields
    (``search.run(task, target="cpu", budget="0.5x", trials=30)``). Re-running with the same study
    resumes it. Returns the Optuna study; :func:`search.load_trials` gives its DataFrame. User
    errors raise :class:`~search.UsageError` (and ``targets.TargetError``,
    ``profilers.TargetUnavailableError``) before any work starts.

    ``profiler`` defaults to the target's own (:func:`profilers.get_profiler`). ``pruner``: an Optuna
    pruner object for the fine-tunes (``NopPruner()`` for none), else the spec's. With the cost
    model on, each plan's latency is predicted before it is fine-tuned, and plans predicted over
    the budget and not worth measuring are skipped (:meth:`CostGate.veto_reason`).
    ``on_setup(text)`` is told what the run prepares before its first trial (the teacher's
    measurement, the fine-tune's length, the teacher's activity, each layer-sensitivity option),
    ``on_stage(number, stage)`` then what each trial does. With ``workers`` > 1 this process plus
    ``workers - 1`` ``search worker`` processes on this machine share the study (the task must come
    from :func:`search.load_task`, so that they can load it too); other machines join with
    :func:`work` on the same ``storage``. As the run ends the teacher is measured once more (the
    study's ``teacher_at_end``: how far the machine drifted over it).
    """
    started = time.monotonic()  # the timeout counts from here: setup (baseline, sensitivity) included
    if spec is None:
        spec = RunSpec(pruner=pruner_name(pruner, "asha"), **settings)
    elif settings:
        raise UsageError(f"pass a RunSpec or its settings as keywords, not both; got spec and {', '.join(settings)}")
    else:
        spec = spec.replace(pruner=pruner_name(pruner, spec.pruner))
    if spec.workers > 1 and task.spec is None:
        raise UsageError(
            "workers > 1 needs a task loaded by 'module:function' (search.load_task or --task), "
            "so that every worker process can load it"
        )
    profiler = profiler or get_profiler(spec.target, service=spec.profiler, **spec.timing)
    layers = describe_layers(task.model, task.example_input)
    unknown = sorted(set(spec.space.layers) - {layer.name for layer in layers})
    if unknown:
        raise UsageError(
            f"search space names layers the model lacks: {', '.join(unknown)}; "
            f"known: {', '.join(layer.name for layer in layers)}"
        )
    spec = spec.replace(
        task=task.spec, task_options=task.options, timing=profiler.timing(), profiler=getattr(profiler, "address", None),
        study_name=spec.study_name or default_study_name(task, spec.target), results_dir=spec.results_dir.resolve(),
    )  # fmt: skip
    directory = spec.results_dir / spec.study_name
    check_results_dir(spec.results_dir, directory)
    setting = profiler.setting()  # None where only a measurement tells
    gate = _gate(spec, task, setting)
    url = spec.storage or f"sqlite:///{directory / SQLITE_FILE}"
    with Setup(url, spec.study_name, directory) as setup:
        study = setup.existing()
        if study is not None:  # resumed: refused here, before any work, when its settings differ
            _claim_study(study, spec, task)
            if StudyKey.BASELINE in study.user_attrs:  # or this machine measures otherwise
                check_measured_alike(study.user_attrs[StudyKey.BASELINE], setting)
        setting_up = on_setup or (lambda text: None)
        if study is None or StudyKey.BASELINE not in study.user_attrs:
            # The task's check (it exports, scores to a finite number, measures) before a new study is written.
            setting_up(f"measuring the uncompressed teacher on {spec.target.name}")
            baseline = measure_baseline(task, profiler, setup.staging())
            warn_of_metric_scale(task, baseline[Key.METRIC])
            if study is None:
                study = setup.create(spec.directions)
                _claim_study(study, spec, task)
            setup.keep_baseline(study, baseline)
        study.pruner = pruner if isinstance(pruner, optuna.pruners.BasePruner) else optuna.pruners.NopPruner()
        study.set_metric_names(spec.metric_names)
        # A resumed study must not replay the first session's random start-up plans.
        study.sampler = make_sampler(spec.sampler, spec.seed + len(study.trials))
        setting_up("choosing the fine-tune's length (a few distillation steps timed)")
        finetune, note = _finetune(study, spec, task)
        spec = spec.replace(finetune=finetune)
        study.set_user_attr(StudyKey.RUN_SPEC, spec.to_dict())
        study.set_user_attr(StudyKey.FINETUNE_NOTE, note)
        budget_ms = spec.budget.resolve(study.user_attrs[StudyKey.BASELINE]["latency_ms"]) if spec.budget else None
        study.set_user_attr(StudyKey.BUDGET_MS, budget_ms)
        blocks = find_blocks(task.model)
        if spec.sensitivity and StudyKey.SENSITIVITY not in study.user_attrs:
            setting_up("measuring the teacher's activity (its channels' ranking and the refits after pruning)")
            task.activity()  # measured once for every plan's build, not out of the pass's share
            deadline = _deadline(time.monotonic(), spec.timeout and SENSITIVITY_SHARE * spec.timeout)
            teacher = study.user_attrs[StudyKey.BASELINE][Key.METRIC]
            rows = layer_sensitivity(task, layers, spec.space, blocks, spec.target, teacher, deadline, setting_up)
            study.set_user_attr(StudyKey.SENSITIVITY, rows)
        sensitivity = study.user_attrs.get(StudyKey.SENSITIVITY, [])
        if spec.recipes and not study.trials:
            users = recipe_rules(spec.space, blocks)
            rules = {**users, **mixed_rules(sensitivity), **stacked_rules(users)}
            exclude, drops = _exclusions(study, spec, layers), block_drops(sensitivity, blocks)
            recipes = recipe_params(rules, spec.space, layers, blocks, exclude, drops)
            enqueue_recipes(study, dict(list(recipes.items())[: spec.trials]))  # no more than the study runs
    directory.mkdir(parents=True, exist_ok=True)  # a study resumed from another machine's storage
    ends = _deadline(started, spec.timeout)
    objective = _objective(study, task, spec, profiler, directory, on_stage, layers, gate, ends)
    after_trial = _after_trial(directory, gate)
    helpers, threads = [], torch.get_num_threads()
    if spec.workers > 1:
        env = {"OMP_NUM_THREADS": str(threads_per_worker(spec.workers))}
        if isinstance(profiler, RemoteProfiler):
            env[TOKEN_ENV] = profiler.token
        left = None if ends is None else ends - time.monotonic()
        helpers = spawn_workers(
            spec.workers - 1, url, spec.study_name, spec.results_dir, spec.seed, spec.profiler, env, left
        )
        torch.set_num_threads(threads_per_worker(spec.workers))
    interrupted = False
    try:
        _work(study, objective, [after_trial, *callbacks])
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        torch.set_num_threads(threads)
        failed = [code for code in stop_workers(helpers, interrupted) if code not in (0, 130)]
        after_trial(study, None)
    if failed:
        raise SearchError(
            f"{len(failed)} of {spec.workers - 1} worker processes failed (exit codes {failed}); "
            f"see {directory / 'workers'}/*.log"
        )
    study.set_user_attr(StudyKey.TEACHER_AT_END, teacher_again(task, profiler, study.user_attrs[StudyKey.BASELINE]))
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
    storage URL such as ``postgresql://…``) as one more worker, with the study's own
    :class:`RunSpec`, until it holds its trials.

    The task is loaded by the ``module:function`` the study was started with; its teacher must be the
    same (same weights) as the first process's. Measurements go to ``profiler``, or to the target's
    own (a profiler service with ``service`` and ``token``), timed as the first process timed them.
    """
    started = time.monotonic()
    url, study_name = locate_study(study, study_name)
    opened = optuna.load_study(study_name=study_name, storage=make_storage(url))
    spec = spec_of(opened)
    if spec.pruner == "custom":
        raise UsageError(f"study {opened.study_name!r} was started with a custom pruner; workers cannot rebuild it")
    task = task_of_study(spec, opened.study_name, "join it with search.run(the same task, storage=..., study_name=...)")
    profiler = profiler or get_profiler(spec.target, service=service, token=token, **spec.timing)
    _claim_teacher(opened, task)
    waited = time.monotonic()
    while StudyKey.BASELINE not in opened.user_attrs:  # the first process is still measuring the teacher
        if time.monotonic() - waited > BASELINE_WAIT_S:
            raise UsageError(f"study {opened.study_name!r} has no baseline after {BASELINE_WAIT_S} s; is its first process running?")
        time.sleep(1.0)
    setting = profiler.setting()  # None where only a measurement tells
    check_measured_alike(opened.user_attrs[StudyKey.BASELINE], setting)
    spec = spec.replace(
        seed=seed if seed is not None else int.from_bytes(os.urandom(4), "little"), timeout=timeout,
        results_dir=Path(results_dir), workers=1,
    )  # fmt: skip
    opened.sampler = make_sampler(spec.sampler, spec.seed)
    opened.pruner = optuna.pruners.NopPruner()
    directory = spec.results_dir / opened.study_name
    check_results_dir(spec.results_dir, directory)
    gate = _gate(spec, task, setting)
    directory.mkdir(parents=True, exist_ok=True)
    layers = describe_layers(task.model, task.example_input)
    ends = _deadline(started, timeout)
    objective = _objective(opened, task, spec, profiler, directory, on_stage, layers, gate, ends)
    after_trial = _after_trial(directory, gate)
    try:
        _work(opened, objective, [after_trial, *callbacks])
    finally:
        after_trial(opened, None)
    return opened


def default_study_name(task: Task, target: Target) -> str:
    return f"{task.name}-{target.name}"


def _claim(study: optuna.Study, key: str, value, hint: str | None = None) -> None:
    """Record a fact of the teacher on a new study; refuse to resume or join one made with another."""
    stored = study.user_attrs.get(key)
    if stored is None:
        study.set_user_attr(key, value)
    elif stored != value:
        raise UsageError(
            f"study {study.study_name!r} was made with {key} {stored!r}, not {value!r}; "
            + (hint or "resume it with the same settings or choose another --study-name")
        )


def _claim_study(study: optuna.Study, spec: RunSpec, task: Task) -> None:
    """Refuse a study made for another task, other settings (:func:`_claim_settings`) or another
    teacher; record them on a new one."""
    _claim(study, StudyKey.TASK, task.name)
    _claim_settings(study, spec)
    _claim_teacher(study, task)
    _claim(
        study, StudyKey.METRIC_WINDOW, task.window,
        "the task's metric_window sets the span its front is judged over: resume it with the same one",
    )  # fmt: skip
    if [d.name for d in study.directions] != [d.name for d in spec.directions]:
        raise UsageError(
            f"study {study.study_name!r} was made with {len(study.directions)} objectives, not "
            f"{','.join(spec.objectives)!r}; resume it with the same settings or choose another --study-name"
        )


def _claim_settings(study: optuna.Study, spec: RunSpec) -> None:
    """Refuse to resume a study made with another target, objectives or budget (the settings its
    trials' values and constraints depend on); any other setting may change on resume."""
    stored = study.user_attrs.get(StudyKey.RUN_SPEC)
    if stored is None:
        return
    if stored.get("version") != SPEC_VERSION:
        RunSpec.from_dict(stored, f"study {study.study_name!r}")  # says which version made it
    given = spec.to_dict()
    for key in CLAIMED:
        if stored[key] != given[key]:
            raise UsageError(
                f"study {study.study_name!r} was made with {key} {stored[key]!r}, not {given[key]!r}; "
                "resume it with the same settings or choose another --study-name"
            )


def _claim_teacher(study: optuna.Study, task: Task) -> None:
    """Every process of a study compresses the same teacher: the first records its weights' sha256."""
    _claim(
        study, StudyKey.TEACHER_SHA256, task.fingerprint(),
        "every worker must load the same trained teacher (copy its weights file to this machine)",
    )  # fmt: skip


def _trials_wanted(study: optuna.Study) -> Callable[[], int]:
    """The study's ``trials``, read afresh: a later ``search run --trials N`` raises it for every worker."""
    return lambda: study.user_attrs[StudyKey.RUN_SPEC]["trials"]


def _deadline(started: float, timeout: float | None) -> float | None:
    """When the run (or the pass) ends, as ``time.monotonic()``: ``timeout`` seconds after ``started``."""
    return None if timeout is None else started + timeout


def _work(study: optuna.Study, objective: Objective, callbacks: Sequence[Callable]) -> None:
    """This process's share of the study's trials; Ctrl-C queues the interrupted trial to run again.
    Before each trial, with successive halving, the plan that has earned a longer fine-tune is
    queued first (:func:`promote`), and the plans that could not reach the front as it stands give
    up the state they saved for a promotion (disk: a MiniLM plan's is 330 MB)."""
    baseline = study.user_attrs[StudyKey.BASELINE]
    teacher, window = (baseline[Key.METRIC], baseline[Key.LATENCY_MS]), study_window(study)

    def run_one() -> None:
        if objective.spec.pruner == "asha":
            promote(study, objective.finetune, teacher, objective.trials(), window)
            objective.drop_saved_states(without_promise(study, objective.finetune, teacher, window))
        study.optimize(
            lambda trial: objective(study, trial), n_trials=1, catch=(*CANDIDATE_FAILURES, Surplus),
            callbacks=list(callbacks),
        )  # fmt: skip

    try:
        work_loop(study, run_one, objective.trials, objective.deadline)
    except KeyboardInterrupt:
        retry_interrupted(study, objective.current)
        raise


def _objective(
    study: optuna.Study,
    task: Task,
    spec: RunSpec,
    profiler: Profiler,
    directory: Path,
    on_stage: StageCallback | None,
    layers: list,
    gate: CostGate | None,
    deadline: float | None,
) -> Objective:
    """The objective of one worker of ``study``, which already holds its settings and baseline;
    ``deadline`` (``time.monotonic()``): when the run's time is up."""
    if gate is not None:
        study.set_user_attr(StudyKey.COST_MODEL_WARM_START, gate.warm_start)
    finetune, blocks = spec.finetune_for(task.finetune), find_blocks(task.model)
    drops = block_drops(study.user_attrs.get(StudyKey.SENSITIVITY, []), blocks)
    return Objective(
        task, spec, profiler, layers, blocks, finetune, rung_ends(spec.pruner, finetune),
        _exclusions(study, spec, layers), drops, study.user_attrs[StudyKey.BUDGET_MS], directory,
        on_stage or (lambda number, stage: None), gate, _trials_wanted(study), deadline,
    )  # fmt: skip


def _exclusions(study: optuna.Study, spec: RunSpec, layers: list) -> dict[str, list]:
    """What the study does not offer of its space (:func:`exclusions`): the same for every worker."""
    sensitivity = study.user_attrs.get(StudyKey.SENSITIVITY, [])
    return exclusions(spec.space, layers, spec.target.precisions, spec.objectives, sensitivity, study_window(study))


def _finetune(study: optuna.Study, spec: RunSpec, task: Task) -> tuple[Finetune, str]:
    """The run's fine-tune, its longest in steps: as a resumed study chose it, unless this run
    sets its length anew; else resolved now (:func:`resolve_finetune`)."""
    finetune = spec.finetune_for(task.finetune)
    stored = study.user_attrs.get(StudyKey.RUN_SPEC, {}).get("finetune", {})
    if finetune.steps is None and finetune.epochs is None and stored.get("steps") is not None:
        finetune = dataclasses.replace(finetune, steps=stored["steps"], epochs=stored.get("epochs"))
        return finetune, study.user_attrs.get(StudyKey.FINETUNE_NOTE, f"{finetune.steps} steps")
    return resolve_finetune(finetune, task, spec.timeout)


def _gate(spec: RunSpec, task: Task, setting: str | None) -> CostGate | None:
    """The cost model's gate, predicting under the profiler's ``setting`` until the study's own
    measurements say; it reads earlier studies' measurements, so a damaged file stops the run here
    (one of another feature layout is left out, with a warning)."""
    if not spec.cost_model:
        return None
    target = spec.target.name
    folder = spec.results_dir / "costmodel" / target / task.name
    return CostGate(folder, spec.study_name, target, task.name, setting=setting)


def _after_trial(directory: Path, gate: CostGate | None) -> Callable:
    def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial | None) -> None:
        write_parquet(study, directory)
        if gate is not None:
            gate.save(study)

    return after_trial
