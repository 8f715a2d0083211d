"""Features of a candidate before fine-tuning: what the cost model predicts its latency from.

Computed on the built candidate in one forward pass (:func:`plan_features`), keyed and ordered by
:data:`FEATURE_NAMES`; a change to the layout bumps :data:`FEATURE_VERSION`, so measurements saved
under another layout are refused rather than misread (:func:`~search.costmodel.load_measurements`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from search.artifacts import runtime_precision
from search.model import (
    Inputs, applied_as_matmul, batch_size, compressible_layers, forward_calls, layer_weights, packed_projections,
    planned_with,
)  # fmt: skip
from search.plan import Plan

if TYPE_CHECKING:
    from targets import Target

# 2: int4 (weight-only MatMul) joined the runtime precisions; 3: padded MACs; 4: an nn.MultiheadAttention's
# packed Q/K/V projection and out_proj count their MACs and bytes (before, only out_proj's weights)
FEATURE_VERSION: int = 4

# What `runtime_precision` can return: a layer runs at one of these. A new one changes the layout.
RUNTIME_PRECISIONS = ("fp32", "int8", "int4")
_BYTES = {"fp32": 4, "int8": 1, "int4": 0.5}
_KINDS = {nn.Conv1d: "conv1d", nn.Conv2d: "conv2d", nn.Linear: "linear"}
_CHANNEL_MULTIPLES = (8, 16, 32)
# CPU kernels compute channels in SIMD blocks (ORT's NCHWc convolutions: 8 floats with AVX2,
# 16 with AVX-512), so a layer costs what its channel counts rounded up to a block would.
PADDED_TO = (8, 16)

FEATURE_NAMES: tuple[str, ...] = (
    # per runtime precision, per sample: multiply-accumulates, weight bytes, activation bytes moved
    *(f"macs_{p}" for p in RUNTIME_PRECISIONS),
    *(f"param_bytes_{p}" for p in RUNTIME_PRECISIONS),
    *(f"activation_bytes_{p}" for p in RUNTIME_PRECISIONS),
    # multiply-accumulates with every channel count rounded up to a multiple of 8 or 16
    *(f"macs_{p}_pad{m}" for m in PADDED_TO for p in RUNTIME_PRECISIONS),
    # the same totals, log1p'd, for models that are linear in their inputs
    "log_macs",
    "log_param_bytes",
    "log_activation_bytes",
    "int8_macs_share",
    # layer counts
    *(f"layers_{kind}" for kind in _KINDS.values()),
    *(f"layers_{p}" for p in RUNTIME_PRECISIONS),
    "precision_transitions",
    "transition_elements",  # activation elements crossing from one precision to another
    # channels
    "channels_total",
    "channels_min",
    "channels_mean",
    *(f"channels_mult{m}_share" for m in _CHANNEL_MULTIPLES),
    # sparsity and width
    "sparsity_mean",
    "two_four_share",
    "width",
    # analytical roofline from the target's datasheet figures (0.0 without figures)
    "roofline_ms",
)

MACS_FEATURES: tuple[str, ...] = tuple(f"macs_{p}" for p in RUNTIME_PRECISIONS)



def plan_features(
    model: nn.Module, plan: Plan, example_input: Inputs, target: Target
) -> dict[str, float]:
    """Features of a candidate *before* fine-tuning, keyed (and ordered) by :data:`FEATURE_NAMES`.

    ``model`` is the built candidate (:func:`~search.build_structure` or :func:`~search.apply_plan`
    output; weight parametrizations and input-quant hooks are fine). One forward pass of
    ``example_input`` in eval mode, under ``torch.no_grad``, records each Conv1d/Conv2d/Linear
    layer's input and output sizes; counts are per sample (divided by the batch size). A layer
    called twice counts twice; a layer the forward never calls counts its weights only.

    Each layer runs at ``runtime_precision(bits, target.precisions, matmul)``: int4 and 1-bit layers
    count as int8 on a target that accelerates int8, since that is what its runtime runs, except a
    Linear on a sequence (a MatMul), which runs int4 weight-only where the target lists it. Weights count
    at that precision's width; biases at 4 bytes (fp32, or the int32 bias of an int8 layer). An
    ``nn.MultiheadAttention``'s packed Q/K/V projection counts like a layer at its ``out_proj``'s bits
    in the work and bytes (:func:`~search.model.forward_calls`); the counts of layers, channels and
    sparsity are of the plan's layers.
    """
    plan = plan.student()
    layers = compressible_layers(model)
    projections = packed_projections(model)
    modules = {**layers, **projections}
    calls: list[tuple[str, int, int]] = []  # (name, input elements, output elements) per call
    matmul: set[str] = set()  # Linear layers applied to sequences: MatMul nodes in the graph

    def observe(name: str, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        calls.append((name, args[0].numel(), output.numel()))
        if applied_as_matmul(module, args[0]):
            matmul.add(name)

    forward_calls(model, example_input, observe)

    batch = batch_size(example_input)
    precision = {}
    for name in modules:
        planned = planned_with(name) if name in projections else name
        p = runtime_precision(plan.layer(planned).quantization.bits, target.precisions, name in matmul)
        if p not in RUNTIME_PRECISIONS:  # a new runtime precision needs a new feature layout
            raise ValueError(f"runtime precision {p!r} has no features; known: {RUNTIME_PRECISIONS}")
        precision[name] = p

    with torch.no_grad():
        shapes = {name: tuple(weight.shape) for name, weight in layer_weights(model).items()}
    zeros = dict.fromkeys(RUNTIME_PRECISIONS, 0.0)
    macs, param_bytes, act_bytes = dict(zeros), dict(zeros), dict(zeros)
    padded_macs = {m: dict(zeros) for m in PADDED_TO}

    for name, module in modules.items():
        p = precision[name]
        weight_numel = math.prod(shapes[name])
        bias = module.in_proj_bias if name in projections else getattr(module, "bias", None)
        bias_numel = bias.numel() if isinstance(bias, torch.Tensor) else 0
        param_bytes[p] += weight_numel * _BYTES[p] + bias_numel * 4

    order: list[str] = []
    transition_elements = 0.0
    for (name, in_numel, out_numel), following in itertools.zip_longest(calls, calls[1:]):
        p = precision[name]
        # every output element takes in_channels/groups x kernel (conv) or in_features (linear) MACs
        macs[p] += out_numel / batch * math.prod(shapes[name][1:])
        act_bytes[p] += (in_numel + out_numel) / batch * _BYTES[p]
        for m, padded in padded_macs.items():
            padded[p] += out_numel / batch * _padded_macs_per_output(shapes[name], modules[name], m)
        if following is not None and precision[following[0]] != p:
            transition_elements += out_numel / batch
        if name not in order:
            order.append(name)

    features: dict[str, float] = {}
    for p in RUNTIME_PRECISIONS:
        features[f"macs_{p}"] = macs[p]
    for p in RUNTIME_PRECISIONS:
        features[f"param_bytes_{p}"] = param_bytes[p]
    for p in RUNTIME_PRECISIONS:
        features[f"activation_bytes_{p}"] = act_bytes[p]
    for m in PADDED_TO:
        for p in RUNTIME_PRECISIONS:
            features[f"macs_{p}_pad{m}"] = padded_macs[m][p]
    total_macs = sum(macs.values())
    features["log_macs"] = math.log1p(total_macs)
    features["log_param_bytes"] = math.log1p(sum(param_bytes.values()))
    features["log_activation_bytes"] = math.log1p(sum(act_bytes.values()))
    features["int8_macs_share"] = macs["int8"] / total_macs if total_macs else 0.0

    for kind in _KINDS.values():
        features[f"layers_{kind}"] = float(sum(_kind(m) == kind for m in layers.values()))
    for p in RUNTIME_PRECISIONS:
        features[f"layers_{p}"] = float(sum(precision[name] == p for name in layers))
    features["precision_transitions"] = float(
        sum(precision[a] != precision[b] for a, b in itertools.pairwise(order))
    )
    features["transition_elements"] = transition_elements

    channels = [shapes[name][0] for name in layers]
    features["channels_total"] = float(sum(channels))
    features["channels_min"] = float(min(channels, default=0))
    features["channels_mean"] = float(np.mean(channels)) if channels else 0.0
    for m in _CHANNEL_MULTIPLES:
        share = sum(c % m == 0 for c in channels) / len(channels) if channels else 0.0
        features[f"channels_mult{m}_share"] = float(share)

    weights = {name: math.prod(shapes[name]) for name in layers}
    total_weights = sum(weights.values())
    features["sparsity_mean"] = (
        sum(plan.layer(name).sparsity.ratio * n for name, n in weights.items()) / total_weights
        if total_weights
        else 0.0
    )
    features["two_four_share"] = (
        sum(plan.layer(name).sparsity.pattern == "2:4" for name in layers) / len(layers) if layers else 0.0
    )
    features["width"] = float(plan.width)
    features["roofline_ms"] = roofline_ms(macs, {p: param_bytes[p] + act_bytes[p] for p in macs}, target)

    assert tuple(features) == FEATURE_NAMES, "plan_features and FEATURE_NAMES disagree"
    return {key: float(value) for key, value in features.items()}


def _padded_macs_per_output(shape: tuple[int, ...], module: nn.Module, multiple: int) -> float:
    """MACs per output element with the layer's channels rounded up to ``multiple``: output
    channels always, input channels per group too unless the layer is grouped (depthwise)."""
    out_channels, in_per_group, *kernel = shape
    if getattr(module, "groups", 1) == 1:
        in_per_group = _round_up(in_per_group, multiple)
    return math.prod(kernel) * in_per_group * _round_up(out_channels, multiple) / out_channels


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _kind(module: nn.Module) -> str | None:
    for cls, kind in _KINDS.items():
        if isinstance(module, cls):
            return kind
    return None


_OPS_UNITS = {"tops": 1e12, "tflops": 1e12, "gops": 1e9, "gflops": 1e9}


def _peak_ops(target: Target, precision: str) -> float | None:
    """Operations per second the target's datasheet gives for ``precision``, if any."""
    for unit, scale in _OPS_UNITS.items():
        value = target.peak.get(f"{precision}_{unit}")
        if value:
            return value * scale
    return None


def roofline_ms(macs: Mapping[str, float], moved_bytes: Mapping[str, float], target: Target) -> float:
    """Sum over precisions of max(2·MACs / peak ops, bytes / memory bandwidth), in ms.

    Peak figures come from the target's ``peak`` table: ``<precision>_{tops,tflops,gops,gflops}``
    and ``memory_gbs``. A precision with no figure of its own uses the fp32 one; a missing term
    counts 0, so a target without figures (the cpu target) gives 0.0.
    """
    bandwidth = target.peak.get("memory_gbs", 0.0) * 1e9
    fp32_ops = _peak_ops(target, "fp32")
    seconds = 0.0
    for p, work in macs.items():
        ops = _peak_ops(target, p) or fp32_ops
        compute = 2.0 * work / ops if ops else 0.0
        memory = moved_bytes.get(p, 0.0) / bandwidth if bandwidth else 0.0
        seconds += max(compute, memory)
    return seconds * 1e3


def feature_matrix(rows) -> np.ndarray:
    """Feature rows (mappings keyed by :data:`FEATURE_NAMES`) as a matrix in the layout's order."""
    return np.array([[row[name] for name in FEATURE_NAMES] for row in rows], dtype=float)
