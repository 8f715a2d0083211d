"""A CNN's activity (its layers' unfolded-input moments) and the least-squares refit of the layer
that reads pruned channels (a Transformer's are in test_transformer.py)."""

import torch
import torch.nn.functional as F
from torch import nn

from models import Conv1dNet, example_input, settle
from search.compress import build_structure, channel_activity
from search.compress import _refit
from search.plan import ChannelPruning, LayerPlan, Plan


def _batches(model, count: int = 4) -> list:
    return [(example_input(model, batch=4, seed=20 + i), None) for i in range(count)]


def test_a_cnns_activity_is_the_moments_of_each_layers_unfolded_input(cnn):
    batches = _batches(cnn)
    activity = channel_activity(cnn, batches)
    assert set(activity) == {"conv1", "conv2", "conv3", "fc"}
    seen = []
    handle = cnn.conv2.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        for x, _ in batches:
            cnn(x)
    handle.remove()
    patches = F.unfold(torch.cat(seen), 3, padding=1)  # (batch, 16 channels × 9 positions, 64 places)
    rows = patches.transpose(1, 2).reshape(-1, 16 * 9).double()
    rows = torch.cat([rows, torch.ones(len(rows), 1, dtype=rows.dtype)], 1)
    torch.testing.assert_close(activity["conv2"], rows.T @ rows / len(rows))


def test_grouped_and_too_wide_layers_get_no_moments(monkeypatch):
    depthwise = nn.Sequential(nn.Conv2d(1, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 4, 1))
    x = torch.randn(2, 1, 8, 8)
    assert set(channel_activity(depthwise, [(x, None)])) == {"0", "2"}
    monkeypatch.setattr(_refit, "MAX_REFIT_INPUTS", 8)  # the 1×1 conv reads 8; the first conv 9
    assert set(channel_activity(depthwise, [(x, None)])) == {"2"}


def _layer_output(model, name: str, batches) -> torch.Tensor:
    outputs = []
    handle = model.get_submodule(name).register_forward_hook(lambda module, args, out: outputs.append(out))
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    handle.remove()
    return torch.cat(outputs)


def test_the_conv_that_read_pruned_channels_is_refitted_to_the_teachers_output(cnn):
    """conv2 loses half its channels; conv3, which read them, is refitted from conv2's other
    channels to give the teacher's output on the calibration data: closer than with its columns for
    the removed channels merely dropped (what a build without activity gives, the same channels
    removed), and a least-squares fit never does worse than that on its own data."""
    batches = _batches(cnn, 8)
    plan = Plan(layers={"conv2": LayerPlan(pruning=ChannelPruning(0.5))})
    refitted = build_structure(cnn, plan, example_input(cnn), channel_activity(cnn, batches))
    dropped = build_structure(cnn, plan, example_input(cnn))
    assert torch.equal(refitted.conv2.weight, dropped.conv2.weight)  # the same channels removed
    assert not torch.equal(refitted.conv3.weight, dropped.conv3.weight)
    expected = _layer_output(cnn, "conv3", batches)
    error_refitted = (_layer_output(refitted, "conv3", batches) - expected).square().mean()
    error_dropped = (_layer_output(dropped, "conv3", batches) - expected).square().mean()
    assert error_refitted < 0.7 * error_dropped, (error_refitted, error_dropped)


def test_a_conv1d_student_is_refitted_and_rebuilds_to_the_same_shapes():
    """Width 0.5 prunes every group of a Conv1d model; each reader at the teacher's width is refitted,
    and a state dict of the refitted student loads into a build without activity (shapes alike)."""
    teacher = settle(Conv1dNet())
    batches = _batches(teacher, 8)
    x = example_input(teacher)
    refitted = build_structure(teacher, Plan(width=0.5), x, channel_activity(teacher, batches))
    dropped = build_structure(teacher, Plan(width=0.5), x)
    with torch.no_grad():
        logits = torch.cat([teacher(b) for b, _ in batches])
        errors = [(torch.cat([m(b) for b, _ in batches]) - logits).square().mean() for m in (refitted, dropped)]
    assert errors[0] < errors[1], errors
    dropped.load_state_dict(refitted.state_dict())
