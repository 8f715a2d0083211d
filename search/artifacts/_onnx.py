"""Export a fine-tuned candidate to the ONNX file the target's runtime runs, and run such files.

Conv and Gemm layers at 8 bits or fewer become int8 Q/DQ in the form ONNX Runtime accelerates on
CPUs: uint8 activations, int8 symmetric per-channel weights, Q/DQ around every op that can take it
(see RUNTIME_FACTS: int8 activations, or Q/DQ only at conv inputs, are slower or no faster than
fp32); in a model with layers that export as MatMuls (a Transformer, a ConvNeXt) around those
layers only. Linear layers on sequences (and an attention's packed Q/K/V projection) export as
MatMul: at int8 they are quantized dynamically
(``DynamicQuantizeMatMul``/``MatMulIntegerToFloat`` kernels; static Q/DQ there also quantizes the
attention products and costs accuracy), at 4 bits they become int4 weight-only ``MatMulNBits``
(``accuracy_level=4``, its only fast form) where the target lists ``int4-weight-only``.
Bit widths the target cannot run (int4 on Conv, 1-bit) run at int8, the nearest precision it
accelerates: 1-bit values (±alpha) are exact int8 levels; int4 levels move by at most half an int8
step (0.4 % of the channel's largest weight).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import shutil
import tempfile
import threading
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxscript.optimizer
import torch
from torch import nn

from profilers import disabled_optimizers
from search._errors import CandidateError
from search.artifacts._dynamic import quantize_dynamic
from search.compress import CALIBRATION_BATCHES
from search.model import (
    Inputs, Output, layer_weights, packed_projections, planned_with, reduced_output, split_batch, tensors,
)  # fmt: skip
from search.plan import Plan

INT4_BLOCK = 32  # MatMulNBits block size along the input dimension


@dataclasses.dataclass(frozen=True)
class ExportedModel:
    path: Path
    layer_precision: Mapping[str, str]  # what the runtime runs each planned layer at
    onnx_bytes: int


def runtime_precision(bits: int, precisions: Iterable[str], matmul: bool = False) -> str:
    """The precision a layer of ``bits`` runs at: the narrowest accelerated one that holds it.
    int4 exists only weight-only, on a MatMul (``matmul``: a Linear applied to a sequence)."""
    precisions = tuple(precisions)
    if bits <= 4 and matmul and "int4-weight-only" in precisions:
        return "int4"
    return "int8" if bits <= 8 and "int8" in precisions else "fp32"


@contextlib.contextmanager
def _quiet():
    """The exporters report every pass on stdout and through warnings, and print the graph on stderr
    when an export fails (the error, which the trial records, says why); a search runs hundreds."""
    silenced = contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO())
    with warnings.catch_warnings(), silenced[0], silenced[1]:
        warnings.simplefilter("ignore")
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(previous)


_REGISTRIES: dict = {}  # the exporter's ATen-to-ONNX tables, by how they were asked for
_EXPORTING = threading.Lock()


@contextlib.contextmanager
def _registry_built_once():
    """The dynamo exporter builds its table of ATen-to-ONNX functions anew for every export, parsing
    the source of each of torchlib's ~500 functions (0.7 s of a 1.5 s export of a small CNN). The
    table is the same for every export of a process, and ``torch.onnx.export`` changes it only for a
    ``custom_translation_table`` (never passed here): within this block it is built once and reused.
    A PyTorch without that table's builder where it is looked for exports as it would anyway."""
    try:
        from torch.onnx._internal.exporter import _registration

        registry_class = _registration.ONNXRegistry
        original = registry_class.__dict__["from_torchlib"]
        build = original.__func__
    except (ImportError, AttributeError, KeyError):
        yield
        return

    def reused(cls, *args, **kwargs):
        key = (cls, args, tuple(sorted(kwargs.items())))
        if key not in _REGISTRIES:
            _REGISTRIES[key] = build(cls, *args, **kwargs)
        return _REGISTRIES[key]

    with _EXPORTING:  # exports from threads (the service) take turns: each restores the builder
        registry_class.from_torchlib = classmethod(reused)
        try:
            yield
        finally:
            registry_class.from_torchlib = original


def _export_arguments(example_input: Inputs) -> dict:
    """``torch.onnx.export`` keywords for task inputs: a dict's keys name the graph's inputs, a tuple's
    are ``input_0``, ``input_1``, …; a single tensor keeps the name of the forward's argument. The
    batch dimension is dynamic on every input, the others fixed at the example's. The example goes
    in twice (batch 2): traced at batch 1, code that broadcasts over the batch makes torch.export
    specialise it to 1, and the graph would then take one sample only."""
    example_input = _twice(example_input)
    batch = {0: torch.export.Dim("batch")}
    if isinstance(example_input, Mapping):
        return {"args": (), "kwargs": dict(example_input), "dynamic_shapes": dict.fromkeys(example_input, batch)}
    if isinstance(example_input, torch.Tensor):
        return {"args": (example_input,), "dynamic_shapes": (batch,)}
    names = [f"input_{i}" for i in range(len(example_input))]
    return {"args": tuple(example_input), "input_names": names, "dynamic_shapes": (batch,) * len(names)}


def _twice(inputs: Inputs) -> Inputs:
    if isinstance(inputs, Mapping):
        return {key: torch.cat([value, value]) for key, value in inputs.items()}
    if isinstance(inputs, torch.Tensor):
        return torch.cat([inputs, inputs])
    return type(inputs)(torch.cat([value, value]) for value in inputs)


def export_raw(
    model: nn.Module, example_input: Inputs, path: Path, output: Output | None = None, *, weights: bool = True
) -> None:
    """torch.export-based ONNX export, one file, dynamic batch dimension, *not optimised*: every
    parameter and buffer stays an initializer under its state-dict name, so that
    :func:`with_weights` can write other weights of the same model into it without exporting again
    (the exporter's tracing is most of an export's time). The graph's one output is
    ``output(model's output)`` (the task's reduction), or the model's output tensor itself.

    ``weights=False`` leaves those initializers' data out (each refers to a file that is never
    written): the graph of the model's structure, which :func:`with_weights` fills with any weights
    of that structure: about 1 MB for MiniLM, whose weights take 90 MB."""
    model.eval()
    try:
        with _quiet(), torch.no_grad(), reduced_output(model, output), _registry_built_once():
            program = torch.onnx.export(
                model, f=None, dynamo=True, external_data=False, optimize=False, **_export_arguments(example_input)
            )
        if not weights:
            _leave_out(program.model.graph, model.state_dict())
        program.save(str(path))
    except Exception as exc:  # the exporter raises many types; the trial records the reason
        raise CandidateError(f"ONNX export failed: {type(exc).__name__}: {exc}".strip()) from exc


_LEFT_OUT = "weights-left-out"  # the file a graph exported without its weights refers them to


def _leave_out(graph: ir.Graph, state: Mapping[str, torch.Tensor]) -> None:
    """Replace the data of ``graph``'s initializers named in ``state`` by a reference to a file that
    does not exist: read only if something reads them before :func:`with_weights` writes them."""
    for name, value in graph.initializers.items():
        tensor = value.const_value
        if name in state and tensor is not None:
            value.const_value = ir.ExternalTensor(
                _LEFT_OUT, offset=0, length=tensor.nbytes, dtype=tensor.dtype, shape=tensor.shape, name=name
            )


def _write_state(graph: ir.Graph, state: Mapping[str, torch.Tensor]) -> None:
    """In place: the initializers of ``graph`` named in ``state`` hold its tensors, data and shape."""
    for name, value in graph.initializers.items():
        if name in state:
            array = state[name].detach().cpu().contiguous().numpy()
            value.const_value, value.shape = ir.tensor(array), ir.Shape(array.shape)


def with_weights(raw: Path, model: nn.Module, path: Path) -> None:
    """Write to ``path`` the graph of ``raw`` (:func:`export_raw` of a model of ``model``'s
    structure) holding ``model``'s state dict, optimised as the exporter optimises (BatchNorm
    folded, constants folded): the file :func:`export_float` writes for ``model``."""
    graph = ir.load(str(raw))
    _write_state(graph.graph, model.state_dict())
    try:
        with _quiet():
            onnxscript.optimizer.optimize(graph)
    except Exception as exc:
        raise CandidateError(f"ONNX optimisation failed: {type(exc).__name__}: {exc}".strip()) from exc
    _name_weights(graph.graph, model)
    ir.save(graph, str(path))


def export_float(model: nn.Module, example_input: Inputs, path: Path, output: Output | None = None) -> None:
    """torch.export-based ONNX export, one file, dynamic batch dimension, optimised; the graph's
    one output is ``output(model's output)`` (the task's reduction), or the model's output itself."""
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp, "raw.onnx")
        export_raw(model, example_input, raw, output)
        with_weights(raw, model, path)


def _name_weights(graph: ir.Graph, model: nn.Module) -> None:
    """In place: give every layer's weight a name the plan can find: ``<layer>.weight``, as the exporter
    names Conv and Gemm weights, or ``<layer>.weight.T`` for a Linear on a sequence (or an attention's
    packed projection, ``<attention>.in_proj.weight.T``), which exports as a MatMul by the
    transposed weight under an opaque name (``val_12``). Found by value."""
    initializers = graph.initializers
    renamed: set[int] = set()
    for name, weight in layer_weights(model).items():
        if f"{name}.weight" in initializers or weight.dim() != 2:
            continue
        transposed = weight.detach().cpu().numpy().T
        for value in list(initializers.values()):
            tensor = value.const_value
            if id(value) in renamed or tensor is None or tuple(tensor.shape) != transposed.shape:
                continue
            if np.array_equal(tensor.numpy(), transposed):
                value.name = f"{name}.weight.T"  # its uses and the initializers' key follow
                renamed.add(id(value))
                break


def weight_name(initializers: Iterable[str], layer: str) -> str | None:
    """The graph's name for ``layer``'s weight (see :func:`_name_weights`), if the graph has it."""
    names = set(initializers)
    return next((w for w in (f"{layer}.weight", f"{layer}.weight.T") if w in names), None)


def _weight_consumers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {node.input[1]: node for node in model.graph.node if len(node.input) > 1}


def _feeds(inputs: Inputs, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Task inputs as ONNX Runtime feeds for a graph whose inputs are ``names``: a dict by its keys,
    a tensor or tuple by position. Floating tensors go as float32 (what the export saw), others as they are."""
    pairs = inputs.items() if isinstance(inputs, Mapping) else zip(names, tensors(inputs), strict=True)
    arrays = {name: t.detach().cpu().numpy() for name, t in pairs}
    return {name: a.astype(np.float32) if np.issubdtype(a.dtype, np.floating) else a for name, a in arrays.items()}


def _graph_inputs(model: onnx.ModelProto) -> list[str]:
    weights = {initializer.name for initializer in model.graph.initializer}
    return [value.name for value in model.graph.input if value.name not in weights]


class _Calibration:
    """ONNX Runtime's CalibrationDataReader over the first batches of the training data."""

    def __init__(self, input_names: Sequence[str], batches: Iterable) -> None:
        self._feeds = iter(
            _feeds(split_batch(batch)[0], input_names) for _, batch in zip(range(CALIBRATION_BATCHES), batches)
        )

    def get_next(self):
        return next(self._feeds, None)


def _pre_process(float_path: Path, pre_path: Path) -> None:
    """ONNX Runtime's quantization pre-processing. Its symbolic shape inference fails on some exported
    graphs (an ``Expand`` to a shape built from ``Shape(attention_mask)``, as ``F.normalize`` after a
    masked pool exports); ONNX's own shape inference then gives the shapes, the batch left symbolic."""
    from onnxruntime.quantization import quant_pre_process

    try:
        quant_pre_process(str(float_path), str(pre_path))
    except Exception:  # the symbolic shape inference raises whatever its op handler hits
        quant_pre_process(str(float_path), str(pre_path), skip_symbolic_shape=True)


def export_candidate(
    model: nn.Module,
    example_input: Inputs,
    path: Path,
    *,
    plan: Plan,
    precisions: Iterable[str],
    calibration: Iterable,
    symmetric: bool = False,
    output: Output | None = None,
    raw: Path | None = None,
    quantized_graphs: Path | None = None,
) -> ExportedModel:
    """Write ``path``: float ONNX (see :func:`export_float`; from ``raw``, an :func:`export_raw` of
    the model's structure, when given: no second export), then the plan's int8 and int4 layers, as
    the module docstring says. Static int8 is calibrated on the first ``(inputs, labels)`` batches
    of ``calibration``.

    Activations are uint8 with a zero point, the only form ONNX Runtime's CPU kernels run fast;
    ``symmetric``: int8 activations with zero point 0 and static Q/DQ on every layer (MatMuls too),
    the only form TensorRT takes. ``quantized_graphs``: a folder where the dynamically quantized
    graphs are kept for other files of the same graph (:mod:`search.artifacts._dynamic`).
    """
    plan = plan.student()
    precisions, path = tuple(precisions), Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        current = Path(tmp, "float.onnx")
        if raw is None:
            export_float(model, example_input, current, output)
        else:
            with_weights(raw, model, current)
        float_graph = onnx.load(str(current))
        nodes = _layer_nodes(float_graph, layer_weights(model))
        projections = packed_projections(model)
        planned = {name: planned_with(name) if name in projections else name for name in nodes}
        wanted = {
            name: runtime_precision(plan.layer(planned[name]).quantization.bits, precisions, node.op_type == "MatMul")
            for name, node in nodes.items()
        }
        dynamic = {n for n, p in wanted.items() if p == "int8" and nodes[n].op_type == "MatMul" and not symmetric}
        static = {n for n, p in wanted.items() if p == "int8"} - dynamic
        int4 = {n for n, p in wanted.items() if p == "int4"}
        sequences = any(node.op_type == "MatMul" for node in nodes.values())
        try:
            with _quiet():
                if static:
                    keep_float = set(nodes) - static
                    current = _quantize_static(
                        current, Path(tmp, "static.onnx"), calibration, symmetric, static, keep_float, sequences
                    )
                if int4:
                    current = _quantize_int4(current, Path(tmp, "int4.onnx"), int4)
                if dynamic:
                    source = onnx.load(str(current)) if static or int4 else float_graph
                    current = _quantize_dynamic(current, source, Path(tmp, "dynamic.onnx"), dynamic, quantized_graphs)
        except Exception as exc:
            raise CandidateError(f"quantization failed: {type(exc).__name__}: {exc}") from exc
        shutil.move(current, path)
    return ExportedModel(path, layer_precision(path, model), path.stat().st_size)


def _layer_nodes(model: onnx.ModelProto, layers: Iterable[str]) -> dict[str, onnx.NodeProto]:
    """The node that consumes each layer's weight in ``model`` (a layer the graph lacks is left out)."""
    consumers = _weight_consumers(model)
    return {name: consumers[w] for name in layers if (w := weight_name(consumers, name)) is not None}


def _quantize_static(
    source: Path, target: Path, calibration: Iterable, symmetric: bool, layers: set[str], keep_float: set[str],
    sequences: bool,
) -> Path:
    """Q/DQ around every op but the layers in ``keep_float`` (and the other precisions' layers); in a
    model of ``sequences`` (a layer exports as a MatMul: a Transformer, a ConvNeXt) around the
    ``layers`` only, as the candidate was fine-tuned: Q/DQ there would also quantize the attention
    products, the softmax and the norms, slower on ONNX Runtime's CPU kernels than Q/DQ at the
    layers alone, and not what PyTorch ran."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    pre_path = target.with_suffix(".pre.onnx")
    _pre_process(source, pre_path)
    pre = onnx.load(str(pre_path))
    quantize_static(
        str(pre_path),
        str(target),
        _Calibration(_graph_inputs(pre), calibration),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        nodes_to_exclude=[node.name for node in _layer_nodes(pre, keep_float).values()],
        nodes_to_quantize=[node.name for node in _layer_nodes(pre, layers).values()] if sequences else None,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True},
    )
    return target


def _quantize_int4(source: Path, target: Path, layers: set[str]) -> Path:
    """int4 weight-only, symmetric blocks of :data:`INT4_BLOCK`, ``accuracy_level=4`` (int8 compute)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    graph = onnx.load(str(source))
    wanted = {node.name for node in _layer_nodes(graph, layers).values()}
    quantizer = MatMulNBitsQuantizer(  # it packs every MatMul it can but those excluded
        graph, block_size=INT4_BLOCK, is_symmetric=True, accuracy_level=4,
        nodes_to_exclude=[node.name for node in graph.graph.node if node.name not in wanted],
    )  # fmt: skip
    quantizer.process()
    quantizer.model.save_model_to_file(str(target), False)
    return target


def _quantize_dynamic(
    source: Path, model: onnx.ModelProto, target: Path, layers: set[str], kept: Path | None
) -> Path:
    """The MatMuls of ``layers`` in ``source`` (whose model is ``model``) quantized dynamically
    (:func:`~search.artifacts._dynamic.quantize_dynamic`)."""
    quantize_dynamic(model, source, target, [node.name for node in _layer_nodes(model, layers).values()], kept)
    return target


def layer_precision(path: Path, model: nn.Module) -> dict[str, str]:
    """Read back from the file what each of ``model``'s layers runs at: ``int4`` (its weight packed
    into a MatMulNBits), ``int8`` (its weight quantized, behind a DequantizeLinear or inside an
    integer MatMul) or ``fp32``; an attention's packed projection too (``<attention>.in_proj``)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    quantized = {init.name.removesuffix("_quantized") for init in graph.initializer if init.name.endswith("_quantized")}
    packed = {node.input[1].rsplit("_Q", 1)[0] for node in graph.node if node.op_type == "MatMulNBits"}
    precision = {}
    for name in layer_weights(model):
        weights = {f"{name}.weight", f"{name}.weight.T"}
        precision[name] = "int4" if weights & packed else "int8" if weights & quantized else "fp32"
    return precision


class OnnxModule(nn.Module):
    """An exported ONNX file behind an ``nn.Module`` forward, so a task's metric scores the deployed model.

    It is called as the torch model is: ``module(x)``, ``module(*x)`` or ``module(**x)``, and returns
    the graph's output, the task's reduced output tensor. Its session runs ORT's graph optimizations
    as the CPU profiler's do (:func:`profilers.disabled_optimizers`).
    """

    def __init__(self, path: Path, threads: int | None = None) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"],
                disabled_optimizers=list(disabled_optimizers()),
            )
        except Exception as exc:
            raise CandidateError(f"ONNX Runtime cannot load {Path(path).name}: {exc}") from exc
        self.input_names = [value.name for value in self.session.get_inputs()]

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        inputs = kwargs or (args[0] if len(args) == 1 else args)
        return torch.from_numpy(self.session.run(None, _feeds(inputs, self.input_names))[0])
