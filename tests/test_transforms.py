import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch.nn.utils import parametrize

from models import (
    Conv1dNet, ResidualNet, TinyText, TwoInputNet, example_input, resnet18, settle, text_inputs, two_inputs,
)
from search._errors import CandidateError, UsageError
from search.artifacts import export_float
from search.model import call
from search.model import compressible_layers, describe_layers
from search.plan import ChannelPruning, LayerPlan, Plan, Quantization, WeightSparsity
from search.compress import bake
from search.compress import apply_plan, build_structure
from search.compress._transforms import _transform_for


def _prune(**ratios) -> Plan:
    return Plan(layers={name: LayerPlan(pruning=ChannelPruning(r)) for name, r in ratios.items()})


def _channels(model) -> dict[str, tuple[int, int]]:
    """(out, in) channels of every compressible layer."""
    return {name: tuple(m.weight.shape[:2]) for name, m in compressible_layers(model).items()}


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _initializers(path) -> dict[str, list[int]]:
    return {i.name: list(i.dims) for i in onnx.load(str(path)).graph.initializer}


def _run_onnx(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def test_channel_pruning_gives_a_physically_smaller_onnx_graph(tmp_path, cnn, cnn_input):
    pruned = build_structure(cnn, _prune(conv2=0.5), cnn_input)
    export_float(cnn, cnn_input, tmp_path / "teacher.onnx")
    export_float(pruned, cnn_input, tmp_path / "pruned.onnx")
    teacher, small = _initializers(tmp_path / "teacher.onnx"), _initializers(tmp_path / "pruned.onnx")
    assert teacher["conv2.weight"] == [32, 16, 3, 3]
    assert small["conv2.weight"] == [16, 16, 3, 3]
    assert small["conv3.weight"] == [32, 16, 3, 3]  # its consumer loses the matching input channels
    assert small["conv1.weight"] == teacher["conv1.weight"]
    size = lambda inits: sum(math.prod(dims) for dims in inits.values())  # noqa: E731
    assert size(small) <= size(teacher) - 16 * 16 * 9 - 16 * 32 * 9  # conv2's half and conv3's inputs
    assert _params(pruned) < _params(cnn)
    assert _channels(cnn)["conv2"] == (32, 16)  # the teacher is untouched
    x = example_input(cnn, batch=3)
    assert _run_onnx(tmp_path / "pruned.onnx", x).shape == (3, 10)


def test_student_width_narrows_every_layer_but_the_output(cnn, cnn_input):
    student = build_structure(cnn, Plan(width=0.5), cnn_input)
    assert _channels(student) == {"conv1": (8, 1), "conv2": (16, 8), "conv3": (16, 16), "fc": (10, 16)}
    assert _params(student) < _params(cnn) / 3
    assert student(cnn_input).shape == (1, 10)
    both = build_structure(cnn, Plan(width=0.5, layers=_prune(conv2=0.5).layers), cnn_input)
    assert _channels(both)["conv2"] == (8, 8)  # per-layer pruning applies on top of the width


def test_dependency_aware_pruning_on_a_residual_net(tmp_path):
    model = settle(ResidualNet())
    x = example_input(model)
    # stem, block1.conv2 and block2.conv2 feed the same residual adds: they are pruned together
    pruned = build_structure(model, _prune(**{"block2.conv2": 0.5}), x)
    assert _channels(pruned) == {
        "stem": (8, 3),
        "block1.conv1": (16, 8),
        "block1.conv2": (8, 16),
        "block2.conv1": (16, 8),
        "block2.conv2": (8, 16),
        "fc": (10, 8),
    }
    inner = build_structure(model, _prune(**{"block1.conv1": 0.5}), x)
    assert _channels(inner)["block1.conv1"] == (8, 16) and _channels(inner)["stem"] == (16, 3)
    export_float(pruned, x, tmp_path / "residual.onnx")
    batch = example_input(model, batch=4)
    out = _run_onnx(tmp_path / "residual.onnx", batch)
    assert out.shape == (4, 10)
    np.testing.assert_allclose(out, pruned(batch).detach().numpy(), rtol=1e-3, atol=1e-4)


def test_dependency_aware_pruning_on_resnet18_exports_and_runs(tmp_path):
    model = resnet18()
    x = torch.randn(1, 3, 32, 32)
    pruned = build_structure(model, Plan(width=0.5), x)
    channels = _channels(pruned)
    assert channels["conv1"] == (32, 3)
    assert channels["layer1.0.conv2"] == (32, 32)
    assert channels["layer2.0.downsample.0"] == (64, 32)
    assert channels["layer4.1.conv2"] == (256, 256)
    assert channels["fc"] == (1000, 256)
    assert _params(pruned) < 0.35 * _params(model)
    export_float(pruned, x, tmp_path / "resnet18.onnx")
    assert _initializers(tmp_path / "resnet18.onnx")["layer3.1.conv1.weight"] == [128, 128, 3, 3]
    assert _run_onnx(tmp_path / "resnet18.onnx", torch.randn(2, 3, 32, 32)).shape == (2, 1000)


def test_conv1d_model_with_a_grouped_conv_prunes_and_exports(tmp_path):
    model = Conv1dNet()
    x = example_input(model)
    pruned = build_structure(model, Plan(width=0.5, layers=_prune(conv3=0.5).layers), x)
    channels = _channels(pruned)
    assert channels["grouped"] == (16, 4) and pruned.grouped.groups == 4
    assert channels["conv3"] == (8, 16)
    assert channels["fc"] == (5, 8)
    export_float(pruned, x, tmp_path / "conv1d.onnx")
    assert _initializers(tmp_path / "conv1d.onnx")["grouped.weight"] == [16, 4, 3]
    batch = example_input(model, batch=3)
    out = _run_onnx(tmp_path / "conv1d.onnx", batch)
    np.testing.assert_allclose(out, pruned(batch).detach().numpy(), rtol=1e-3, atol=1e-4)


def test_pruning_that_torch_pruning_cannot_do_fails_the_candidate():
    # Torch-Pruning 1.6.1 rounds per channel group: a 16-channel layer feeding a groups=4 conv
    # cannot shrink to a multiple of 4 per group, and it would silently keep every channel.
    model = Conv1dNet()
    with pytest.raises(CandidateError, match="conv1 unpruned"):
        build_structure(model, _prune(conv1=0.5), example_input(model))


def test_unknown_layer_in_a_plan_lists_the_models_layers(cnn, cnn_input):
    plan = Plan(layers={"conv9": LayerPlan(quantization=Quantization(8)), "conv2": LayerPlan()})
    with pytest.raises(UsageError) as info:
        apply_plan(cnn, plan, cnn_input)
    message = str(info.value)
    assert "conv9" in message
    assert "conv1, conv2, conv3, fc" in message


def test_sparsity_masks_are_applied(cnn, cnn_input):
    plan = Plan(
        layers={
            "conv2": LayerPlan(sparsity=WeightSparsity(0.75)),
            "conv3": LayerPlan(sparsity=WeightSparsity(0.5, "2:4")),
        }
    )
    model = apply_plan(cnn, plan, cnn_input)
    assert parametrize.is_parametrized(model.conv2, "weight")
    assert (model.conv2.weight == 0).float().mean() == pytest.approx(0.75, abs=0.01)
    groups = model.conv3.weight.detach().movedim(1, -1).reshape(-1, 4)  # 4 consecutive input channels
    assert ((groups == 0).sum(1) == 2).all()
    kept = model.conv2.weight.detach().abs()
    assert kept[kept > 0].min() >= cnn.conv2.weight.detach().abs().flatten().kthvalue(int(0.75 * kept.numel())).values


def test_two_four_on_a_layer_without_groups_of_four_fails_the_candidate(cnn, cnn_input):
    plan = Plan(layers={"conv1": LayerPlan(sparsity=WeightSparsity(0.5, "2:4"))})
    with pytest.raises(CandidateError, match="'conv1' has 1 input channels"):
        apply_plan(cnn, plan, cnn_input)


def test_an_unregistered_config_type_lists_the_registered_ones():
    with pytest.raises(TypeError, match="no transform registered for float; registered: ChannelPruning"):
        _transform_for(float)


def test_build_structure_is_deterministic_and_a_saved_candidate_reloads(tmp_path, cnn, cnn_input):
    plan = Plan(
        width=0.75,
        layers={
            "conv2": LayerPlan(ChannelPruning(0.5), WeightSparsity(0.5), Quantization(8)),
            "conv3": LayerPlan(quantization=Quantization(1)),
        },
    )
    first, second = build_structure(cnn, plan, cnn_input), build_structure(cnn, plan, cnn_input)
    assert _channels(first) == _channels(second)
    assert _channels(first)["conv2"] == (12, 12)
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)

    candidate = apply_plan(cnn, plan, cnn_input)
    optimizer = torch.optim.Adam(candidate.parameters(), lr=1e-2)
    candidate.train()
    loss = candidate(example_input(cnn, batch=8)).logsumexp(1).mean()
    loss.backward()
    optimizer.step()
    bake(candidate.eval())
    torch.save({"plan": plan.to_json(), "state_dict": candidate.state_dict()}, tmp_path / "checkpoint.pt")

    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    fresh = build_structure(cnn, Plan.from_json(saved["plan"]), cnn_input)
    fresh.load_state_dict(saved["state_dict"])  # strict: same keys, same shapes
    fresh.eval()
    x = example_input(cnn, batch=4)
    untrained = build_structure(cnn, plan, cnn_input).eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), candidate(x))
        assert not torch.allclose(fresh(x), untrained(x))


def test_build_structure_works_under_no_grad(cnn, cnn_input):
    """Loading a checkpoint for inference often happens under no_grad; Torch-Pruning needs autograd."""
    with torch.no_grad():
        student = build_structure(cnn, Plan(width=0.5), cnn_input)
        layers = describe_layers(cnn, cnn_input)
    assert _channels(student)["conv2"] == (16, 8)
    assert [layer.name for layer in layers if layer.prunable] == ["conv1", "conv2", "conv3"]
    with torch.no_grad():
        build_structure(cnn, Plan(width=0.5), cnn_input)
        assert not torch.is_grad_enabled()  # the caller's mode is restored


@pytest.mark.parametrize(
    "make, inputs, leader, follower",
    [
        (TinyText, text_inputs, "fc1", "fc2"),
        (TwoInputNet, two_inputs, "fc_x", "head"),
    ],
    ids=["dict", "tuple"],
)
def test_models_on_dict_and_tuple_inputs_are_described_pruned_and_rebuilt(make, inputs, leader, follower):
    teacher = make().eval()
    layers = {layer.name: layer for layer in describe_layers(teacher, inputs(1))}
    assert layers[leader].prunable and not layers[follower].prunable  # the output layer keeps its outputs
    plan = Plan(layers={leader: LayerPlan(ChannelPruning(0.5), quantization=Quantization(8))})
    candidate = apply_plan(teacher, plan, inputs(1))
    half = teacher.get_submodule(leader).weight.shape[0] // 2
    assert candidate.get_submodule(leader).weight.shape[0] == half
    assert candidate.get_submodule(follower).weight.shape[1] == half
    assert call(candidate, inputs(3)).shape == call(teacher, inputs(3)).shape
    rebuilt = build_structure(teacher, plan, inputs(1))
    rebuilt.load_state_dict(bake(candidate).state_dict())
    torch.testing.assert_close(call(rebuilt, inputs(3)), call(candidate, inputs(3)))
