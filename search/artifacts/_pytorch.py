"""A candidate made ready for a runtime that runs PyTorch modules (the ``gpu`` target's PyTorch
CUDA fallback, ``pytorch-cpu``): the :class:`~profilers.ModuleArtifact` its profiler measures.

The module runs in the float precision the target accelerates (fp16, else bf16, else fp32, as
TensorRT runs float layers in fp16 when the target lists it), its int8 Linear layers through
torchao's int8 kernels (dynamic per-token activations, per-channel weights), its 2:4 Linear
layers as semi-structured sparse tensors (cuSPARSELt / CUTLASS, CUDA only). A compression with no
PyTorch kernel (int4 and binarized layers, int8 convolutions, 2:4 where the shape or device does
not allow it, an attention's packed Q/K/V projection) runs in the float precision, and the notes
say so: it gets no speedup.
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from profilers import ModuleArtifact
from search.model import Inputs, arguments, compressible_layers, packed_projections, planned_with
from search.plan import Plan

_FLOAT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_PRECISION_ORDER = ("sparse-2:4", "int8", "fp16", "bf16", "fp32")


def float_precision(precisions: tuple[str, ...]) -> str:
    """The float precision a model runs in on a target that accelerates ``precisions``."""
    return next((p for p in ("fp16", "bf16") if p in precisions), "fp32")


@functools.cache
def torchao_version() -> str | None:
    """torchao's version where it is installed (``pip install '.[cuda]'``), else None (read once:
    every layer of every candidate asks)."""
    try:
        return importlib.metadata.version("torchao")
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class Prepared:
    """A candidate made ready to run: what each compressible layer runs as, and why a layer does
    not run as its plan asked."""

    model: nn.Module
    dtype: str
    layer_precision: Mapping[str, str]
    notes: tuple[str, ...]

    @property
    def precision(self) -> str:
        """The precisions the model computes in, such as ``"int8+fp16"``."""
        used = {part for value in self.layer_precision.values() for part in value.split("+")} | {self.dtype}
        return "+".join(p for p in _PRECISION_ORDER if p in used)


def prepare(model: nn.Module, plan: Plan, precisions: tuple[str, ...], device: torch.device) -> Prepared:
    """A copy of ``model`` (a baked candidate, built from ``plan``) on ``device``, in
    :func:`float_precision`, with the layers the target accelerates at int8 or 2:4 converted."""
    plan = plan.student()
    dtype = float_precision(precisions)
    model = copy.deepcopy(model).eval().to(device=device, dtype=_FLOAT_DTYPES[dtype])
    layer_precision, notes, int8 = {}, [], set()
    for name, layer in compressible_layers(model).items():
        entry, runs_as = plan.layer(name), dtype
        bits = entry.quantization.bits
        if bits != 32:
            why = _why_not_int(layer, bits, precisions)
            if why is None:
                int8.add(name)
                runs_as = "int8"
            else:
                notes.append(f"{name}: {bits}-bit planned, runs as {dtype} ({why})")
        if entry.sparsity.pattern == "2:4" and entry.sparsity.ratio > 0 and "sparse-2:4" in precisions:
            why = _two_four(layer) if runs_as != "int8" else "2:4 is not combined with int8 here"
            if why is None:
                runs_as = f"sparse-2:4+{runs_as}"
            else:
                notes.append(f"{name}: 2:4 planned, runs dense ({why})")
        layer_precision[name] = runs_as
    for name in packed_projections(model):
        layer_precision[name] = dtype
        bits = plan.layer(planned_with(name)).quantization.bits
        if bits != 32:
            why = "torchao quantizes Linear layers only"
            notes.append(f"{name}: {bits}-bit planned (its out_proj's), runs as {dtype} ({why})")
    if int8:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        quantize_(model, Int8DynamicActivationInt8WeightConfig(), filter_fn=lambda _, fqn: fqn in int8)
    return Prepared(model, dtype, layer_precision, tuple(notes))


def _why_not_int(layer: nn.Module, bits: int, precisions: tuple[str, ...]) -> str | None:
    """Why a ``bits``-bit layer cannot run on integer kernels here; None when torchao's int8 can."""
    if bits != 8 or not isinstance(layer, nn.Linear):
        return f"this profiler has no {bits}-bit {type(layer).__name__} kernel"
    if "int8" not in precisions:
        return "the target does not list int8"
    if torchao_version() is None:
        return "torchao is not installed: pip install '.[cuda]'"
    return None


def _two_four(layer: nn.Module) -> str | None:
    """Make ``layer``'s weight a semi-structured sparse tensor in place; the reason it cannot be
    (not a Linear, not on CUDA, a shape or dtype the kernels do not take), or None once done."""
    if not isinstance(layer, nn.Linear):
        return f"PyTorch's 2:4 kernels take Linear layers, not {type(layer).__name__}"
    try:
        sparse = torch.sparse.to_sparse_semi_structured(layer.weight.detach().contiguous())
    except (RuntimeError, ValueError) as exc:
        return str(exc).split("\n")[0]
    layer.weight = nn.Parameter(sparse, requires_grad=False)
    return None


def _to_device(inputs: Inputs, device: torch.device, dtype: torch.dtype) -> Inputs:
    """``inputs`` on ``device``, their float tensors in ``dtype`` (integer ids and masks kept)."""
    if isinstance(inputs, Mapping):
        return {key: _to_device(value, device, dtype) for key, value in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_to_device(value, device, dtype) for value in inputs)
    return inputs.to(device=device, dtype=dtype if inputs.is_floating_point() else inputs.dtype)


def module_artifact(
    model: nn.Module, example_input: Inputs, plan: Plan, precisions: tuple[str, ...], device: torch.device
) -> ModuleArtifact:
    """The candidate ``model`` (baked, built from ``plan``) made ready for a target that
    accelerates ``precisions``, on ``device``, with ``example_input`` to call it on."""
    prepared = prepare(model, plan, precisions, device)
    args, kwargs = arguments(_to_device(example_input, device, _FLOAT_DTYPES[prepared.dtype]))
    torchao = torchao_version()
    return ModuleArtifact(
        prepared.model, args, kwargs, precision=prepared.precision,
        libraries=(f"torchao {torchao}",) if torchao else (),
        details={"dtype": prepared.dtype, "layer_precision": dict(prepared.layer_precision), "notes": list(prepared.notes)},
    )  # fmt: skip
