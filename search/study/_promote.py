"""Successive halving over a study's plans (ASHA): every plan is screened with the shortest fine-tune,
and the plans that could still reach the front are promoted to longer ones.

A promotion is a trial of its own, enqueued in the study's storage with the plan's parameters and
``continue_from`` naming the trial whose fine-tune it goes on with from its saved state (the step
count grows; nothing restarts): it survives a crash as any trial does, and the plan's shorter
result stays in the study. Optuna's own SuccessiveHalvingPruner decides inside a running trial,
which cannot be suspended, so it promotes whatever comes first; here a plan waits at its rung until
enough plans have reached it to judge it, as asynchronous successive halving does.

At rung ``r``, with ``n`` of the study's own plans there (the sampler's, the sensitivity mixes),
up to ``n // reduction`` of them are promoted. A recipe users know (they run it at the longest
fine-tune) takes no slot: its plan is promoted, rung by rung, while it could still be on the front
(in the front's box or below it), so that the study's front weakly dominates every recipe users
know, at the same fine-tune. A plan could still reach the front if the metric the longer
fine-tunes could still give it (its metric at rung ``r`` plus the share of its gap to the teacher
that earlier promotions from each rung closed: their upper quartile, half of it until two were
seen) would not be matched by another plan at least as fast. Of those, the promotion goes to the
plan that would add most to the front's hypervolume (metric × latency, the box from the teacher's
metric minus the task's metric window at the teacher's latency), then to the one that
would reach the highest metric.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from search._record import Key
from search.compress import Finetune
from search.study._front import METRIC_WINDOW, hypervolume
from search.study._recipes import users_know
from search.study._workers import counted

RECOVERY_QUANTILE = 0.75
MIN_RECOVERIES = 2
PRIOR_RECOVERY = 0.5  # the share of its gap to the teacher a promotion is expected to close, before any was seen


def lineages(trials: Sequence[FrozenTrial]) -> dict[int, dict[int, FrozenTrial]]:
    """Each plan's trials by rung, keyed by the number of the trial that screened it: a promotion
    (``continue_from``) joins the lineage of the trial it continues, from the moment it is queued."""
    by_number = {trial.number: trial for trial in trials}
    found: dict[int, dict[int, FrozenTrial]] = {}
    for trial in trials:
        if Key.RUNG not in trial.user_attrs or Key.DUPLICATE_OF in trial.user_attrs:  # a copy is not a plan
            continue
        root = trial
        while Key.CONTINUE_FROM in root.user_attrs and root.user_attrs[Key.CONTINUE_FROM] in by_number:
            root = by_number[root.user_attrs[Key.CONTINUE_FROM]]
        found.setdefault(root.number, {})[trial.user_attrs[Key.RUNG]] = trial
    return found


def _feasible(trial: FrozenTrial) -> bool:
    return trial.state == TrialState.COMPLETE and all(v <= 0 for v in trial.constraints.values())


def recovery(lines: dict[int, dict[int, FrozenTrial]], rung: int, teacher_metric: float) -> float:
    """The share of the gap to the teacher that promotions from ``rung`` closed: their upper
    quartile, or :data:`PRIOR_RECOVERY` until :data:`MIN_RECOVERIES` were seen."""
    seen = []
    for line in lines.values():
        before, after = line.get(rung), line.get(rung + 1)
        if before is None or after is None or not (_feasible(before) and _feasible(after)):
            continue
        gap = teacher_metric - before.user_attrs[Key.METRIC]
        if gap > 1e-9:
            seen.append((after.user_attrs[Key.METRIC] - before.user_attrs[Key.METRIC]) / gap)
    if len(seen) < MIN_RECOVERIES:
        return PRIOR_RECOVERY
    return float(np.clip(np.quantile(seen, RECOVERY_QUANTILE), 0.0, 1.0))


def reachable(metric: float, rung: int, last: int, recoveries: Sequence[float], teacher_metric: float) -> float:
    """The metric a plan at ``metric`` after ``rung`` could reach by the ``last`` rung."""
    for r in range(rung, last):
        metric += recoveries[r] * max(0.0, teacher_metric - metric)
    return metric


def _waiting(
    study: optuna.Study, finetune: Finetune, teacher: tuple[float, float], window: float
) -> list[tuple[int, dict[int, tuple[FrozenTrial, tuple[float, float] | None]]]]:
    """The plans waiting at each rung below the last, from the highest rung down: the rung's free
    promotion slots, and each waiting plan's trial with its promise (None: it could not reach the
    front as it stands). ``teacher`` is the teacher's (metric, latency); ``window`` the metric the
    front's box spans."""
    last = len(finetune.rung_ends()) - 1
    teacher_metric, teacher_latency = teacher
    reference = (teacher_metric - window, teacher_latency)
    lines = lineages(study.get_trials(deepcopy=False))
    recoveries = [recovery(lines, r, teacher_metric) for r in range(last)]
    latest = {
        root: line[max(r for r, t in line.items() if _feasible(t))]
        for root, line in lines.items()
        if any(_feasible(t) for t in line.values())
    }  # each plan's furthest fine-tuned result: the front as it stands

    def point(trial: FrozenTrial) -> tuple[float, float]:
        return trial.user_attrs[Key.METRIC], trial.user_attrs[Key.LATENCY_MS]

    def promise(root: int, trial: FrozenTrial, rung: int) -> tuple[float, float] | None:
        """If this plan reached what it still could: what the box's hypervolume would gain, and
        that metric; None where another plan is at least as good and as fast already."""
        others = [point(t) for r, t in latest.items() if r != root]
        metric, latency = point(trial)
        reached = reachable(metric, rung, last, recoveries, teacher_metric)
        if any(m >= reached and l <= latency for m, l in others):
            return None
        before = hypervolume([*others, (metric, latency)], reference)
        gain = hypervolume([*others, (reached, latency)], reference) - before
        return gain, reached

    found = []
    for rung in reversed(range(last)):
        at_rung = {root: line[rung] for root, line in lines.items() if rung in line and _feasible(line[rung])}
        moved_on = {root for root, line in lines.items() if any(r > rung for r in line)}  # promoted (any state)
        own = {root for root, trial in at_rung.items() if not users_know(trial)}
        slots = len(own) // finetune.reduction - len(moved_on & own)
        waiting = {  # a plan scored without a fine-tune (a PTQ recipe) is not fine-tuned longer either
            root: (trial, promise(root, trial, rung)) for root, trial in at_rung.items()
            if root not in moved_on and Key.FINETUNE_SKIPPED not in trial.user_attrs
        }  # fmt: skip
        found.append((slots, waiting))
    return found


def next_promotion(
    study: optuna.Study, finetune: Finetune, teacher: tuple[float, float], window: float = METRIC_WINDOW
) -> FrozenTrial | None:
    """The trial whose plan should be fine-tuned longer next, or None: see the module's doc.
    ``teacher`` is the teacher's (metric, latency); ``window`` the metric the front's box spans."""
    for slots, waiting in _waiting(study, finetune, teacher, window):
        promising = {
            root: p for root, (trial, p) in waiting.items()
            if p is not None and (users_know(trial) or slots > 0)
        }  # fmt: skip
        if promising:
            return waiting[max(promising, key=promising.get)][0]
    return None


def without_promise(
    study: optuna.Study, finetune: Finetune, teacher: tuple[float, float], window: float = METRIC_WINDOW
) -> list[FrozenTrial]:
    """The trials waiting at a rung whose plans could not reach the front as it stands: the state
    each saved for a promotion to go on from is kept for nothing, unless later promotions recover
    more than those seen so far (then such a plan's promotion starts its fine-tune over)."""
    found = _waiting(study, finetune, teacher, window)
    return [trial for _, waiting in found for trial, p in waiting.values() if p is None]


def promote(
    study: optuna.Study, finetune: Finetune, teacher: tuple[float, float], trials: int, window: float = METRIC_WINDOW
) -> int | None:
    """Enqueue the next promotion (:func:`next_promotion`, the box ``window`` deep), unless one waits
    already or the study's ``trials`` are all run or queued (a promotion past them would be left
    waiting when the study ends; a resumed study with more trials queues it then); the number of
    the trial it continues, or None."""
    everything = study.get_trials(deepcopy=False)
    waiting = [t for t in everything if t.state == TrialState.WAITING]
    if any(Key.CONTINUE_FROM in t.user_attrs for t in waiting) or len(counted(everything)) >= trials:
        return None
    parent = next_promotion(study, finetune, teacher, window)
    if parent is None:
        return None
    attrs = {Key.CONTINUE_FROM: parent.number, Key.RUNG: parent.user_attrs[Key.RUNG] + 1}
    if Key.RECIPE in parent.user_attrs:
        attrs[Key.RECIPE] = parent.user_attrs[Key.RECIPE]
    study.enqueue_trial(parent.params, user_attrs=attrs)
    return parent.number
