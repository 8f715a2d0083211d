"""One run's settings, parsed and checked once: :class:`RunSpec`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import optuna
from optuna.study import StudyDirection
from sqlalchemy.engine import make_url

from profilers import TIMING_KNOBS
from search._errors import UsageError
from search._record import Key, StudyKey
from search.compress import Finetune
from search.plan import Budget, SearchSpace, parse_budget
from search.study._optuna import PRUNERS, SAMPLERS
from targets import Target, load_target

if TYPE_CHECKING:
    from search.tasks import Task

SPEC_VERSION = 1
MAX_STUDY_NAME = 200
# objective name (--objectives) -> (study metric name and trial user attr, direction)
OBJECTIVES = {
    "metric": (Key.METRIC, StudyDirection.MAXIMIZE),
    "latency": (Key.LATENCY_MS, StudyDirection.MINIMIZE),
    "energy": (Key.ENERGY_MJ, StudyDirection.MINIMIZE),
    "size": (Key.SIZE_BYTES, StudyDirection.MINIMIZE),
}
_FINETUNE_FIELDS = tuple(field.name for field in dataclasses.fields(Finetune))


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """Everything one run of the search is set to: built once, from the CLI's flags or from Python
    (``search.run(task, target="cpu", budget="0.5x")`` builds one from its keywords), checked as it
    is built, and stored in the study as one versioned JSON document (:meth:`to_dict`), which
    worker processes and ``search export`` read back (:meth:`from_dict`).

    ``target`` and ``budget`` may be given as text (``"cpu"``, ``"0.5x"``): they are parsed here.
    ``finetune`` holds the fine-tune settings this run sets (a :class:`~search.Finetune` sets them
    all); the others are the task's own (``Task.finetune``) or the defaults, see
    :meth:`finetune_for`. ``task`` and ``task_options`` are the ``module:function`` that makes the
    task and its keywords, which workers load it by; ``timing`` the profiler's timing knobs;
    ``profiler`` the address of the profiler service measuring on the target (None: this machine).
    ``recipes``: the study's first trials are the recipes users know (:mod:`search.study._recipes`);
    ``sensitivity``: each layer's sensitivity is measured first and steers the search
    (:mod:`search.study._sensitivity`).
    ``seed``, ``timeout`` and ``workers`` are this process's own: a joining worker sets its own.
    """

    target: Target | str = "cpu"
    budget: Budget | str | None = None
    objectives: tuple[str, ...] = ("metric", "latency")
    trials: int = 20
    timeout: float | None = None
    sampler: str = "tpe"
    seed: int = 0
    space: SearchSpace = SearchSpace()
    finetune: Mapping[str, Any] | Finetune = dataclasses.field(default_factory=dict)
    pruner: str = "asha"
    cost_model: bool = True
    recipes: bool = True
    sensitivity: bool = True
    timing: Mapping[str, float] = dataclasses.field(default_factory=dict)
    task: str | None = None
    task_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    profiler: str | None = None
    storage: str | None = None
    study_name: str | None = None
    results_dir: Path | str = Path("results")
    workers: int = 1

    def __post_init__(self) -> None:
        def set_(key: str, value: object) -> None:  # a frozen dataclass normalises its own fields
            object.__setattr__(self, key, value)

        if not isinstance(self.target, Target):
            set_("target", load_target(self.target))
        if isinstance(self.budget, str):
            set_("budget", parse_budget(self.budget))
        objectives = tuple(self.objectives)
        if not objectives or len(set(objectives)) != len(objectives) or not set(objectives) <= set(OBJECTIVES):
            raise UsageError(
                f"objectives {','.join(objectives)!r}: expected distinct names from {', '.join(OBJECTIVES)}"
            )
        set_("objectives", objectives)
        if isinstance(self.trials, bool) or not isinstance(self.trials, int) or self.trials < 1:
            raise UsageError(f"trials must be at least 1, got {self.trials}")
        if self.timeout is not None and not self.timeout > 0:
            raise UsageError(f"timeout must be positive seconds, got {self.timeout}")
        if self.workers < 1:
            raise UsageError(f"workers must be at least 1, got {self.workers}")
        if self.sampler not in SAMPLERS:
            raise UsageError(f"sampler {self.sampler!r}: expected one of {', '.join(SAMPLERS)}")
        if self.pruner not in PRUNERS:
            raise UsageError(f"pruner {self.pruner!r}: expected one of {', '.join(PRUNERS)}")
        if self.workers > 1 and self.pruner == "custom":
            raise UsageError("workers > 1 runs the default pruner or none: pass pruner=None or NopPruner()")
        if not isinstance(self.space, SearchSpace):
            raise UsageError(f"space must be a search.SearchSpace, got {type(self.space).__name__}")
        finetune = dataclasses.asdict(self.finetune) if isinstance(self.finetune, Finetune) else dict(self.finetune)
        unknown = sorted(set(finetune) - set(_FINETUNE_FIELDS))
        if unknown:
            raise UsageError(f"fine-tune setting(s) {', '.join(unknown)}: accepted: {', '.join(_FINETUNE_FIELDS)}")
        try:
            dataclasses.replace(Finetune(), **finetune)  # Finetune's own checks, on the values set
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        set_("finetune", MappingProxyType(finetune))
        unknown = sorted(set(self.timing) - set(TIMING_KNOBS))
        if unknown:
            raise UsageError(f"timing knob(s) {', '.join(unknown)}: accepted: {', '.join(TIMING_KNOBS)}")
        set_("timing", MappingProxyType(dict(self.timing)))
        set_("task_options", MappingProxyType(dict(self.task_options)))
        set_("results_dir", Path(self.results_dir))
        if self.study_name is not None:
            _check_study_name(self.study_name)

    @property
    def directions(self) -> list[StudyDirection]:
        return [OBJECTIVES[o][1] for o in self.objectives]

    @property
    def metric_names(self) -> list[str]:
        """The study's metric names: the trial user attrs its objectives are."""
        return [OBJECTIVES[o][0] for o in self.objectives]

    def finetune_for(self, task_finetune: Finetune | None) -> Finetune:
        """The fine-tune this run gives each candidate of a task whose own is ``task_finetune``:
        that one (or the defaults) with the settings this run sets."""
        return dataclasses.replace(task_finetune or Finetune(), **self.finetune)

    def replace(self, **changes: Any) -> RunSpec:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The JSON document stored in the study (and printed by ``search run --dry-run``)."""
        return {
            "version": SPEC_VERSION,
            "task": self.task,
            "task_options": dict(self.task_options),
            "target": self.target.name,
            "target_file": self.target.path,
            "budget": self.budget.text if self.budget else None,
            "objectives": list(self.objectives),
            "trials": self.trials,
            "timeout": self.timeout,
            "sampler": self.sampler,
            "seed": self.seed,
            "space": self.space.to_dict(),
            "finetune": dict(self.finetune),
            "pruner": self.pruner,
            "cost_model": "on" if self.cost_model else "off",
            "recipes": self.recipes,
            "sensitivity": self.sensitivity,
            "timing": dict(self.timing),
            "profiler": self.profiler or "local",
            "storage": _without_password(self.storage),
            "study_name": self.study_name,
            "results_dir": str(self.results_dir),
            "workers": self.workers,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], study_name: str = "the study") -> RunSpec:
        """The spec :meth:`to_dict` stored; the target is loaded from its file where that exists
        on this machine, else by its name."""
        if not isinstance(data, Mapping) or data.get("version") != SPEC_VERSION:
            version = data.get("version") if isinstance(data, Mapping) else None
            raise UsageError(
                f"{study_name} was started by another version of compression-search (run spec version "
                f"{version!r}, this one reads {SPEC_VERSION}): start a new study (another --study-name)"
            )
        target_file = data["target_file"]
        return cls(
            target=target_file if Path(target_file).exists() else data["target"],
            budget=data["budget"],
            objectives=tuple(data["objectives"]),
            trials=data["trials"],
            timeout=data["timeout"],
            sampler=data["sampler"],
            seed=data["seed"],
            space=SearchSpace.from_dict(data["space"]),
            finetune=data["finetune"],
            pruner=data["pruner"],
            cost_model=data["cost_model"] == "on",
            recipes=data["recipes"],
            sensitivity=data["sensitivity"],
            timing=data["timing"],
            task=data["task"],
            task_options=data["task_options"],
            profiler=None if data["profiler"] == "local" else data["profiler"],
            storage=data["storage"],
            study_name=data["study_name"],
            results_dir=data["results_dir"],
            workers=data["workers"],
        )


def spec_of(study: optuna.Study) -> RunSpec:
    """The :class:`RunSpec` a study was started with."""
    stored = study.user_attrs.get(StudyKey.RUN_SPEC)
    if stored is None:
        raise UsageError(f"study {study.study_name!r} was not started by `search run`; start it that way first")
    return RunSpec.from_dict(stored, f"study {study.study_name!r}")


def task_of_study(spec: RunSpec, study_name: str, remedy: str) -> Task:
    """The task a study was started with, loaded again by its ``module:function`` and options;
    ``remedy`` says what to do when it was started with a Task object instead."""
    from search.tasks import load_task  # PyTorch: a spec is read without it, a task is not loaded without it

    if spec.task is None:
        raise UsageError(f"study {study_name!r} was not started with a 'module:function' task to load again: {remedy}")
    return load_task(spec.task, **spec.task_options)


def _check_study_name(name: object) -> None:
    """A study name is also its folder under the results: one plain folder name."""
    if (
        not isinstance(name, str) or not name.strip() or len(name) > MAX_STUDY_NAME or name.startswith(".")
        or any(c in name for c in "/\\") or not name.isprintable()
    ):  # fmt: skip
        raise UsageError(
            f"study name {name!r}: expected a folder name of 1 to {MAX_STUDY_NAME} printable characters, "
            "without / or \\ and not starting with a dot"
        )


def _without_password(url: str | None) -> str | None:
    """A storage URL as it may be shown and stored: its password masked."""
    if url is None or "://" not in url:
        return url
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a SQLAlchemy URL (an Optuna journal file, say): shown as given
        return url


def pruner_name(pruner: optuna.pruners.BasePruner | str | None, default: str) -> str:
    """The spec's name for a pruner given to :func:`search.run`: an Optuna pruner object, one of
    :data:`PRUNERS`, or None (``default``)."""
    if pruner is None:
        return default
    if isinstance(pruner, str):
        return pruner
    return "none" if isinstance(pruner, optuna.pruners.NopPruner) else "custom"
