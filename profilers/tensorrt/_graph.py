"""What an ONNX graph holds that decides how TensorRT builds it: Q/DQ nodes, fp16 tensors, 2:4
sparse weights, and Q/DQ that TensorRT cannot take (:func:`summarise_graph`, :func:`qdq_hint`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import numpy_helper

# weight the 2:4 pattern runs along (the input channels); Gemm depends on transB.
_WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_PASS_THROUGH = frozenset({"DequantizeLinear", "QuantizeLinear", "Identity", "Cast"})
_QDQ = frozenset({"QuantizeLinear", "DequantizeLinear"})



@dataclasses.dataclass(frozen=True)
class GraphSummary:
    """What an ONNX graph holds that decides how TensorRT builds it.

    ``int8_nodes`` are the weighted nodes (Conv, Gemm, MatMul) whose weight comes through a
    DequantizeLinear: the plan wants them int8. ``sparse_nodes`` are the weighted nodes whose
    weight is 2:4 sparse along its input channels. ``asymmetric_qdq`` names the Q/DQ nodes with a
    uint8 or nonzero zero point, which TensorRT does not take (it quantizes symmetrically, to int8).
    """

    has_qdq: bool
    has_fp16: bool
    int8_nodes: frozenset[str] = frozenset()
    sparse_nodes: frozenset[str] = frozenset()
    asymmetric_qdq: tuple[str, ...] = ()


def summarise_graph(model: onnx.ModelProto) -> GraphSummary:
    """The :class:`GraphSummary` of ``model``, whose weights must be loaded (2:4 detection reads
    them)."""
    graph = model.graph
    weights = {tensor.name: tensor for tensor in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    for node in graph.node:  # Constant nodes hold weights too
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                weights[node.output[0]] = value
    int8_nodes, sparse_nodes = set(), set()
    for node in graph.node:
        if node.op_type not in _WEIGHTED_OPS or len(node.input) < 2:
            continue
        name = node.name or node.output[0]
        source, dequantized = _weight_source(node.input[1], producers)
        if dequantized:
            int8_nodes.add(name)
        axis = _reduction_axis(node)
        if source in weights and axis is not None:
            array = numpy_helper.to_array(weights[source])
            if is_two_four_sparse(array, axis):
                sparse_nodes.add(name)
    return GraphSummary(
        has_qdq=any(node.op_type in _QDQ for node in graph.node),
        has_fp16=_has_fp16(model),
        int8_nodes=frozenset(int8_nodes),
        sparse_nodes=frozenset(sparse_nodes),
        asymmetric_qdq=_asymmetric_qdq(graph, weights),
    )


def is_two_four_sparse(weight: np.ndarray, axis: int) -> bool:
    """Whether every 4 consecutive entries of ``weight`` along ``axis`` (the input channels) hold
    at least 2 zeros: the pattern TensorRT's sparse kernels need (``BuilderFlag.SPARSE_WEIGHTS``).
    False when that axis is not a multiple of 4 long, or when the weight has fewer than 2 axes."""
    if weight.ndim < 2 or weight.size == 0:
        return False
    moved = np.moveaxis(weight, axis, -1)
    if moved.shape[-1] % 4:
        return False
    groups = moved.reshape(-1, 4)
    return bool(np.all(np.count_nonzero(groups, axis=1) <= 2))


def _weight_source(name: str, producers: Mapping[str, onnx.NodeProto]) -> tuple[str, bool]:
    """The tensor a weight input starts from, following Q/DQ, Identity and Cast back, and whether
    a DequantizeLinear was on the way."""
    dequantized = False
    seen = set()
    while name in producers and name not in seen:
        seen.add(name)
        node = producers[name]
        if node.op_type not in _PASS_THROUGH or not node.input:
            break
        dequantized |= node.op_type == "DequantizeLinear"
        name = node.input[0]
    return name, dequantized


def _reduction_axis(node: onnx.NodeProto) -> int | None:
    """The input-channel axis of ``node``'s weight: Conv [out, in, k...] → 1; MatMul [..., in,
    out] → -2; Gemm B [in, out] → 0, or [out, in] → 1 with transB. None for ConvTranspose,
    whose 2:4 TensorRT does not use."""
    if node.op_type == "Conv":
        return 1
    if node.op_type == "MatMul":
        return -2
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 1 if trans_b else 0
    return None


def _has_fp16(model: onnx.ModelProto) -> bool:
    graph = model.graph
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer):
        return True
    values = (*graph.input, *graph.output, *graph.value_info)
    return any(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for v in values)


def _asymmetric_qdq(
    graph: onnx.GraphProto, weights: Mapping[str, onnx.TensorProto]
) -> tuple[str, ...]:
    found = []
    for node in graph.node:
        if node.op_type not in _QDQ or len(node.input) < 3 or node.input[2] not in weights:
            continue
        zero_point = weights[node.input[2]]
        unsigned = zero_point.data_type == onnx.TensorProto.UINT8
        if unsigned or np.any(numpy_helper.to_array(zero_point)):
            found.append(node.name or node.output[0])
    return tuple(found)


def qdq_hint(summary: GraphSummary) -> str:
    """A sentence explaining a parse or build failure caused by asymmetric Q/DQ, or ''."""
    if not summary.asymmetric_qdq:
        return ""
    first = summary.asymmetric_qdq[0]
    return (
        f" ({len(summary.asymmetric_qdq)} Q/DQ node(s), such as {first!r}, have a uint8 or nonzero "
        "zero point: TensorRT takes only symmetric int8 Q/DQ, zero point 0; the export for a "
        "TensorRT target must quantize that way)"
    )
