"""The Optuna study: a run's settings (:class:`RunSpec`), one trial's pipeline (the objective),
starting, resuming and joining a study with many workers (:func:`run`, :func:`work`), the
teacher's baseline, and reading the results back (:func:`load_trials`) and deploying the front
(:func:`export`)."""

from search.study._baseline import measure_baseline
from search.study._deploy import export
from search.study._exclude import exclusions, unhelpful_options
from search.study._fidelity import resolve_finetune
from search.study._front import METRIC_WINDOW, hypervolume, hypervolume_share
from search.study._objective import CANDIDATE_FAILURES, STAGES, Objective
from search.study._optuna import PRUNERS, SAMPLERS, make_sampler, rung_ends
from search.study._promote import next_promotion
from search.study._recipes import enqueue_recipes, recipe_params, recipe_rules
from search.study._results import (
    load_sensitivity,
    load_trials,
    locate_study,
    open_study,
    pareto_front,
    plot_front,
    write_parquet,
)
from search.study._run import default_study_name, run, work
from search.study._sensitivity import layer_sensitivity, sensitivity_frame
from search.study._setup import check_results_dir
from search.study._storage import make_storage
from search.study._spec import OBJECTIVES, SPEC_VERSION, RunSpec, spec_of, task_of_study
from search.study._workers import FINISHED, finished_count, measuring_alone

__all__ = [
    "CANDIDATE_FAILURES",
    "FINISHED",
    "METRIC_WINDOW",
    "OBJECTIVES",
    "PRUNERS",
    "SAMPLERS",
    "SPEC_VERSION",
    "STAGES",
    "Objective",
    "RunSpec",
    "check_results_dir",
    "default_study_name",
    "enqueue_recipes",
    "exclusions",
    "export",
    "finished_count",
    "hypervolume",
    "hypervolume_share",
    "layer_sensitivity",
    "load_sensitivity",
    "load_trials",
    "locate_study",
    "make_sampler",
    "make_storage",
    "measure_baseline",
    "measuring_alone",
    "next_promotion",
    "open_study",
    "pareto_front",
    "plot_front",
    "recipe_params",
    "recipe_rules",
    "resolve_finetune",
    "rung_ends",
    "run",
    "sensitivity_frame",
    "spec_of",
    "task_of_study",
    "unhelpful_options",
    "work",
    "write_parquet",
]
