import optuna
import pytest
from optuna.trial import FixedTrial

from search._errors import UsageError
from search.model import LayerInfo, describe_layers
from search.plan import ChannelPruning, LayerPlan, Plan, Quantization, WeightSparsity
from search.plan import SearchSpace, suggest_plan


@pytest.fixture
def layers(cnn, cnn_input) -> list[LayerInfo]:
    """SmallCNN: conv1 (1 input channel, edge), conv2, conv3, fc (edge, output: not prunable)."""
    return describe_layers(cnn, cnn_input)


def test_layers_of_the_small_cnn(layers):
    assert [(l.name, l.prunable, l.two_four, l.edge) for l in layers] == [
        ("conv1", True, False, True),
        ("conv2", True, True, False),
        ("conv3", True, True, False),
        ("fc", False, True, True),
    ]


def test_fixed_trial_builds_the_expected_plan(layers):
    trial = FixedTrial(
        {
            "width": 0.75,
            "conv1.bits": 8, "conv1.sparsity": 0.5, "conv1.pruning": 0.25,
            "conv2.bits": 1, "conv2.pruning": 0.5,
            "conv3.bits": 4, "conv3.sparsity": "2:4", "conv3.pruning": 0.0,
            "fc.bits": 32, "fc.sparsity": 0.75,
        }
    )  # fmt: skip
    plan = suggest_plan(trial, SearchSpace(), layers)
    assert plan == Plan(
        width=0.75,
        layers={
            "conv1": LayerPlan(ChannelPruning(0.25), WeightSparsity(0.5), Quantization(8)),
            "conv2": LayerPlan(ChannelPruning(0.5), WeightSparsity(), Quantization(1)),
            "conv3": LayerPlan(ChannelPruning(0.0), WeightSparsity(0.5, "2:4"), Quantization(4)),
            "fc": LayerPlan(ChannelPruning(0.0), WeightSparsity(0.75), Quantization(32)),
        },
    )
    assert "fc.pruning" not in trial.distributions  # the output layer keeps its channels


def _choices(trial, name):
    return tuple(trial.distributions[name].choices)


def _all_params(layers, **overrides):
    params = {"width": 1.0}
    for layer in layers:
        params.update({f"{layer.name}.bits": 8, f"{layer.name}.sparsity": 0.0, f"{layer.name}.pruning": 0.0})
    params.update(overrides)
    return params


def test_edge_layers_are_offered_no_bits_below_edge_min_bits(layers):
    trial = FixedTrial(_all_params(layers))
    suggest_plan(trial, SearchSpace(), layers)
    assert _choices(trial, "conv1.bits") == (32, 8)
    assert _choices(trial, "fc.bits") == (32, 8)
    assert _choices(trial, "conv2.bits") == (32, 8, 4, 1)

    lifted = FixedTrial(_all_params(layers, **{"conv1.bits": 1, "conv1.sparsity": None}))
    plan = suggest_plan(lifted, SearchSpace(edge_min_bits=1), layers)
    assert _choices(lifted, "conv1.bits") == (32, 8, 4, 1)
    assert plan.layer("conv1").quantization.bits == 1


def test_edge_layers_never_sampled_below_edge_min_bits(layers):
    space = SearchSpace(edge_min_bits=4)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = {"conv1": set(), "conv2": set(), "fc": set()}
    for _ in range(60):
        plan = suggest_plan(study.ask(), space, layers)
        for name in seen:
            seen[name].add(plan.layer(name).quantization.bits)
    assert seen["conv1"] == seen["fc"] == {32, 8, 4}
    assert 1 in seen["conv2"]


def test_edge_layers_stay_float_when_the_space_offers_no_wide_enough_bits(layers):
    trial = FixedTrial(_all_params(layers, **{"conv1.bits": 32, "fc.bits": 32, "conv2.bits": 4, "conv3.bits": 4}))
    plan = suggest_plan(trial, SearchSpace(bits=(4, 1), edge_min_bits=8), layers)
    assert _choices(trial, "conv1.bits") == _choices(trial, "fc.bits") == (32,)
    assert plan.layer("conv1").quantization.bits == 32
    assert plan.layer("conv2").quantization.bits == 4


def test_binarized_layers_get_no_sparsity_parameter(layers):
    trial = FixedTrial(_all_params(layers, **{"conv2.bits": 1, "conv2.sparsity": 0.75}))
    plan = suggest_plan(trial, SearchSpace(), layers)
    assert "conv2.sparsity" not in trial.distributions
    assert "conv3.sparsity" in trial.distributions
    assert plan.layer("conv2").sparsity == WeightSparsity()
    assert plan.layer("conv2").quantization.bits == 1


def test_two_four_offered_only_where_input_channels_split_into_fours(layers):
    trial = FixedTrial(_all_params(layers))
    suggest_plan(trial, SearchSpace(), layers)
    assert "2:4" not in _choices(trial, "conv1.sparsity")  # 1 input channel
    assert "2:4" in _choices(trial, "conv2.sparsity")  # 16
    assert "2:4" in _choices(trial, "fc.sparsity")  # 32

    without = FixedTrial(_all_params(layers))
    suggest_plan(without, SearchSpace(two_four=False), layers)
    assert all("2:4" not in _choices(without, f"{l.name}.sparsity") for l in layers)


def test_space_restricted_to_some_layers(layers):
    trial = FixedTrial(_all_params(layers))
    plan = suggest_plan(trial, SearchSpace(layers=("conv2",)), layers)
    assert set(plan.layers) == {"conv2"}
    assert not any(name.startswith(("conv1.", "conv3.", "fc.")) for name in trial.distributions)


def test_from_toml_reads_a_file(tmp_path, layers):
    path = tmp_path / "space.toml"
    path.write_text(
        'width = [0.5]\npruning = [0.0, 0.5]\nsparsity = [0.0]\nbits = [8, 32]\n'
        'two_four = false\nedge_min_bits = 32\nlayers = ["conv2", "conv3"]\n'
    )
    space = SearchSpace.from_toml(path)
    assert space == SearchSpace(
        width=(0.5,), pruning=(0.0, 0.5), sparsity=(0.0,), bits=(8, 32),
        two_four=False, edge_min_bits=32, layers=("conv2", "conv3"),
    )  # fmt: skip
    assert space.to_dict()["bits"] == (8, 32)
    trial = FixedTrial(_all_params(layers, width=0.5))
    plan = suggest_plan(trial, space, layers)
    assert plan.width == 0.5 and set(plan.layers) == {"conv2", "conv3"}
    assert _choices(trial, "conv2.sparsity") == (0.0,)


@pytest.mark.parametrize(
    "text, names",
    [
        ("widht = [0.5]\n", ["widht", "accepted", "width"]),
        ("bits = [3, 8]\n", ["'bits'", "[3]", "32, 8, 4, 1"]),
        ("width = [0.0]\n", ["'width'", "[0.0]", "(0, 1]"]),
        ("pruning = [1.0]\n", ["'pruning'", "[1.0]"]),
        ("sparsity = []\n", ["'sparsity'", "at least one value"]),
        ("width = 0.5\n", ["'width'", "must be a list"]),
        ("edge_min_bits = 2\n", ["'edge_min_bits'", "2"]),
        ("width = [0.5\n", ["space.toml"]),
    ],
)
def test_bad_space_files_are_usage_errors_naming_the_problem(tmp_path, text, names):
    path = tmp_path / "space.toml"
    path.write_text(text)
    with pytest.raises(UsageError) as info:
        SearchSpace.from_toml(path)
    for name in names:
        assert name in str(info.value)


def test_a_missing_space_file_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="nope.toml"):
        SearchSpace.from_toml(tmp_path / "nope.toml")


def test_replace_ignores_unset_flags():
    space = SearchSpace().replace(bits=(8,), width=None)
    assert space.bits == (8,) and space.width == SearchSpace().width


@pytest.mark.parametrize(
    "data, message",
    [
        ({"width": ["half"]}, "'width' has ['half']"),
        ({"bits": [8.0, True]}, "'bits' has [8.0, True]"),
        ({"two_four": "yes"}, "'two_four' is 'yes'; accepted: true or false"),
        ({"edge_min_bits": "8"}, "'edge_min_bits' is '8'"),
        ({"layers": [3]}, "'layers' has [3]"),
    ],
)
def test_a_space_value_of_the_wrong_type_is_a_usage_error(data, message):
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("]", r"\]")):
        SearchSpace.from_dict(data)
