"""The Optuna study: a run's settings (:class:`RunSpec`), one trial's pipeline (the objective),
starting, resuming and joining a study with many workers (:func:`run`, :func:`work`), the
teacher's baseline, and reading the results back (:func:`load_trials`) and deploying the front
(:func:`export`)."""

from search.study._baseline import measure_baseline
from search.study._deploy import export
from search.study._objective import CANDIDATE_FAILURES, STAGES, Objective
from search.study._optuna import PRUNERS, SAMPLERS, make_pruner, make_sampler, make_storage
from search.study._results import load_trials, locate_study, open_study, pareto_front, plot_front, write_parquet
from search.study._run import default_study_name, run, work
from search.study._spec import OBJECTIVES, SPEC_VERSION, RunSpec, spec_of, task_of_study
from search.study._workers import FINISHED, finished_count, measuring_alone

__all__ = [
    "CANDIDATE_FAILURES",
    "FINISHED",
    "OBJECTIVES",
    "PRUNERS",
    "SAMPLERS",
    "SPEC_VERSION",
    "STAGES",
    "Objective",
    "RunSpec",
    "default_study_name",
    "export",
    "finished_count",
    "load_trials",
    "locate_study",
    "make_pruner",
    "make_sampler",
    "make_storage",
    "measure_baseline",
    "measuring_alone",
    "open_study",
    "pareto_front",
    "plot_front",
    "run",
    "spec_of",
    "task_of_study",
    "work",
    "write_parquet",
]
