import copy

import onnx
import pytest
import torch
from torch import nn
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


def test_a_per_call_input_quantizer_gives_what_onnx_runtime_s_dynamic_quantization_gives():
    """DynamicQuantizeLinear (the input side of a dynamically quantized MatMul) and back: the same
    values, from each call's own range; nothing is tracked."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "scale", "zero"]),
            helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["y"]),
        ],
        "dynamic", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None, 8])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    quantizer = InputFakeQuant()
    quantizer.per_call = True
    for seed, shift in ((1, 0.0), (2, 3.0), (3, -5.0)):  # ranges with and without 0 inside
        x = torch.randn(4, 16, 8, generator=torch.Generator().manual_seed(seed)) * 2 + shift
        expected = torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
        torch.testing.assert_close(quantizer.train()(x), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(quantizer.eval()(x), expected, rtol=0, atol=1e-6)
    assert not quantizer.initialized and quantizer.low == quantizer.high == 0


def test_linears_on_sequences_take_each_call_s_range_where_the_target_quantizes_matmuls_dynamically(tmp_path):
    """TinyText's two Linear layers run on sequences (MatMuls): with ``dynamic_matmuls`` their input
    quantizers take each call's range, need no calibration, and the candidate gives what its ONNX
    file (dynamic int8) gives. A convolution's and a Linear's on vectors stay static."""
    from models import SmallCNN, TinyText, text_inputs

    from search.artifacts import OnnxModule, export_candidate
    from search.compress import add_compression, baked_state_dict, build_structure, calibrate_input_quant
    from search.plan import LayerPlan, Plan, Quantization

    plan = Plan(layers={name: LayerPlan(quantization=Quantization(8)) for name in ("fc1", "fc2")})
    structure = build_structure(TinyText().eval(), plan, text_inputs(1))
    candidate = add_compression(copy.deepcopy(structure), plan, text_inputs(1), dynamic_matmuls=True)
    assert candidate.fc1.input_quant.per_call and candidate.fc2.input_quant.per_call
    called = []
    candidate.register_forward_hook(lambda *args: called.append(1))
    calibrate_input_quant(candidate, [(text_inputs(8, seed=s), None) for s in range(4)])
    assert called == []  # no quantizer to calibrate
    structure.load_state_dict(baked_state_dict(candidate))
    exported = export_candidate(
        structure, text_inputs(1), tmp_path / "int8.onnx", plan=plan, precisions=("fp32", "int8"), calibration=[]
    )
    assert "DynamicQuantizeLinear" in {node.op_type for node in onnx.load(str(exported.path)).graph.node}
    x = text_inputs(32, seed=9)
    with torch.no_grad():  # calibrated static ranges: 6e-3 apart
        torch.testing.assert_close(candidate.eval()(**x), OnnxModule(exported.path)(**x), rtol=0, atol=1e-5)

    cnn = SmallCNN().eval()
    names = [name for name, module in cnn.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))]
    cnn_plan = Plan(layers={name: LayerPlan(quantization=Quantization(8)) for name in names})
    x = torch.randn(1, 1, 8, 8)
    static = add_compression(build_structure(cnn, cnn_plan, x), cnn_plan, x, dynamic_matmuls=True)
    assert not any(module.input_quant.per_call for name, module in static.named_modules() if name in names)
