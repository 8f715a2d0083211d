"""A candidate turned into what the target's runtime runs, and measured there: the ONNX file
(int8 Q/DQ, int4 ``MatMulNBits``, read back layer by layer), run in ONNX Runtime to score it
(:class:`OnnxModule`), or, on a runtime that runs PyTorch modules, the module itself made ready
for the target (:func:`module_artifact`); :func:`measure_candidate` hands either to the profiler."""

from search.artifacts._graphs import QUANTIZED, StructureGraphs
from search.artifacts._measure import measure_candidate
from search.artifacts._onnx import (
    INT4_BLOCK,
    ExportedModel,
    OnnxModule,
    export_candidate,
    export_float,
    export_raw,
    layer_precision,
    runtime_precision,
    weight_name,
    with_weights,
)
from search.artifacts._pytorch import Prepared, float_precision, module_artifact, prepare, torchao_version

__all__ = [
    "INT4_BLOCK",
    "QUANTIZED",
    "ExportedModel",
    "OnnxModule",
    "Prepared",
    "StructureGraphs",
    "export_candidate",
    "export_float",
    "export_raw",
    "float_precision",
    "layer_precision",
    "measure_candidate",
    "module_artifact",
    "prepare",
    "runtime_precision",
    "torchao_version",
    "weight_name",
    "with_weights",
]
