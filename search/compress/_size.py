"""Model size at the plan's true bit widths, sparse layers stored compressed.

The ONNX file does not show this (int4 and 1-bit layers travel as int8, zeros are stored), so the
size objective counts what a deployment format packing those bits would hold:
- a compressible layer's weights: ``nonzeros × bits``, plus a 1-bit-per-weight mask for unstructured
  sparsity or a 2-bit index per kept weight for 2:4; a 4-byte scale per output channel below 32 bits;
- an attention's packed Q/K/V projection likewise, at its ``out_proj``'s bits;
- every other parameter (biases, norms) at 32 bits.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from search.model import compressible_layers, packed_projections, planned_with
from search.plan import Plan, WeightSparsity


def _stored(module: nn.Module, tensor: str) -> nn.Parameter:
    """The parameter behind ``module.<tensor>``: under QAT, the float original of a parametrization."""
    if parametrize.is_parametrized(module, tensor):
        return getattr(module.parametrizations, tensor).original
    return getattr(module, tensor)


def _weight_bits(weight: torch.Tensor, width: int, sparsity: WeightSparsity) -> int:
    nonzero = int((weight != 0).sum())
    bits = nonzero * width
    if sparsity.ratio > 0:
        bits += 2 * nonzero if sparsity.pattern == "2:4" else weight.numel()
    else:
        bits += (weight.numel() - nonzero) * width  # a dense layer stores its zeros
    return bits + (32 * weight.shape[0] if width < 32 else 0)


def packed_size_bytes(model: nn.Module, plan: Plan) -> int:
    """``model`` is the built candidate; ``plan`` the plan it was built from. An attention's packed
    projection counts at its ``out_proj``'s bits, dense."""
    plan = plan.student()
    layers = compressible_layers(model)
    projections = packed_projections(model)
    weights = {id(_stored(m, "weight")) for m in layers.values()}
    weights |= {id(_stored(a, "in_proj_weight")) for a in projections.values()}
    bits = sum(32 * p.numel() for p in model.parameters() if id(p) not in weights)
    for name, module in layers.items():
        layer = plan.layer(name)
        bits += _weight_bits(module.weight.detach(), layer.quantization.bits, layer.sparsity)
    for name, attention in projections.items():
        width = plan.layer(planned_with(name)).quantization.bits
        bits += _weight_bits(attention.in_proj_weight.detach(), width, WeightSparsity())
    return (bits + 7) // 8
