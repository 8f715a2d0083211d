"""How well the cost model predicts a study's measurements: ``search costmodel``."""

from __future__ import annotations

import numpy as np
import optuna
from sklearn.model_selection import KFold

from search._record import Key
from search.costmodel._estimator import FlopsBaseline, LatencyModel, accuracy
from search.costmodel._features import feature_matrix
from search.costmodel._measured import measured_rows, measured_trials, sensor_energy


def cost_model_report(study: optuna.Study, folds: int = 5) -> dict[str, dict[str, float] | int]:
    """The cost model's error on this study's measured trials.

    ``online``: what the search saw, the prediction made before each trial against its measurement
    (``online_energy``: the same for energy, where a sensor measured it). ``held_out``: k-fold
    cross-validation on the study's measured trials whose features are of this version's layout
    (``current_layout`` of them), for the forest and for the FLOPs-only linear baseline.
    """
    measured = measured_trials(study)
    online = [
        (t.user_attrs[Key.LATENCY_MS], t.user_attrs[Key.PREDICTED_LATENCY_MS])
        for t in measured
        if t.user_attrs.get(Key.PREDICTED_LATENCY_MS) is not None
    ]
    report: dict = {"measured": len(measured), "predicted_online": len(online)}
    if online:
        report["online"] = accuracy(*map(np.array, zip(*online)))
    online_energy = [
        (sensor_energy(t.user_attrs), t.user_attrs[Key.PREDICTED_ENERGY_MJ])
        for t in measured
        if t.user_attrs.get(Key.PREDICTED_ENERGY_MJ) is not None and sensor_energy(t.user_attrs) is not None
    ]
    if online_energy:
        report["online_energy"] = accuracy(*map(np.array, zip(*online_energy)))
    rows, latency, _, _ = measured_rows(study)
    report["current_layout"] = len(latency)
    if len(latency) >= 2 * folds:
        x, y = feature_matrix(rows), np.array(latency)
        for name, make in (("held_out", LatencyModel), ("held_out_flops_baseline", FlopsBaseline)):
            predicted = np.empty_like(y)
            for train, test in KFold(folds, shuffle=True, random_state=0).split(x):
                predicted[test] = make().fit(x[train], y[train]).predict(x[test])
            report[name] = accuracy(y, predicted)
    return report
