"""A latency cost model: features of a candidate before fine-tuning, and a regressor on them.

Every trial measures its candidate on the target; those measurements teach a model that predicts
the latency of the next candidates from their structure alone (:func:`plan_features`, computed on
the built candidate in one forward pass, before any fine-tuning). :class:`LatencyModel` predicts
with a spread, so a caller can skip the fine-tune of a candidate that is likely over budget and
expected to leave next to nothing of it unused if not (:func:`expected_headroom`), and measure the rest.

The measurements are the asset; the model is refitted from them (a forest on a few hundred rows
takes well under a second). They persist as plain JSON (:func:`save_measurements`) tagged with the
feature layout, so a file written under another layout is refused rather than misread.
"""

from __future__ import annotations

import itertools
import json
import math
import numbers
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import forestci
import numpy as np
import scipy.optimize
import scipy.stats
import torch
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.ensemble import RandomForestRegressor
from sklearn.utils.validation import check_is_fitted, validate_data
from torch import nn

from search._errors import UsageError
from search._export import runtime_precision
from search._io import Inputs, batch_size, call
from search._layers import compressible_layers
from search._plan import Plan

if TYPE_CHECKING:
    from targets import Target

FEATURE_VERSION: int = 3  # 2: int4 (weight-only MatMul) joined the runtime precisions; 3: padded MACs

# What `runtime_precision` can return: a layer runs at one of these. A new one changes the layout.
RUNTIME_PRECISIONS = ("fp32", "int8", "int4")
_BYTES = {"fp32": 4, "int8": 1, "int4": 0.5}
_KINDS = {nn.Conv1d: "conv1d", nn.Conv2d: "conv2d", nn.Linear: "linear"}
_CHANNEL_MULTIPLES = (8, 16, 32)
# CPU kernels compute channels in SIMD blocks (ORT's NCHWc convolutions: 8 floats with AVX2,
# 16 with AVX-512), so a layer costs what its channel counts rounded up to a block would.
_PADDED_TO = (8, 16)

FEATURE_NAMES: tuple[str, ...] = (
    # per runtime precision, per sample: multiply-accumulates, weight bytes, activation bytes moved
    *(f"macs_{p}" for p in RUNTIME_PRECISIONS),
    *(f"param_bytes_{p}" for p in RUNTIME_PRECISIONS),
    *(f"activation_bytes_{p}" for p in RUNTIME_PRECISIONS),
    # multiply-accumulates with every channel count rounded up to a multiple of 8 or 16
    *(f"macs_{p}_pad{m}" for m in _PADDED_TO for p in RUNTIME_PRECISIONS),
    # the same totals, log1p'd, for models that are linear in their inputs
    "log_macs",
    "log_param_bytes",
    "log_activation_bytes",
    "int8_macs_share",
    # layer counts
    *(f"layers_{kind}" for kind in _KINDS.values()),
    *(f"layers_{p}" for p in RUNTIME_PRECISIONS),
    "precision_transitions",
    "transition_elements",  # activation elements crossing from one precision to another
    # channels
    "channels_total",
    "channels_min",
    "channels_mean",
    *(f"channels_mult{m}_share" for m in _CHANNEL_MULTIPLES),
    # sparsity and width
    "sparsity_mean",
    "two_four_share",
    "width",
    # analytical roofline from the target's datasheet figures (0.0 without figures)
    "roofline_ms",
)

MACS_FEATURES: tuple[str, ...] = tuple(f"macs_{p}" for p in RUNTIME_PRECISIONS)

MEASUREMENTS_FORMAT = "compression-search/cost-measurements"


# --------------------------------------------------------------------------------------------
# Features


def plan_features(
    model: nn.Module, plan: Plan, example_input: Inputs, target: Target
) -> dict[str, float]:
    """Features of a candidate *before* fine-tuning, keyed (and ordered) by :data:`FEATURE_NAMES`.

    ``model`` is the built candidate (:func:`~search.build_structure` or :func:`~search.apply_plan`
    output; weight parametrizations and input-quant hooks are fine). One forward pass of
    ``example_input`` in eval mode, under ``torch.no_grad``, records each Conv1d/Conv2d/Linear
    layer's input and output sizes; counts are per sample (divided by the batch size). A layer
    called twice counts twice; a layer the forward never calls counts its weights only.

    Each layer runs at ``runtime_precision(bits, target.precisions, matmul)``: int4 and 1-bit layers
    count as int8 on a target that accelerates int8, since that is what its runtime runs, except a
    Linear on a sequence (a MatMul), which runs int4 weight-only where the target lists it. Weights count
    at that precision's width; biases at 4 bytes (fp32, or the int32 bias of an int8 layer).
    """
    plan = plan.student()
    layers = compressible_layers(model)
    calls: list[tuple[str, int, int]] = []  # (name, input elements, output elements) per call
    matmul: set[str] = set()  # Linear layers applied to sequences: MatMul nodes in the graph

    def record(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            calls.append((name, args[0].numel(), output.numel()))
            if isinstance(module, nn.Linear) and args[0].dim() > 2:
                matmul.add(name)

        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in layers.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            call(model, example_input)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()

    batch = batch_size(example_input)
    precision = {}
    for name in layers:
        p = runtime_precision(plan.layer(name).quantization.bits, target.precisions, name in matmul)
        if p not in RUNTIME_PRECISIONS:  # a new runtime precision needs a new feature layout
            raise ValueError(f"runtime precision {p!r} has no features; known: {RUNTIME_PRECISIONS}")
        precision[name] = p

    with torch.no_grad():
        shapes = {name: tuple(module.weight.shape) for name, module in layers.items()}
    zeros = dict.fromkeys(RUNTIME_PRECISIONS, 0.0)
    macs, param_bytes, act_bytes = dict(zeros), dict(zeros), dict(zeros)
    padded_macs = {m: dict(zeros) for m in _PADDED_TO}

    for name, module in layers.items():
        p = precision[name]
        weight_numel = math.prod(shapes[name])
        bias = getattr(module, "bias", None)
        bias_numel = bias.numel() if isinstance(bias, torch.Tensor) else 0
        param_bytes[p] += weight_numel * _BYTES[p] + bias_numel * 4

    order: list[str] = []
    transition_elements = 0.0
    for (name, in_numel, out_numel), following in itertools.zip_longest(calls, calls[1:]):
        p = precision[name]
        # every output element takes in_channels/groups x kernel (conv) or in_features (linear) MACs
        macs[p] += out_numel / batch * math.prod(shapes[name][1:])
        act_bytes[p] += (in_numel + out_numel) / batch * _BYTES[p]
        for m, padded in padded_macs.items():
            padded[p] += out_numel / batch * _padded_macs_per_output(shapes[name], layers[name], m)
        if following is not None and precision[following[0]] != p:
            transition_elements += out_numel / batch
        if name not in order:
            order.append(name)

    features: dict[str, float] = {}
    for p in RUNTIME_PRECISIONS:
        features[f"macs_{p}"] = macs[p]
    for p in RUNTIME_PRECISIONS:
        features[f"param_bytes_{p}"] = param_bytes[p]
    for p in RUNTIME_PRECISIONS:
        features[f"activation_bytes_{p}"] = act_bytes[p]
    for m in _PADDED_TO:
        for p in RUNTIME_PRECISIONS:
            features[f"macs_{p}_pad{m}"] = padded_macs[m][p]
    total_macs = sum(macs.values())
    features["log_macs"] = math.log1p(total_macs)
    features["log_param_bytes"] = math.log1p(sum(param_bytes.values()))
    features["log_activation_bytes"] = math.log1p(sum(act_bytes.values()))
    features["int8_macs_share"] = macs["int8"] / total_macs if total_macs else 0.0

    for kind in _KINDS.values():
        features[f"layers_{kind}"] = float(sum(_kind(m) == kind for m in layers.values()))
    for p in RUNTIME_PRECISIONS:
        features[f"layers_{p}"] = float(sum(precision[name] == p for name in layers))
    features["precision_transitions"] = float(
        sum(precision[a] != precision[b] for a, b in itertools.pairwise(order))
    )
    features["transition_elements"] = transition_elements

    channels = [shapes[name][0] for name in layers]
    features["channels_total"] = float(sum(channels))
    features["channels_min"] = float(min(channels, default=0))
    features["channels_mean"] = float(np.mean(channels)) if channels else 0.0
    for m in _CHANNEL_MULTIPLES:
        share = sum(c % m == 0 for c in channels) / len(channels) if channels else 0.0
        features[f"channels_mult{m}_share"] = float(share)

    weights = {name: math.prod(shape) for name, shape in shapes.items()}
    total_weights = sum(weights.values())
    features["sparsity_mean"] = (
        sum(plan.layer(name).sparsity.ratio * n for name, n in weights.items()) / total_weights
        if total_weights
        else 0.0
    )
    features["two_four_share"] = (
        sum(plan.layer(name).sparsity.pattern == "2:4" for name in layers) / len(layers) if layers else 0.0
    )
    features["width"] = float(plan.width)
    features["roofline_ms"] = roofline_ms(macs, {p: param_bytes[p] + act_bytes[p] for p in macs}, target)

    assert tuple(features) == FEATURE_NAMES, "plan_features and FEATURE_NAMES disagree"
    return {key: float(value) for key, value in features.items()}


def _padded_macs_per_output(shape: tuple[int, ...], module: nn.Module, multiple: int) -> float:
    """MACs per output element with the layer's channels rounded up to ``multiple``: output
    channels always, input channels per group too unless the layer is grouped (depthwise)."""
    out_channels, in_per_group, *kernel = shape
    if getattr(module, "groups", 1) == 1:
        in_per_group = _round_up(in_per_group, multiple)
    return math.prod(kernel) * in_per_group * _round_up(out_channels, multiple) / out_channels


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _kind(module: nn.Module) -> str | None:
    for cls, kind in _KINDS.items():
        if isinstance(module, cls):
            return kind
    return None


_OPS_UNITS = {"tops": 1e12, "tflops": 1e12, "gops": 1e9, "gflops": 1e9}


def _peak_ops(target: Target, precision: str) -> float | None:
    """Operations per second the target's datasheet gives for ``precision``, if any."""
    for unit, scale in _OPS_UNITS.items():
        value = target.peak.get(f"{precision}_{unit}")
        if value:
            return value * scale
    return None


def roofline_ms(macs: Mapping[str, float], moved_bytes: Mapping[str, float], target: Target) -> float:
    """Sum over precisions of max(2·MACs / peak ops, bytes / memory bandwidth), in ms.

    Peak figures come from the target's ``peak`` table: ``<precision>_{tops,tflops,gops,gflops}``
    and ``memory_gbs``. A precision with no figure of its own uses the fp32 one; a missing term
    counts 0, so a target without figures (the cpu target) gives 0.0.
    """
    bandwidth = target.peak.get("memory_gbs", 0.0) * 1e9
    fp32_ops = _peak_ops(target, "fp32")
    seconds = 0.0
    for p, work in macs.items():
        ops = _peak_ops(target, p) or fp32_ops
        compute = 2.0 * work / ops if ops else 0.0
        memory = moved_bytes.get(p, 0.0) / bandwidth if bandwidth else 0.0
        seconds += max(compute, memory)
    return seconds * 1e3


# --------------------------------------------------------------------------------------------
# Estimators

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
    *(f"macs_{p}_pad{m}" for m in _PADDED_TO for p in RUNTIME_PRECISIONS),
    "activation_bytes_fp32", "activation_bytes_int8",
    "precision_transitions", "transition_elements", "layers_fp32", "layers_int8",
)  # fmt: skip


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
        variance = forestci.random_forest_error(self.estimator_, (len(self.inbag_), self.n_features_in_), X,
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


# --------------------------------------------------------------------------------------------
# Persistence


def save_measurements(
    path,
    rows: Sequence[Mapping[str, float]],
    latency_ms: Sequence[float],
    *,
    target: str,
    task: str,
    energy_mj: Sequence[float | None] | None = None,
) -> None:
    """Write the measurements to ``path`` as plain JSON, atomically, replacing what was there.

    Each row must hold exactly the :data:`FEATURE_NAMES` keys; the caller merges old and new rows.
    ``energy_mj`` holds each row's energy per inference where a sensor measured it, else None
    (an estimate is not a measurement to learn from).
    """
    path = Path(path)
    energy_mj = [None] * len(rows) if energy_mj is None else list(energy_mj)
    if not len(rows) == len(latency_ms) == len(energy_mj):
        raise ValueError(f"{len(rows)} feature rows but {len(latency_ms)} latencies and {len(energy_mj)} energies")
    matrix = []
    for i, row in enumerate(rows):
        if set(row) != set(FEATURE_NAMES):
            missing = sorted(set(FEATURE_NAMES) - set(row))
            extra = sorted(set(row) - set(FEATURE_NAMES))
            raise ValueError(f"row {i} does not have the feature layout: missing {missing}, extra {extra}")
        matrix.append([float(row[name]) for name in FEATURE_NAMES])
    latencies = [float(v) for v in latency_ms]
    if not all(math.isfinite(v) for r in matrix for v in r):
        raise ValueError("feature rows must hold finite numbers")
    if not all(math.isfinite(v) and v > 0 for v in latencies):
        raise ValueError(f"latencies must be finite and > 0 ms, got {latencies}")
    energies = [None if v is None else float(v) for v in energy_mj]
    if not all(v is None or (math.isfinite(v) and v > 0) for v in energies):
        raise ValueError(f"energies must be None or finite and > 0 mJ, got {energies}")
    document = {
        "format": MEASUREMENTS_FORMAT,
        "feature_version": FEATURE_VERSION,
        "features": list(FEATURE_NAMES),
        "target": target,
        "task": task,
        "rows": matrix,
        "latency_ms": latencies,
        "energy_mj": energies,
    }
    text = json.dumps(document, allow_nan=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def load_measurements(
    path, *, target: str, task: str
) -> tuple[list[dict[str, float]], list[float], list[float | None]]:
    """The rows, latencies and measured energies (None where not measured) in ``path``; empty
    lists when it does not exist.

    Raises :class:`~search.UsageError` when the file is not a measurement file, was written with
    another feature layout, or holds another target's or task's measurements.
    """
    path = Path(path)
    afresh = "delete it or move it away to start afresh"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return [], [], []
    except OSError as exc:
        raise UsageError(f"cannot read cost measurements {path}: {exc.strerror or exc}") from exc
    try:
        document = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path} is not valid JSON ({exc}): {afresh}") from exc
    if not isinstance(document, dict) or document.get("format") != MEASUREMENTS_FORMAT:
        raise UsageError(f"{path} is not a {MEASUREMENTS_FORMAT} file: {afresh}")

    version, names = document.get("feature_version"), document.get("features")
    if version != FEATURE_VERSION or names != list(FEATURE_NAMES):
        count = len(names) if isinstance(names, list) else "unknown number of"
        detail = ""
        if version == FEATURE_VERSION and isinstance(names, list):
            difference = next(
                (i for i, (a, b) in enumerate(zip(names, FEATURE_NAMES)) if a != b),
                min(len(names), len(FEATURE_NAMES)),
            )
            stored = names[difference] if difference < len(names) else "(end)"
            expected = FEATURE_NAMES[difference] if difference < len(FEATURE_NAMES) else "(end)"
            detail = f" (feature {difference} is {stored!r}, expected {expected!r})"
        raise UsageError(
            f"{path} was written with feature layout v{version} ({count} features); this version "
            f"uses v{FEATURE_VERSION} ({len(FEATURE_NAMES)} features){detail}: {afresh}"
        )
    if document.get("target") != target or document.get("task") != task:
        raise UsageError(
            f"{path} holds measurements of task {document.get('task')!r} on target "
            f"{document.get('target')!r}, not of task {task!r} on target {target!r}: {afresh}"
        )

    rows, latencies = document.get("rows"), document.get("latency_ms")
    energies = document.get("energy_mj", [None] * len(rows) if isinstance(rows, list) else None)
    if (
        not isinstance(rows, list)
        or not isinstance(latencies, list)
        or not isinstance(energies, list)
        or not len(rows) == len(latencies) == len(energies)
        or not all(isinstance(row, list) and len(row) == len(FEATURE_NAMES) for row in rows)
    ):
        raise UsageError(
            f"{path} is damaged: expected as many rows of {len(FEATURE_NAMES)} numbers as latencies "
            f"and energies: {afresh}"
        )
    try:
        return (
            [dict(zip(FEATURE_NAMES, map(float, row))) for row in rows],
            [float(v) for v in latencies],
            [None if v is None else float(v) for v in energies],
        )
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{path} is damaged: {exc}: {afresh}") from exc
