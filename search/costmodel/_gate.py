"""The learned cost model as the search uses it: fitted on measured trials, asked before fine-tuning.

The model is never persisted, only the measurements it learns from (plain JSON, one file per study
under ``<results>/costmodel/<target>/<task>/``); it is refitted from them, so every worker of a study
and every later study on the same target and task gets the same model without unpickling anything.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path

import numpy as np
import optuna

from search._record import Key
from search.costmodel._estimator import LatencyModel, expected_headroom
from search.costmodel._features import feature_matrix
from search.costmodel._measured import measured_rows
from search.costmodel._store import FeatureLayoutError, load_measurements, save_measurements

MIN_MEASUREMENTS = 5  # below this the model vetoes nothing
# A plan predicted over the budget is vetoed when its expected headroom under the budget is below
# this share of it: each veto then loses at most 0.5 % of the front's box, in expectation (see
# expected_headroom). Chosen by replaying four studies (benchmarks/cost_model.py replay): no veto of
# a plan measured within the budget, on either latency figure, cold or warm-started.
MAX_EXPECTED_HEADROOM = 0.005


@dataclasses.dataclass
class _Refitted:
    """A model refitted only when its measurements grew by a tenth since the last fit, or came from
    another measurement setting: a forest fit costs a fraction of a second, a candidate's fine-tune
    seconds, but hundreds of fits add up."""

    minimum: int
    model: LatencyModel | None = None
    fitted_on: int = 0
    setting: str | None = None

    def get(self, rows: list, values: list, setting: str | None) -> LatencyModel | None:
        if len(values) < self.minimum:
            return None
        grown = len(values) - self.fitted_on >= max(1, self.fitted_on // 10)
        if self.model is None or setting != self.setting or grown:
            self.model = LatencyModel().fit(feature_matrix(rows), np.array(values))
            self.fitted_on, self.setting = len(values), setting
        return self.model


def latency_figures(model: LatencyModel, predicted: float, spread: float, budget_ms: float | None) -> dict:
    """What the gate records and decides on, from one prediction and its spread: the prediction,
    ``model``'s lower bound (without a second pass over the trees) and, with a budget, the expected
    headroom under it."""
    figures = {
        Key.PREDICTED_LATENCY_MS: predicted,
        Key.PREDICTED_LATENCY_LOW_MS: predicted * math.exp(-model.confidence * spread),  # model.lower_bound
    }
    if budget_ms is not None:
        figures[Key.PREDICTED_HEADROOM] = float(expected_headroom(predicted, spread, budget_ms))
    return figures


@dataclasses.dataclass
class CostGate:
    """Predicts a candidate's latency (and energy, once a sensor measured enough of it) before it is
    fine-tuned; vetoes it when its latency is predicted over budget with too little expected
    headroom under it to be worth measuring (:meth:`veto_reason`).

    ``folder`` holds one measurements file per study; the other studies' files warm-start this one
    (a file of another feature layout, an earlier version's, with a warning that it is left out).
    It learns only from measurements taken under the setting of the study's latest one, or before
    the first under ``setting``, the profiler's where known (machine, runtime version, threads,
    runtime options: :func:`profilers.measurement_setting`; None: it predicts nothing before the
    study's first measurement), so a results folder shared by several machines, or kept across a
    runtime upgrade, does not mix their latencies.
    """

    folder: Path
    study_name: str
    target: str
    task: str
    min_measurements: int = MIN_MEASUREMENTS
    setting: str | None = None
    _warm: tuple[list, list, list, list] = dataclasses.field(default=([], [], [], []), init=False)
    _latency: _Refitted = dataclasses.field(init=False)
    _energy: _Refitted = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        warm = ([], [], [], [])
        for path in sorted(Path(self.folder).glob("*.json")):
            if path.stem != self.study_name:
                try:
                    measured = load_measurements(path, target=self.target, task=self.task)
                except FeatureLayoutError as exc:  # an earlier version's study: the others still warm-start this one
                    warnings.warn(f"{exc}; until then the cost model starts without its measurements", stacklevel=2)
                    continue
                for gathered, more in zip(warm, measured):
                    gathered += more
        self._warm = warm
        self._latency = _Refitted(self.min_measurements)
        self._energy = _Refitted(self.min_measurements)

    @property
    def warm_start(self) -> int:
        return len(self._warm[1])

    def _measurements(self, study: optuna.Study) -> tuple[list, list, list, str | None, int]:
        """Earlier studies' and this study's features, latencies and energies measured under the
        setting of the study's latest measurement (:attr:`setting` before its first), that setting,
        and how many measurements under other settings were left out."""
        own = measured_rows(study)
        setting = own[3][-1] if own[3] else self.setting
        together = list(zip(*(warm + mine for warm, mine in zip(self._warm, own))))
        kept = [(row, ms, mj) for row, ms, mj, where in together if setting is not None and where == setting]
        rows, latency, energy = (list(column) for column in zip(*kept)) if kept else ([], [], [])
        return rows, latency, energy, setting, len(together) - len(kept)

    def model(self, study: optuna.Study) -> LatencyModel | None:
        """The latency model fitted on earlier studies' and this study's measurements under the
        setting of its latest one; None below the minimum."""
        rows, latency, _, setting, _ = self._measurements(study)
        return self._latency.get(rows, latency, setting)

    def predict(self, study: optuna.Study, features: dict[str, float], budget_ms: float | None = None) -> dict | None:
        """The predicted figures, None below the minimum; with ``budget_ms``, the plan's expected
        headroom under it too (``predicted_headroom``, a share of the budget)."""
        rows, latency, energy, setting, left_out = self._measurements(study)
        model = self._latency.get(rows, latency, setting)
        if model is None:
            return None
        x = feature_matrix([features])
        predicted, spread = (float(value[0]) for value in model.predict(x, return_std=True))
        prediction = latency_figures(model, predicted, spread, budget_ms)
        elsewhere = f", {left_out} measured under another machine or runtime setting left out" if left_out else ""
        prediction[Key.PREDICTED_SOURCE] = f"predicted:cost-model(n={self._latency.fitted_on}{elsewhere})"
        metered = [(row, mj) for row, mj in zip(rows, energy) if mj is not None]
        energy_model = self._energy.get([row for row, _ in metered], [mj for _, mj in metered], setting)
        if energy_model is not None:
            prediction[Key.PREDICTED_ENERGY_MJ] = float(energy_model.predict(x)[0])
            prediction[Key.PREDICTED_SOURCE] += f", energy from {self._energy.fitted_on} sensor measurements"
        return prediction

    @staticmethod
    def veto_reason(prediction: dict, budget_ms: float | None) -> str | None:
        """Why the plan is not worth fine-tuning and measuring, or None: predicted over the budget,
        with an expected headroom under it below :data:`MAX_EXPECTED_HEADROOM`."""
        predicted, headroom = prediction[Key.PREDICTED_LATENCY_MS], prediction.get(Key.PREDICTED_HEADROOM)
        if budget_ms is None or predicted <= budget_ms or headroom is None or headroom >= MAX_EXPECTED_HEADROOM:
            return None
        return (
            f"cost model predicts {predicted:.4g} ms (lower bound {prediction[Key.PREDICTED_LATENCY_LOW_MS]:.4g} ms), "
            f"over the {budget_ms:.4g} ms budget; expected headroom under it {headroom:.2%} of the budget, "
            f"below {MAX_EXPECTED_HEADROOM:.1%}"
        )

    def save(self, study: optuna.Study) -> None:
        rows, latency, energy, settings = measured_rows(study)
        if rows:
            self.folder.mkdir(parents=True, exist_ok=True)
            save_measurements(
                self.folder / f"{self.study_name}.json", rows, latency, target=self.target, task=self.task,
                energy_mj=energy, settings=settings,
            )  # fmt: skip
