"""The teacher's activity, and the refit of a layer whose input channels were pruned away.

Before any plan is built, the teacher runs calibration batches once and records the second moments
of the inputs of the layers that read prunable channels (:func:`channel_activity`). A Transformer's
heads and FFN channels are ranked by their diagonal; and after any structured pruning, each layer
that read removed channels is refitted by least squares to give the teacher's output from the
channels left (:func:`pruned_with_refits`). The normal equations need nothing but those moments,
so a refit runs no data. This is the layer-wise reconstruction of channel pruning (He et al., 2017, for
CNNs; Kwon et al., 2022, "A Fast Post-Training Pruning Framework for Transformers").
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from search.model import Inputs, call, dependency_graph, find_blocks, split_batch

# Batches of a Transformer task's calibration data its activity is measured on: a refit solves for
# every input of the layer it narrows (1,536 in a MiniLM FFN), and needs some ten real tokens each.
# A CNN's batches hold a row per position: its activity takes the int8 calibration batches.
ACTIVITY_BATCHES = 48
# A layer whose unfolded input is wider is not refitted: its moments would take over 30 MB.
MAX_REFIT_INPUTS = 2048
# A Transformer's layer whose input is wider keeps only its inputs' mean squares, which rank its
# channels, and is not refitted: BERT-large's FFN (4,096) takes 134 MB a block, a Llama's 8,192-wide
# down_proj would take 537 MB a block and minutes of the pass.
MAX_BLOCK_REFIT_INPUTS = 4096
# Rows a batch gives each layer's moments, at most (evenly strided): a CNN's early layers have many.
_ROWS_PER_BATCH = 4096
# The refit's ridge, relative to the mean of its second moments: keeps the solve well posed where
# few calibration rows meet many inputs, without pulling the fit away from the teacher's output.
_RIDGE = 1e-6

Activity = Mapping[str, torch.Tensor]
"""Per layer that reads prunable channels, by the teacher's dotted name: the second moments of its
input with a constant 1 appended, ``E[x̃ x̃ᵀ]`` for ``x̃ = [x; 1]`` over calibration data, ``x`` a
Linear's input row or a convolution's unfolded patch (:func:`channel_activity`). The diagonal's
first entries are each input's mean square. A Transformer's layer wider than
:data:`MAX_BLOCK_REFIT_INPUTS` has the diagonal alone (a vector): ranked by it, never refitted."""

_READERS = (tp.prune_linear_in_channels, tp.prune_conv_in_channels)


def mean_squares(moments: torch.Tensor) -> torch.Tensor:
    """Each input's mean square, from its layer's :data:`Activity` entry."""
    return (moments.diagonal() if moments.dim() == 2 else moments)[:-1]


def _inputs_per_row(module: nn.Module) -> int:
    """The width of ``module``'s input row: a Linear's features, a convolution's patch."""
    return module.weight[0].numel()


def _readers(model: nn.Module, example_input: Inputs) -> dict[str, nn.Module]:
    """The layers whose moments are recorded: in a Transformer, the layers that read the channels a
    plan can remove (its heads' and FFN's: BERT's attention output and FFN output projections, a
    Llama's ``down_proj``), found by Torch-Pruning on ``example_input``; in another model (a CNN)
    every Linear and ungrouped convolution whose input row is at most :data:`MAX_REFIT_INPUTS` wide."""
    blocks = find_blocks(model)
    if blocks is not None:
        graph = dependency_graph(model, example_input)
        pruned = [model.get_submodule(name) for name in blocks.ffn]
        pruned += [model.get_submodule(name).query for name in blocks.heads]  # as a head's removal prunes
        readers = {
            dep.target.module
            for layer in pruned
            for dep, _ in graph.get_pruning_group(layer, tp.prune_linear_out_channels, [0])
            if dep.handler in _READERS
        }
        return {name: module for name, module in model.named_modules() if module in readers}
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d))
        and getattr(module, "groups", 1) == 1
        and _inputs_per_row(module) <= MAX_REFIT_INPUTS
    }


def _rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module``'s input as the rows its weight multiplies: a Linear's features (leading dimensions
    flattened), a convolution's unfolded patches (channel-major, as its weight is laid out)."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(module, nn.Conv1d):  # as a 2-D convolution over a height of one
        x, kernel = x.unsqueeze(2), (1, *module.kernel_size)
        stride, padding, dilation = (1, *module.stride), (0, *module.padding), (1, *module.dilation)
    else:
        kernel, stride, padding, dilation = module.kernel_size, module.stride, module.padding, module.dilation
    patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def _token_rows(inputs: Inputs) -> torch.Tensor | None:
    """Which rows of a block's ``(batch × tokens, features)`` activations are real tokens: the
    ``attention_mask`` a Hugging Face batch carries (padding rows are left out), else all."""
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    return mask.reshape(-1).bool() if isinstance(mask, torch.Tensor) else None


@torch.no_grad()
def channel_activity(model: nn.Module, batches: Iterable) -> dict[str, torch.Tensor]:
    """The second moments (:data:`Activity`) of the input of every layer :func:`_readers` names,
    over ``batches`` of ``(inputs, labels)`` (a Transformer's real tokens only).

    With them, a Transformer's heads and FFN channels are ranked by what they add to their block's
    output: a channel's mean square times the squared norm of the weights that read it (the output
    projection's columns), the structured form of Wanda's ``|W|·‖X‖`` (Sun et al., 2023); and after
    any structured pruning the layers that read what was removed are refitted
    (:func:`pruned_with_refits`). Measured with no fine-tune (benchmarks/RESULTS.md): MiniLM
    without a quarter of its FFN width keeps cosine 0.85 ranked by weight magnitude, 0.91 by
    activity, 0.98 refitted."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    tokens: torch.Tensor | None = None

    def record(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            rows = _rows(module, args[0].detach())
            if tokens is not None and tokens.shape[0] == rows.shape[0]:
                rows = rows[tokens]
            rows = rows[:: max(1, len(rows) // _ROWS_PER_BATCH)].double()
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], 1)
            wide = _inputs_per_row(module) > MAX_BLOCK_REFIT_INPUTS
            sums[name] = sums.get(name, 0) + (rows.square().sum(0) if wide else rows.T @ rows)
            counts[name] = counts.get(name, 0) + rows.shape[0]

        return hook

    handles: list | None = None
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            inputs = split_batch(batch)[0]
            if handles is None:  # the first batch finds the readers
                readers = _readers(model, inputs).items()
                handles = [module.register_forward_pre_hook(record(name)) for name, module in readers]
            tokens = _token_rows(inputs)
            call(model, inputs)
    finally:
        for handle in handles or ():
            handle.remove()
        model.train(was_training)
    return {name: sums[name] / counts[name] for name in sums}


def by_module(model: nn.Module, activity: Activity | None) -> dict[nn.Module, torch.Tensor]:
    """``activity`` (by the teacher's names) keyed by ``model``'s modules of those names (a copy of
    the teacher before any block is dropped)."""
    activity = activity or {}
    return {module: activity[name] for name, module in model.named_modules() if name in activity}


def reader_moments(dep, activity: Mapping[nn.Module, torch.Tensor]) -> torch.Tensor | None:
    """The teacher's input moments of a layer that reads a pruning group's channels (``dep``), if
    ``activity`` (by module) has them at its current width (an activity measured on another model,
    or before an earlier pruning narrowed it, is not used)."""
    reader = dep.target.module
    moments = activity.get(reader)
    if dep.handler not in _READERS or moments is None or len(moments) != _inputs_per_row(reader) + 1:
        return None
    return moments


def pruned_with_refits(group, activity: Mapping[nn.Module, torch.Tensor]) -> None:
    """Prune Torch-Pruning's ``group``, then refit each layer that read its channels and has the
    teacher's ``activity`` (by module) to the inputs it keeps (:func:`_refit`)."""
    refits = []
    for dep, idxs in group:
        if (moments := reader_moments(dep, activity)) is not None and moments.dim() == 2:
            reader = dep.target.module
            bias = None if reader.bias is None else reader.bias.detach().clone()
            refits.append((reader, reader.weight.detach().clone(), bias, set(idxs), moments))
    group.prune()
    for refit in refits:
        _refit(*refit)


def _kept_columns(weight: torch.Tensor, removed: set[int]) -> Iterator[int]:
    """The columns of ``weight`` flattened to rows that read the input channels not ``removed``."""
    per_channel = weight[0].numel() // weight.shape[1]  # a convolution's kernel positions
    for channel in range(weight.shape[1]):
        if channel not in removed:
            yield from range(channel * per_channel, (channel + 1) * per_channel)


@torch.no_grad()
def _refit(reader: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, removed: set[int], moments) -> None:
    """Set ``reader`` (already without its ``removed`` input channels) to the least-squares fit of
    the teacher's output ``weight·x + bias`` from the inputs it keeps (and its bias, if it has one),
    given the teacher's input ``moments``: the normal equations need nothing else."""
    flat = weight.reshape(len(weight), -1)
    kept = list(_kept_columns(weight, removed))
    columns = kept + ([flat.shape[1]] if bias is not None else [])
    teacher = torch.cat([flat, (bias if bias is not None else flat.new_zeros(len(flat)))[:, None]], 1)
    gram = moments[columns][:, columns]
    gram = gram + _RIDGE * gram.diagonal().mean() * torch.eye(len(columns), dtype=gram.dtype)
    fitted = torch.linalg.solve(gram, (teacher.double() @ moments[:, columns]).T).T.to(weight.dtype)
    reader.weight.copy_(fitted[:, : len(kept)].reshape(reader.weight.shape))
    if bias is not None:
        reader.bias.copy_(fitted[:, -1])
