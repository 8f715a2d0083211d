"""Structural operations on a Transformer's block list: drop blocks, remove attention heads and FFN width.

Each operation changes ``model`` in place: the caller passes a copy of the teacher, so what is left
starts from the teacher's weights (and, given the teacher's
:func:`~search.compress.channel_activity`, the layers that read removed heads or channels are
refitted to the rest). All of them are deterministic (index lists, a ranking by the teacher's
activity on fixed calibration batches, or by weight magnitude without it), so re-applying the
same arguments to the teacher rebuilds the same shapes, and a state_dict saved from one candidate
loads into the rebuilt one with ``weights_only=True`` (the shapes do not depend on the ranking).
A head-pruned Hugging Face model does not reload with ``from_pretrained``; this rebuild is the way
back. Modules are addressed by dotted name, as plan entries are; :func:`~search.model.find_blocks`
says which a model has.
"""

from __future__ import annotations

import numbers
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
import torch_pruning as tp
from torch import nn

from search._errors import CandidateError, UsageError
from search.compress._refit import Activity, by_module, mean_squares, pruned_with_refits, reader_moments
from search.model import Inputs, dependency_graph, describe_blocks, is_block_list, is_gated_mlp
from search.plan import Depth

# Without activity: L2 magnitude, as for CNN channels. Torch-Pruning scores every channel of a group
# over all of its members: for heads, the rows of Q, K, V and the columns of attention.output.dense.
_IMPORTANCE = tp.importance.MagnitudeImportance(p=2)

def drop_blocks(model: nn.Module, container: str, keep: Sequence[int]) -> None:
    """Keep only the blocks ``keep`` (increasing indices) of the nn.ModuleList ``container`` (or
    the nn.Sequential of blocks named by index, as torchvision's ViT has them).

    The student-depth knob: MiniLM 6 → 3 layers keeps three of the teacher's blocks as they are, and
    distillation repairs the rest. ``config.num_hidden_layers`` follows (on the model and on any
    module above the blocks that has a config), and so does a per-layer ``config.layer_types`` list
    (sliding or full attention per block, in newer decoders), so the config describes the model;
    each kept block's ``layer_idx`` (the key of its KV-cache slot in HF models) is renumbered; an
    ``nn.TransformerEncoder``'s ``num_layers`` follows too.
    """
    try:
        blocks = model.get_submodule(container)
    except AttributeError:
        blocks = None
    if blocks is None or not is_block_list(blocks):
        raise UsageError(
            f"{container!r} is not an nn.ModuleList of blocks (or an nn.Sequential of blocks named by index) "
            f"in {type(model).__name__}; expected a dotted name such as 'encoder.layer'"
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
    if isinstance(blocks, nn.ModuleList):
        kept = nn.ModuleList(blocks[i] for i in keep)
    else:  # torchvision's ViT: blocks named by index ("encoder_layer_3"), renamed as the plan's Depth renames them
        depth, named = Depth(container, tuple(keep)), list(blocks.named_children())
        renamed = (depth.rename(f"{container}.{named[i][0]}").rpartition(".")[2] for i in keep)
        kept = nn.Sequential(OrderedDict((name, named[i][1]) for name, i in zip(renamed, keep)))
    for index, block in enumerate(kept):
        for module in block.modules():
            if getattr(module, "layer_idx", None) is not None:
                module.layer_idx = index
    parent, _, attr = container.rpartition(".")
    holder = model.get_submodule(parent)
    setattr(holder, attr, kept)
    if getattr(holder, "num_layers", None) == len(blocks):  # an nn.TransformerEncoder's count
        holder.num_layers = len(keep)
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


def _prune_out(
    graph: tp.DependencyGraph, layer: nn.Linear, indices: list[int], activity: Mapping[nn.Module, torch.Tensor]
) -> None:
    """Remove ``layer``'s output channels ``indices`` with their group, refitting their readers."""
    pruned_with_refits(graph.get_pruning_group(layer, tp.prune_linear_out_channels, indices), activity)


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
        if (moments := reader_moments(dep, activity)) is None:
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
    the teacher's ``activity`` (:func:`~search.compress.channel_activity`; the layers that read them
    are then refitted), else those of least L2 weight magnitude.
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
    moments = by_module(model, activity)
    for name, ratio in heads.items():
        if int(ratio * blocks.heads[name]):
            _remove_heads(graph, name, model.get_submodule(name), ratio, moments)
    for name, ratio in ffn.items():
        if int(ratio * blocks.ffn[name]):
            _narrow_ffn(graph, model, name, ratio, moments)
