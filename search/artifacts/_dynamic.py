"""ONNX Runtime's dynamic int8 quantization of a file, its graph kept for other files of that graph.

``quantize_dynamic`` quantizes each weight per output channel in a Python loop (MiniLM: 20,736
channels, 1.3 s), and loads the model with shape inference and saves it: 2 s of a 3.4 s int8 MiniLM
export, paid again for every file, though the graph it writes depends on the source's graph alone,
not on its weights' values or sizes. So the graph it writes is kept, its tensors left out, under a
digest of the source's graph and the nodes quantized; a file of that graph (another structure of one
form, other weights) gets it with its own tensors, each weight quantized by ONNX Runtime's own
vectorised helpers (``compute_scale_zp_blocked``, ``quantize_nparray``: the loop's formulas), the
value shapes inferred as ``quantize_dynamic`` infers them. A graph is kept only where this gives, for
the file ONNX Runtime quantized, the very file it wrote.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

TensorProto = onnx.TensorProto
_SUFFIXES = ("_quantized", "_scale", "_zero_point")  # what quantize_dynamic names a weight's tensors
_DATA_FIELDS = ("raw_data", "float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def quantize_dynamic(
    source: onnx.ModelProto, path: Path, target: Path, nodes: Sequence[str], kept: Path | None
) -> None:
    """Write to ``target`` ``path`` (whose model is ``source``) with the MatMul ``nodes`` quantized
    dynamically: int8 weights per output channel, activations quantized per call (uint8) inside the
    kernel. ``kept``: the folder of graphs kept, or None to keep none."""
    kept_path = None if kept is None else Path(kept) / f"{_digest(source, nodes)}.onnx"
    if kept_path is not None and kept_path.exists():
        onnx.save(_with_tensors(onnx.load(str(kept_path)), source), str(target))
        return
    _ort_quantize_dynamic(path, target, nodes)
    if kept_path is None:
        return
    written = onnx.load(str(target))
    try:
        alike = _with_tensors(written, source).SerializeToString() == written.SerializeToString()
    except KeyError:  # a tensor this module does not know how to compute
        alike = False
    if alike:
        kept_path.parent.mkdir(parents=True, exist_ok=True)
        partial = kept_path.with_name(f"{kept_path.stem}.{os.getpid()}-{threading.get_ident()}.tmp")
        _leave_out_data(written)
        onnx.save(written, str(partial))
        os.replace(partial, kept_path)


def _ort_quantize_dynamic(source: Path, target: Path, nodes: Sequence[str]) -> None:
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    ort_quantize_dynamic(
        str(source), str(target), op_types_to_quantize=["MatMul"], nodes_to_quantize=list(nodes),
        per_channel=True, weight_type=QuantType.QInt8, extra_options={"MatMulConstBOnly": True},
    )  # fmt: skip


def _digest(source: onnx.ModelProto, nodes: Sequence[str]) -> str:
    """sha256 of what ``quantize_dynamic``'s graph depends on: the source's graph (its nodes, inputs,
    outputs, opsets; each initializer's name, type and rank, not its sizes or values), ``nodes``,
    and the versions of ONNX Runtime and ONNX."""
    import onnxruntime

    versions = f"onnxruntime {onnxruntime.__version__}, onnx {onnx.__version__}"  # what writes it, what infers
    digest = hashlib.sha256(f"{versions};{source.ir_version};{sorted(nodes)};".encode())
    for part in (*source.opset_import, *source.graph.input, *source.graph.output, *source.graph.node):
        digest.update(part.SerializeToString())
    for tensor in source.graph.initializer:
        digest.update(f"{tensor.name}:{tensor.data_type}:{len(tensor.dims)};".encode())
    return digest.hexdigest()


def _leave_out_data(model: onnx.ModelProto) -> None:
    """In place: ``model``'s initializers without their data (their names, types and shapes kept)."""
    for tensor in model.graph.initializer:
        for field in _DATA_FIELDS:
            tensor.ClearField(field)


def _with_tensors(graph: onnx.ModelProto, source: onnx.ModelProto) -> onnx.ModelProto:
    """The quantized ``graph`` (of a source of ``source``'s digest) holding ``source``'s tensors:
    each initializer ``source`` has by name, each weight's quantized tensors computed from it, and the
    shapes ONNX's inference gives ``source``'s values, as ``quantize_dynamic`` writes them."""
    tensors = {tensor.name: tensor for tensor in source.graph.initializer}
    model = onnx.ModelProto()
    model.CopyFrom(graph)
    del model.graph.initializer[:]
    del model.graph.value_info[:]
    model.graph.value_info.extend(onnx.shape_inference.infer_shapes(_shapes_only(source)).graph.value_info)
    quantized: dict[str, dict[str, TensorProto]] = {}
    for kept in graph.graph.initializer:
        tensor = model.graph.initializer.add()
        if kept.name in tensors:
            tensor.CopyFrom(tensors[kept.name])
        else:
            suffix = next((s for s in _SUFFIXES if kept.name.endswith(s)), "")
            weight = kept.name.removesuffix(suffix)
            if not suffix or weight not in tensors:
                raise KeyError(f"{kept.name}: neither the source's nor a weight's quantized tensor")
            if weight not in quantized:
                quantized[weight] = _per_channel_int8(tensors[weight])
            tensor.CopyFrom(quantized[weight][suffix])
        if kept.HasField("data_location"):
            tensor.data_location = kept.data_location
    return model


def _shapes_only(source: onnx.ModelProto) -> onnx.ModelProto:
    """``source`` for shape inference: its float initializers' data left out (inference reads their
    types and shapes; it reads the values of integer ones, such as a ``Reshape``'s shape)."""
    model = onnx.ModelProto(ir_version=source.ir_version)
    model.opset_import.extend(source.opset_import)
    model.functions.extend(source.functions)
    graph = model.graph
    graph.node.extend(source.graph.node)
    graph.input.extend(source.graph.input)
    graph.output.extend(source.graph.output)
    graph.value_info.extend(source.graph.value_info)
    for tensor in source.graph.initializer:
        light = graph.initializer.add()
        if tensor.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE):
            light.name, light.data_type = tensor.name, tensor.data_type
            light.dims.extend(tensor.dims)
        else:
            light.CopyFrom(tensor)
    return model


def _per_channel_int8(weight: TensorProto) -> dict[str, TensorProto]:
    """A MatMul weight ``[in, out]`` quantized to int8 per output channel, symmetric, as
    ``quantize_dynamic(per_channel=True, weight_type=QInt8)`` quantizes it: its tensors by suffix."""
    from onnxruntime.quantization.quant_utils import compute_scale_zp_blocked, quantize_nparray

    array = numpy_helper.to_array(weight)
    zero_point, scale = compute_scale_zp_blocked(
        array, TensorProto.INT8, axis=0, block_size=array.shape[0], symmetric=True
    )
    values = np.asarray(quantize_nparray(TensorProto.INT8, array, scale, zero_point)).reshape(array.shape)
    channels = [array.shape[1]]
    return {
        "_quantized": numpy_helper.from_array(values, weight.name + "_quantized"),
        "_scale": onnx.helper.make_tensor(weight.name + "_scale", weight.data_type, channels, scale.ravel().tolist()),
        "_zero_point": onnx.helper.make_tensor(
            weight.name + "_zero_point", TensorProto.INT8, channels, zero_point.ravel().tolist()
        ),
    }
