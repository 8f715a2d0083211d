"""``search``: a thin Typer CLI over the Python API (``search.run``, ``load_trials``, ``export``).

A command that runs, measures or exports imports what it needs (PyTorch, scikit-learn, ONNX: seconds
together) in its own body, so that ``search --help``, a usage error or ``search results`` does not
wait for them."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Annotated, Optional

import optuna
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

import profilers
import targets
from search._errors import SearchError, UsageError, first_line
from search._record import STAGES, Key, StudyKey
from search.compress import SCHEDULES, Finetune
from search.plan import SearchSpace
from search.study import (
    BLOCK,
    FINISHED,
    OBJECTIVES,
    SAMPLERS,
    RunSpec,
    check_results_dir,
    finished_count,
    load_sensitivity,
    load_trials,
    open_study,
    pareto_front,
    plot_front,
    spec_of,
    study_window,
)
from search.tasks import DEFAULT_TASK


# Bounds of the numbers a user gives: each well past any real run, so that a typo (a unit, an
# exponent, a stray digit) stops at the flag with its range instead of deep inside a run.
MAX_TRIALS = 100_000
MAX_TIMEOUT_S = 30 * 24 * 3600.0
MAX_SEED = 2**32 - 1  # what NumPy's generators, under Optuna's samplers, take
MAX_EPOCHS = 10_000.0
MAX_STEPS = 10_000_000
MAX_SEQ_LEN = 65_536
MAX_WORKERS = 256
MIN_METRIC_WINDOW, MAX_METRIC_WINDOW = 1e-9, 1e9  # in the task's metric's units, whatever they are


def within(low: float, high: float) -> dict:
    """A number option's keywords: it must lie in [low, high] (NaN never does), else a usage
    error naming the option and the range."""

    def check(value: float | None) -> float | None:
        if value is not None and not low <= value <= high:
            raise typer.BadParameter(f"{value} is not in the range {_shown(low)} to {_shown(high)}")
        return value

    return {"callback": check}


def _shown(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


class Switch(str, enum.Enum):
    on = "on"
    off = "off"


# What the packages raise on purpose: each becomes one line on stderr and exit status 1.
ERRORS = (SearchError, targets.TargetError, profilers.ProfilerError)

app = typer.Typer(help="Hardware-aware compression search for PyTorch models.", no_args_is_help=True)
console = Console()
_debug = {"on": False}


@app.callback()
def _main(debug: Annotated[bool, typer.Option(help="Show tracebacks for errors.")] = False) -> None:
    _debug["on"] = debug
    shown = warnings.showwarning
    if getattr(shown, "func", None) is not _show_warning:  # once, however many commands a process runs
        warnings.showwarning = functools.partial(_show_warning, shown)


def _show_warning(shown_otherwise, message, category, filename, lineno, file=None, line=None) -> None:
    """This package's warnings as one line on stderr, as its errors are; others as Python shows them."""
    if Path(filename).resolve().is_relative_to(Path(__file__).resolve().parent):
        text = Text.assemble(("warning: ", "bold yellow"), str(message))
        Console(stderr=True).print(text, highlight=False, soft_wrap=True)
    else:
        shown_otherwise(message, category, filename, lineno, file, line)


@contextlib.contextmanager
def _user_errors():
    """The one place a library error becomes one line on stderr and exit status 1."""
    try:
        yield
    except ERRORS as exc:
        if _debug["on"]:
            raise
        # soft_wrap, and the lines of a message from elsewhere joined: one line, so it greps and pipes whole
        Console(stderr=True).print(
            Text.assemble(("error: ", "bold red"), " ".join(str(exc).split())), highlight=False, soft_wrap=True
        )
        raise typer.Exit(1) from None
    except OSError as exc:  # a file the command writes (a plot, a folder): the system's words and the path
        if _debug["on"]:
            raise
        where = f": {exc.filename}" if exc.filename else ""
        Console(stderr=True).print(
            Text.assemble(("error: ", "bold red"), f"{exc.strerror or first_line(exc)}{where}"),
            highlight=False, soft_wrap=True,
        )  # fmt: skip
        raise typer.Exit(1) from None


def _floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected comma-separated numbers such as 1.0,0.75") from None


def _ints(text: str | None, flag: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected comma-separated whole numbers such as 32,8,4") from None


def _space(path: Path | None, **flags) -> SearchSpace:
    space = SearchSpace.from_toml(path) if path else SearchSpace()
    return space.replace(**flags)


TIMEOUT_HELP = (
    "The run's time in seconds, set-up included: no trial starts after it, and a running fine-tune "
    "stops at it (its best state kept and scored)."
)
ProfilerAddress = Annotated[
    Optional[str], typer.Option(help="host:port of a `search serve` profiler service measuring on the target.")
]
ProfilerToken = Annotated[
    Optional[str], typer.Option(help=f"The profiler service's token (default: ${profilers.TOKEN_ENV}).")
]
StudyArg = Annotated[str, typer.Argument(help="results/<study> folder, study name under results/, or storage URL.")]
StudyName = Annotated[Optional[str], typer.Option(help="Study name inside a storage URL.")]


@app.command("run")
def run_command(
    task: Annotated[str, typer.Option(help="module:function returning a search.Task.")] = DEFAULT_TASK,
    target: Annotated[str, typer.Option(help="Target name (see `search targets`) or a .toml file.")] = "cpu",
    budget: Annotated[Optional[str], typer.Option(help="Latency budget: 5ms, 500us, 0.005s or 0.5x.")] = None,
    objectives: Annotated[str, typer.Option(help=f"Comma-separated from {', '.join(OBJECTIVES)}.")] = "metric,latency",
    trials: Annotated[int, typer.Option(**within(1, MAX_TRIALS), help="Finished trials the study should hold.")] = 20,
    timeout: Annotated[
        Optional[float],
        typer.Option(**within(0.001, MAX_TIMEOUT_S), help=TIMEOUT_HELP),
    ] = None,
    sampler: Annotated[str, typer.Option(help=f"One of {', '.join(SAMPLERS)}.")] = "tpe",
    seed: Annotated[int, typer.Option(**within(0, MAX_SEED), help="The sampler's seed.")] = 0,
    space: Annotated[Optional[Path], typer.Option(help="Search space TOML file.")] = None,
    width: Annotated[Optional[str], typer.Option(help="Student widths, e.g. 1,0.75,0.5.")] = None,
    bits: Annotated[Optional[str], typer.Option(help="Bit widths, e.g. 32,8,4,1.")] = None,
    pruning: Annotated[Optional[str], typer.Option(help="Channel pruning ratios, e.g. 0,0.25,0.5.")] = None,
    sparsity: Annotated[Optional[str], typer.Option(help="Weight sparsity ratios, e.g. 0,0.5.")] = None,
    two_four: Annotated[Optional[bool], typer.Option("--two-four/--no-two-four", help="Offer 2:4 sparsity.")] = None,
    epochs: Annotated[
        Optional[float],
        typer.Option(
            **within(0.001, MAX_EPOCHS),
            help="The longest fine-tune, in epochs of the task's training data \\[default: the task's, else from the "
            "data's size and the run's time].",
        ),
    ] = None,
    steps: Annotated[
        Optional[int],
        typer.Option(**within(0, MAX_STEPS), help="The longest fine-tune in steps (batches), instead of --epochs."),
    ] = None,
    alpha: Annotated[
        Optional[float],
        typer.Option(**within(0.0, 1.0), help=f"Weight of the distillation (KL) term \\[default: {Finetune.alpha}]."),
    ] = None,
    temperature: Annotated[
        Optional[float],
        typer.Option(**within(0.01, 100.0), help=f"Distillation temperature \\[default: {Finetune.temperature}]."),
    ] = None,
    lr: Annotated[
        Optional[float],
        typer.Option(**within(1e-9, 10.0), help=f"Fine-tune learning rate \\[default: the task's, or {Finetune.lr}]."),
    ] = None,
    lr_schedule: Annotated[
        Optional[str],
        typer.Option(
            help=f"Learning-rate schedule: {', '.join(SCHEDULES)} \\[default: the task's, or {Finetune.schedule}]."
        ),
    ] = None,
    finetune_seed: Annotated[
        Optional[int],
        typer.Option(
            **within(0, MAX_SEED),
            help="Seed of every plan's fine-tune: all see the same batches in the same order "
            f"\\[default: {Finetune.seed}].",
        ),
    ] = None,
    seq_len: Annotated[
        Optional[int],
        typer.Option(**within(1, MAX_SEQ_LEN), help="Sequence length latency is measured at, for tasks that take one."),
    ] = None,
    metric_window: Annotated[
        Optional[float],
        typer.Option(
            **within(MIN_METRIC_WINDOW, MAX_METRIC_WINDOW),
            help="The drop below the teacher's metric the front is judged within, in the metric's units: plans are "
            "fine-tuned longer for what they could add there, and a bit width that alone drops the metric by more is "
            "not offered \\[default: the task's, else 0.1: 10 points of an accuracy in 0 to 1].",
        ),
    ] = None,
    prune_trials: Annotated[
        bool,
        typer.Option("--pruner/--no-pruner", help="Successive halving: screen every plan with a short fine-tune and "
                     "fine-tune longer only those that could still reach the front (off: every plan gets the longest)."),
    ] = True,
    recipes: Annotated[
        bool, typer.Option(help="Start with the recipes users know (int8 everywhere, uniform pruning, students).")
    ] = True,
    sensitivity: Annotated[
        bool, typer.Option(help="Measure each layer's sensitivity first; it seeds a recipe and steers the search.")
    ] = True,
    cost_model: Annotated[
        Switch,
        typer.Option(help="Skip plans the learned cost model predicts over the budget and not worth measuring."),
    ] = Switch.on,
    storage: Annotated[Optional[str], typer.Option(help="Optuna storage URL (default: SQLite in results/).")] = None,
    study_name: Annotated[Optional[str], typer.Option(help="Default: <task>-<target>.")] = None,
    results_dir: Annotated[Path, typer.Option(help="Where studies write.")] = Path("results"),
    workers: Annotated[
        int,
        typer.Option(**within(1, MAX_WORKERS), help="Processes on this machine sharing the study (this one included)."),
    ] = 1,
    profiler: ProfilerAddress = None,
    token: ProfilerToken = None,
    dry_run: Annotated[bool, typer.Option(help="Print the resolved run and exit.")] = False,
) -> None:
    """Search compression plans for a task on a target."""
    from search.study import run
    from search.tasks import load_task

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    with _user_errors():
        target_spec = targets.load_target(target)
        # An unreachable target fails before any work.
        measurer = profilers.get_profiler(target_spec, service=profiler, token=token)
        tuning = {"steps": steps, "epochs": epochs, "alpha": alpha, "temperature": temperature, "lr": lr,
                  "schedule": lr_schedule, "seed": finetune_seed}  # fmt: skip
        spec = RunSpec(
            target=target_spec, budget=budget, objectives=tuple(objectives.split(",")), trials=trials,
            timeout=timeout, sampler=sampler, seed=seed,
            space=_space(
                space,
                width=_floats(width, "--width"),
                bits=_ints(bits, "--bits"),
                pruning=_floats(pruning, "--pruning"),
                sparsity=_floats(sparsity, "--sparsity"),
                two_four=two_four,
            ),
            finetune={key: value for key, value in tuning.items() if value is not None},  # the task's for the rest
            pruner="asha" if prune_trials else "none", cost_model=cost_model == Switch.on, recipes=recipes,
            sensitivity=sensitivity,
            task=task, task_options={"seq_len": seq_len} if seq_len is not None else {},
            profiler=getattr(measurer, "address", None), storage=storage, study_name=study_name,
            results_dir=results_dir, workers=workers,
        )  # fmt: skip
        if dry_run:
            console.print_json(json.dumps(spec.to_dict(), default=str))
            return
        check_results_dir(results_dir)  # before the task loads: a folder it cannot write stops here
        if isinstance(measurer, profilers.RemoteProfiler):
            with console.status(f"checking the profiler service at {measurer.address}…"):
                measurer.check()
        with console.status(f"loading task {task}…"):
            task_obj = load_task(task, **spec.task_options)
            if metric_window is not None:
                task_obj = dataclasses.replace(task_obj, metric_window=metric_window)
        if workers > 1 and not isinstance(measurer, profilers.RemoteProfiler):
            console.print(
                f"note: {workers} workers fine-tune on this machine while it measures; measurements take "
                "turns, but the other workers' load can still slow them. For figures to rely on, measure "
                "on the device (--profiler) or run one worker.",
                highlight=False,
            )
        progress = _Progress(trials)
        with _resumable("the same command"), console.status("starting the study…") as status:
            progress.status = status
            study = run(
                task_obj, spec=spec, profiler=measurer, on_stage=progress.stage, on_setup=progress.setup,
                callbacks=[progress.trial_done],
            )  # fmt: skip
        progress.trial_done(study)  # the other workers' last trials
        _print_front(study)
        folder = _folder(study)
        console.print(
            f"\nResults in [bold]{folder}[/]: study.db, trials.parquet, trials/<n>/model.onnx\n"
            f"  search results {folder}        # front table and pareto.png\n"
            f"  search export {folder} --out deploy\n"
            f"  python -c \"import search; print(search.load_trials('{folder}'))\"\n"
            f"  optuna-dashboard {storage or 'sqlite:///' + str(folder / 'study.db')}",
            highlight=False,
            soft_wrap=True,  # whole lines, to copy from a pipe or a log too
        )


@contextlib.contextmanager
def _resumable(again: str):
    """Ctrl-C: one line saying what was kept and how to go on, exit status 130."""
    try:
        yield
    except KeyboardInterrupt:
        console.print(
            "interrupted: the running trial is marked failed and queued to run again; finished trials "
            f"are kept. Run {again} again to resume the study.",
            highlight=False,
        )
        raise typer.Exit(130) from None


@app.command("worker")
def worker_command(
    study: StudyArg,
    study_name: StudyName = None,
    results_dir: Annotated[Path, typer.Option(help="Where this worker writes its trials' files.")] = Path("results"),
    seed: Annotated[
        Optional[int], typer.Option(**within(0, MAX_SEED), help="This worker's sampler seed (default: random).")
    ] = None,
    timeout: Annotated[
        Optional[float],
        typer.Option(**within(0.001, MAX_TIMEOUT_S), help=TIMEOUT_HELP),
    ] = None,
    profiler: ProfilerAddress = None,
    token: ProfilerToken = None,
) -> None:
    """Join a study started by `search run` (e.g. on PostgreSQL) and work on it with its own settings."""
    from search.study import work

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    with _user_errors(), _resumable("this worker"):
        progress = _Progress(None)
        with console.status(f"joining {study}…") as status:
            progress.status = status
            joined = work(
                study, study_name, service=profiler, token=token, results_dir=results_dir, seed=seed,
                timeout=timeout, on_stage=progress.stage, callbacks=[progress.trial_done],
            )  # fmt: skip
        console.print(f"{joined.study_name}: {finished_count(joined)} trials finished", highlight=False)


class _Progress:
    """Live status: trials done, the running trial's stage, and the best feasible point so far."""

    def __init__(self, trials: int | None) -> None:
        self.trials = trials or "?"
        self.status = None
        self.best = "none yet"
        self.done = "?"
        self.started = time.monotonic()
        self.printed: set[int] = set()

    def setup(self, text: str) -> None:
        self.status.update(f"{text}… · {time.monotonic() - self.started:.0f}s")

    def stage(self, number: int, stage: str) -> None:
        step = STAGES.index(stage) + 1
        self.status.update(
            f"{self.done}/{self.trials} trials done · trial {number}: {stage} ({step}/{len(STAGES)}) · "
            f"best feasible: {self.best} · {time.monotonic() - self.started:.0f}s"
        )

    def trial_done(self, study: optuna.Study, trial: optuna.trial.FrozenTrial | None = None) -> None:
        """Print every trial that finished since the last call, this process's and other workers'."""
        mine = os.getpid()
        for finished in study.get_trials(deepcopy=False, states=FINISHED):
            if finished.number not in self.printed:
                self.printed.add(finished.number)
                worker = finished.user_attrs.get(Key.WORKER, {})
                by = f"  (worker {worker['pid']})" if worker and worker.get("pid") != mine else ""
                console.print(_trial_line(finished) + by, highlight=False, soft_wrap=True)
        self.done = finished_count(study)
        self.trials = study.user_attrs.get(StudyKey.RUN_SPEC, {}).get("trials", self.trials)
        feasible = study.best_trials
        if feasible:
            top = max(feasible, key=lambda t: t.user_attrs[Key.METRIC])
            self.best = f"metric {top.user_attrs[Key.METRIC]:.4f} at {top.user_attrs[Key.LATENCY_MS]:.4f} ms"


def _trial_line(trial: optuna.trial.FrozenTrial) -> str:
    attrs = trial.user_attrs
    if trial.state == optuna.trial.TrialState.COMPLETE:
        feasible = all(v <= 0 for v in trial.constraints.values())
        return (
            f"trial {trial.number:>3}  metric {attrs[Key.METRIC]:.4f}  latency {attrs[Key.LATENCY_MS]:.4f} ms"
            f"  size {attrs[Key.SIZE_BYTES] / 1024:.0f} KiB  {'within budget' if feasible else 'over budget'}"
            f"  {_finetune_words(attrs)}{_recipe_words(attrs)}"
        )
    reason = attrs.get(Key.FAIL_REASON) or attrs.get(Key.PRUNED_REASON) or trial.system_attrs.get("fail_reason", "")
    return f"trial {trial.number:>3}  {trial.state.name.lower()}  {reason}"


def _finetune_words(attrs: dict) -> str:
    """How the trial's plan was fine-tuned: skipped, or its steps, rung and where it came from."""
    if attrs.get(Key.FINETUNE_SKIPPED):
        return f"not fine-tuned ({attrs[Key.FINETUNE_SKIPPED]})"
    if Key.FINETUNE_STEPS not in attrs:
        return ""
    parent = f", continues trial {attrs[Key.CONTINUE_FROM]}" if Key.CONTINUE_FROM in attrs else ""
    cut = f"; {attrs[Key.FINETUNE_CUT]}" if attrs.get(Key.FINETUNE_CUT) else ""
    return (
        f"fine-tuned {attrs[Key.FINETUNE_STEPS]} steps (rung {attrs.get(Key.RUNG, 0)}{parent}, "
        f"best at {attrs.get(Key.BEST_STEP)}{cut})"
    )


def _session_words(lists) -> str:
    """The graph optimizations ONNX Runtime's sessions ran without (each measurement's
    ``disabled_optimizers``, None where another runtime measured): what a deployment sets to run
    the files as they were measured."""
    disabled = sorted({name for names in lists if isinstance(names, list) for name in names})
    return f" with disabled_optimizers={disabled}" if disabled else ""


def _front_session_words(frame) -> str:
    column = f"user_attrs_{Key.DEVICE}"
    devices = frame[column].dropna() if column in frame else []
    return _session_words(device.get("disabled_optimizers") for device in devices)


def _recipe_words(attrs: dict) -> str:
    return f"  recipe: {attrs[Key.RECIPE]}" if attrs.get(Key.RECIPE) else ""


def _print_front(study: optuna.Study, sort: str | None = None) -> None:
    frame = load_trials(study)
    baseline = study.user_attrs.get(StudyKey.BASELINE, {})
    counts = frame["state"].value_counts().to_dict() if not frame.empty else {}
    budget_ms = study.user_attrs.get(StudyKey.BUDGET_MS)
    title = (
        f"{study.study_name}: Pareto front ({', '.join(f'{n} {s.lower()}' for s, n in counts.items()) or 'no trials'}"
        f"; budget {f'{budget_ms:.4g} ms' if budget_ms else 'none'})"
    )
    runtime = frame[Key.RUNTIME].dropna().iloc[0] if Key.RUNTIME in frame and frame[Key.RUNTIME].notna().any() else "the target"
    caption = f"latency: median and p90, measured by {runtime}{_front_session_words(frame)}; * estimated, not measured"
    again = study.user_attrs.get(StudyKey.TEACHER_AT_END)
    if again:
        caption += (
            f"; the teacher measured {again[Key.LATENCY_MS]:.4f} ms as the latest run ended ({again['change']:+.1%}): "
            "the host's drift, which the trials' latencies carry too (search export measures the front with the teacher)"
        )
    table = Table(title=title, caption=caption)
    for column in ("trial", "metric", "ms", "p90 ms", "speedup", "energy mJ", "KiB", "precision", "steps", "recipe"):
        table.add_column(column, justify="left" if column == "recipe" else "right")
    base_ms = baseline.get(Key.LATENCY_MS)
    rows = [("teacher", baseline, "fp32", "", "")] if baseline else []
    rows += [
        (str(row["number"]), row, row[Key.PRECISION], _steps(row[Key.FINETUNE_STEPS]), _text(row[Key.RECIPE]))
        for _, row in sorted_by(pareto_front(frame), sort).iterrows()
    ]
    for label, row, precision, steps, recipe in rows:
        table.add_row(
            label, f"{row[Key.METRIC]:.4f}", f"{row[Key.LATENCY_MS]:.4f}", f"{row[Key.LATENCY_P90_MS]:.4f}",
            f"{base_ms / row[Key.LATENCY_MS]:.2f}×" if base_ms else "",
            _energy(row[Key.ENERGY_MJ], row[Key.ENERGY_SOURCE]), f"{row[Key.SIZE_BYTES] / 1024:.0f}", precision,
            steps, recipe,
        )  # fmt: skip
    _print_table(table)
    note = study.user_attrs.get(StudyKey.FINETUNE_NOTE)
    if note:
        console.print(f"longest fine-tune: {note}", highlight=False, soft_wrap=True)
    if StudyKey.NOT_OFFERED in study.user_attrs:
        console.print(study.user_attrs[StudyKey.NOT_OFFERED], highlight=False, soft_wrap=True)


def _steps(value) -> str:
    return "" if value is None or value != value else str(int(value))


def _text(value) -> str:
    """A DataFrame cell that holds text or nothing (None, NaN)."""
    return value if isinstance(value, str) else ""


def _folder(study: optuna.Study) -> Path:
    """The folder a study writes in: its results folder where ``search run`` started it."""
    if StudyKey.RUN_SPEC not in study.user_attrs:
        return Path(".")
    spec = spec_of(study)
    return spec.results_dir / spec.study_name


def _print_table(table: Table) -> None:
    """A table as wide as it needs on a pipe or in a file, so no name is cut there (``search
    targets | grep jetson-orin-nano``); a terminal's width folds it as usual."""
    if console.is_terminal:
        console.print(table)
        return
    natural = console.measure(table, options=console.options.update_width(10_000)).maximum
    Console(file=console.file, width=max(console.width, natural)).print(table)


def _energy(value: float | None, source: str) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}*" if source.startswith("estimated") else f"{value:.4f}"


@app.command("results")
def results_command(
    study: StudyArg,
    study_name: StudyName = None,
    sensitivity: Annotated[bool, typer.Option(help="Print each layer's sensitivity instead.")] = False,
    all_trials: Annotated[
        bool, typer.Option("--all", help="Every trial, front or not, pruned and failed ones with the reason.")
    ] = False,
    sort: Annotated[
        Optional[str], typer.Option(help="Sort the rows by this column of search.load_trials (e.g. metric).")
    ] = None,
) -> None:
    """Print the Pareto front (or --all trials) and trial counts; write pareto.png beside the study."""
    with _user_errors():
        opened = open_study(study, study_name)
        if sensitivity:
            _print_sensitivity(opened)
            return
        if all_trials:
            _print_all(opened, sort)
        else:
            _print_front(opened, sort)
        folder = _folder(opened)
        console.print(f"plot: {plot_front(opened, folder / 'pareto.png')}", highlight=False)


def sorted_by(frame, column: str | None):
    """``frame`` sorted by ``column`` (None: as it is); a column it lacks is a usage error naming them all."""
    if column is None or frame.empty:
        return frame
    if column not in frame.columns:
        accepted = ", ".join(map(str, frame.columns))
        raise UsageError(f"--sort {column!r}: not a column of the trials; accepted: {accepted}")
    return frame.sort_values(column, kind="stable", na_position="last")


def _print_all(study: optuna.Study, sort: str | None) -> None:
    frame = sorted_by(load_trials(study), sort)
    baseline = study.user_attrs.get(StudyKey.BASELINE, {})
    base_ms = baseline.get(Key.LATENCY_MS)
    table = Table(
        title=f"{study.study_name}: every trial ({len(frame)})",
        caption="front: on the feasible Pareto front; why: the reason a trial was pruned or failed, superseded or waiting",
    )
    for column in ("trial", "state", "front", "metric", "ms", "speedup", "KiB", "precision", "recipe", "why"):
        table.add_column(column, justify="left" if column in ("state", "recipe", "why", "precision") else "right")
    for _, row in frame.iterrows():
        latency = _number(row[Key.LATENCY_MS])
        why = _text(row[Key.PRUNED_REASON]) or _text(row[Key.FAIL_REASON])
        if not why and _number(row[Key.SUPERSEDED_BY]) is not None:
            why = f"superseded by trial {int(row[Key.SUPERSEDED_BY])}"
        if not why and _number(row[Key.DUPLICATE_OF]) is not None:
            why = f"same plan as trial {int(row[Key.DUPLICATE_OF])}"
        if not why and row["state"] == "WAITING":
            parent = _number(row[Key.CONTINUE_FROM])
            why = "queued" if parent is None else f"queued: goes on with trial {int(parent)}'s fine-tune"
        size = _number(row[Key.SIZE_BYTES])
        metric = _number(row[Key.METRIC])
        table.add_row(
            str(row["number"]), row["state"].lower(), "yes" if row[Key.PARETO] else "",
            "" if metric is None else f"{metric:.4f}", "" if latency is None else f"{latency:.4f}",
            f"{base_ms / latency:.2f}×" if base_ms and latency else "", "" if size is None else f"{size / 1024:.0f}",
            _text(row[Key.PRECISION]), _text(row[Key.RECIPE]), why,
        )  # fmt: skip
    _print_table(table)


def _number(value) -> float | None:
    """A DataFrame cell that holds a number or nothing (None, NaN)."""
    if value is None or isinstance(value, str):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


@app.command("show")
def show_command(
    study: StudyArg,
    trial: Annotated[int, typer.Argument(help="The trial's number (see `search results --all`).")],
    study_name: StudyName = None,
    plot: Annotated[bool, typer.Option(help="Also write a PNG: per-layer time, teacher against trial.")] = False,
    out: Annotated[
        Optional[Path], typer.Option(help="Where --plot writes \\[default: layers-<trial>.png beside the study].")
    ] = None,
) -> None:
    """Why a trial is (not) faster, layer by layer: the plan, what the runtime ran, against the teacher."""
    from search.report import load_layers, plot_layers

    with _user_errors():
        frame = load_layers(study, trial, study_name)
        _print_layers(frame)
        if plot:
            folder = Path(frame.attrs["folder"]) if frame.attrs.get("folder") else Path(".")
            path = plot_layers(frame, out or folder / f"layers-{trial:05d}.png")
            console.print(f"plot: {path}", highlight=False)


def _print_layers(frame) -> None:
    attrs = frame.attrs
    state = attrs["state"].lower()
    runtime = attrs.get("runtime") or "the target"
    title = f"{attrs['study']}: trial {attrs['trial']} ({state}), layer by layer on {runtime}"
    caption = "! the plan asked for what this runtime does not accelerate: the layer shrank, its time did not"
    table = Table(title=title, caption=caption)
    for column in ("layer", "pruning", "sparsity", "bits", "channels", "kernel", "precision", "ms", "share",
                   "teacher ms", "speedup", "", "why"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("layer", "kernel", "precision", "why", "") else "right")
    for label, row in _layer_rows(frame):
        is_layer = _number(row.get("bits")) is not None
        channels = (
            f"{_count(row.get('channels_before'))}→{_count(row.get('channels_after'))}"
            if _number(row.get("channels_before")) is not None or _number(row.get("channels_after")) is not None
            else ""
        )  # fmt: skip
        why = "; ".join(filter(None, (_text(row.get("flag")), _text(row.get("note")))))
        table.add_row(
            label,
            _ratio(row.get("pruning")) if is_layer else "",
            (_text(row.get("sparsity")) or _ratio(row.get("sparsity"))) if is_layer else "",
            str(int(row["bits"])) if is_layer else "",
            channels,
            _text(row.get("kernel")), _text(row.get("precision")),
            _fixed(row.get("ms")), _percent(row.get("share")), _fixed(row.get("teacher_ms")),
            f"{row['speedup']:.2f}×" if _number(row.get("speedup")) is not None else "",
            "!" if row.get("unaccelerated") else "", why,
        )  # fmt: skip
    _print_table(table)
    if not attrs.get("layer_times"):
        console.print("no per-layer times recorded for this trial (not measured, or measured before they were)",
                      highlight=False)  # fmt: skip
    if attrs.get("reason"):
        console.print(f"{state}: {attrs['reason']}", highlight=False, soft_wrap=True)
    for figure in attrs["figures"]:
        value = _number(figure["value"])
        if value is None:
            continue
        text = f"{value:.4f}" if figure["figure"] != "size" else f"{value / 1024:.0f} KiB"
        unit = f" {figure['unit']}" if figure["unit"] and figure["figure"] != "size" else ""
        teacher = _number(figure["teacher"])
        against = ""
        if teacher is not None:
            shown = f"{teacher:.4f}{unit}" if figure["figure"] != "size" else f"{teacher / 1024:.0f} KiB"
            against = f"  (teacher {shown})"
        console.print(
            f"{figure['figure']:>8}: {text}{unit}  {figure['kind'] or 'unknown'} "
            f"({figure['source'] or 'no source recorded'}){against}",
            highlight=False, soft_wrap=True,
        )  # fmt: skip


def _layer_rows(frame):
    """(label, row) pairs; for a Transformer, each block's total, then its attention and FFN and
    their projections indented, then the layers outside the blocks."""
    records = frame.to_dict("records")
    if frame["block"].isna().all():
        return [(row["layer"], row) for row in records]
    out, seen = [], set()
    for row in records:
        block = row["block"]
        if not isinstance(block, str) or block in seen:
            continue
        seen.add(block)
        members = [r for r in records if r["block"] == block]
        out.append((f"[bold]{block}[/]", _total(members)))
        for part in ("attention", "ffn", "projection"):
            inside = [r for r in members if r["part"] == part]
            if not inside:
                continue
            out.append((f"  {part}", _total(inside)))
            out.extend((f"    {r['layer'].removeprefix(block + '.')}", r) for r in inside)
    out.extend((row["layer"], row) for row in records if not isinstance(row["block"], str))
    return out


def _total(rows) -> dict:
    ms = [r["ms"] for r in rows if _number(r["ms"]) is not None]
    teacher = [r["teacher_ms"] for r in rows if _number(r["teacher_ms"]) is not None]
    share = [r["share"] for r in rows if _number(r["share"]) is not None]
    total = {
        "ms": sum(ms) if ms else None,
        "teacher_ms": sum(teacher) if teacher else None,
        "share": sum(share) if share else None,
        "unaccelerated": any(r["unaccelerated"] for r in rows),
    }
    total["speedup"] = total["teacher_ms"] / total["ms"] if total["ms"] and total["teacher_ms"] else None
    return total


def _fixed(value) -> str:
    number = _number(value)
    return "" if number is None else f"{number:.4f}"


def _percent(value) -> str:
    number = _number(value)
    return "" if number is None else f"{number:.0%}"


def _ratio(value) -> str:
    number = _number(value)
    return "" if number is None else f"{number:g}"


def _count(value) -> str:
    number = _number(value)
    return "?" if number is None else str(int(number))


def _print_sensitivity(study: optuna.Study) -> None:
    frame = load_sensitivity(study)
    if frame.empty:
        console.print(f"{study.study_name}: no layer sensitivity (the study ran with --no-sensitivity)", highlight=False)
        return
    teacher = study.user_attrs.get(StudyKey.BASELINE, {}).get(Key.METRIC)
    table = Table(
        title=f"{study.study_name}: the metric with one layer compressed or one block removed, no fine-tune "
        "(most sensitive first)",
        caption="excluded: a bit width not offered to that layer (alone it drops the metric by more than "
        f"{study_window(study):g})"
        + ("; a student keeps the blocks whose removal costs most" if (frame["kind"] == BLOCK).any() else "")
        + (f"; teacher's metric on its ONNX file {teacher:.4f}" if teacher is not None else ""),
    )  # fmt: skip
    for column in ("layer", "kind", "option", "metric", "drop", "scored on", "excluded"):
        table.add_column(column, justify="right" if column in ("metric", "drop") else "left")
    for row in frame.itertuples():
        metric = "failed" if row.error else f"{row.metric:.4f}"
        drop = "" if row.error else f"{row.drop:+.4f}"
        scored_on = row.scored_on if isinstance(row.scored_on, str) else ""  # a study from before it was recorded
        table.add_row(row.layer, row.kind, row.option, metric, drop, scored_on, "yes" if row.excluded else "")
    _print_table(table)


@app.command("export")
def export_command(
    study: StudyArg,
    out: Annotated[Path, typer.Option(help="Folder for the exported models.")] = Path("deploy"),
    study_name: StudyName = None,
    profiler: ProfilerAddress = None,
    token: ProfilerToken = None,
    skip_broken: Annotated[
        bool, typer.Option(help="Export the trials whose files are sound and list the others, instead of stopping.")
    ] = False,
    rounds: Annotated[
        int, typer.Option(min=1, help="Times each model and the teacher are measured, in turn (the median is kept).")
    ] = 3,
) -> None:
    """Write every Pareto-optimal model (ONNX, plan JSON, checkpoint) and re-measure it on the target,
    in turn with the teacher. Each file is checked first; nothing is left half-written in --out."""
    from search.study import export

    with _user_errors():
        opened = open_study(study, study_name)
        measurer = profilers.get_profiler(spec_of(opened).target, service=profiler, token=token)
        with console.status("exporting and re-measuring the Pareto front…") as status:
            rows = export(
                opened, out, profiler=measurer, skip_broken=skip_broken, rounds=rounds,
                progress=lambda text: status.update(f"exporting the Pareto front: {text}…"),
            )  # fmt: skip
        teacher = rows["teacher_latency_ms"].dropna()
        session = _session_words(rows["disabled_optimizers"])
        caption = f"re-measured in turn with the teacher, median of {rounds}{session}"
        if len(teacher):
            caption += f"; the teacher {teacher.iloc[0]:.4f} ms then"
        table = Table(title=f"exported to {out}", caption=caption)
        columns = ("trial", "metric", "re-scored", "search-time ms", "re-measured ms", "p90 ms", "speedup", "file")
        for column in columns:
            table.add_column(column, justify="right")
        for _, row in rows.iterrows():
            rescored, speedup = row["export_metric"], _number(row["speedup"])
            table.add_row(
                str(row["number"]), f"{row[Key.METRIC]:.4f}", "" if rescored is None else f"{rescored:.4f}",
                f"{row['search_latency_ms']:.4f}", f"{row['export_latency_ms']:.4f}",
                f"{row['export_latency_p90_ms']:.4f}", "" if speedup is None else f"{speedup:.2f}×", row["path"],
            )  # fmt: skip
        _print_table(table)
        console.print(f"the rows above, paths relative to the folder: {out / 'front.csv'}", highlight=False)
        for _, row in rows[rows["trtexec"].notna()].iterrows():  # a TensorRT target's
            folder = Path(row["path"]).parent
            line = f"trial {row['number']}'s engine, as measured: cd {folder} && {row['trtexec']}"
            console.print(line, highlight=False, soft_wrap=True)
        differences = sorted({d for found in rows["setting_differences"] for d in found})
        if differences:
            Console(stderr=True).print(
                f"re-measured under another setting than the study's ({'; '.join(differences)}): the search-time "
                "latencies are of another cost function; compare the re-measured ones and the speed-ups",
                highlight=False, soft_wrap=True,
            )  # fmt: skip
        for skipped in rows.attrs.get("skipped", []):
            Console(stderr=True).print(f"skipped {skipped}", highlight=False, soft_wrap=True)


@app.command("costmodel")
def costmodel_command(study: StudyArg, study_name: StudyName = None) -> None:
    """How well the learned cost model predicts this study's measured latencies (and energy)."""
    from search.costmodel import cost_model_report

    with _user_errors():
        opened = open_study(study, study_name)
        report = cost_model_report(opened)
        console.print(
            f"{opened.study_name}: {report['measured']} measured trials, {report['predicted_online']} of them "
            f"predicted before they ran; {opened.user_attrs.get(StudyKey.COST_MODEL_WARM_START, 0)} measurements "
            "from earlier studies warm-started the model",
            highlight=False,
        )
        latency = {
            "online": "during the search",
            "held_out": "held out (5-fold)",
            "held_out_flops_baseline": "FLOPs-only baseline, held out",
        }
        _print_table(_error_table("latency prediction error (predicted vs measured)", latency, report))
        if "online_energy" in report:
            energy = {"online_energy": "during the search (sensor-measured energy)"}
            _print_table(_error_table("energy prediction error (predicted vs measured)", energy, report))
        if "held_out" not in report:
            older = report["measured"] - report["current_layout"]
            recorded = f"; {older} recorded with an older feature layout" if older else ""
            console.print(
                f"too few measured trials for a held-out estimate (10 needed, {report['current_layout']} with "
                f"this version's features{recorded})",
                highlight=False,
                soft_wrap=True,
            )


def _error_table(title: str, labels: dict[str, str], report: dict) -> Table:
    table = Table(title=title)
    for column in ("predictions", "within ±10 %", "within ±20 %", "MAPE", "Spearman"):
        table.add_column(column, justify="right")
    for key, label in labels.items():
        if key in report:
            scores = report[key]
            table.add_row(
                label, f"{scores['within_10pct']:.0%}", f"{scores['within_20pct']:.0%}", f"{scores['mape']:.1%}",
                f"{scores['spearman']:.3f}",
            )  # fmt: skip
    return table


@app.command("serve")
def serve_command(
    target: Annotated[str, typer.Option(help="Target name (see `search targets`) or a .toml file.")] = "cpu",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = profilers.DEFAULT_PORT,
    host: Annotated[
        str, typer.Option(help="Address to listen on; another machine needs the device's address or 0.0.0.0.")
    ] = "127.0.0.1",
    token: Annotated[
        Optional[str],
        typer.Option(envvar=profilers.TOKEN_ENV, show_envvar=True, help="Token clients must send (required)."),
    ] = None,
    max_upload_mib: Annotated[
        float, typer.Option(min=0.001, help="Largest model file a client may upload, in MiB (larger: 413).")
    ] = profilers.ServiceLimits.max_bytes / 2**20,
    max_model_memory_mib: Annotated[
        float,
        typer.Option(min=0.001, help="Most tensor memory a model may declare (inputs, outputs, weights, inferred "
                     "shapes), in MiB; refused (413) before a runtime session is made."),
    ] = profilers.ServiceLimits.max_model_memory / 2**20,
    max_time_s: Annotated[
        float, typer.Option(min=0.001, help="Most a client may ask for warmup_s, min_time_s and max_time_s (above: 400).")
    ] = profilers.ServiceLimits.max_time_s,
    max_sessions: Annotated[
        int, typer.Option(min=1, help="Most sessions a client may ask for (above: 400).")
    ] = profilers.ServiceLimits.max_sessions,
    max_queue: Annotated[
        int, typer.Option(min=0, help="Requests waiting beside the one measured; the next gets 503 with Retry-After.")
    ] = profilers.ServiceLimits.max_queue,
) -> None:
    """Measure models for other machines: run the target's profiler as a service (`search run --profiler`)."""
    with _user_errors():
        target_spec = targets.load_target(target)
        limits = profilers.ServiceLimits(
            max_bytes=int(max_upload_mib * 2**20), max_model_memory=int(max_model_memory_mib * 2**20),
            max_time_s=max_time_s, max_sessions=max_sessions, max_queue=max_queue,
        )  # fmt: skip
        profilers.serve(target_spec, host=host, port=port, token=token, limits=limits)


@app.command("targets")
def targets_command() -> None:
    """List the known targets and whether this machine can measure them."""
    table = Table(title="targets (pass a name, or a path to your own .toml, to --target)")
    for column in ("name", "runtime", "precisions", "threads", "power sensor", "measurable here"):
        table.add_column(column)
    for spec in targets.list_targets():
        try:
            reachable = f"yes ({profilers.get_profiler(spec).runtime})"
        except profilers.ProfilerError:
            reachable = "no: see --target"
        runtime = f"{spec.runtime}, else {spec.fallback_runtime}" if spec.fallback_runtime else spec.runtime
        table.add_row(spec.name, runtime, ", ".join(spec.precisions), str(spec.threads), spec.power_sensor, reachable)
    _print_table(table)


def main() -> None:
    """The console script: a usage error (an unknown flag, a number out of its range) is one line on
    stderr and exit status 2, as a library error is one line and exit status 1 (:func:`_user_errors`)."""
    if len(sys.argv) <= 1:
        app()  # no command: the help, as Typer shows it
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as exc:  # Typer's usage errors (click's, which Typer carries)
        if _debug["on"]:
            raise
        ctx = getattr(exc, "ctx", None)
        hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
        Console(stderr=True).print(
            Text.assemble(("error: ", "bold red"), exc.format_message(), hint), highlight=False, soft_wrap=True
        )
        raise SystemExit(exc.exit_code) from None
    except typer.Abort:
        raise SystemExit(1) from None
    raise SystemExit(code if isinstance(code, int) else 0)
