"""Model size at the plan's true bit widths, sparse layers stored compressed.

The ONNX file does not show this (int4 and 1-bit layers travel as int8, zeros are stored), so the
size objective counts what a deployment format packing those bits would hold:
- a compressible layer's weights: ``nonzeros × bits``, plus a 1-bit-per-weight mask for unstructured
  sparsity or a 2-bit index per kept weight for 2:4; a 4-byte scale per output channel below 32 bits;
- every other parameter (biases, norms) at 32 bits.
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize

from search.model import compressible_layers
from search.plan import Plan


def _stored_weight(module: nn.Module) -> nn.Parameter:
    """The parameter behind ``module.weight``: under QAT that is the float original of a parametrization."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def packed_size_bytes(model: nn.Module, plan: Plan) -> int:
    """``model`` is the built candidate; ``plan`` the plan it was built from."""
    plan = plan.student()
    layers = compressible_layers(model)
    weights = {id(_stored_weight(m)) for m in layers.values()}
    bits = sum(32 * p.numel() for p in model.parameters() if id(p) not in weights)
    for name, module in layers.items():
        layer = plan.layer(name)
        weight = module.weight.detach()
        width = layer.quantization.bits
        nonzero = int((weight != 0).sum())
        bits += nonzero * width
        if layer.sparsity.ratio > 0:
            bits += 2 * nonzero if layer.sparsity.pattern == "2:4" else weight.numel()
        else:
            bits += (weight.numel() - nonzero) * width  # a dense layer stores its zeros
        if width < 32:
            bits += 32 * weight.shape[0]
    return (bits + 7) // 8
