"""Training-time quantizers: weight parametrizations and a uint8 input fake-quantizer.

Weights are quantized through ``torch.nn.utils.parametrize`` so that the float weight keeps learning
(straight-through estimator) while the forward sees the quantized one; baking the parametrization
(:func:`bake`) leaves weights that lie exactly on the grid ONNX Runtime's int8 quantizer reproduces.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

from search.model import call, split_batch

CALIBRATION_BATCHES = 8  # batches that set int8 activation ranges, in torch and in the exported graph


def _per_channel(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.view(-1, *([1] * (like.dim() - 1)))


class WeightMask(nn.Module):
    """Keeps a fixed sparsity mask applied during fine-tuning."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


class FakeQuantWeight(nn.Module):
    """Symmetric per-output-channel integer grid ``[-q, q]`` with q = 2**(bits-1) - 1."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.qmax = 2 ** (bits - 1) - 1

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        scale = weight.detach().abs().flatten(1).amax(1).clamp_min(1e-12) / self.qmax
        zero = torch.zeros_like(scale, dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(weight, scale, zero, 0, -self.qmax, self.qmax)


class BinarizeWeight(nn.Module):
    """XNOR-Net: sign(w) times the channel's mean |w|; gradient passes straight through where |w| <= 1."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        alpha = _per_channel(weight.detach().abs().flatten(1).mean(1), weight)
        binary = torch.where(weight >= 0, alpha, -alpha)
        clipped = weight.clamp(-1.0, 1.0)
        return binary + (clipped - clipped.detach())  # value: exactly `binary`; gradient: clipped STE


class InputFakeQuant(nn.Module):
    """uint8 per-tensor fake quantization of a layer's input, range tracked as a running min/max.

    ONNX Runtime runs int8 layers fast only with uint8 activations, so training sees that grid.
    ``per_call``: the range is each call's own, as ONNX Runtime's ``DynamicQuantizeLinear``
    computes it for a dynamically quantized MatMul; nothing is tracked, nothing calibrated.
    """

    def __init__(self, momentum: float = 0.1) -> None:
        super().__init__()
        self.momentum = momentum
        self.per_call = False
        self.register_buffer("low", torch.tensor(0.0))
        self.register_buffer("high", torch.tensor(0.0))
        self.register_buffer("initialized", torch.tensor(False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.per_call:
            low, high = x.detach().min().clamp(max=0.0), x.detach().max().clamp(min=0.0)
            scale = ((high - low) / 255.0).clamp_min(1e-8).float()
            zero_point = torch.round(-low / scale).clamp(0, 255).int()
            return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, 255)
        if self.training:
            low, high = x.detach().min(), x.detach().max()
            if self.initialized:
                low = self.low + self.momentum * (low - self.low)
                high = self.high + self.momentum * (high - self.high)
            self.low.copy_(torch.minimum(low, torch.zeros_like(low)))
            self.high.copy_(torch.maximum(high, torch.zeros_like(high)))
            self.initialized.fill_(True)
        if not self.initialized:
            return x
        scale = float((self.high - self.low).clamp_min(1e-8)) / 255.0
        zero_point = int(round(float(-self.low) / scale))
        return torch.fake_quantize_per_tensor_affine(x, scale, min(max(zero_point, 0), 255), 0, 255)


def _quantize_input(module: nn.Module, args: tuple) -> tuple:
    """The first argument quantized, and every argument that is that same tensor: a self-attention's
    query, key and value stay one tensor, so its packed projection stays one MatMul."""
    quantized = module.input_quant(args[0])
    return tuple(quantized if arg is args[0] else arg for arg in args)


def add_input_quant(module: nn.Module) -> None:
    module.input_quant = InputFakeQuant()
    module.register_forward_pre_hook(_quantize_input)


@torch.no_grad()
def calibrate_input_quant(model: nn.Module, batches: Iterable, count: int = CALIBRATION_BATCHES) -> None:
    """Set the input fake-quantizers' ranges from the first ``count`` ``(inputs, labels)`` batches,
    as the exporter's int8 calibration sets the graph's: the rest of the model stays in eval mode
    (BatchNorm statistics untouched). Before it, an input quantizer passes its input through, and a
    score of the candidate would leave its int8 activations out."""
    quantizers = [module for module in model.modules() if isinstance(module, InputFakeQuant) and not module.per_call]
    if not quantizers:  # none, or every one takes each call's range
        return
    model.eval()
    for quantizer in quantizers:
        quantizer.train()
    try:
        for batch in itertools.islice(batches, count):
            call(model, split_batch(batch)[0])
    finally:
        model.eval()


@torch.no_grad()
def baked_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict as :func:`bake` would leave it, with ``model`` left as it is: each
    parametrized weight at its current value (masked, on the quantization grid), no input
    quantizers. It loads into the model :func:`~search.compress.build_structure` made for the plan."""
    state = {
        key: value.detach().clone()
        for key, value in model.state_dict().items()
        if ".parametrizations." not in f".{key}" and ".input_quant." not in f".{key}"
    }
    for name, module in model.named_modules():
        for tensor in _parametrized(module):
            state[f"{name}.{tensor}" if name else tensor] = getattr(module, tensor).detach().clone()
    return state


def _parametrized(module: nn.Module) -> list[str]:
    """The names of ``module``'s parametrized tensors: a layer's ``weight``, an attention's ``in_proj_weight``."""
    return list(module.parametrizations) if parametrize.is_parametrized(module) else []


def bake(model: nn.Module) -> nn.Module:
    """Replace every parametrized weight by its current value and drop input quantizers, in place.

    The result is a plain float model (pruned, sparse and on the quantization grid) ready for export.
    Bake in place, never a deepcopy: a parametrized module's class is shared with its copies.
    """
    for module in model.modules():
        for tensor in _parametrized(module):
            parametrize.remove_parametrizations(module, tensor, leave_parametrized=True)
        if hasattr(module, "input_quant"):
            for key, hook in list(module._forward_pre_hooks.items()):
                if hook is _quantize_input:
                    del module._forward_pre_hooks[key]
            del module.input_quant
    return model
