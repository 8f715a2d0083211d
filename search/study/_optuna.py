"""The Optuna objects a study runs with: its sampler and its pruner, with the view
that lets a single-objective pruner judge a multi-objective study's fine-tunes."""

from __future__ import annotations

import optuna
from optuna.study import StudyDirection
from optuna.trial import TrialState

from search._record import Key
from search.compress import Finetune

_SAMPLERS = {
    # Categorical, conditional space, a few hundred trials at most: what AutoSampler picks too.
    "tpe": lambda seed: optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True),
    "nsga2": lambda seed: optuna.samplers.NSGAIISampler(seed=seed),
    "random": lambda seed: optuna.samplers.RandomSampler(seed=seed),
}
SAMPLERS = tuple(_SAMPLERS)
# "asha": successive halving over the plans' fine-tunes (search.study._promote); "none": every plan
# fine-tuned to the longest at once; "custom": an Optuna pruner object passed to search.run, asked at
# every score of a fine-tune (worker processes cannot rebuild it).
PRUNERS = ("asha", "none", "custom")


def make_sampler(name: str, seed: int | None) -> optuna.samplers.BaseSampler:
    """The sampler named ``name``, one of :data:`SAMPLERS`."""
    return _SAMPLERS[name](seed)


def rung_ends(pruner: str, finetune: Finetune) -> tuple[int, ...]:
    """The step each rung's fine-tune ends at: successive halving's rungs, or only the longest."""
    return finetune.rung_ends() if pruner == "asha" else (finetune.steps,)


def _curve_trial(trial: optuna.trial.FrozenTrial | None, curve: dict | None = None) -> optuna.trial.FrozenTrial:
    """A trial as a single-objective pruner sees it: its fine-tune curve of the metric, nothing else."""
    curve = curve if curve is not None else trial.user_attrs.get(Key.FINETUNE_CURVE, {})
    return optuna.trial.create_trial(
        state=TrialState.RUNNING if trial is None else trial.state,
        values=trial.values if trial is not None and trial.state == TrialState.COMPLETE else None,
        intermediate_values={int(step): value for step, value in curve.items()},
    )


class _MetricView:
    """The study as Optuna's single-objective pruners see it: the metric's fine-tune curves, maximised.

    Optuna's pruners, and ``Trial.report``, reject multi-objective studies (and intermediate values
    stored in one break TPE's handling of pruned trials), so the curves live in a user attr and the
    pruner judges them here. A fine-tune that is hopeless is hopeless on the metric, whatever its latency.
    """

    direction = StudyDirection.MAXIMIZE

    def __init__(self, study: optuna.Study) -> None:
        self._study = study

    def get_trials(self, deepcopy: bool = False, states=None) -> list[optuna.trial.FrozenTrial]:
        return [_curve_trial(t) for t in self._study.get_trials(deepcopy=False, states=states)]


def report_and_maybe_prune(study: optuna.Study, trial: optuna.Trial, curve: dict, step: int, value: float) -> None:
    """Add ``value`` at fine-tune ``step`` to the trial's curve, and raise ``optuna.TrialPruned``
    when the study's pruner says the fine-tune is hopeless."""
    curve[str(step)] = value
    trial.set_user_attr(Key.FINETUNE_CURVE, curve)
    if study.pruner.prune(_MetricView(study), _curve_trial(None, curve)):
        reason = f"metric {value:.4f} at fine-tune step {step} is below the pruner's bar"
        trial.set_user_attr(Key.PRUNED_BY, "pruner")
        trial.set_user_attr(Key.PRUNED_REASON, reason)
        raise optuna.TrialPruned(reason)
