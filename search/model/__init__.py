"""A task's model as the search reaches into it: how it is called on its inputs and what its output
reduces to, which of its layers a plan can address, and a Transformer's blocks."""

from search.model._blocks import EncoderBlocks, describe_blocks, find_blocks, is_gated_mlp
from search.model._inputs import (
    FORMS,
    Inputs,
    Output,
    arguments,
    batch_size,
    call,
    check_example_input,
    describe,
    reduce_output,
    reduced_output,
    split_batch,
    tensors,
)
from search.model._layers import (
    COMPRESSIBLE,
    LayerInfo,
    applied_as_matmul,
    compressible_layers,
    dependency_graph,
    describe_layers,
    forward_calls,
    matmul_layers,
    output_layer,
    unwrapped_quietly,
)

__all__ = [
    "COMPRESSIBLE",
    "FORMS",
    "EncoderBlocks",
    "Inputs",
    "LayerInfo",
    "Output",
    "applied_as_matmul",
    "arguments",
    "batch_size",
    "call",
    "check_example_input",
    "compressible_layers",
    "dependency_graph",
    "describe",
    "describe_blocks",
    "describe_layers",
    "forward_calls",
    "find_blocks",
    "is_gated_mlp",
    "matmul_layers",
    "output_layer",
    "reduce_output",
    "reduced_output",
    "split_batch",
    "tensors",
    "unwrapped_quietly",
]
