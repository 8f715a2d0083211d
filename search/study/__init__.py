"""The Optuna study: a run's settings (:class:`RunSpec`), one trial's pipeline (the objective),
starting, resuming and joining a study with many workers (:func:`run`, :func:`work`), the
teacher's baseline, and reading the results back (:func:`load_trials`) and deploying the front
(:func:`export`).

Names load on first use (PEP 562): reading a study's results imports neither PyTorch nor the
runtimes that running one needs."""

from search._lazy import lazy_names

__getattr__, __dir__, __all__ = lazy_names(
    __name__,
    {
        "search._record": ("STAGES",),
        "search.study._baseline": ("measure_baseline",),
        "search.study._deploy": ("export",),
        "search.study._exclude": ("exclusions", "unhelpful_options"),
        "search.study._fidelity": ("resolve_finetune",),
        "search.study._front": ("METRIC_WINDOW", "hypervolume", "hypervolume_share", "study_window"),
        "search.study._objective": ("CANDIDATE_FAILURES", "Objective"),
        "search.study._optuna": ("PRUNERS", "SAMPLERS", "make_sampler", "rung_ends"),
        "search.study._promote": ("next_promotion",),
        "search.study._recipes": ("enqueue_recipes", "recipe_params", "recipe_rules"),
        "search.study._results": (
            "load_sensitivity", "load_trials", "locate_study", "open_study", "pareto_front", "plot_front", "write_parquet",
        ),
        "search.study._run": ("default_study_name", "run", "work"),
        "search.study._sensitivity": ("BLOCK", "layer_sensitivity", "sensitivity_frame"),
        "search.study._setup": ("check_results_dir",),
        "search.study._storage": ("make_storage",),
        "search.study._spec": ("OBJECTIVES", "SPEC_VERSION", "RunSpec", "spec_of", "task_of_study"),
        "search.study._workers": ("FINISHED", "finished_count", "measuring_alone"),
    },
)  # fmt: skip
