"""Which plan layer each node of an exported ONNX file belongs to, read from the weights it uses."""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path

import onnx

# The suffixes a layer's parameters carry in an exported graph: ``conv1.weight``, ``fc.weight.T``,
# ``conv1.weight_quantized``, ``conv1.weight_bias`` (a folded BatchNorm), ``fc.bias_quantized``.
_MARKERS = (".weight", ".bias")


def layer_of_tensor(name: str, layers: Collection[str]) -> str | None:
    """The layer whose parameter the tensor ``name`` is (or was quantized from), else None."""
    for marker in _MARKERS:
        prefix, found, _ = name.rpartition(marker)
        if found and prefix in layers:
            return prefix
    return None


def node_layers(path: str | Path, layers: Collection[str]) -> dict[str, str]:
    """Node name -> the layer among ``layers`` whose parameters it takes, directly or through
    nodes computing on constants only (the DequantizeLinear of a quantized weight). Nodes that
    take no layer's parameters are left out."""
    graph = onnx.load(str(path), load_external_data=False).graph
    layers = set(layers)
    constant = {init.name: layer_of_tensor(init.name, layers) for init in graph.initializer}
    found = {}
    for node in graph.node:  # in topological order, as ONNX requires
        inputs = [name for name in node.input if name]
        owners = [constant[name] for name in inputs if constant.get(name)]
        if owners:
            found[node.name] = owners[0]
        if inputs and all(name in constant for name in inputs):  # a constant subgraph: its outputs too
            for output in node.output:
                constant[output] = owners[0] if owners else None
    return found


def entry_layer(entry: Mapping[str, object], nodes: Mapping[str, str]) -> str | None:
    """The layer a runtime's report entry ran: the one most of its ONNX nodes belong to, else the
    one its own name is a node of (a TensorRT layer named after the node it runs)."""
    onnx_nodes: Iterable[str] = entry.get("onnx_nodes") or ()
    counts = Counter(nodes[name] for name in onnx_nodes if name in nodes)
    if counts:
        return counts.most_common(1)[0][0]
    return nodes.get(str(entry.get("name")))
