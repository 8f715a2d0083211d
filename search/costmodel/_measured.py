"""A study's measurements as the cost model learns from them: each measured trial's features,
latency, sensor-measured energy and the setting it was measured under. A trial whose features are
of another layout (a study resumed after an upgrade that changed them) is not learned from."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from profilers import measurement_setting
from search._record import Key
from search.costmodel._features import FEATURE_VERSION


def measured_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The study's completed trials that measured their plan: a trial that reused another's
    results (``duplicate_of``) is not a second measurement, and counted as one it would shrink
    the out-of-bag residual, so the spread, with a copy of a training row."""
    return [
        trial
        for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if Key.DUPLICATE_OF not in trial.user_attrs and Key.CONTINUE_FROM not in trial.user_attrs
    ]


def measured_rows(
    study: optuna.Study,
) -> tuple[list[dict[str, float]], list[float], list[float | None], list[str]]:
    """Features, measured latency, sensor-measured energy (None when estimated) and measurement
    setting (:func:`profilers.measurement_setting`) of the study's measured trials whose features
    are of this version's layout (:data:`~search.costmodel.FEATURE_VERSION`; a trial recorded before
    the layout was, of an older one)."""
    rows, latency, energy, settings = [], [], [], []
    for trial in measured_trials(study):
        attrs = trial.user_attrs
        current = attrs.get(Key.COST_FEATURE_VERSION) == FEATURE_VERSION and attrs.get(Key.COST_FEATURES) is not None
        if current and attrs.get(Key.LATENCY_MS) is not None:
            rows.append(attrs[Key.COST_FEATURES])
            latency.append(attrs[Key.LATENCY_MS])
            energy.append(sensor_energy(attrs))
            settings.append(measurement_setting(attrs.get(Key.RUNTIME, ""), attrs.get(Key.DEVICE) or {}))
    return rows, latency, energy, settings


def sensor_energy(attrs: dict) -> float | None:
    """A trial's energy per inference where a sensor measured it; None where it was estimated."""
    measured = str(attrs.get(Key.ENERGY_SOURCE, "")).startswith("measured:")
    return attrs.get(Key.ENERGY_MJ) if measured and attrs.get(Key.ENERGY_MJ) else None
