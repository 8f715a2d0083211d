import pytest
import torch
from torch.nn.utils import parametrize

from models import example_input
from search.plan import LayerPlan, Plan, Quantization, WeightSparsity
from search.compress import BinarizeWeight, FakeQuantWeight, InputFakeQuant, bake
from search.compress import apply_plan


def _quantized(cnn, cnn_input, **bits):
    plan = Plan(layers={name: LayerPlan(quantization=Quantization(b)) for name, b in bits.items()})
    return apply_plan(cnn, plan, cnn_input)


def _train_step(model, steps=1):
    """A few Adam steps on random targets: weights move, input quantizers see data."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for step in range(steps):
        x = example_input(model, batch=16, seed=100 + step)
        loss = torch.nn.functional.cross_entropy(model(x), torch.arange(16) % 10)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_binarized_layer_bakes_to_plus_minus_channel_mean(cnn, cnn_input):
    model = _train_step(_quantized(cnn, cnn_input, conv2=1), steps=2)
    original = model.conv2.parametrizations.weight.original.detach().clone()
    alpha = original.abs().flatten(1).mean(1)  # per output channel, at bake time
    bake(model)
    weight = model.conv2.weight.detach()
    assert not parametrize.is_parametrized(model.conv2)
    for channel in range(weight.shape[0]):
        values = weight[channel].unique()
        assert len(values) == 2, f"channel {channel} has {len(values)} distinct values"
        torch.testing.assert_close(values, torch.stack([-alpha[channel], alpha[channel]]))
    assert torch.equal(weight.sign(), torch.where(original >= 0, 1.0, -1.0))
    # the float layers are untouched
    assert model.conv3.weight[0].unique().numel() > 100


@pytest.mark.parametrize("bits, qmax", [(8, 127), (4, 7)])
def test_int_layers_bake_onto_a_symmetric_per_channel_grid(cnn, cnn_input, bits, qmax):
    model = bake(_train_step(_quantized(cnn, cnn_input, conv2=bits, fc=bits), steps=2))
    for name in ("conv2", "fc"):
        weight = getattr(model, name).weight.detach().flatten(1)
        scale = weight.abs().amax(1, keepdim=True) / qmax
        levels = weight / scale
        torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0)
        assert levels.abs().max() <= qmax + 1e-4
        torch.testing.assert_close(levels.abs().amax(1), torch.full((len(weight),), float(qmax)))
        for row in levels.round():
            assert row.unique().numel() <= 2 * qmax + 1
    if bits == 4:  # 15 levels per channel, where float weights would have one value per weight
        assert model.conv2.weight[0].unique().numel() <= 15 < model.conv2.weight[0].numel()


def test_sparse_int8_layer_keeps_its_zeros_through_bake(cnn, cnn_input):
    plan = Plan(layers={"conv3": LayerPlan(sparsity=WeightSparsity(0.5), quantization=Quantization(8))})
    model = bake(_train_step(apply_plan(cnn, plan, cnn_input), steps=2))
    assert (model.conv3.weight == 0).float().mean() >= 0.5


@pytest.mark.parametrize("bits", [8, 4, 1])
def test_gradients_reach_the_float_weight_through_the_ste(cnn, cnn_input, bits):
    model = _quantized(cnn, cnn_input, conv2=bits)
    original = model.conv2.parametrizations.weight.original
    assert not torch.equal(model.conv2.weight, original)  # the forward sees the quantized weight
    model.train()
    x = example_input(model, batch=8)
    model(x).square().sum().backward()
    assert original.grad is not None
    assert (original.grad != 0).float().mean() > 0.5
    before = original.detach().clone()
    torch.optim.SGD([original], lr=0.1).step()
    assert not torch.equal(original.detach(), before)


def test_weight_quantizers_directly():
    weight = torch.randn(4, 3, 3, 3, requires_grad=True)
    int8 = FakeQuantWeight(8)(weight)
    scale = weight.detach().abs().flatten(1).amax(1).view(-1, 1, 1, 1) / 127
    torch.testing.assert_close(int8, (weight.detach() / scale).round() * scale)
    binary = BinarizeWeight()(weight)
    alpha = weight.detach().abs().flatten(1).mean(1).view(-1, 1, 1, 1)
    assert torch.equal(binary.detach().abs(), alpha.expand_as(weight))
    binary.sum().backward()
    assert torch.equal(weight.grad, (weight.detach().abs() <= 1).float())  # clipped straight-through


def _on_uint8_grid(values, quantizer):
    scale = float(quantizer.high - quantizer.low) / 255.0
    zero_point = round(float(-quantizer.low) / scale)
    codes = values / scale + zero_point
    torch.testing.assert_close(codes, codes.round(), atol=1e-3, rtol=0)
    assert codes.min() >= -1e-3 and codes.max() <= 255 + 1e-3
    return codes.round().unique().numel()


def test_input_fake_quant_outputs_lie_on_a_256_level_grid_after_a_training_step():
    quantizer = InputFakeQuant()
    x = torch.randn(64, 8, 4, 4) * 3
    assert torch.equal(quantizer.eval()(x), x)  # before any data: identity
    out = quantizer.train()(x)
    assert quantizer.low < 0 < quantizer.high
    levels = _on_uint8_grid(out, quantizer)
    assert 100 < levels <= 256
    assert not torch.equal(out, x)
    out = quantizer.eval()(torch.randn(64, 8) * 10)  # outside the tracked range: clamped to the grid
    assert _on_uint8_grid(out, quantizer) <= 256


def test_quantized_layers_see_uint8_grid_inputs_during_training(cnn, cnn_input):
    model = _quantized(cnn, cnn_input, conv2=8)
    assert isinstance(model.conv2.input_quant, InputFakeQuant)
    assert not hasattr(model.conv3, "input_quant")
    _train_step(model)
    seen = []
    model.conv2.register_forward_hook(lambda module, args, out: seen.append(args[0].detach()))
    with torch.no_grad():
        model(example_input(model, batch=16, seed=7))
    assert _on_uint8_grid(seen[0], model.conv2.input_quant) > 50


def test_bake_leaves_a_plain_model(cnn, cnn_input):
    model = _train_step(_quantized(cnn, cnn_input, conv1=8, conv2=1, conv3=4))
    with torch.no_grad():
        before = model(cnn_input)
    bake(model)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert not any(hasattr(m, "input_quant") for m in model.modules())
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert all("parametrizations" not in key and "input_quant" not in key for key in model.state_dict())
    with torch.no_grad():
        after = model(cnn_input)
    assert after.shape == before.shape and not torch.equal(after, before)  # inputs no longer fake-quantized
