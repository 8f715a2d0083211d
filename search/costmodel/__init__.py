"""The learned cost model: features of a built candidate (:func:`plan_features`), a regressor that
predicts its latency with a spread (:class:`LatencyModel`), the measurements it learns from, kept as
plain JSON per study, and the gate that skips the fine-tune of a plan predicted over the budget
(:class:`CostGate`)."""

from search.costmodel._estimator import (
    BASE_FEATURES,
    FlopsBaseline,
    LatencyModel,
    accuracy,
    expected_headroom,
)
from search.costmodel._features import (
    FEATURE_NAMES,
    FEATURE_VERSION,
    MACS_FEATURES,
    RUNTIME_PRECISIONS,
    feature_matrix,
    plan_features,
    roofline_ms,
)
from search.costmodel._gate import MAX_EXPECTED_HEADROOM, MIN_MEASUREMENTS, CostGate, latency_figures
from search.costmodel._measured import measured_rows
from search.costmodel._report import cost_model_report
from search.costmodel._store import MEASUREMENTS_FORMAT, FeatureLayoutError, load_measurements, save_measurements

__all__ = [
    "BASE_FEATURES",
    "FEATURE_NAMES",
    "FEATURE_VERSION",
    "MACS_FEATURES",
    "MAX_EXPECTED_HEADROOM",
    "MEASUREMENTS_FORMAT",
    "MIN_MEASUREMENTS",
    "RUNTIME_PRECISIONS",
    "CostGate",
    "FeatureLayoutError",
    "FlopsBaseline",
    "LatencyModel",
    "accuracy",
    "cost_model_report",
    "expected_headroom",
    "feature_matrix",
    "latency_figures",
    "load_measurements",
    "measured_rows",
    "plan_features",
    "roofline_ms",
    "save_measurements",
]
