"""The learned cost model as the search uses it: fitted on measured trials, asked before fine-tuning.

The model is never persisted, only the measurements it learns from (plain JSON, one file per study
under ``<results>/costmodel/<target>/<task>/``); it is refitted from them, so every worker of a study
and every later study on the same target and task gets the same model without unpickling anything.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState

from search._costmodel import FEATURE_NAMES, LatencyModel, accuracy, load_measurements, save_measurements

MIN_MEASUREMENTS = 10  # below this the model vetoes nothing


def measured_rows(study: optuna.Study) -> tuple[list[dict[str, float]], list[float]]:
    """Features and measured latency of the study's completed trials."""
    rows, latency = [], []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        features = trial.user_attrs.get("cost_features")
        if features is not None and trial.user_attrs.get("latency_ms") is not None:
            rows.append(features)
            latency.append(trial.user_attrs["latency_ms"])
    return rows, latency


def _matrix(rows) -> np.ndarray:
    return np.array([[row[name] for name in FEATURE_NAMES] for row in rows], dtype=float)


@dataclasses.dataclass
class CostGate:
    """Predicts a candidate's latency before it is fine-tuned; vetoes it when confidently over budget.

    ``folder`` holds one measurements file per study; the other studies' files warm-start this one.
    """

    folder: Path
    study_name: str
    target: str
    task: str
    min_measurements: int = MIN_MEASUREMENTS
    _warm: tuple[list, list] = dataclasses.field(default=([], []), init=False)
    _model: LatencyModel | None = dataclasses.field(default=None, init=False)
    _fitted_on: int = dataclasses.field(default=0, init=False)

    def __post_init__(self) -> None:
        rows, latency = [], []
        for path in sorted(Path(self.folder).glob("*.json")):
            if path.stem != self.study_name:
                more_rows, more_latency = load_measurements(path, target=self.target, task=self.task)
                rows += more_rows
                latency += more_latency
        self._warm = (rows, latency)

    @property
    def warm_start(self) -> int:
        return len(self._warm[1])

    def model(self, study: optuna.Study) -> LatencyModel | None:
        """The model fitted on earlier studies' and this study's measurements; None below the minimum.

        Refitted only when the measurements grew by a tenth since the last fit: a forest fit costs
        a fraction of a second, a candidate's fine-tune seconds, but hundreds of fits add up.
        """
        rows, latency = measured_rows(study)
        rows, latency = self._warm[0] + rows, self._warm[1] + latency
        if len(latency) < self.min_measurements:
            return None
        if self._model is None or len(latency) - self._fitted_on >= max(1, self._fitted_on // 10):
            self._model = LatencyModel().fit(_matrix(rows), np.array(latency))
            self._fitted_on = len(latency)
        return self._model

    def predict(self, study: optuna.Study, features: dict[str, float]) -> dict | None:
        model = self.model(study)
        if model is None:
            return None
        x = _matrix([features])
        return {
            "predicted_latency_ms": float(model.predict(x)[0]),
            "predicted_latency_low_ms": float(model.lower_bound(x)[0]),
            "predicted_source": f"predicted:cost-model(n={self._fitted_on})",
        }

    def save(self, study: optuna.Study) -> None:
        rows, latency = measured_rows(study)
        if rows:
            self.folder.mkdir(parents=True, exist_ok=True)
            save_measurements(
                self.folder / f"{self.study_name}.json", rows, latency, target=self.target, task=self.task
            )


def cost_model_report(study: optuna.Study, folds: int = 5) -> dict[str, dict[str, float] | int]:
    """The cost model's error on this study's measured trials.

    ``online``: what the search saw, the prediction made before each trial against its measurement.
    ``held_out``: k-fold cross-validation on the study's measured trials, for the forest and for the
    FLOPs-only linear baseline.
    """
    from sklearn.model_selection import KFold

    from search._costmodel import FlopsBaseline

    measured = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    online = [
        (t.user_attrs["latency_ms"], t.user_attrs["predicted_latency_ms"])
        for t in measured
        if t.user_attrs.get("predicted_latency_ms") is not None
    ]
    report: dict = {"measured": len(measured), "predicted_online": len(online)}
    if online:
        report["online"] = accuracy(*map(np.array, zip(*online)))
    rows, latency = measured_rows(study)
    if len(latency) >= 2 * folds:
        x, y = _matrix(rows), np.array(latency)
        for name, make in (("held_out", LatencyModel), ("held_out_flops_baseline", FlopsBaseline)):
            predicted = np.empty_like(y)
            for train, test in KFold(folds, shuffle=True, random_state=0).split(x):
                predicted[test] = make().fit(x[train], y[train]).predict(x[test])
            report[name] = accuracy(y, predicted)
    return report
