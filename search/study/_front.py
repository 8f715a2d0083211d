"""The front as the study judges it: the box from the teacher's metric minus the task's metric
window (:data:`METRIC_WINDOW` by default) at the teacher's latency, and the hypervolume a set of
(metric, latency) points dominates in it."""

from __future__ import annotations

from collections.abc import Sequence

import optuna

from search._record import StudyKey
from search.tasks import METRIC_WINDOW  # the box's metric span by default; a task may set its own


def study_window(study: optuna.Study) -> float:
    """The metric span ``study`` judges its front over: its task's, recorded when it was made."""
    return study.user_attrs.get(StudyKey.METRIC_WINDOW, METRIC_WINDOW)


def hypervolume(points: Sequence[tuple[float, float]], reference: tuple[float, float]) -> float:
    """The area of the (metric ↑, latency ↓) plane that ``points`` dominate inside the box from
    ``reference`` (a metric, a latency): nothing for a point below or right of it."""
    floor, ceiling = reference
    inside = sorted((latency, metric) for metric, latency in points if metric > floor and latency < ceiling)
    area, best = 0.0, floor
    for index, (latency, metric) in enumerate(inside):
        best = max(best, metric)
        right = inside[index + 1][0] if index + 1 < len(inside) else ceiling
        area += (right - latency) * (best - floor)
    return area


def hypervolume_share(
    points: Sequence[tuple[float, float]], teacher: tuple[float, float], window: float = METRIC_WINDOW
) -> float:
    """The hypervolume of ``points`` over the whole box's, with the box at the ``teacher``'s
    (metric, latency), ``window`` deep: 1 for a plan at the teacher's metric that takes no time at all."""
    metric, latency = teacher
    return hypervolume(points, (metric - window, latency)) / (window * latency)
