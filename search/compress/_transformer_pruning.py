"""Structural operations on a Transformer's block list: drop blocks, remove attention heads and FFN width.

Each operation changes ``model`` in place: the caller passes a copy of the teacher, so what is left
starts from the teacher's weights (and, given the teacher's :func:`channel_activity`, the layers
that read removed heads or channels are refitted to the rest). All of them are deterministic
(index lists, a ranking by the teacher's activity on fixed calibration batches, or by weight
magnitude without it),
so re-applying the same arguments to the teacher rebuilds the same shapes, and a state_dict saved
from one candidate loads into the rebuilt one with ``weights_only=True`` (the shapes do not depend
on the ranking). A head-pruned Hugging Face model does not reload with ``from_pretrained``; this
rebuild is the way back. Modules are addressed by dotted name, as plan entries are;
:func:`~search.model.find_blocks` says which a model has.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch_pruning as tp
from torch import nn

from search._errors import CandidateError, UsageError
from search.model import Inputs, call, dependency_graph, describe_blocks, find_blocks, is_gated_mlp, split_batch

# Without activity: L2 magnitude, as for CNN channels. Torch-Pruning scores every channel of a group
# over all of its members: for heads, the rows of Q, K, V and the columns of attention.output.dense.
_IMPORTANCE = tp.importance.MagnitudeImportance(p=2)

# Batches of a Transformer task's calibration data its activity is measured on: a refit solves for
# every input of the layer it narrows (1,536 in a MiniLM FFN), and needs some ten real tokens each.
ACTIVITY_BATCHES = 48
# The refit's ridge, relative to the mean of its second moments: keeps the solve well posed where
# few calibration rows meet many inputs, without pulling the fit away from the teacher's output.
_RIDGE = 1e-6

Activity = Mapping[str, torch.Tensor]
"""Per Linear layer in a Transformer's blocks, by the teacher's dotted name: the second moments of
its input with a constant 1 appended, ``E[x̃ x̃ᵀ]`` for ``x̃ = [x; 1]`` over calibration data
(:func:`channel_activity`). The diagonal's first entries are each input channel's mean square."""


def mean_squares(moments: torch.Tensor) -> torch.Tensor:
    """Each input channel's mean square, from its layer's :data:`Activity` entry."""
    return moments.diagonal()[:-1]


def _token_rows(inputs: Inputs) -> torch.Tensor | None:
    """Which rows of a block's ``(batch × tokens, features)`` activations are real tokens: the
    ``attention_mask`` a Hugging Face batch carries (padding rows are left out), else all."""
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    return mask.reshape(-1).bool() if isinstance(mask, torch.Tensor) else None


@torch.no_grad()
def channel_activity(model: nn.Module, batches: Iterable) -> dict[str, torch.Tensor]:
    """The second moments (:data:`Activity`) of the input of every Linear layer in ``model``'s
    blocks, over the real tokens of ``batches`` of ``(inputs, labels)``; ``{}`` for a model without
    recognised blocks (a CNN).

    With them, heads and FFN channels are ranked by what they add to their block's output: a
    channel's mean square times the squared norm of the weights that read it (the output
    projection's columns), the structured form of Wanda's ``|W|·‖X‖`` (Sun et al., 2023). And the
    layers that read what was removed are refitted by least squares to give the teacher's output
    from what is left (the layer-wise reconstruction of Kwon et al., 2022). Measured on MiniLM with
    no fine-tune (benchmarks/RESULTS.md): a quarter of the FFN width removed keeps cosine 0.91 where
    weight magnitude keeps 0.85, and 0.98 once refitted."""
    blocks = find_blocks(model)
    if blocks is None:
        return {}
    layers = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith(f"{blocks.container}.")
    }
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    tokens: torch.Tensor | None = None

    def record(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            rows = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            if tokens is not None and tokens.shape[0] == rows.shape[0]:
                rows = rows[tokens]
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], 1)
            sums[name] = sums.get(name, 0) + rows.T @ rows
            counts[name] = counts.get(name, 0) + rows.shape[0]

        return hook

    handles = [module.register_forward_pre_hook(record(name)) for name, module in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            inputs = split_batch(batch)[0]
            tokens = _token_rows(inputs)
            call(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: sums[name] / counts[name] for name in sums}


def drop_blocks(model: nn.Module, container: str, keep: Sequence[int]) -> None:
    """Keep only the blocks ``keep`` (increasing indices) of the nn.ModuleList ``container``.

    The student-depth knob: MiniLM 6 → 3 layers keeps three of the teacher's blocks as they are, and
    distillation repairs the rest. ``config.num_hidden_layers`` follows (on the model and on any
    module above the blocks that has a config), and so does a per-layer ``config.layer_types`` list
    (sliding or full attention per block, in newer decoders), so the config describes the model;
    each kept block's ``layer_idx`` (the key of its KV-cache slot in HF models) is renumbered.
    """
    try:
        blocks = model.get_submodule(container)
    except AttributeError:
        blocks = None
    if not isinstance(blocks, nn.ModuleList):
        raise UsageError(
            f"{container!r} is not an nn.ModuleList of blocks in {type(model).__name__}; "
            f"expected a dotted name such as 'encoder.layer'"
        )
    keep = list(keep)
    bad = [i for i in keep if not isinstance(i, numbers.Integral) or not 0 <= i < len(blocks)]
    if bad:
        raise UsageError(
            f"block index {bad[0]!r} is not in {container!r}, which has {len(blocks)} blocks "
            f"(indices 0 to {len(blocks) - 1})"
        )
    if not keep or keep != sorted(set(keep)):
        raise UsageError(f"blocks to keep must be increasing indices without repeats, at least one; got {keep}")
    kept = nn.ModuleList(blocks[i] for i in keep)
    for index, block in enumerate(kept):
        for module in block.modules():
            if getattr(module, "layer_idx", None) is not None:
                module.layer_idx = index
    parent, _, attr = container.rpartition(".")
    setattr(model.get_submodule(parent), attr, kept)
    parts, seen = container.split("."), set()
    for end in range(len(parts)):  # the model, or the wrapped Hugging Face model that holds the blocks
        config = getattr(model.get_submodule(".".join(parts[:end])), "config", None)
        if id(config) in seen:  # LlamaForCausalLM and its LlamaModel share one config: slice it once
            continue
        seen.add(id(config))
        if hasattr(config, "num_hidden_layers"):
            config.num_hidden_layers = len(keep)
        layer_types = getattr(config, "layer_types", None)
        if isinstance(layer_types, (list, tuple)) and len(layer_types) == len(blocks):
            config.layer_types = type(layer_types)(layer_types[i] for i in keep)


def _check_ratios(kind: str, ratios: Mapping[str, float], known: Mapping[str, int]) -> None:
    for name, ratio in ratios.items():
        if name not in known:
            raise UsageError(f"unknown {kind} {name!r}; the model's are: {', '.join(known) or 'none'}")
        if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0.0 <= ratio < 1.0:
            raise UsageError(f"{kind} ratio for {name!r} must be a number in [0, 1), got {ratio!r}")


def _weakest(importance: torch.Tensor, count: int) -> list[int]:
    """Indices of the ``count`` least important entries (ties broken by index: deterministic)."""
    return sorted(torch.argsort(importance, stable=True)[:count].tolist())


def _reader_moments(dep, activity: Mapping[nn.Module, torch.Tensor]) -> torch.Tensor | None:
    """The teacher's input moments of a Linear that reads a pruning group's channels (``dep``), if
    ``activity`` has them at its width (an activity measured on another model is not used)."""
    reader = dep.target.module
    moments = activity.get(reader)
    if dep.handler != tp.prune_linear_in_channels or moments is None or len(moments) != reader.in_features + 1:
        return None
    return moments


def _prune_out(
    graph: tp.DependencyGraph, layer: nn.Linear, indices: list[int], activity: Mapping[nn.Module, torch.Tensor]
) -> None:
    """Remove ``layer``'s output channels ``indices`` with their group; each Linear that read them
    and has the teacher's ``activity`` is then refitted to the inputs it keeps (:func:`_refit`)."""
    group = graph.get_pruning_group(layer, tp.prune_linear_out_channels, indices)
    refits = []
    for dep, idxs in group:
        if (moments := _reader_moments(dep, activity)) is not None:
            reader = dep.target.module
            kept = sorted(set(range(reader.in_features)) - set(idxs))
            bias = None if reader.bias is None else reader.bias.detach().clone()
            refits.append((reader, reader.weight.detach().clone(), bias, kept, moments))
    group.prune()
    for refit in refits:
        _refit(*refit)


@torch.no_grad()
def _refit(reader: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None, kept: list[int], moments) -> None:
    """Set ``reader`` (already narrowed to its ``kept`` inputs) to the least-squares fit of the
    teacher's output ``weight·x + bias`` from ``x[kept]`` (and its bias, if it has one), given the
    teacher's input ``moments``: the normal equations need nothing else, so no data is run again."""
    inputs = weight.shape[1]
    columns = kept + ([inputs] if bias is not None else [])
    teacher = torch.cat([weight, (bias if bias is not None else weight.new_zeros(len(weight)))[:, None]], 1)
    gram = moments[columns][:, columns]
    gram = gram + _RIDGE * gram.diagonal().mean() * torch.eye(len(columns), dtype=gram.dtype)
    fitted = torch.linalg.solve(gram, (teacher.double() @ moments[:, columns]).T).T.to(weight.dtype)
    reader.weight.copy_(fitted[:, : len(kept)])
    if bias is not None:
        reader.bias.copy_(fitted[:, -1])


def _importance(
    graph: tp.DependencyGraph, layer: nn.Linear, activity: Mapping[nn.Module, torch.Tensor]
) -> torch.Tensor:
    """Each output channel of ``layer``: what it adds to the block's output where ``activity`` (by
    module) covers the layers that read it (summed over them), else its group's L2 magnitude. An
    activity of another width than its layer's inputs (measured on another model) is not used."""
    group = graph.get_pruning_group(layer, tp.prune_linear_out_channels, list(range(layer.out_features)))
    scores = torch.zeros(layer.out_features)
    readers = 0
    for index, (dep, idxs) in enumerate(group):
        if (moments := _reader_moments(dep, activity)) is None:
            continue
        reader = dep.target.module
        contribution = mean_squares(moments).float() * reader.weight.detach().square().sum(0)
        scores[list(group[index].root_idxs)] += contribution[list(idxs)]
        readers += 1
    return scores if readers else _IMPORTANCE(group)


def _remove_heads(
    graph: tp.DependencyGraph, name: str, attention: nn.Module, ratio: float, activity: Mapping[nn.Module, torch.Tensor]
) -> None:
    """Remove the ``int(ratio × heads)`` least important heads, whole (head size kept)."""
    heads, size = attention.num_attention_heads, attention.attention_head_size
    per_head = _importance(graph, attention.query, activity).view(heads, size).mean(1)
    dropped = _weakest(per_head, int(ratio * heads))
    _prune_out(graph, attention.query, [h * size + i for h in dropped for i in range(size)], activity)
    attention.num_attention_heads = heads - len(dropped)
    attention.all_head_size = attention.num_attention_heads * size
    # Q, K and V are coupled only through the traced attention op; if a model's attention hides
    # that from Torch-Pruning, the forward would break later with a less telling shape error.
    widths = {proj: getattr(attention, proj).out_features for proj in ("query", "key", "value")}
    if set(widths.values()) != {attention.all_head_size}:
        raise CandidateError(
            f"head pruning of {name!r} left Q/K/V widths {widths}, expected {attention.all_head_size} each"
        )


def _narrow_ffn(
    graph: tp.DependencyGraph, model: nn.Module, name: str, ratio: float, activity: Mapping[nn.Module, torch.Tensor]
) -> None:
    """Remove the ``int(ratio × width)`` least important intermediate channels. In a gated
    (Llama-style) MLP the group holds ``gate_proj`` rows and ``down_proj`` columns too; if the traced
    graph did not couple them, the forward would break later with a less telling shape error."""
    layer = model.get_submodule(name)
    width = layer.out_features - int(ratio * layer.out_features)
    _prune_out(graph, layer, _weakest(_importance(graph, layer, activity), layer.out_features - width), activity)
    mlp = name.rpartition(".")[0]
    widths = {f"{name} (out)": layer.out_features}
    if name.endswith("mlp.up_proj") and is_gated_mlp(model.get_submodule(mlp)):
        widths[f"{mlp}.gate_proj (out)"] = model.get_submodule(f"{mlp}.gate_proj").out_features
        widths[f"{mlp}.down_proj (in)"] = model.get_submodule(f"{mlp}.down_proj").in_features
    if set(widths.values()) != {width}:
        raise CandidateError(f"FFN pruning of {name!r} left widths {widths}, expected {width} each")


def prune_heads_and_ffn(
    model: nn.Module,
    example_inputs: Inputs,
    heads: Mapping[str, float],
    ffn: Mapping[str, float],
    activity: Activity | None = None,
) -> None:
    """Remove a ratio of the attention heads and of the FFN width, per module name, keeping the hidden size.

    ``heads`` maps BERT-style attention modules (``encoder.layer.0.attention.self``) to the ratio of
    their heads to remove (a Llama-style model has none to name), ``ffn`` maps FFN intermediate
    Linears (``encoder.layer.0.intermediate.dense``, ``model.layers.0.mlp.up_proj``) to the ratio of
    their width to remove; ratios in [0, 1), rounded down to whole heads and channels. The heads and
    channels removed are those that add least to their block's output on calibration data, given
    the teacher's ``activity`` (:func:`channel_activity`), else those of least L2 weight magnitude.
    Only these groups are built and pruned, through Torch-Pruning's dependency graph, so the hidden
    size (embeddings, residual stream, ``attention.output.dense``/``output.dense``/``o_proj``/
    ``down_proj`` outputs, pooler) is never touched. The attention modules'
    ``num_attention_heads``/``all_head_size`` are updated.
    """
    blocks = describe_blocks(model)
    _check_ratios("attention module", heads, blocks.heads)
    _check_ratios("FFN layer", ffn, blocks.ffn)
    if not any(heads.values()) and not any(ffn.values()):
        return
    graph = dependency_graph(model, example_inputs)
    activity = activity or {}
    by_module = {module: activity[name] for name, module in model.named_modules() if name in activity}
    for name, ratio in heads.items():
        if int(ratio * blocks.heads[name]):
            _remove_heads(graph, name, model.get_submodule(name), ratio, by_module)
    for name, ratio in ffn.items():
        if int(ratio * blocks.ffn[name]):
            _narrow_ffn(graph, model, name, ratio, by_module)
