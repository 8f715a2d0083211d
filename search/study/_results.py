"""Reading a study back: the trials DataFrame, the Pareto front table and plot."""

from __future__ import annotations

import json
import os
from pathlib import Path

import optuna
import pandas as pd
import sqlalchemy.exc
from optuna.study import StudyDirection
from optuna.trial import TrialState

from search._errors import UsageError
from search._record import COLUMNS, Key, StudyKey
from search.study._storage import damaged, make_storage, storage_url
from search.study._front import study_window
from search.study._sensitivity import excluded_bits, sensitivity_frame
from search.study._workers import retried

SQLITE_FILE = "study.db"


def locate_study(study: str | Path, study_name: str | None = None) -> tuple[str, str]:
    """The storage URL and study name of a results folder (``results/<name>``), a name under
    ``results/``, or a storage URL (with ``study_name``, unless the storage holds one study)."""
    storage = None
    if "://" in str(study):
        storage, study = storage_url(str(study)), study_name
    if storage is None:
        folder = Path(study)
        if not (folder / SQLITE_FILE).exists():
            folder = Path("results") / str(study)
        if not (folder / SQLITE_FILE).exists():
            raise UsageError(
                f"no study at {study!r}: expected a folder holding {SQLITE_FILE} (such as "
                f"results/<study-name>), a study name under results/, or --storage URL"
            )
        storage = f"sqlite:///{folder.resolve() / SQLITE_FILE}"
        study_name = study_name or folder.name
    else:
        study_name = study_name or (str(study) if study else None)
    try:
        names = optuna.get_all_study_names(make_storage(storage))
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as exc:
        raise damaged(storage, exc) from exc
    if study_name is None and len(names) == 1:
        study_name = names[0]
    if study_name not in names:
        raise UsageError(f"study {study_name!r} is not in {storage}; it holds: {', '.join(names) or 'none'}")
    return storage, study_name


def open_study(study: str | Path, study_name: str | None = None) -> optuna.Study:
    """A study from a results folder (``results/<name>``), a name under ``results/``, or a storage URL.

    The study's records are read once here, so that a damaged file stops at the door with one line
    that names it (:class:`UsageError`) rather than halfway through a table or a copy."""
    storage, study_name = locate_study(study, study_name)
    try:
        opened = optuna.load_study(study_name=study_name, storage=make_storage(storage))
        opened.get_trials(deepcopy=False)
        opened.user_attrs  # noqa: B018 (read for its error)
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as exc:
        raise damaged(storage, exc) from exc
    return opened


def _frame(study: optuna.Study) -> pd.DataFrame:
    # Other workers add and finish trials meanwhile: the frame holds the trials of one snapshot, taken
    # first (trial numbers are dense, so later trials are rows at the end), with the snapshot's states.
    trials = study.get_trials(deepcopy=False)
    frame = study.trials_dataframe(multi_index=False)
    if frame.empty:
        return frame
    frame = frame[frame["number"] < len(trials)].reset_index(drop=True)
    frame["state"] = [t.state.name for t in trials]
    renames = {f"user_attrs_{c}": c for c in COLUMNS}
    frame = frame.rename(columns=renames)
    missing = [c for c in COLUMNS if c not in frame]  # one schema whatever the trials recorded
    frame = pd.concat([frame, pd.DataFrame(None, index=frame.index, columns=missing, dtype=object)], axis=1)
    frame[Key.LATENCY_PREDICTION_ERROR] = (
        pd.to_numeric(frame[Key.PREDICTED_LATENCY_MS]) / pd.to_numeric(frame[Key.LATENCY_MS]) - 1.0
    )
    metered = frame[Key.ENERGY_SOURCE].astype(str).str.startswith("measured:")
    frame[Key.ENERGY_PREDICTION_ERROR] = (
        pd.to_numeric(frame[Key.PREDICTED_ENERGY_MJ]) / pd.to_numeric(frame[Key.ENERGY_MJ]) - 1.0
    ).where(metered)
    plans = frame.get(f"user_attrs_{Key.PLAN}")
    # Removing columns (drop, pop) leaves a frame of many plan columns (a MiniLM's or a MobileNet's) in
    # pieces, and pandas warns (PerformanceWarning) at each column added to it: all removed at once,
    # then one copy, which is in one piece per dtype.
    dropped = [c for c in frame if c.startswith("values_") or c in ("value", f"user_attrs_{Key.PLAN}")]
    frame = frame.drop(columns=dropped).copy()
    if plans is not None:
        frame[Key.PLAN] = plans.map(lambda p: json.dumps(p) if isinstance(p, dict) else p)
    frame[Key.RETRY_OF] = [t.system_attrs.get("failed_trial") for t in trials]
    frame[Key.FAIL_REASON] = _fail_reasons(trials, frame[Key.FAIL_REASON])
    complete = any(t.state == TrialState.COMPLETE for t in trials)
    superseded = _superseded(study, trials)
    frame[Key.SUPERSEDED_BY] = [superseded.get(t.number) for t in trials]
    # A duplicate repeats an earlier trial's result, and a plan's promotion goes on with its
    # fine-tune: the earlier trial, or the longer fine-tune, stands for both on the front.
    pareto = (
        {t.number for t in study.best_trials if Key.DUPLICATE_OF not in t.user_attrs and t.number not in superseded}
        if complete else set()
    )  # fmt: skip
    frame[Key.FEASIBLE] = [
        t.state == TrialState.COMPLETE and all(v <= 0 for v in t.constraints.values()) for t in trials
    ]
    frame[Key.PARETO] = frame["number"].isin(pareto)
    first = ["number", "state", Key.PARETO, Key.FEASIBLE, *COLUMNS]
    return frame[first + [c for c in frame if c not in first]]


def _superseded(study: optuna.Study, trials: list[optuna.trial.FrozenTrial]) -> dict[int, int]:
    """Trial number -> the completed promotion that fine-tuned its plan further and is at least as
    good on every objective (the same plan, so the same latency: at least as high a metric)."""
    found = {}
    for trial in trials:
        parent = trial.user_attrs.get(Key.CONTINUE_FROM)
        if trial.state != TrialState.COMPLETE or parent is None or trials[parent].state != TrialState.COMPLETE:
            continue
        pairs = zip(study.directions, trial.values, trials[parent].values)
        if all(new >= old if d == StudyDirection.MAXIMIZE else new <= old for d, new, old in pairs):
            found[parent] = trial.number
    return found


def _fail_reasons(trials: list[optuna.trial.FrozenTrial], recorded: pd.Series) -> list:
    """The recorded reasons, and for a trial whose worker died (it could record nothing) what the
    study knows: the stage it was in and the trial that retried its plan."""
    retries = retried(trials)
    reasons = []
    for trial, reason in zip(trials, recorded):
        if trial.state == TrialState.FAIL:
            if reason is None or reason != reason:
                reason = f"its worker stopped (killed, crashed or lost) during {trial.user_attrs.get(Key.STAGE, 'start-up')}"
            if trial.number in retries:
                reason += f"; retried as trial {retries[trial.number]}"
        reasons.append(reason)
    return reasons


def load_trials(study: str | Path | optuna.Study, study_name: str | None = None) -> pd.DataFrame:
    """One row per trial: per-layer plan columns (``params_<layer>.<knob>``), metric, latency
    median/p90, energy, size, each with a ``*_source`` column, the state and a ``pareto`` flag.

    ``study``: a results folder, a study name under ``results/``, a storage URL, or a Study.
    """
    if not isinstance(study, optuna.Study):
        study = open_study(study, study_name)
    return _frame(study)


def write_parquet(study: optuna.Study, folder: str | Path) -> Path:
    """``folder/trials.parquet``, replaced atomically: a crash mid-write leaves the previous file."""
    path = Path(folder) / "trials.parquet"
    frame = _frame(study)
    for column in frame.columns[frame.dtypes == object]:
        kinds = {type(v) for v in frame[column] if v is not None and v == v}
        if kinds & {dict, list}:  # nested records (an enqueued trial's fixed params): JSON text, any types
            frame[column] = frame[column].map(lambda v: v if v is None or v != v else json.dumps(v, default=str))
        elif len(kinds) > 1:  # e.g. sparsity choices 0.5 and "2:4": Parquet columns hold one type
            frame[column] = frame[column].map(lambda v: None if v is None or v != v else str(v))
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # one per worker process
    frame.to_parquet(temporary)
    os.replace(temporary, path)
    return path


def load_sensitivity(study: str | Path | optuna.Study, study_name: str | None = None) -> pd.DataFrame:
    """The study's layer sensitivity (:func:`~search.study.layer_sensitivity`): one row per layer
    and option, with ``excluded`` for the bit widths the study did not offer that layer.
    Empty for a study run without it."""
    if not isinstance(study, optuna.Study):
        study = open_study(study, study_name)
    rows = study.user_attrs.get(StudyKey.SENSITIVITY, [])
    frame = sensitivity_frame(rows)
    excluded = excluded_bits(rows, study_window(study))
    frame["excluded"] = [
        row.pruning == 0 and row.bits in excluded.get(f"{row.layer}.bits", ()) for row in frame.itertuples()
    ]
    return frame


def pareto_front(frame: pd.DataFrame) -> pd.DataFrame:
    if frame.empty:
        return frame
    return frame[frame[Key.PARETO]].sort_values(Key.LATENCY_MS)


def plot_front(study: optuna.Study, path: Path) -> Path:
    """Metric against measured latency; every completed trial, the feasible front highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = _frame(study)
    done = frame[frame["state"] == "COMPLETE"] if not frame.empty else frame
    baseline = study.user_attrs.get(StudyKey.BASELINE, {})
    budget_ms = study.user_attrs.get(StudyKey.BUDGET_MS)
    figure, axes = plt.subplots(figsize=(7, 4.5))
    if not done.empty:
        other = done[~done[Key.PARETO]]
        axes.scatter(other[Key.LATENCY_MS], other[Key.METRIC], c="0.6", s=18, label="trial")
        front = done[done[Key.PARETO]].sort_values(Key.LATENCY_MS)
        axes.plot(front[Key.LATENCY_MS], front[Key.METRIC], "o-", c="C0", label="Pareto front (feasible)")
    if baseline:
        axes.scatter([baseline[Key.LATENCY_MS]], [baseline[Key.METRIC]], marker="*", s=160, c="C3", label="teacher")
    if budget_ms:
        axes.axvline(budget_ms, ls="--", c="C1", label=f"budget {budget_ms:.3g} ms")
    runtime = done[Key.RUNTIME].iloc[0] if not done.empty else "the target's runtime"
    axes.set_xlabel(f"latency, median ms (measured: {runtime})")
    axes.set_ylabel("metric (on the exported ONNX model)")
    axes.set_title(f"{study.study_name}: {len(done)} completed trials")
    axes.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
