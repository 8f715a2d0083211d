"""Export a fine-tuned candidate to the ONNX file the target's runtime runs, and run such files.

Layers at 8 bits or fewer become int8 Q/DQ in the form ONNX Runtime accelerates on CPUs: uint8
activations, int8 symmetric per-channel weights, Q/DQ around every op that can take it (see
RUNTIME_FACTS: int8 activations, or Q/DQ only at conv inputs, are slower or no faster than fp32).
Bit widths the target cannot run (int4 and 1-bit on CPU) run at int8, the nearest precision it
accelerates: 1-bit values (±alpha) are exact int8 levels; int4 levels move by at most half an int8
step (0.4 % of the channel's largest weight).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import tempfile
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from search._errors import CandidateError
from search._io import Inputs, Output, reduced_output, split_batch, tensors
from search._layers import compressible_layers
from search._plan import Plan

CALIBRATION_BATCHES = 8


@dataclasses.dataclass(frozen=True)
class ExportedModel:
    path: Path
    layer_precision: Mapping[str, str]  # what the runtime runs each planned layer at
    onnx_bytes: int


def runtime_precision(bits: int, precisions: Iterable[str]) -> str:
    """The precision a layer of ``bits`` runs at: the narrowest accelerated one that holds it."""
    return "int8" if bits <= 8 and "int8" in precisions else "fp32"


@contextlib.contextmanager
def _quiet():
    """The exporters report every pass on stdout and through warnings; a search runs hundreds."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(previous)


def _export_arguments(example_input: Inputs) -> dict:
    """``torch.onnx.export`` keywords for task inputs: a dict's keys name the graph's inputs, a tuple's
    are ``input_0``, ``input_1``, …; a single tensor keeps the name of the forward's argument. The
    batch dimension is dynamic on every input, the others fixed at the example's."""
    batch = {0: torch.export.Dim("batch")}
    if isinstance(example_input, Mapping):
        return {"args": (), "kwargs": dict(example_input), "dynamic_shapes": dict.fromkeys(example_input, batch)}
    if isinstance(example_input, torch.Tensor):
        return {"args": (example_input,), "dynamic_shapes": (batch,)}
    names = [f"input_{i}" for i in range(len(example_input))]
    return {"args": tuple(example_input), "input_names": names, "dynamic_shapes": (batch,) * len(names)}


def export_float(model: nn.Module, example_input: Inputs, path: Path, output: Output | None = None) -> None:
    """torch.export-based ONNX export, one file, dynamic batch dimension; the graph's one output is
    ``output(model's output)`` (the task's reduction), or the model's output tensor itself."""
    model.eval()
    try:
        with _quiet(), torch.no_grad(), reduced_output(model, output):
            torch.onnx.export(
                model, f=str(path), dynamo=True, external_data=False, **_export_arguments(example_input)
            )
    except Exception as exc:  # the exporter raises many types; the trial records the reason
        raise CandidateError(f"ONNX export failed: {type(exc).__name__}: {exc}".strip()) from exc


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
) -> ExportedModel:
    """Write ``path``: float ONNX (see :func:`export_float`), then int8 Q/DQ for the plan's
    int8-running layers if any, calibrated on the first ``(inputs, labels)`` batches of ``calibration``.

    Activations are uint8 with a zero point, the only form ONNX Runtime's CPU kernels run fast;
    ``symmetric``: int8 activations with zero point 0, the only form TensorRT takes.
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    precisions = tuple(precisions)
    wanted = {
        name: runtime_precision(plan.layer(name).quantization.bits, precisions)
        for name in compressible_layers(model)
    }
    path = Path(path)
    if "int8" not in wanted.values():
        export_float(model, example_input, path, output)
        return ExportedModel(path, _layer_precision(path, wanted), path.stat().st_size)

    with tempfile.TemporaryDirectory() as tmp:
        float_path, pre_path = Path(tmp, "float.onnx"), Path(tmp, "pre.onnx")
        export_float(model, example_input, float_path, output)
        try:
            with _quiet():
                _pre_process(float_path, pre_path)
                pre = onnx.load(str(pre_path))
                consumers = _weight_consumers(pre)
                keep_float = [
                    consumers[f"{name}.weight"].name
                    for name, precision in wanted.items()
                    if precision == "fp32" and f"{name}.weight" in consumers
                ]
                quantize_static(
                    str(pre_path),
                    str(path),
                    _Calibration(_graph_inputs(pre), calibration),
                    quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    per_channel=True,
                    nodes_to_exclude=keep_float,
                    calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True},
                )
        except Exception as exc:
            raise CandidateError(f"int8 quantization failed: {type(exc).__name__}: {exc}") from exc
    return ExportedModel(path, _layer_precision(path, wanted), path.stat().st_size)


def _layer_precision(path: Path, wanted: Mapping[str, str]) -> dict[str, str]:
    """Read back from the file which planned layers really are int8 (weight behind a DequantizeLinear)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    dequantized = {node.input[0] for node in graph.node if node.op_type == "DequantizeLinear"}
    return {
        name: "int8" if f"{name}.weight_quantized" in dequantized else "fp32"
        for name in wanted
    }


class OnnxModule(nn.Module):
    """An exported ONNX file behind an ``nn.Module`` forward, so a task's metric scores the deployed model.

    It is called as the torch model is: ``module(x)``, ``module(*x)`` or ``module(**x)``, and returns
    the graph's output, the task's reduced output tensor.
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
                disabled_optimizers=["WeightBiasQuantization"],
            )
        except Exception as exc:
            raise CandidateError(f"ONNX Runtime cannot load {Path(path).name}: {exc}") from exc
        self.input_names = [value.name for value in self.session.get_inputs()]

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        inputs = kwargs or (args[0] if len(args) == 1 else args)
        return torch.from_numpy(self.session.run(None, _feeds(inputs, self.input_names))[0])
