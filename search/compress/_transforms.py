"""Apply a :class:`~search.Plan` to a copy of the teacher: one transform per config type.

Order: student width, then per-layer channel pruning and attention-head pruning (all structural,
through Torch-Pruning, so the layers really shrink), then the Transformer's depth (blocks dropped),
then sparsity masks, then quantizers. Each transform takes the model and the ``{module name:
config}`` of its type; names are the teacher's until the depth transform, the candidate's after it.
The structural transforms also take the teacher's channel ``activity``
(:func:`~search.compress.channel_activity`): a Transformer's heads and FFN channels are ranked by
it, and every layer that read pruned channels is refitted by it to the teacher's output.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.utils import parametrize

from search._errors import CandidateError, UsageError
from search.compress._quant import BinarizeWeight, FakeQuantWeight, WeightMask, add_input_quant
from search.compress._refit import Activity, by_module, pruned_with_refits
from search.compress._transformer_pruning import drop_blocks, prune_heads_and_ffn
from search.model import (
    Inputs, call, compressible_layers, find_blocks, matmul_layers, output_layer, packed_projections, planned_with,
    unwrapped_quietly,
)  # fmt: skip
from search.plan import ChannelPruning, Depth, HeadPruning, LayerPlan, Plan, Quantization, WeightSparsity

ROUND_CHANNELS_TO = 4  # channel counts stay multiples of 4, so 2:4 groups stay whole

Transform = Callable[[nn.Module, Mapping[str, object], Inputs], None]
_TRANSFORMS: dict[type, Transform] = {}


def register_transform(config_type: type) -> Callable[[Transform], Transform]:
    def register(fn: Transform) -> Transform:
        _TRANSFORMS[config_type] = fn
        return fn

    return register


@torch.enable_grad()  # Torch-Pruning traces through autograd, even under a caller's no_grad
def _prune(model: nn.Module, example_input: Inputs, activity: Activity | None, **kwargs) -> None:
    """Torch-Pruning's ``MetaPruner`` step, one group at a time, each reader refitted by ``activity``."""
    was_training = model.training
    model.eval()
    try:
        with unwrapped_quietly():
            pruner = tp.pruner.MetaPruner(
                model,
                example_input,
                forward_fn=call,
                importance=tp.importance.MagnitudeImportance(p=2),
                ignored_layers=[output_layer(model)],
                round_to=ROUND_CHANNELS_TO,
                **kwargs,
            )
        moments = by_module(model, activity)
        for group in pruner.step(interactive=True):
            pruned_with_refits(group, moments)
    finally:
        model.train(was_training)


def shrink_width(model: nn.Module, width: float, example_input: Inputs, activity: Activity | None = None) -> None:
    """The student: every prunable group keeps ``width`` of its channels (L2-magnitude ranked)."""
    if width < 1.0:
        _prune(model, example_input, activity, pruning_ratio=1.0 - width)


@register_transform(ChannelPruning)
def _channel_pruning_transform(
    model, configs: Mapping[str, ChannelPruning], example_input, activity: Activity | None = None
) -> None:
    ratios = {name: c.ratio for name, c in configs.items() if c.ratio > 0}
    if not ratios:
        return
    blocks = find_blocks(model)
    if blocks is not None:
        _prune_transformer_channels(model, blocks, ratios, example_input, activity)
        return
    before = {name: model.get_submodule(name).weight.shape[0] for name in ratios}
    modules = {model.get_submodule(name): ratio for name, ratio in ratios.items()}
    _prune(model, example_input, activity, pruning_ratio=0.0, pruning_ratio_dict=modules)
    # Torch-Pruning skips a group it cannot round to whole channel groups (e.g. a small layer
    # feeding a grouped conv) without a word: a plan that asked for pruning must get it.
    unpruned = [name for name in ratios if model.get_submodule(name).weight.shape[0] == before[name]]
    if unpruned:
        raise CandidateError(
            f"Torch-Pruning left {', '.join(unpruned)} unpruned (channel groups or rounding to "
            f"multiples of {ROUND_CHANNELS_TO} allow no smaller size)"
        )


def _prune_transformer_channels(model, blocks, ratios: Mapping[str, float], example_input, activity) -> None:
    """In a Transformer only the FFN width is pruned channel by channel: Q/K/V lose whole heads
    (:class:`HeadPruning`) and the hidden size is the residual stream every block shares."""
    others = sorted(set(ratios) - set(blocks.ffn))
    if others:
        raise UsageError(
            f"channel pruning in a Transformer applies to FFN intermediate layers only ({', '.join(blocks.ffn)}); "
            f"the plan prunes {', '.join(others)}: attention shrinks by whole heads (HeadPruning), and the "
            "hidden size is the residual stream every block shares"
        )
    prune_heads_and_ffn(model, example_input, heads={}, ffn=ratios, activity=activity)


@register_transform(HeadPruning)
def _head_pruning_transform(
    model, configs: Mapping[str, HeadPruning], example_input, activity: Activity | None = None
) -> None:
    heads = {name: c.ratio for name, c in configs.items()}
    prune_heads_and_ffn(model, example_input, heads=heads, ffn={}, activity=activity)


@register_transform(Depth)
def _depth_transform(model, configs: Mapping[str, Depth], example_input) -> None:
    for container, depth in configs.items():
        drop_blocks(model, container, depth.keep)


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
    """Each layer's weight on its grid, its input on uint8; an attention's packed Q/K/V projection
    at its ``out_proj``'s bits (:func:`~search.model.packed_projections`)."""
    projections = {planned_with(name): attention for name, attention in packed_projections(model).items()}
    for name, config in configs.items():
        if config.bits == 32:
            continue
        targets = [(model.get_submodule(name), "weight")]
        if name in projections:
            targets.append((projections[name], "in_proj_weight"))
        for module, tensor in targets:
            quantizer = BinarizeWeight() if config.bits == 1 else FakeQuantWeight(config.bits)
            parametrize.register_parametrization(module, tensor, quantizer)
            add_input_quant(module)


def _transform_for(config_type: type) -> Transform:
    try:
        return _TRANSFORMS[config_type]
    except KeyError:
        known = ", ".join(t.__name__ for t in _TRANSFORMS)
        raise TypeError(f"no transform registered for {config_type.__name__}; registered: {known}") from None


def _apply(model: nn.Module, plan: Plan, fields: tuple[str, ...], example_input: Inputs, **context) -> None:
    """The transforms of ``fields``' config types, in order; ``context`` (the structural transforms'
    ``activity``) goes to each as keywords."""
    for field in fields:
        configs = {name: getattr(layer, field) for name, layer in plan.layers.items()}
        _transform_for(type(getattr(LayerPlan(), field)))(model, configs, example_input, **context)


def _apply_structure(model: nn.Module, plan: Plan, example_input: Inputs, activity: Activity | None) -> None:
    """Channels and heads (by the teacher's names), then depth, which renumbers the blocks."""
    _apply(model, plan, ("pruning",), example_input, activity=activity)
    if plan.heads:
        _transform_for(HeadPruning)(model, plan.heads, example_input, activity=activity)
    if plan.depth is not None:
        _transform_for(Depth)(model, {plan.depth.container: plan.depth}, example_input)


def build_structure(
    teacher: nn.Module, plan: Plan, example_input: Inputs, activity: Activity | None = None
) -> nn.Module:
    """A copy of the teacher with the plan's structural part applied: width, channels and heads, depth.

    Deterministic (CNN channels ranked by weight magnitude; a Transformer's heads and FFN channels
    by the teacher's ``activity``, :func:`~search.compress.channel_activity` on the task's
    calibration batches, or by weight magnitude without it). The shapes depend on the plan alone,
    so a saved state_dict loads into ``build_structure`` again, with or without ``activity``.
    """
    layers = compressible_layers(teacher)
    unknown = sorted(set(plan.layers) - set(layers))
    if unknown:
        raise UsageError(
            f"plan names layers the model does not have as Conv1d/Conv2d/Linear: {', '.join(unknown)}; "
            f"the model's are: {', '.join(layers)}"
        )
    model = copy.deepcopy(teacher)
    shrink_width(model, plan.width, example_input, activity)
    _apply_structure(model, plan, example_input, activity)
    _check_forward(model, example_input)
    return model


@torch.no_grad()
def _check_forward(model: nn.Module, example_input: Inputs) -> None:
    """A pruning the model's code does not follow (a reshape to a fixed hidden size, as in
    torchvision's ViT) fails here, as the candidate's failure, not later inside a fine-tune."""
    was_training = model.training
    model.eval()
    try:
        call(model, example_input)
    except Exception as exc:
        raise CandidateError(
            f"the pruned model no longer runs ({type(exc).__name__}: {exc}); its code ties a pruned "
            "dimension to a fixed size: leave those layers out of the space (layers = [...])"
        ) from exc
    finally:
        model.train(was_training)


def add_compression(model: nn.Module, plan: Plan, example_input: Inputs, *, dynamic_matmuls: bool = False) -> nn.Module:
    """``model`` (:func:`build_structure`'s output, or a copy of it) with the plan's sparsity masks
    and quantizers added, in place: ready for QAT. Returns ``model``.

    ``dynamic_matmuls``: the target quantizes a MatMul's input per call (ONNX Runtime's dynamic
    int8, ``MatMulNBits``' int8 compute), so the input quantizer of each Linear applied to a
    sequence and of each attention's packed projection (exported as a MatMul; a Linear on a batch
    of vectors exports as a Gemm, quantized statically) takes each call's range too, and needs no
    calibration."""
    _apply(model, plan.student(), ("sparsity", "quantization"), example_input)
    if dynamic_matmuls:
        sequences = [model.get_submodule(name) for name in matmul_layers(model, example_input)]
        for module in [*sequences, *packed_projections(model).values()]:
            quantizer = getattr(module, "input_quant", None)
            if quantizer is not None:
                quantizer.per_call = True
    return model


def apply_plan(teacher: nn.Module, plan: Plan, example_input: Inputs, activity: Activity | None = None) -> nn.Module:
    """A new model: the teacher with the whole plan applied, quantizers active (ready for QAT)."""
    return add_compression(build_structure(teacher, plan, example_input, activity), plan, example_input)
