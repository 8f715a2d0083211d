"""Which layers of a model a plan can address, and which of them lead a channel-pruning group."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator

import torch
import torch_pruning as tp
from torch import nn

from search._errors import UsageError
from search.model._inputs import Inputs, call

COMPRESSIBLE = (nn.Conv1d, nn.Conv2d, nn.Linear)


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    name: str
    kind: str
    weight_shape: tuple[int, ...]
    prunable: bool  # leads a Torch-Pruning group whose output channels can be removed
    two_four: bool  # the input dimension splits into groups of 4 (2:4 sparsity possible)
    edge: bool  # first or last compressible layer
    matmul: bool = False  # a Linear applied to a sequence: a MatMul in the graph, not a Gemm


def compressible_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Conv1d/Conv2d/Linear modules by dotted name, in registration order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, COMPRESSIBLE)}


def packed_projections(model: nn.Module) -> dict[str, nn.MultiheadAttention]:
    """Each ``nn.MultiheadAttention``'s packed Q/K/V projection, by the name ``<attention>.in_proj``.

    Its weight (``in_proj_weight``) belongs to no Linear, so it is no layer of a plan: it takes the
    precision the plan gives the attention's ``out_proj`` (:func:`planned_with`), and runs as a
    MatMul like any Linear on a sequence. Without it int8 would leave a quarter of a block's
    Linear work in float."""
    return {
        f"{name}.in_proj" if name else "in_proj": module
        for name, module in model.named_modules()
        if isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None
    }


def planned_with(projection: str) -> str:
    """The planned layer whose precision the packed projection ``projection`` takes: its attention's
    ``out_proj``."""
    return projection.removesuffix("in_proj") + "out_proj"


def layer_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weight of every compressible layer and of every packed projection, by layer name, in
    the model's order (a packed projection before its ``out_proj``)."""
    projections = {attention: name for name, attention in packed_projections(model).items()}
    weights = {}
    for name, module in model.named_modules():
        if module in projections:
            weights[projections[module]] = module.in_proj_weight
        elif isinstance(module, COMPRESSIBLE):
            weights[name] = module.weight
    return weights


def output_channels(model: nn.Module) -> dict[str, int]:
    """The output channels of every compressible layer and packed projection (:func:`layer_weights`)."""
    return {name: int(weight.shape[0]) for name, weight in layer_weights(model).items()}


def output_layer(model: nn.Module) -> nn.Module:
    """The last compressible layer: its outputs are the model's, so its channels are never pruned."""
    layers = compressible_layers(model)
    if not layers:
        raise UsageError(
            f"model {type(model).__name__} has no Conv1d, Conv2d or Linear layer to compress"
        )
    return list(layers.values())[-1]


@contextlib.contextmanager
def unwrapped_quietly() -> Iterator[None]:
    """Torch-Pruning warns of each parameter held outside a layer (a learned position table) every
    time it traces a model: it prunes such a parameter along its last dimension, the hidden size
    of the tokens it is added to, which is right for those tables, and nothing a user of a search
    can act on. Without this, every trial of such a model prints it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected", category=UserWarning)
        yield


@torch.enable_grad()  # Torch-Pruning traces through autograd, even under a caller's no_grad
def dependency_graph(model: nn.Module, example_input: Inputs) -> tp.DependencyGraph:
    was_training = model.training
    model.eval()  # tracing runs a forward pass: keep BatchNorm statistics untouched
    try:
        with unwrapped_quietly():
            return tp.DependencyGraph().build_dependency(model, example_inputs=example_input, forward_fn=call)
    finally:
        model.train(was_training)


def applied_as_matmul(module: nn.Module, layer_input: torch.Tensor) -> bool:
    """A Linear applied to a sequence (an input of more than two dimensions) exports as a MatMul
    node, not a Gemm: int4 weight-only (``MatMulNBits``) can run it. So does an attention's packed
    projection (``module`` the attention) on a sequence."""
    return isinstance(module, (nn.Linear, nn.MultiheadAttention)) and layer_input.dim() > 2


def forward_calls(model: nn.Module, example_input: Inputs, observe) -> None:
    """Run one no-grad, eval-mode forward pass of ``example_input`` and call
    ``observe(name, module, args, output)`` for every call of a compressible layer, and of each
    packed projection (:func:`packed_projections`) and its attention's ``out_proj``: PyTorch's
    attention computes those two from their weights without calling a module, so they are observed
    at the attention's call with the shapes they compute on (for the packed projection ``module``
    is the attention and ``output`` a ``meta`` tensor of its output's shape)."""

    def hook(name: str):
        def record(module: nn.Module, args: tuple, output: object) -> None:
            observe(name, module, args, output)

        return record

    def attention_hook(projection: str):
        def record(attention: nn.MultiheadAttention, args: tuple, kwargs: dict, output: tuple) -> None:
            query, attended = args[0] if args else kwargs["query"], output[0]
            packed = torch.empty((*query.shape[:-1], attention.in_proj_weight.shape[0]), device="meta")
            observe(projection, attention, (query,), packed)
            # out_proj runs on the attention's output flattened to one row per token: a Gemm
            rows = attended.reshape(-1, attended.shape[-1])
            observe(planned_with(projection), attention.out_proj, (rows,), rows)

        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in compressible_layers(model).items()]
    handles += [
        attention.register_forward_hook(attention_hook(projection), with_kwargs=True)
        for projection, attention in packed_projections(model).items()
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            call(model, example_input)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()


def matmul_layers(model: nn.Module, example_input: Inputs) -> set[str]:
    """The Linear layers that one forward pass of ``example_input`` applies to sequences
    (:func:`applied_as_matmul`)."""
    found: set[str] = set()

    def observe(name: str, module: nn.Module, args: tuple, output: object) -> None:
        if isinstance(module, nn.Linear) and applied_as_matmul(module, args[0]):
            found.add(name)

    forward_calls(model, example_input, observe)
    return found


def describe_layers(model: nn.Module, example_input: Inputs) -> list[LayerInfo]:
    layers = compressible_layers(model)
    graph = dependency_graph(model, example_input)
    matmuls = matmul_layers(model, example_input)
    roots = {
        group[0].dep.target.module
        for group in graph.get_all_groups(
            ignored_layers=[output_layer(model)], root_module_types=list(COMPRESSIBLE)
        )
    }
    names = list(layers)
    return [
        LayerInfo(
            name=name,
            kind=type(module).__name__,
            weight_shape=tuple(module.weight.shape),
            prunable=module in roots,
            two_four=module.weight.shape[1] % 4 == 0,
            edge=name in (names[0], names[-1]),
            matmul=name in matmuls,
        )
        for name, module in layers.items()
    ]
