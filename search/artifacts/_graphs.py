"""Each structure's graph, its weights left out (:func:`export_raw` with ``weights=False``), kept in a
folder for the weights of any model of that structure to be written into (:func:`with_weights`).

Tracing (torch.export, then the ATen-to-ONNX translation) is most of an export's time, and a study
meets a new structure in most trials: 0.7 s for the digits CNN, 1.9 s for a MobileNet, 4 s for
MiniLM. Structures of one *form* (the same modules and state-dict entries, their channels pruned
apart, a narrower student) have one graph but for the shapes of its weights, and for the constants
the exporter derived from them: a flatten's ``Reshape`` to ``[batch, channels]`` (written
``[batch, -1]`` here, the same operation), a depthwise convolution's ``group``. So the graph traced
for one structure of a form is given another's shapes, and kept for it only if it computes what
that structure computes on the task's example; otherwise that structure is traced.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import torch
from torch import nn

from search.artifacts._onnx import Inputs, Output, _feeds, _leave_out, _twice, _write_state, export_raw
from search.model import call, reduce_output

FORMS = "forms"  # within a graphs folder: the graph traced last for each form
QUANTIZED = "quantized"  # within a graphs folder: the dynamically quantized graphs kept (see _dynamic)


def structure_digest(structure: nn.Module) -> str:
    """sha256 of a model's structure: its modules as printed, and each state-dict entry's name, shape
    and dtype. Two models with one digest export to the same graph but for its weights."""
    digest = hashlib.sha256(repr(structure).encode())
    for name, tensor in structure.state_dict().items():
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
    return digest.hexdigest()


def form_digest(structure: nn.Module) -> str:
    """sha256 of a model's form: each module's name and class, and each state-dict entry's name,
    rank and dtype; not their sizes. Two models of one form differ in their layers' widths only."""
    digest = hashlib.sha256()
    for name, module in structure.named_modules():
        digest.update(f"{name}:{type(module).__qualname__};".encode())
    for name, tensor in structure.state_dict().items():
        digest.update(f"{name}{tensor.dim()}{tensor.dtype};".encode())
    return digest.hexdigest()


class StructureGraphs:
    """``graphs(structure)``: the path of ``structure``'s graph, without its weights, in ``folder``
    (``<structure digest>.onnx``): the graph of another structure of its form, given its shapes,
    where that computes as ``structure`` does on ``example_input``; traced otherwise. The folder
    may be shared by processes: each file is written whole under a name of its own, then renamed."""

    def __init__(self, folder: Path, example_input: Inputs, output: Output | None = None) -> None:
        self.folder, self.example_input, self.output = Path(folder), example_input, output
        self.traced = 0  # structures traced by this object; the others were reshaped

    def __call__(self, structure: nn.Module) -> Path:
        path = self.folder / f"{structure_digest(structure)}.onnx"
        if path.exists():
            return path
        form = self.folder / FORMS / f"{form_digest(structure)}.onnx"
        form.parent.mkdir(parents=True, exist_ok=True)
        written = path.with_name(f"{path.stem}.{os.getpid()}-{threading.get_ident()}.tmp")
        if not (form.exists() and _reshaped(form, structure, written, self.example_input, self.output)):
            export_raw(structure, self.example_input, written, self.output, weights=False)
            graph = ir.load(str(written))
            _generalised(graph.graph)
            ir.save(graph, str(written))
            self.traced += 1
            template = form.with_name(written.name)
            shutil.copyfile(written, template)
            os.replace(template, form)
        os.replace(written, path)
        return path


def _reshaped(template: Path, model: nn.Module, path: Path, example_input: Inputs, output: Output | None) -> bool:
    """Write to ``path`` the graph ``template`` (of another model of ``model``'s form) with
    ``model``'s weight shapes and convolution groups, if it computes what ``model`` computes on
    ``example_input`` (twice, a batch of two); whether it does. Its other values take the shapes
    seen in that run, the batch left symbolic as traced: the optimiser that writes the weights in
    (:func:`with_weights`) folds the graph by them, as it folds a traced graph."""
    graph = ir.load(str(template))
    state = model.state_dict()
    _write_state(graph.graph, state)
    groups = {f"{name}.weight": m.groups for name, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)}
    for node in graph.graph:
        if node.op_type in ("Conv", "ConvTranspose") and len(node.inputs) > 1 and node.inputs[1].name in groups:
            node.attributes["group"] = ir.AttrInt64("group", groups[node.inputs[1].name])
    traced = {value: value.shape for node in graph.graph for value in node.outputs if value.shape is not None}
    for value in traced:
        value.shape = None  # the template's sizes: ONNX Runtime would check the run against them
    seen = _seen_shapes(graph, [value.name for value in traced], model, example_input, output)
    if seen is None:
        return False
    symbolic = {str(dim) for value in graph.graph.inputs for dim in value.shape or () if not isinstance(dim, int)}
    for value, shape in traced.items():
        value.shape = _resized(shape, seen[value.name], symbolic)
    _leave_out(graph.graph, state)
    ir.save(graph, str(path))
    return True


def _seen_shapes(
    graph: ir.Model, names: list[str], model: nn.Module, example_input: Inputs, output: Output | None
) -> dict[str, tuple[int, ...]] | None:
    """The shapes of the values ``names`` as ONNX Runtime runs ``graph`` (unoptimised) on
    ``example_input`` twice over (the graph's batch is dynamic), if its output is ``model``'s to
    float rounding; None if it is not, or does not run."""
    import onnxruntime as ort

    inputs = _twice(example_input)
    proto = ir.serde.serialize_model(graph)
    result = proto.graph.output[0].name
    extra = [name for name in names if name != result]
    proto.graph.output.extend(onnx.ValueInfoProto(name=name) for name in extra)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads, options.log_severity_level = 1, 4
    try:
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        got = session.run([result, *extra], _feeds(inputs, [value.name for value in session.get_inputs()]))
    except Exception:  # ONNX Runtime raises its own types for a graph whose shapes do not agree
        return None
    model.eval()
    with torch.no_grad():
        expected = reduce_output(call(model, inputs), output).detach().cpu().numpy()
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    if got[0].shape != expected.shape or not np.allclose(got[0], expected, rtol=1e-3, atol=1e-4 * scale):
        return None
    return {name: np.shape(array) for name, array in zip([result, *extra], got)}


def _resized(traced: ir.Shape, seen: tuple[int, ...], symbolic: set[str]) -> ir.Shape | None:
    """A value's shape as traced for another structure, its sizes those ``seen``: a dimension named
    as the graph's inputs name theirs (the batch) keeps its name, another symbolic one is unknown."""
    if len(traced) != len(seen):
        return None
    dims = [
        size if isinstance(dim, int) else ir.SymbolicDim(str(dim) if str(dim) in symbolic else None)
        for dim, size in zip(traced, seen)
    ]
    return ir.Shape(dims)


def _generalised(graph: ir.Graph) -> None:
    """In place: a ``Reshape`` to ``[batch, n]`` (``n`` a constant: a flatten) reshapes to ``[batch, -1]``,
    the same operation, that holds for any ``n``."""
    for node in list(graph):
        if node.op_type != "Reshape" or len(node.inputs) < 2 or len(node.inputs[1].uses()) != 1:
            continue
        concat = node.inputs[1].producer()
        if concat is None or concat.op_type != "Concat":
            continue
        known = [(index, _constant(value)) for index, value in enumerate(concat.inputs)]
        known = [(index, values) for index, values in known if values is not None]
        if len(known) != 1 or len(known[0][1]) != 1 or known[0][1][0] <= 0:
            continue
        index, _ = known[0]
        stale = concat.inputs[index]
        any_size = ir.node("Constant", [], attributes={"value_ints": [-1]})
        graph.insert_before(concat, any_size)
        concat.replace_input_with(index, any_size.outputs[0])
        if not stale.uses() and stale.producer() is not None:
            graph.remove(stale.producer(), safe=True)


def _constant(value: ir.Value | None) -> list[int] | None:
    """The integers of ``value`` where it is a constant (a ``Constant`` node's output, an initializer)."""
    if value is None:
        return None
    if value.const_value is not None:
        return np.asarray(value.const_value.numpy()).reshape(-1).tolist()
    producer = value.producer()
    if producer is None or producer.op_type != "Constant":
        return None
    attributes = producer.attributes
    if "value_ints" in attributes:
        return list(attributes["value_ints"].value)
    if "value" in attributes:
        return np.asarray(attributes["value"].value.numpy()).reshape(-1).tolist()
    return None
