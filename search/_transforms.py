"""Apply a :class:`~search.Plan` to a copy of the teacher: one transform per config type.

Order: student width, then per-layer channel pruning (both structural, through Torch-Pruning, so the
layers really shrink), then sparsity masks, then quantizers. Each transform takes the model and the
``{layer name: config}`` of its type.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.utils import parametrize

from search._errors import CandidateError, UsageError
from search._io import Inputs, call
from search._layers import compressible_layers, output_layer
from search._plan import ChannelPruning, LayerPlan, Plan, Quantization, WeightSparsity
from search._quant import BinarizeWeight, FakeQuantWeight, WeightMask, add_input_quant

ROUND_CHANNELS_TO = 4  # channel counts stay multiples of 4, so 2:4 groups stay whole

Transform = Callable[[nn.Module, Mapping[str, object], Inputs], None]
_TRANSFORMS: dict[type, Transform] = {}


def register_transform(config_type: type) -> Callable[[Transform], Transform]:
    def register(fn: Transform) -> Transform:
        _TRANSFORMS[config_type] = fn
        return fn

    return register


@torch.enable_grad()  # Torch-Pruning traces through autograd, even under a caller's no_grad
def _prune(model: nn.Module, example_input: Inputs, **kwargs) -> None:
    was_training = model.training
    model.eval()
    try:
        pruner = tp.pruner.MetaPruner(
            model,
            example_input,
            forward_fn=call,
            importance=tp.importance.MagnitudeImportance(p=2),
            ignored_layers=[output_layer(model)],
            round_to=ROUND_CHANNELS_TO,
            **kwargs,
        )
        pruner.step()
    finally:
        model.train(was_training)


def shrink_width(model: nn.Module, width: float, example_input: Inputs) -> None:
    """The student: every prunable group keeps ``width`` of its channels (L2-magnitude ranked)."""
    if width < 1.0:
        _prune(model, example_input, pruning_ratio=1.0 - width)


@register_transform(ChannelPruning)
def _channel_pruning_transform(model, configs: Mapping[str, ChannelPruning], example_input) -> None:
    ratios = {name: c.ratio for name, c in configs.items() if c.ratio > 0}
    if not ratios:
        return
    before = {name: model.get_submodule(name).weight.shape[0] for name in ratios}
    modules = {model.get_submodule(name): ratio for name, ratio in ratios.items()}
    _prune(model, example_input, pruning_ratio=0.0, pruning_ratio_dict=modules)
    # Torch-Pruning skips a group it cannot round to whole channel groups (e.g. a small layer
    # feeding a grouped conv) without a word: a plan that asked for pruning must get it.
    unpruned = [name for name in ratios if model.get_submodule(name).weight.shape[0] == before[name]]
    if unpruned:
        raise CandidateError(
            f"Torch-Pruning left {', '.join(unpruned)} unpruned (channel groups or rounding to "
            f"multiples of {ROUND_CHANNELS_TO} allow no smaller size)"
        )


def _two_four_mask(weight: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest |w| of every 4 consecutive input channels (NVIDIA's 2:4 layout)."""
    moved = weight.movedim(1, -1)  # (out, *kernel, in)
    groups = moved.abs().reshape(-1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, groups.topk(2, dim=1).indices, True)
    return keep.reshape(moved.shape).movedim(-1, 1).to(weight.dtype)


@register_transform(WeightSparsity)
def _sparsity_transform(model, configs: Mapping[str, WeightSparsity], example_input) -> None:
    for name, config in configs.items():
        if config.ratio == 0:
            continue
        module = model.get_submodule(name)
        weight = module.weight.detach()
        if config.pattern == "2:4":
            if weight.shape[1] % 4:
                raise CandidateError(
                    f"layer {name!r} has {weight.shape[1]} input channels: 2:4 sparsity needs a multiple of 4"
                )
            mask = _two_four_mask(weight)
        else:
            k = int(config.ratio * weight.numel())
            threshold = weight.abs().flatten().kthvalue(k).values if k else -1.0
            mask = (weight.abs() > threshold).to(weight.dtype)
        parametrize.register_parametrization(module, "weight", WeightMask(mask))


@register_transform(Quantization)
def _quantization_transform(model, configs: Mapping[str, Quantization], example_input) -> None:
    for name, config in configs.items():
        if config.bits == 32:
            continue
        module = model.get_submodule(name)
        quantizer = BinarizeWeight() if config.bits == 1 else FakeQuantWeight(config.bits)
        parametrize.register_parametrization(module, "weight", quantizer)
        add_input_quant(module)


def _transform_for(config_type: type) -> Transform:
    try:
        return _TRANSFORMS[config_type]
    except KeyError:
        known = ", ".join(t.__name__ for t in _TRANSFORMS)
        raise TypeError(f"no transform registered for {config_type.__name__}; registered: {known}") from None


def _apply(model: nn.Module, plan: Plan, fields: tuple[str, ...], example_input: Inputs) -> None:
    for field in fields:
        configs = {name: getattr(layer, field) for name, layer in plan.layers.items()}
        _transform_for(type(getattr(LayerPlan(), field)))(model, configs, example_input)


def build_structure(teacher: nn.Module, plan: Plan, example_input: Inputs) -> nn.Module:
    """A copy of the teacher with the plan's structural part applied: width, then channel pruning.

    Deterministic (magnitude ranking), so a saved state_dict loads into ``build_structure`` again.
    """
    layers = compressible_layers(teacher)
    unknown = sorted(set(plan.layers) - set(layers))
    if unknown:
        raise UsageError(
            f"plan names layers the model does not have as Conv1d/Conv2d/Linear: {', '.join(unknown)}; "
            f"the model's are: {', '.join(layers)}"
        )
    model = copy.deepcopy(teacher)
    shrink_width(model, plan.width, example_input)
    _apply(model, plan, ("pruning",), example_input)
    return model


def apply_plan(teacher: nn.Module, plan: Plan, example_input: Inputs) -> nn.Module:
    """A new model: the teacher with the whole plan applied, quantizers active (ready for QAT)."""
    model = build_structure(teacher, plan, example_input)
    _apply(model, plan, ("sparsity", "quantization"), example_input)
    return model
