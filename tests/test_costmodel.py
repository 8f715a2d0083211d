"""Cost-model features, the latency regressor and its baseline, accuracy figures, persistence."""

from __future__ import annotations

import json
import math

import forestci
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.exceptions import NotFittedError
from sklearn.utils.estimator_checks import parametrize_with_checks

from models import Conv1dNet, example_input
from search.costmodel._estimator import UNCALIBRATED_LOG_SIGMA
from search.costmodel import (
    BASE_FEATURES,
    FEATURE_NAMES,
    FEATURE_VERSION,
    MACS_FEATURES,
    FeatureLayoutError,
    FlopsBaseline,
    LatencyModel,
    accuracy,
    expected_headroom,
    load_measurements,
    plan_features,
    save_measurements,
)
from search._errors import UsageError
from search.plan import ChannelPruning, LayerPlan, Plan, Quantization, WeightSparsity
from search.compress import apply_plan, build_structure
from targets import load_target

CNN_LAYERS = ("conv1", "conv2", "conv3", "fc")


@pytest.fixture(scope="module")
def cpu():
    return load_target("cpu")


def _features(cnn, cnn_input, plan, target):
    return plan_features(apply_plan(cnn, plan, cnn_input), plan, cnn_input, target)


def _bits(bits: dict[str, int]) -> Plan:
    return Plan(layers={name: LayerPlan(quantization=Quantization(b)) for name, b in bits.items()})


# --------------------------------------------------------------------------------------------
# Features


def test_keys_are_the_layout_and_model_is_left_as_found(cnn, cnn_input, cpu):
    cnn.train()
    features = plan_features(cnn, Plan(), cnn_input, cpu)
    assert tuple(features) == FEATURE_NAMES
    assert all(isinstance(v, float) and math.isfinite(v) for v in features.values())
    assert cnn.training  # the training flag is restored
    assert not any(m._forward_hooks for m in cnn.modules())  # hooks removed


def test_conv1d_macs_and_bytes_by_hand(cpu):
    model = Conv1dNet()
    x = example_input(model, batch=2)  # counts are per sample
    features = plan_features(model, Plan(), x, cpu)
    # out elements × in_channels/groups × kernel; the grouped conv sees 16/4 inputs per output
    macs = 16 * 32 * 4 * 3 + 32 * 32 * (16 // 4) * 3 + 32 * 32 * 32 * 1 + 5 * 32
    assert features["macs_fp32"] == macs
    assert features["macs_int8"] == 0
    activations = (4 * 32 + 16 * 32) + (16 * 32 + 32 * 32) + (32 * 32 + 32 * 32) + (32 + 5)
    assert features["activation_bytes_fp32"] == 4 * activations
    params = sum(
        m.weight.numel() + m.bias.numel() for m in (model.conv1, model.grouped, model.conv3, model.fc)
    )
    assert features["param_bytes_fp32"] == 4 * params
    assert (features["layers_conv1d"], features["layers_conv2d"], features["layers_linear"]) == (3, 0, 1)


def test_padded_macs_round_channels_up_to_simd_blocks(cpu):
    model = Conv1dNet()
    x = example_input(model, batch=2)
    features = plan_features(model, Plan(), x, cpu)
    # conv1's 4 inputs and fc's 5 outputs round up; the grouped conv pads only its outputs
    unchanged = 32 * 32 * (16 // 4) * 3 + 32 * 32 * 32 * 1
    assert features["macs_fp32_pad8"] == 16 * 32 * 8 * 3 + unchanged + 8 * 32
    assert features["macs_fp32_pad16"] == 16 * 32 * 16 * 3 + unchanged + 16 * 32
    assert features["macs_int8_pad8"] == features["macs_int4_pad16"] == 0


def test_transition_elements_count_what_crosses_precisions(cpu):
    model = Conv1dNet()
    x = example_input(model, batch=2)
    one_island = _bits({"conv1": 8})
    assert plan_features(apply_plan(model, one_island, x), one_island, x, cpu)["transition_elements"] == 16 * 32
    two = _bits({"conv1": 8, "grouped": 32, "conv3": 8, "fc": 8})  # int8 → fp32 → int8
    assert plan_features(apply_plan(model, two, x), two, x, cpu)["transition_elements"] == 16 * 32 + 32 * 32
    assert plan_features(model, Plan(), x, cpu)["transition_elements"] == 0


def test_dict_input_macs_count_every_token_per_sample(cpu):
    from models import TinyText, text_inputs

    features = plan_features(TinyText(), Plan(), text_inputs(batch=3), cpu)
    assert features["macs_fp32"] == 2 * 16 * 32 * 32  # two 32×32 Linear layers on 16 tokens
    assert features["layers_linear"] == 2


def test_an_attention_counts_its_packed_projection_and_out_proj(cpu):
    """PyTorch's attention computes Q/K/V and out_proj from their weights without calling a module: a
    third of a block's work, counted from the attention's call (a MatMul and a Gemm in the graph)."""
    from models import SignalEncoder

    model = SignalEncoder().eval()
    x = example_input(model, batch=2)  # counts are per sample: 8 tokens of 16
    features = plan_features(model, Plan(), x, cpu)
    block = 8 * 48 * 16 + 8 * 16 * 16 + 8 * 32 * 16 + 8 * 16 * 32  # in_proj, out_proj, linear1, linear2
    assert features["macs_fp32"] == 16 * 8 * (2 * 4) + 3 * block + 4 * 16
    parameters = sum(p.numel() for name, p in model.named_parameters() if "norm" not in name and name != "position")
    assert features["param_bytes_fp32"] == 4 * parameters
    assert features["layers_linear"] == 3 * 3 + 1  # the plan's layers: out_proj, linear1, linear2; the head

    attention = "encoder.layers.0.self_attn"
    int4 = _bits({f"{attention}.out_proj": 4})  # the packed projection takes out_proj's bits
    low = plan_features(apply_plan(model, int4, x), int4, x, cpu)
    assert low["macs_int4"] == 8 * 48 * 16  # a MatMul: int4 weight-only
    assert low["macs_int8"] == 8 * 16 * 16  # a Gemm: int4 runs as int8
    assert low["macs_fp32"] == features["macs_fp32"] - 8 * 48 * 16 - 8 * 16 * 16
    assert low["param_bytes_int4"] == 48 * 16 / 2 + 48 * 4
    assert not any(m._forward_hooks for m in model.modules())


def test_an_attention_called_by_keyword_counts_alike(cpu):
    class Attend(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = torch.nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = torch.nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.attention(query=x, key=x, value=x, need_weights=False)[0].mean(1))

    x = torch.randn(2, 5, 8)  # a batch of 2, 5 tokens
    features = plan_features(Attend().eval(), Plan(), x, cpu)
    assert features["macs_fp32"] == 5 * 24 * 8 + 5 * 8 * 8 + 3 * 8  # per sample: in_proj, out_proj, head


def test_int8_plan_moves_macs_from_fp32_to_int8(cnn, cnn_input, cpu):
    dense = _features(cnn, cnn_input, Plan(), cpu)
    int8 = _features(cnn, cnn_input, _bits(dict.fromkeys(CNN_LAYERS, 8)), cpu)
    assert dense["macs_int8"] == 0 and int8["macs_fp32"] == 0
    assert int8["macs_int8"] == dense["macs_fp32"] > 0
    # int8 weights are a quarter of fp32 ones (biases stay 4 bytes)
    assert int8["param_bytes_int8"] < dense["param_bytes_fp32"] / 3
    assert int8["activation_bytes_int8"] == dense["activation_bytes_fp32"] / 4
    assert (int8["layers_int8"], int8["layers_fp32"], int8["int8_macs_share"]) == (4, 0, 1.0)


def test_int4_and_binarized_layers_count_at_int8_on_cpu(cnn, cnn_input, cpu):
    int8 = _features(cnn, cnn_input, _bits(dict.fromkeys(CNN_LAYERS, 8)), cpu)
    low = _features(cnn, cnn_input, _bits({"conv1": 8, "conv2": 4, "conv3": 1, "fc": 8}), cpu)
    assert low["macs_int8"] == int8["macs_int8"]
    assert low["param_bytes_int8"] == int8["param_bytes_int8"]


def test_channel_pruning_lowers_macs(cnn, cnn_input, cpu):
    dense = _features(cnn, cnn_input, Plan(), cpu)
    pruned = _features(cnn, cnn_input, Plan(layers={"conv2": LayerPlan(pruning=ChannelPruning(0.5))}), cpu)
    assert pruned["macs_fp32"] < dense["macs_fp32"]
    assert pruned["channels_total"] == dense["channels_total"] - 16
    assert pruned["param_bytes_fp32"] < dense["param_bytes_fp32"]


def test_width_lowers_total_channels(cnn, cnn_input, cpu):
    dense = _features(cnn, cnn_input, Plan(), cpu)
    student = plan_features(build_structure(cnn, Plan(width=0.5), cnn_input), Plan(width=0.5), cnn_input, cpu)
    assert student["channels_total"] < dense["channels_total"]
    assert student["macs_fp32"] < dense["macs_fp32"]
    assert student["width"] == 0.5 and dense["width"] == 1.0
    # 16, 32, 32, 10 output channels
    assert dense["channels_min"] == 10 and dense["channels_mean"] == 22.5
    assert dense["channels_mult8_share"] == 0.75 and dense["channels_mult32_share"] == 0.5


def test_precision_transitions(cnn, cnn_input, cpu):
    mixed = _features(cnn, cnn_input, _bits({"conv1": 8, "conv2": 32, "conv3": 8, "fc": 8}), cpu)
    all_int8 = _features(cnn, cnn_input, _bits(dict.fromkeys(CNN_LAYERS, 8)), cpu)
    assert mixed["precision_transitions"] == 2  # int8 → fp32 → int8
    assert all_int8["precision_transitions"] == 0
    assert 0 < mixed["int8_macs_share"] < 1


def test_sparsity_features(cnn, cnn_input, cpu):
    plan = Plan(
        layers={
            "conv2": LayerPlan(sparsity=WeightSparsity(0.5, "2:4")),
            "conv3": LayerPlan(sparsity=WeightSparsity(0.75)),
        }
    )
    features = _features(cnn, cnn_input, plan, cpu)
    weights = {"conv1": 16 * 9, "conv2": 32 * 16 * 9, "conv3": 32 * 32 * 9, "fc": 10 * 32}
    expected = (0.5 * weights["conv2"] + 0.75 * weights["conv3"]) / sum(weights.values())
    assert features["sparsity_mean"] == pytest.approx(expected)
    assert features["two_four_share"] == 0.25


def test_roofline_needs_target_figures(cnn, cnn_input, cpu):
    jetson = load_target("jetson")
    assert _features(cnn, cnn_input, Plan(), cpu)["roofline_ms"] == 0.0  # peak = {}
    fp32 = _features(cnn, cnn_input, Plan(), jetson)["roofline_ms"]
    int8 = _features(cnn, cnn_input, _bits(dict.fromkeys(CNN_LAYERS, 8)), jetson)["roofline_ms"]
    assert 0 < int8 < fp32


# --------------------------------------------------------------------------------------------
# Estimators


def _synthetic(n: int, seed: int, noise: float = 0.03):
    """Latency ∝ MACs (log-uniform over two decades) times ±3 % noise, in the FEATURE_NAMES layout."""
    rng = np.random.default_rng(seed)
    X = rng.uniform(0, 1, size=(n, len(FEATURE_NAMES)))
    macs = 10 ** rng.uniform(5, 7, size=n)
    share = rng.uniform(0, 1, size=n)
    for suffix in ("", "_pad8", "_pad16"):  # channels aligned to 8 and 16: padding adds nothing
        X[:, FEATURE_NAMES.index(f"macs_fp32{suffix}")] = macs * (1 - share)
        X[:, FEATURE_NAMES.index(f"macs_int8{suffix}")] = macs * share
    X[:, FEATURE_NAMES.index("log_macs")] = np.log1p(macs)
    y = macs / 1e6 * np.exp(rng.normal(0, noise, size=n))
    return X, y


def test_latency_model_fits_a_monotone_relation():
    X, y = _synthetic(300, seed=0)
    X_test, y_test = _synthetic(50, seed=1)
    model = LatencyModel(n_estimators=100).fit(X, y)
    predicted = model.predict(X_test)
    assert np.all(np.abs(predicted - y_test) / y_test < 0.20)
    assert np.all(model.lower_bound(X_test) <= predicted)
    mean, std = model.predict(X_test, return_std=True)
    np.testing.assert_allclose(mean, predicted)
    assert np.all(std >= model.log_sigma_) and np.all(std < 0.5)


def test_latency_model_takes_a_dataframe():
    X, y = _synthetic(40, seed=0)
    frame = pd.DataFrame(X, columns=FEATURE_NAMES)
    model = LatencyModel(n_estimators=20).fit(frame, y)
    assert list(model.feature_names_in_) == list(FEATURE_NAMES)
    np.testing.assert_allclose(model.predict(frame), LatencyModel(n_estimators=20).fit(X, y).predict(X))


def test_the_spread_is_forestcis_jackknife_on_the_forest_and_asks_no_forest_property():
    # forestci given the forest itself asks dir(forest), which evaluates every scikit-learn property
    # of it; the model hands it only the trees, and must get the same variance.
    X, y = _synthetic(40, seed=0)
    X_test, _ = _synthetic(5, seed=1)
    model = LatencyModel(n_estimators=30).fit(X, y)
    variance = forestci.random_forest_error(model.estimator_, X.shape, X_test, inbag=model.inbag_, calibrate=False)
    expected = np.sqrt(np.clip(variance, 0.0, None) + model.log_sigma_**2)
    forest_class = type(model.estimator_)
    asked = []
    original = forest_class.feature_importances_
    forest_class.feature_importances_ = property(lambda forest: asked.append("feature_importances_"))
    try:
        _, spread = model.predict(X_test, return_std=True)
    finally:
        forest_class.feature_importances_ = original
    np.testing.assert_allclose(spread, expected)
    assert asked == []


def test_sigma_shrinks_as_data_arrives():
    X_test, _ = _synthetic(50, seed=1)
    spreads = []
    for n in (3, 20, 300):
        X, y = _synthetic(n, seed=0)
        model = LatencyModel(n_estimators=100).fit(X, y)
        spreads.append(float(np.mean(model.predict(X_test, return_std=True)[1])))
    assert spreads[0] > spreads[1] > spreads[2]
    # three samples: uncalibrated, so the lower bound vetoes nothing
    model = LatencyModel(n_estimators=100).fit(*_synthetic(3, seed=0))
    assert model.log_sigma_ == UNCALIBRATED_LOG_SIGMA
    assert np.all(model.lower_bound(X_test) < 1e-3 * model.predict(X_test))


def test_the_spread_matches_how_far_held_out_measurements_fall_below_the_prediction():
    # A normal spread puts 16 % of them more than one spread below, 2.3 % more than two. Too
    # narrow and the gate vetoes plans within the budget; too wide and it skips little. The
    # single trees' disagreement ⊕ a chi-square upper bound on the floor put 5.0 % and 0 % there.
    below = []
    for seed in range(5):
        X, y = _synthetic(60, seed=seed, noise=0.05)
        X_test, y_test = _synthetic(200, seed=seed + 100, noise=0.05)
        predicted, spread = LatencyModel(n_estimators=100).fit(X, y).predict(X_test, return_std=True)
        below.append(np.log(predicted / y_test) / spread)
    below = np.concatenate(below)
    assert 0.08 < np.mean(below > 1) < 0.25
    assert 0.005 < np.mean(below > 2) < 0.06


def test_a_base_that_fits_few_measurements_exactly_is_not_taken_for_certainty():
    # Six measurements, each the only one with work in its own base column: the non-negative base
    # fits them exactly and the forest's out-of-bag residuals are zero. The spread must still say
    # how far a base fitted without a measurement lands from it (here: nowhere near).
    X = np.zeros((6, len(FEATURE_NAMES)))
    for row, name in enumerate(BASE_FEATURES[:6]):
        X[row, FEATURE_NAMES.index(name)] = 1.0
    y = np.array([0.1, 0.2, 0.4, 0.8, 1.6, 3.2])
    model = LatencyModel(n_estimators=50).fit(X, y)
    np.testing.assert_allclose(model.predict(X), y, rtol=1e-6)
    assert model.log_sigma_ > 1.0
    assert np.all(model.lower_bound(X) < 0.1 * y)


def test_slow_outliers_do_not_widen_the_lower_bound_but_fast_ones_do():
    # Interference only ever slows a measurement: a fifth of the measurements 50 % slow says
    # nothing about how much faster than predicted a plan can run; a fifth 33 % fast says it can.
    # A floor from both sides of the residuals put the slow case's lower bound the lower of the two
    # (0.50 of the prediction, against 0.59); from the over-predictions only, 0.57 against 0.45.
    X, y = _synthetic(100, seed=0, noise=0.01)
    X_test, _ = _synthetic(50, seed=1)
    spoiled = np.arange(len(y)) % 5 == 0
    below = {}
    for outliers, factor in (("slow", 1.5), ("fast", 1 / 1.5)):
        model = LatencyModel(n_estimators=100).fit(X, np.where(spoiled, y * factor, y))
        below[outliers] = float(np.median(model.lower_bound(X_test) / model.predict(X_test)))
    assert below["slow"] > below["fast"] + 0.05


def test_expected_headroom_is_the_mean_unused_share_of_the_budget():
    rng = np.random.default_rng(0)
    for predicted, spread in ((0.9, 0.1), (1.0, 0.05), (1.1, 0.08), (1.3, 0.3), (5.0, 2.0)):
        latency = predicted * np.exp(spread * rng.standard_normal(400_000))
        sampled = np.mean(np.clip(1 - latency / 1.0, 0, None))
        assert expected_headroom(predicted, spread, 1.0) == pytest.approx(sampled, abs=3e-4, rel=0.01)
    # known limits: far within the budget, the predicted share; far over, nothing; at the budget,
    # about spread·φ(0) for a small spread
    assert expected_headroom(0.5, 0.01, 1.0) == pytest.approx(0.5, rel=1e-3)
    assert expected_headroom(2.0, 0.01, 1.0) < 1e-12
    assert expected_headroom(1.0, 0.01, 1.0) == pytest.approx(0.01 / math.sqrt(2 * math.pi), rel=0.02)
    # the uncalibrated spread leaves a plan predicted over the budget a large expected headroom
    assert expected_headroom(3.0, UNCALIBRATED_LOG_SIGMA, 1.0) > 0.1


def test_latency_model_validates():
    X, y = _synthetic(10, seed=0)
    with pytest.raises(ValueError, match="latencies > 0"):
        LatencyModel().fit(X, -y)
    with pytest.raises(ValueError, match="'confidence' parameter of LatencyModel"):
        LatencyModel(confidence=-1).fit(X, y)
    with pytest.raises(NotFittedError):
        LatencyModel().lower_bound(X)


def test_flops_baseline():
    X, y = _synthetic(100, seed=0, noise=0.0)
    model = FlopsBaseline().fit(X, y)
    # latency = MACs / 1e6 exactly: slope 1 on log(1 + MACs) ≈ log MACs
    assert model.coef_ == pytest.approx(1.0, abs=1e-3)
    np.testing.assert_array_equal(model.columns_, [FEATURE_NAMES.index(c) for c in MACS_FEATURES])
    np.testing.assert_allclose(model.predict(X), y, rtol=1e-3)
    # the other columns do not matter
    shuffled = X.copy()
    shuffled[:, FEATURE_NAMES.index("channels_total")] = 0
    np.testing.assert_allclose(model.predict(shuffled), model.predict(X))
    # by name through a DataFrame, even with other columns in another order
    frame = pd.DataFrame(X, columns=FEATURE_NAMES)[["width", *MACS_FEATURES]]
    np.testing.assert_allclose(FlopsBaseline().fit(frame, y).predict(frame), model.predict(X))
    with pytest.raises(ValueError, match="cannot find column 'macs_fp32'"):
        FlopsBaseline().fit(X[:, :3], y)


@parametrize_with_checks(
    # fewer trees: the contract does not depend on the count, and the checks fit dozens of times
    [LatencyModel(n_estimators=10, base_columns=[0]), FlopsBaseline(columns=[0])],
)
def test_sklearn_contract(estimator, check):
    # No check is expected to fail: both set the `positive_only` target tag, so the checks
    # generate strictly positive latencies for them.
    check(estimator)


# --------------------------------------------------------------------------------------------
# Accuracy


def test_accuracy_on_known_numbers():
    result = accuracy([10, 10, 10, 10], [10.5, 9.0, 11.5, 13.0])  # errors 5, 10, 15, 30 %
    assert result["within_10pct"] == 0.5
    assert result["within_20pct"] == 0.75
    assert result["mape"] == pytest.approx(0.15)
    assert math.isnan(result["spearman"])  # constant measurements have no ranking
    ranked = accuracy([1, 2, 3, 4], [1, 3, 2, 4])
    assert ranked["spearman"] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="as many predictions"):
        accuracy([1, 2], [1])


# --------------------------------------------------------------------------------------------
# Persistence


def test_measurements_round_trip(tmp_path, cnn, cnn_input, cpu):
    rows = [_features(cnn, cnn_input, plan, cpu) for plan in (Plan(), _bits(dict.fromkeys(CNN_LAYERS, 8)))]
    path = tmp_path / "costmodel" / "cpu" / "digits.json"
    save_measurements(path, rows, [1.5, 0.5], target="cpu", task="digits")
    assert load_measurements(path, target="cpu", task="digits") == (rows, [1.5, 0.5], [None, None], [None, None])
    document = json.loads(path.read_text())
    assert document["format"] == "compression-search/cost-measurements"
    assert document["feature_version"] == FEATURE_VERSION and document["features"] == list(FEATURE_NAMES)
    assert [p.name for p in path.parent.iterdir()] == ["digits.json"]  # no temp file left
    settings = ['{"runtime": "onnxruntime 1.32.0"}', None]
    save_measurements(path, rows, [2.0, 1.0], target="cpu", task="digits", energy_mj=[None, 3.5],
                      settings=settings)  # overwrites  # fmt: skip
    assert load_measurements(path, target="cpu", task="digits") == (rows, [2.0, 1.0], [None, 3.5], settings)
    with pytest.raises(ValueError, match="settings must be None or text"):
        save_measurements(path, rows, [2.0, 1.0], target="cpu", task="digits", settings=[{"cpu": "x"}, None])
    with pytest.raises(ValueError, match="energies must be None or finite and > 0 mJ"):
        save_measurements(path, rows, [2.0, 1.0], target="cpu", task="digits", energy_mj=[0.0, 3.5])
    with pytest.raises(UsageError, match="not of task 'other' on target 'cpu'"):
        load_measurements(path, target="cpu", task="other")


def test_missing_file_loads_empty(tmp_path):
    assert load_measurements(tmp_path / "none.json", target="cpu", task="digits") == ([], [], [], [])


def test_a_file_from_before_energy_and_settings_were_kept_loads_with_neither(tmp_path):
    row = [1.0] * len(FEATURE_NAMES)
    older = _stale(tmp_path / "older.json", rows=[row], latency_ms=[0.5])  # no "energy_mj" or "settings" key
    assert load_measurements(older, target="cpu", task="digits")[1:] == ([0.5], [None], [None])
    for name, damage in (("energy.json", {"energy_mj": []}), ("settings.json", {"settings": [3]})):
        damaged = _stale(tmp_path / name, rows=[row], latency_ms=[0.5], **damage)
        with pytest.raises(UsageError, match="damaged: .* as latencies, energies and settings"):
            load_measurements(damaged, target="cpu", task="digits")


def _stale(path, **changes):
    document = {
        "format": "compression-search/cost-measurements",
        "feature_version": FEATURE_VERSION,
        "features": list(FEATURE_NAMES),
        "target": "cpu",
        "task": "digits",
        "rows": [],
        "latency_ms": [],
    }
    path.write_text(json.dumps({**document, **changes}))
    return path


def test_stale_layout_is_refused(tmp_path):
    n = len(FEATURE_NAMES)
    old = _stale(tmp_path / "old.json", feature_version=0, features=list(FEATURE_NAMES[:12]))
    with pytest.raises(FeatureLayoutError) as error:
        load_measurements(old, target="cpu", task="digits")
    message = str(error.value)
    assert isinstance(error.value, UsageError)
    assert str(old) in message
    assert "v0 (12 features)" in message and f"v{FEATURE_VERSION} ({n} features)" in message
    assert "delete it or move it away" in message

    renamed = _stale(tmp_path / "renamed.json", features=["flops", *FEATURE_NAMES[1:]])
    with pytest.raises(
        FeatureLayoutError, match=rf"v{FEATURE_VERSION} \({n} features\).*'flops', expected 'macs_fp32'"
    ):
        load_measurements(renamed, target="cpu", task="digits")

    with pytest.raises(UsageError, match="not a compression-search/cost-measurements file"):
        load_measurements(_stale(tmp_path / "other.json", format="something"), target="cpu", task="digits")
