import pytest

from search.model import compressible_layers
from search.plan import ChannelPruning, LayerPlan, Plan, Quantization, WeightSparsity
from search.compress import bake
from search.compress import packed_size_bytes
from search.compress import apply_plan

LAYERS = ("conv1", "conv2", "conv3", "fc")


def _plan(bits: int, **sparsity: WeightSparsity) -> Plan:
    return Plan(
        layers={
            name: LayerPlan(sparsity=sparsity.get(name, WeightSparsity()), quantization=Quantization(bits))
            for name in LAYERS
        }
    )


@pytest.fixture
def parts(cnn):
    """SmallCNN's compressible weights (count, output channels) and the bytes of everything else."""
    layers = compressible_layers(cnn).values()
    weights = sum(m.weight.numel() for m in layers)
    channels = sum(m.weight.shape[0] for m in layers)
    other = sum(p.numel() for p in cnn.parameters()) - weights
    assert (weights, channels, other) == (14288, 90, 170)
    return weights, channels, 4 * other


def test_fp32_is_four_bytes_per_parameter(cnn, parts):
    weights, _, other = parts
    assert packed_size_bytes(cnn, Plan()) == other + 4 * weights


def test_int8_weights_take_a_quarter_plus_channel_scales(cnn, cnn_input, parts):
    weights, channels, other = parts
    plan = _plan(8)
    model = bake(apply_plan(cnn, plan, cnn_input))
    fp32 = packed_size_bytes(cnn, Plan()) - other
    int8 = packed_size_bytes(model, plan) - other
    assert int8 == weights + 4 * channels
    assert 0.25 < int8 / fp32 < 0.26


def test_binarized_weights_take_a_32nd_plus_channel_scales(cnn, cnn_input, parts):
    weights, channels, other = parts
    plan = _plan(1)
    model = bake(apply_plan(cnn, plan, cnn_input))
    size = packed_size_bytes(model, plan) - other
    assert size == (weights + 7) // 8 + 4 * channels
    assert 1 / 32 < size / (4 * weights) < 1 / 32 + 0.01


def test_int4_is_half_of_int8(cnn, cnn_input, parts):
    weights, channels, other = parts
    plan = _plan(4)
    size = packed_size_bytes(bake(apply_plan(cnn, plan, cnn_input)), plan) - other
    assert size == weights // 2 + 4 * channels


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize(
    "sparsity, kept", [(WeightSparsity(0.75), 0.25), (WeightSparsity(0.5, "2:4"), 0.5)], ids=["unstructured", "2:4"]
)
def test_sparsity_reduces_the_size(cnn, cnn_input, bits, sparsity, kept):
    dense_plan, sparse_plan = _plan(bits), _plan(bits, conv2=sparsity, conv3=sparsity)
    dense = packed_size_bytes(bake(apply_plan(cnn, dense_plan, cnn_input)), dense_plan)
    sparse = packed_size_bytes(bake(apply_plan(cnn, sparse_plan, cnn_input)), sparse_plan)
    assert sparse < dense
    # Per weight of conv2 and conv3 (13824 of them): `bits` dense; `kept · bits` plus 1 bit sparse
    # (a 1-bit mask per weight, or a 2-bit index per kept weight of 2:4).
    saved = (dense - sparse) * 8 / (13824 * bits)
    expected = 1 - kept - 1 / bits
    if bits == 32:
        assert saved == pytest.approx(expected, abs=1e-3)
    else:  # int8 rounding may zero a few more weights
        assert expected - 1e-3 <= saved < expected + 0.05


def test_the_size_of_a_qat_candidate_equals_the_size_once_baked(cnn, cnn_input):
    plan = _plan(8, conv3=WeightSparsity(0.5))
    candidate = apply_plan(cnn, plan, cnn_input)  # weights still parametrized
    assert packed_size_bytes(candidate, plan) == packed_size_bytes(bake(candidate), plan)


def test_pruning_shrinks_the_size(cnn, cnn_input):
    plan = Plan(width=0.5, layers={"conv2": LayerPlan(pruning=ChannelPruning(0.5))})
    assert packed_size_bytes(apply_plan(cnn, plan, cnn_input), plan) < packed_size_bytes(cnn, Plan()) / 3
