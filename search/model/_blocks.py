"""A Transformer as the search sees it: its list of blocks, the attention modules whose heads can be
removed and its FFN layers, by dotted module name (:func:`find_blocks`).

Three families are recognised:

* BERT-style encoders: an attention module is one with ``query``/``key``/``value`` Linear children
  and a ``num_attention_heads`` attribute (BERT's ``encoder.layer.N.attention.self``); its heads can
  be removed. The FFN is the Linear named ``intermediate.dense`` in a block.
* Llama-style decoders (``LlamaForCausalLM``): an attention module is one with ``q_proj``/``k_proj``/
  ``v_proj`` Linear children (``model.layers.N.self_attn``); it locates the blocks, but its heads
  are not removed (rotary embeddings and grouped K/V heads tie Q, K and V in ways a row pruning of
  the projections does not follow). The FFN is the gated MLP, named by ``mlp.up_proj``: removing
  its output channels removes the same rows of ``mlp.gate_proj`` and columns of ``mlp.down_proj``,
  which Torch-Pruning couples through the ``act(gate) * up`` product.
* PyTorch's own ``nn.TransformerEncoder`` (``encoder.layers.N``, ``nn.TransformerEncoderLayer``
  blocks) and torchvision's ViT (``encoder.layers.encoder_layer_N``, in an ``nn.Sequential``): their
  ``nn.MultiheadAttention`` packs Q/K/V into one parameter, so it locates the blocks but loses no
  heads, as a Llama's; the FFN is ``linear1`` (``mlp.0`` in torchvision's ``MLPBlock``).

Anything else (an encoder-decoder ``nn.Transformer``, whose attention spans two block lists, GPT-2,
whose projections are transformers' ``Conv1D``) has no recognised attention module: it is searched
as a CNN is, layer by layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from torch import nn

from search._block_names import split_index
from search._errors import UsageError


@dataclasses.dataclass(frozen=True)
class EncoderBlocks:
    """What a Transformer search can change in a model, by dotted module name."""

    container: str  # the list of blocks, e.g. "encoder.layer", "model.layers" or torchvision's "encoder.layers"
    blocks: int
    heads: Mapping[str, int]  # head-prunable (BERT-style) attention module -> number of heads
    ffn: Mapping[str, int]  # FFN intermediate Linear -> its width (out_features)


_BERT_PROJECTIONS = ("query", "key", "value")
_LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj")
_FFN_SUFFIXES = ("intermediate.dense", "mlp.up_proj", "linear1", "mlp.0")  # BERT, Llama, PyTorch's, torchvision's
_GATED = ("gate_proj", "down_proj")  # the up_proj's siblings in a Llama-style MLP


def _has_linears(module: nn.Module, names: Sequence[str]) -> bool:
    return all(isinstance(getattr(module, name, None), nn.Linear) for name in names)


def _is_attention(module: nn.Module) -> bool:
    """BERT-style attention, whose heads :func:`prune_heads_and_ffn` can remove."""
    return hasattr(module, "num_attention_heads") and _has_linears(module, _BERT_PROJECTIONS)


def _any_attention(model: nn.Module) -> dict[str, nn.Module]:
    """Every recognised attention module, head-prunable or not (Llama-style, PyTorch's): they locate
    the blocks. PyTorch's ``nn.MultiheadAttention`` counts where its blocks are one list of blocks
    and nothing else is recognised."""
    named = {name: m for name, m in model.named_modules() if _is_attention(m) or _has_linears(m, _LLAMA_PROJECTIONS)}
    if named:
        return named
    pytorch = {name: m for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    containers = {_containing_list(model, name) for name in pytorch}
    return pytorch if len(containers) == 1 and None not in containers else {}


def _ffn_layers(model: nn.Module, container: str) -> dict[str, nn.Linear]:
    """The FFN intermediate Linears of the blocks in ``container``."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.startswith(f"{container}.") and name.endswith(_FFN_SUFFIXES)
    }


def is_block_list(module: nn.Module) -> bool:
    """An nn.ModuleList, or an nn.Sequential whose children's names end with their index
    (torchvision's ``encoder_layer_0``, ``encoder_layer_1``, …), as :class:`~search.plan.Depth` renames them."""
    if isinstance(module, nn.ModuleList):
        return True
    found = [split_index(name) for name, _ in module.named_children()] if isinstance(module, nn.Sequential) else []
    return bool(found) and all(split is not None and split[1] == i for i, split in enumerate(found))


def _containing_list(model: nn.Module, name: str) -> str | None:
    """The dotted name of the innermost list of blocks (:func:`is_block_list`) that ``name`` sits in, if any."""
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:end])
        if is_block_list(model.get_submodule(prefix)):
            return prefix
    return None


def find_blocks(model: nn.Module) -> EncoderBlocks | None:
    """:func:`describe_blocks` of a BERT-style encoder, a Llama-style decoder, an
    ``nn.TransformerEncoder`` or torchvision's ViT; None for a model without recognised attention
    modules (a CNN)."""
    return describe_blocks(model) if _any_attention(model) else None


def describe_blocks(model: nn.Module) -> EncoderBlocks:
    """The block list, head-prunable attention modules and FFN widths of a BERT-style encoder, a
    Llama-style decoder, an ``nn.TransformerEncoder`` or torchvision's ViT (a UsageError if none).
    Only a BERT-style encoder has entries in ``heads``."""
    attention = _any_attention(model)
    containers = {_containing_list(model, name) for name in attention}
    if not attention or None in containers or len(containers) > 1:
        raise UsageError(
            f"model {type(model).__name__} is not a BERT-style encoder, Llama-style decoder, "
            "nn.TransformerEncoder or torchvision ViT: expected attention modules (with query, key and value "
            "Linear layers and num_attention_heads, q_proj, k_proj and v_proj Linear layers, or nn.MultiheadAttention) "
            "inside one nn.ModuleList (or nn.Sequential named by index) of blocks; found "
            f"{', '.join(attention) or 'no attention module'}"
        )
    (container,) = containers
    return EncoderBlocks(
        container=container,
        blocks=len(model.get_submodule(container)),
        heads={name: m.num_attention_heads for name, m in attention.items() if _is_attention(m)},
        ffn={name: m.out_features for name, m in _ffn_layers(model, container).items()},
    )


def is_gated_mlp(module: nn.Module) -> bool:
    """A Llama-style MLP: ``gate_proj`` and ``down_proj`` Linear children beside its ``up_proj``."""
    return _has_linears(module, _GATED)
