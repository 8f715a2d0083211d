"""The latency cost model: a regressor on :mod:`features <search.costmodel._features>`.

Every trial measures its candidate on the target; those measurements teach a model that predicts
the latency of the next candidates from their structure alone. :class:`LatencyModel` predicts
with a spread, so a caller can skip the fine-tune of a candidate that is likely over budget and
expected to leave next to nothing of it unused if not (:func:`expected_headroom`), and measure the
rest. The measurements are the asset; the model is refitted from them (a forest on a few hundred
rows takes well under a second).
"""

from __future__ import annotations

import math
import numbers
import warnings

import forestci
import numpy as np
import scipy.optimize
import scipy.stats
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.ensemble import RandomForestRegressor
from sklearn.utils.validation import check_is_fitted, validate_data

from search.costmodel._features import FEATURE_NAMES, MACS_FEATURES, PADDED_TO, RUNTIME_PRECISIONS

MIN_OOB_SAMPLES = 5
"""Below this many samples with out-of-bag predictions, the residual spread is not trusted."""

MIN_OVER_PREDICTIONS = 3
"""Below this many out-of-bag over-predictions the floor is not trusted (a Student t with fewer
degrees of freedom has no finite spread)."""

UNCALIBRATED_LOG_SIGMA = math.log(1000.0)
"""The log-space spread used while uncalibrated: a factor of 1000 either way, so no veto."""

BASE_FOLDS = 10
"""The base's part of the residual spread is measured on rows held out from it, in this many folds
(one row per fold below that many rows)."""


def _check_param(estimator: BaseEstimator, name: str, ok: bool, expected: str) -> None:
    if not ok:
        value = getattr(estimator, name)
        raise ValueError(
            f"The {name!r} parameter of {type(estimator).__name__} must be {expected}. Got {value!r} instead."
        )


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_positive_y(y: np.ndarray, who: str) -> None:
    if np.any(y <= 0):
        raise ValueError(f"{who} needs latencies > 0 ms; got min(y) = {float(np.min(y))!r}")


def _column_positions(estimator: BaseEstimator, columns, default: tuple[str, ...], param: str) -> np.ndarray:
    """Positions in the fitted ``X`` of ``columns`` (names or positions; ``None``: ``default``).

    Names are found in a DataFrame's columns, or by position when ``X`` has the
    :data:`FEATURE_NAMES` layout.
    """
    who = type(estimator).__name__
    columns = default if columns is None else tuple(columns)
    if not columns:
        raise ValueError(f"The {param!r} parameter of {who} must name at least one column.")
    names = getattr(estimator, "feature_names_in_", None)
    if names is None and estimator.n_features_in_ == len(FEATURE_NAMES):
        names = np.asarray(FEATURE_NAMES)
    positions = []
    for column in columns:
        if _is_int(column):
            if not 0 <= column < estimator.n_features_in_:
                raise ValueError(
                    f"{who} column {column} is out of range for X with {estimator.n_features_in_} features"
                )
            positions.append(int(column))
        elif names is not None and column in list(names):
            positions.append(list(names).index(column))
        else:
            raise ValueError(
                f"{who} cannot find column {column!r}: X has {estimator.n_features_in_} "
                f"features{'' if names is None else ' named ' + ', '.join(map(str, names))}; "
                f"pass a DataFrame with the cost-model feature names, an X in the "
                f"{len(FEATURE_NAMES)}-feature FEATURE_NAMES layout, or {param}=[positions]"
            )
    return np.asarray(positions, dtype=int)


# The work a runtime does, additively: the base of LatencyModel, a non-negative linear fit on these.
BASE_FEATURES = (
    *(f"macs_{p}_pad{m}" for m in PADDED_TO for p in RUNTIME_PRECISIONS),
    "activation_bytes_fp32", "activation_bytes_int8",
    "precision_transitions", "transition_elements", "layers_fp32", "layers_int8",
)  # fmt: skip


class _Trees:
    """What ``forestci.random_forest_error`` reads of a fitted single-output regression forest: its
    trees, their count and its tags. Given the forest itself, forestci asks ``'n_outputs_' in
    dir(forest)`` twice, and scikit-learn's ``dir`` evaluates every property of the forest
    (``feature_importances_``, ``estimators_samples_``): 0.13 s of a 0.19 s prediction on 200 trees."""

    def __init__(self, forest: RandomForestRegressor) -> None:
        self.forest = forest
        self.n_estimators = forest.n_estimators

    def __iter__(self):
        return iter(self.forest.estimators_)

    def __sklearn_tags__(self):
        return self.forest.__sklearn_tags__()


class LatencyModel(RegressorMixin, BaseEstimator):
    """Latency = a non-negative linear base × a random-forest correction; the spread combines the
    forest mean's variance with the out-of-bag residual spread, so it only vetoes when confident.

    The base, ``w · X[:, base_columns] + b`` with ``w, b >= 0`` (scipy's NNLS), is the additive
    cost model a runtime roughly follows (per-precision MACs and bytes, per-layer and per-transition
    overheads): it extrapolates sensibly from few measurements. The forest learns ``log(y / base)``
    from every feature. Measured on 32 held-out random plans (benchmarks/cost_model.py), trained on
    32: the default task 97 % within ±10 % (the forest alone: 66 %), ResNet-18 100 % (84 % before
    the base counted channels rounded up to SIMD blocks).

    Parameters
    ----------
    n_estimators, min_samples_leaf, random_state
        Passed to :class:`~sklearn.ensemble.RandomForestRegressor` (bootstrap, out-of-bag scored).
    confidence
        How many standard deviations (log space) :meth:`lower_bound` stays below the prediction.
    base_columns
        Columns of the linear base, names or positions; ``None`` means :data:`BASE_FEATURES`
        (by name in a DataFrame, or by position in the :data:`FEATURE_NAMES` layout).

    The spread below a prediction, in log space, is ``sqrt(forest_var(x) + log_sigma_**2)``:
    ``forest_var`` is the variance of the forest's mean at ``x`` (the bias-corrected infinitesimal
    jackknife of Wager, Hastie & Efron 2014, by forestci; high where few measurements decide the
    prediction), ``log_sigma_`` the calibration floor: the root-mean-square of the out-of-bag
    residuals where the prediction was *above* the measurement, as the spread of a Student t with
    as many degrees of freedom (``sqrt(k / (k - 2))`` wider for ``k`` of them). Only that side: the
    lower bound is wrong when a plan runs faster than predicted, and interference on a shared
    machine only ever makes a measurement slower, so the slow outliers it leaves among the
    measurements say nothing about how much faster than predicted a plan can be. The residual is
    held out from the base as well (:data:`BASE_FOLDS`): with fewer measurements than base columns
    the base can fit them exactly, and the forest's residuals alone would be zero. With fewer than
    :data:`MIN_OOB_SAMPLES` out-of-bag samples, or fewer than :data:`MIN_OVER_PREDICTIONS` of them
    predicted above their measurement, ``log_sigma_`` is :data:`UNCALIBRATED_LOG_SIGMA` and
    :meth:`lower_bound` stays far below any budget.

    Not the single trees' disagreement, as until 2026-12-02: that counts the measurements' scatter
    a second time beside the floor, and with a chi-square 95 % upper bound on the floor the spread
    was about twice what the misses needed. Replaying four studies of the default task
    (benchmarks/cost_model.py ``replay``), no measurement lay more than 0.82 spreads below its
    prediction from the study's own measurements, where a normal spread puts 16 % beyond one; now
    5.6 % lie beyond one and none beyond two (warm-started from the other studies: 21.7 % and 1.1 %).

    Attributes
    ----------
    estimator_ : RandomForestRegressor
        The forest, fitted on ``log(y / base)``.
    base_columns_, base_scale_, base_coef_ : ndarray
        Positions, column scales and non-negative weights (the last one the intercept) of the base.
    log_sigma_ : float
        The calibration floor of the spread below a prediction, in log space.
    n_oob_ : int
        How many training samples had an out-of-bag prediction.
    inbag_ : ndarray of shape (n_samples, n_estimators)
        How many times each training sample was drawn into each tree's bootstrap sample.
    n_features_in_, feature_names_in_
        As in scikit-learn.
    """

    def __init__(self, n_estimators=200, min_samples_leaf=1, confidence=2.0, random_state=0, base_columns=None):
        self.n_estimators = n_estimators
        self.min_samples_leaf = min_samples_leaf
        self.confidence = confidence
        self.random_state = random_state
        self.base_columns = base_columns

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.positive_only = True  # a latency; the model fits its log
        return tags

    def _validate_params(self) -> None:
        n_estimators, leaf, confidence = self.n_estimators, self.min_samples_leaf, self.confidence
        _check_param(self, "n_estimators", _is_int(n_estimators) and n_estimators >= 1, "an int >= 1")
        leaf_ok = (_is_int(leaf) and leaf >= 1) or (_is_real(leaf) and not _is_int(leaf) and 0 < leaf < 1)
        _check_param(self, "min_samples_leaf", leaf_ok, "an int >= 1 or a float in (0, 1)")
        _check_param(self, "confidence", _is_real(confidence) and confidence >= 0, "a finite number >= 0")

    def fit(self, X, y):
        """Fit the forest on ``log(y)``; ``y`` is latency in ms, every value > 0."""
        self._validate_params()
        X, y = validate_data(self, X, y, y_numeric=True, dtype=np.float64)
        _check_positive_y(y, type(self).__name__)
        self.base_columns_ = _column_positions(self, self.base_columns, BASE_FEATURES, "base_columns")
        columns = self._base_inputs(X)
        scale = columns.max(axis=0)
        self.base_scale_ = np.where(scale > 0, scale, 1.0)
        scaled = columns / self.base_scale_
        self.base_coef_, _ = scipy.optimize.nnls(scaled, y)
        log_y = np.log(y) - np.log(self._base(X))
        forest = RandomForestRegressor(
            n_estimators=self.n_estimators,
            min_samples_leaf=self.min_samples_leaf,
            bootstrap=True,
            oob_score=True,
            random_state=self.random_state,
        )
        with warnings.catch_warnings():
            # few samples: some (or all) have no out-of-bag tree, and R^2 is undefined;
            # both are handled below through the coverage mask
            warnings.simplefilter("ignore", UserWarning)
            forest.fit(X, log_y)
        self.estimator_ = forest

        # How often each measurement was drawn into each tree's bootstrap sample (rows: measurements),
        # as forestci takes it; read from the public sample indices, not re-drawn.
        drawn = [np.bincount(in_bag, minlength=len(y)) for in_bag in forest.estimators_samples_]
        self.inbag_ = np.stack(drawn, axis=1)
        covered = (self.inbag_ == 0).any(axis=1)
        self.n_oob_ = int(covered.sum())
        self.log_sigma_ = UNCALIBRATED_LOG_SIGMA
        if self.n_oob_ >= MIN_OOB_SAMPLES:
            # Held out from the base too: with fewer measurements than base columns the base fits
            # them exactly, and the forest's out-of-bag residuals alone would be zero.
            held_out = np.log(self._held_out_base(scaled, y)) + forest.oob_prediction_
            residuals = held_out[covered] - np.log(y[covered])
            over = residuals[residuals > 0]  # predicted slower than measured
            if len(over) >= MIN_OVER_PREDICTIONS:
                # the spread of a Student t with as many degrees of freedom as over-predictions
                self.log_sigma_ = float(np.sqrt(np.mean(over**2) * len(over) / (len(over) - 2)))
        return self

    @staticmethod
    def _held_out_base(scaled: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Each row's base prediction by a base fitted without it (without its fold of at most
        ten), in ms, floored as :meth:`_base` is."""
        held_out = np.empty_like(y)
        folds = np.arange(len(y)) % BASE_FOLDS
        for fold in np.unique(folds):
            coef, _ = scipy.optimize.nnls(scaled[folds != fold], y[folds != fold])
            held_out[folds == fold] = scaled[folds == fold] @ coef
        return np.maximum(held_out, 1e-9)

    def _base_inputs(self, X: np.ndarray) -> np.ndarray:
        """The base's columns of ``X`` (negatives clipped to 0) and a column of ones for the intercept."""
        return np.column_stack([np.clip(X[:, self.base_columns_], 0.0, None), np.ones(len(X))])

    def _base(self, X: np.ndarray) -> np.ndarray:
        """The linear base in ms, floored so that its log exists (the forest corrects the rest)."""
        base = (self._base_inputs(X) / self.base_scale_) @ self.base_coef_
        return np.maximum(base, 1e-9)

    def _log_predict(self, X, with_spread: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """The mean log prediction and, with ``with_spread``, the spread below it (``None`` without:
        the forest's variance is a second pass over every tree that a plain prediction does not need)."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float64)
        mu = self.estimator_.predict(X) + np.log(self._base(X))
        if not with_spread:
            return mu, None
        # the forest mean's variance (see the class docstring); Monte Carlo noise can leave the
        # bias-corrected figure below zero
        variance = forestci.random_forest_error(_Trees(self.estimator_), (len(self.inbag_), self.n_features_in_), X,
                                                inbag=self.inbag_, calibrate=False)  # fmt: skip
        sigma = np.sqrt(np.clip(variance, 0.0, None) + self.log_sigma_**2)
        return mu, sigma

    def predict(self, X, return_std=False):
        """Latency in ms (the exp of the mean log prediction); with ``return_std``, also the
        spread below it in log space (so ``exp(mu - k·std)`` is a multiplicative lower bound)."""
        mu, sigma = self._log_predict(X, with_spread=return_std)
        if return_std:
            return np.exp(mu), sigma
        return np.exp(mu)

    def lower_bound(self, X) -> np.ndarray:
        """``exp(mu - confidence·std)`` in ms: a candidate is confidently slower than a budget
        only when this is above it."""
        mu, sigma = self._log_predict(X)
        return np.exp(mu - self.confidence * sigma)


def expected_headroom(predicted_ms, spread, budget_ms: float) -> np.ndarray:
    """``E[max(0, 1 - latency / budget)]``: the share of the budget a plan is expected to leave
    unused, when its log latency is normal around ``log(predicted_ms)`` with standard deviation
    ``spread`` (:meth:`LatencyModel.predict` with ``return_std``; the log-normal's partial expectation).

    What a plan can add to a front's hypervolume (metric × latency, reference point at the budget) is
    at most its headroom times the best metric: measured, a plan 2 % under the budget adds at most 2 %
    of that box. So vetoing plans whose expected headroom is below a share ``h`` loses at most ``h``
    of the box each, in expectation, whether or not they turn out within the budget.
    """
    predicted_ms, spread = np.asarray(predicted_ms, dtype=float), np.asarray(spread, dtype=float)
    z = np.log(budget_ms / predicted_ms) / spread
    norm = scipy.stats.norm
    return norm.cdf(z) - predicted_ms / budget_ms * np.exp(spread**2 / 2) * norm.cdf(z - spread)


class FlopsBaseline(RegressorMixin, BaseEstimator):
    """The published-style FLOPs-only predictor: linear regression of log latency on log total MACs.

    Parameters
    ----------
    columns
        The MAC columns of ``X``, summed into total MACs: names or positions. ``None`` means
        :data:`MACS_FEATURES`, found by name in a DataFrame's columns, or by position when ``X``
        has the :data:`FEATURE_NAMES` layout. Negative sums count as 0 (``log1p`` of MACs).

    Attributes
    ----------
    columns_ : ndarray of int
        Positions of the summed columns.
    coef_, intercept_ : float
        ``log(latency_ms) ≈ coef_ · log1p(total MACs) + intercept_``.
    """

    def __init__(self, columns=None):
        self.columns = columns

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.positive_only = True
        # one summed column by design: on generic data (scikit-learn's checks) R^2 stays low
        tags.regressor_tags.poor_score = True
        return tags

    def _resolve_columns(self) -> np.ndarray:
        return _column_positions(self, self.columns, MACS_FEATURES, "columns")

    def _log_macs(self, X: np.ndarray) -> np.ndarray:
        return np.log1p(np.clip(X[:, self.columns_].sum(axis=1), 0.0, None))

    def fit(self, X, y):
        X, y = validate_data(self, X, y, y_numeric=True, dtype=np.float64)
        _check_positive_y(y, type(self).__name__)
        self.columns_ = self._resolve_columns()
        x, log_y = self._log_macs(X), np.log(y)
        spread = x - x.mean()
        denominator = float(spread @ spread)
        self.coef_ = float(spread @ (log_y - log_y.mean()) / denominator) if denominator > 0 else 0.0
        self.intercept_ = float(log_y.mean() - self.coef_ * x.mean())
        return self

    def predict(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float64)
        return np.exp(self.coef_ * self._log_macs(X) + self.intercept_)


def accuracy(y_true_ms, y_pred_ms) -> dict[str, float]:
    """How close predictions are to measurements.

    ``within_10pct`` / ``within_20pct``: share of predictions within ±10 % / ±20 % of the measured
    latency; ``mape``: mean absolute percentage error, as a fraction (0.05 = 5 %); ``spearman``:
    rank correlation (what ranking candidates needs; NaN with fewer than 2 points or constant input).
    """
    true = np.asarray(y_true_ms, dtype=float).ravel()
    pred = np.asarray(y_pred_ms, dtype=float).ravel()
    if true.shape != pred.shape or true.size == 0:
        raise ValueError(
            f"accuracy needs as many predictions as measurements, at least one; "
            f"got {true.size} measurements and {pred.size} predictions"
        )
    _check_positive_y(true, "accuracy")
    error = np.abs(pred - true) / true
    if true.size >= 2 and np.ptp(true) > 0 and np.ptp(pred) > 0:
        spearman = float(scipy.stats.spearmanr(true, pred).statistic)
    else:
        spearman = float("nan")
    return {
        "within_10pct": float(np.mean(error <= 0.10 + 1e-12)),
        "within_20pct": float(np.mean(error <= 0.20 + 1e-12)),
        "mape": float(np.mean(error)),
        "spearman": spearman,
    }
