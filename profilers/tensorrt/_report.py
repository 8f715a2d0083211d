"""The per-layer report: the engine inspector's JSON and the ``IProfiler`` callbacks, read into
one row per engine layer with its time, precision, tactic and the ONNX nodes it came from."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# Engine layers that do a network's heavy work; the precision of a plan is read from these.
_COMPUTE_KINDS = frozenset(
    {"Convolution", "Deconvolution", "FullyConnected", "MatrixMultiply", "Gemm"}
)
_COMPUTE_TYPE = re.compile(r"conv|gemm|matrixmultiply|matmul", re.IGNORECASE)
_PRECISION_ORDER = ("fp8", "int4", "int8", "fp16", "bf16", "fp32")
_PRECISION_TOKENS = (  # checked in order: "UInt8" before "Int8"
    (re.compile(r"\buint8\b", re.IGNORECASE), "uint8"),
    (re.compile(r"\bint8\b", re.IGNORECASE), "int8"),
    (re.compile(r"\bint4\b", re.IGNORECASE), "int4"),
    (re.compile(r"\bfp8\b", re.IGNORECASE), "fp8"),
    (re.compile(r"\b(?:fp16|half)\b", re.IGNORECASE), "fp16"),
    (re.compile(r"\b(?:bf16|bfloat16)\b", re.IGNORECASE), "bf16"),
    (re.compile(r"\b(?:fp32|float)\b", re.IGNORECASE), "fp32"),
    (re.compile(r"\bint32\b", re.IGNORECASE), "int32"),
    (re.compile(r"\bint64\b", re.IGNORECASE), "int64"),
    (re.compile(r"\bbool\b", re.IGNORECASE), "bool"),
)
_ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^|\]]+?)\s*(?:\|[^\]]*)?\]")



@dataclasses.dataclass(frozen=True)
class EngineLayer:
    """One layer of a built engine, as the engine inspector describes it."""

    name: str
    type: str | None = None
    kind: str | None = None  # ParameterType: Convolution, FullyConnected, Reformat, ...
    precision: str | None = None
    tactic: str | None = None
    onnx_nodes: tuple[str, ...] = ()


def parse_engine_information(text: str | Mapping[str, Any]) -> list[EngineLayer]:
    """The layers in the JSON of ``IEngineInspector.get_engine_information(JSON)``.

    Reads TensorRT 10's layout (tensors with a ``Format/Datatype`` string) and 11's (separate
    ``DataType`` and ``Format``). An engine built without DETAILED profiling verbosity lists only
    layer names; its layers have no precision or tactic. A layer's precision is that of its
    weights where it has some, else of its first input, else of its first output.
    """
    data = json.loads(text) if isinstance(text, (str, bytes)) else text
    layers = data.get("Layers", []) if isinstance(data, Mapping) else []
    parsed = []
    for layer in layers:
        if isinstance(layer, str):
            parsed.append(EngineLayer(name=layer))
            continue
        if not isinstance(layer, Mapping) or "Name" not in layer:
            continue
        parsed.append(
            EngineLayer(
                name=str(layer["Name"]),
                type=layer.get("LayerType"),
                kind=layer.get("ParameterType"),
                precision=_layer_precision(layer),
                tactic=layer.get("TacticName") or None,
                onnx_nodes=tuple(_ONNX_LAYER.findall(str(layer.get("Metadata", "")))),
            )
        )
    return parsed


def _layer_precision(layer: Mapping[str, Any]) -> str | None:
    weights = layer.get("Weights")
    if isinstance(weights, Mapping) and weights.get("Type"):
        found = _precision_of(str(weights["Type"]))
        if found:
            return found
    for key in ("Inputs", "Outputs"):
        tensors = layer.get(key) or []
        if tensors and isinstance(tensors[0], Mapping):
            found = _tensor_precision(tensors[0])
            if found:
                return found
    return None


def _tensor_precision(tensor: Mapping[str, Any]) -> str | None:
    for key in ("DataType", "Format/Datatype", "Format/DataType", "Format"):
        if tensor.get(key):
            found = _precision_of(str(tensor[key]))
            if found:
                return found
    return None


def _precision_of(text: str) -> str | None:
    for pattern, precision in _PRECISION_TOKENS:
        if pattern.search(text):
            return precision
    return None


class LayerTimes:
    """Collects ``IProfiler.report_layer_time`` callbacks: TensorRT calls it once per layer after
    each profiled inference. :meth:`per_inference` gives each layer's mean milliseconds."""

    def __init__(self) -> None:
        self.total_ms: dict[str, float] = {}
        self.runs = 0

    def report_layer_time(self, layer_name: str, ms: float) -> None:
        self.total_ms[layer_name] = self.total_ms.get(layer_name, 0.0) + float(ms)

    def per_inference(self) -> dict[str, float]:
        if not self.runs:
            return {}
        return {name: total / self.runs for name, total in self.total_ms.items()}


def layer_report(
    layers: Sequence[EngineLayer],
    layer_ms: Mapping[str, float],
    *,
    int8_nodes: Iterable[str] = (),
    sparse_nodes: Iterable[str] = (),
    sparse_enabled: bool = False,
) -> tuple[dict[str, object], ...]:
    """One entry per engine layer, slowest first: ``name``, ``type``, ``ms`` (per inference),
    ``share`` of the summed layer time, ``precision``, ``tactic``, ``onnx_nodes`` and a ``note``
    saying why the layer may not be as fast as the plan wanted, or None:

    - an ONNX node the plan quantized (``int8_nodes``) in a layer that did not run int8;
    - a 2:4 sparse weight (``sparse_nodes``) in a layer whose tactic is not a sparse kernel,
      although ``SPARSE_WEIGHTS`` was set (``sparse_enabled``);
    - a reformat layer: time spent converting between precisions or memory layouts.

    Layers the profiler did not time (constants folded away) are left out; with no times at all
    (``layer_ms`` empty), every layer is listed with ``ms`` and ``share`` None.
    """
    int8_nodes, sparse_nodes = set(int8_nodes), set(sparse_nodes)
    known = {layer.name: layer for layer in layers}
    names = list(layer_ms) if layer_ms else list(known)
    total = sum(layer_ms.values())
    entries = []
    for name in names:
        layer = known.get(name, EngineLayer(name=name))
        ms = layer_ms.get(name)
        entries.append({
            "name": name,
            "type": layer.type,
            "ms": ms,
            "share": (ms / total if total > 0 else 0.0) if ms is not None else None,
            "precision": layer.precision,
            "tactic": layer.tactic,
            "onnx_nodes": list(layer.onnx_nodes),
            "note": _note(layer, int8_nodes, sparse_nodes, sparse_enabled),
        })  # fmt: skip
    entries.sort(key=lambda entry: -(entry["ms"] or 0.0))
    return tuple(entries)


def _note(
    layer: EngineLayer, int8_nodes: set[str], sparse_nodes: set[str], sparse_enabled: bool
) -> str | None:
    notes = []
    wanted_int8 = [node for node in layer.onnx_nodes if node in int8_nodes]
    if wanted_int8 and layer.precision not in (None, "int8"):
        notes.append(
            f"the plan quantized {wanted_int8[0]} to int8, but this layer ran in "
            f"{layer.precision}: its Q/DQ nodes did not fuse into an int8 kernel"
        )
    sparse = [node for node in layer.onnx_nodes if node in sparse_nodes]
    if sparse and sparse_enabled and layer.tactic and "sparse" not in layer.tactic.lower():
        notes.append(
            f"{sparse[0]} has 2:4 sparse weights, but TensorRT chose a dense kernel (no sparse "
            "kernel for this shape or precision, or a dense one was faster)"
        )
    if _is_reformat(layer):
        notes.append(
            "a conversion TensorRT inserted between precisions or memory layouts (around a "
            "float island in an int8 graph, or at the inputs and outputs)"
        )
    return "; ".join(notes) or None


def _is_reformat(layer: EngineLayer) -> bool:
    return "reformat" in f"{layer.type} {layer.kind}".lower()


def engine_precision(layers: Sequence[EngineLayer]) -> str:
    """The precisions the engine computes in, such as ``"int8+fp16"``, judged from its
    convolution and matrix layers (all layers but reformats when it has none); ``"unknown"``
    when the engine does not say (built without DETAILED profiling verbosity)."""
    compute = [
        layer
        for layer in layers
        if layer.kind in _COMPUTE_KINDS or (layer.type and _COMPUTE_TYPE.search(layer.type))
    ]
    if not compute:
        compute = [layer for layer in layers if not _is_reformat(layer)]
    found = {layer.precision for layer in compute if layer.precision in _PRECISION_ORDER}
    order = {precision: i for i, precision in enumerate(_PRECISION_ORDER)}
    return "+".join(sorted(found, key=order.__getitem__)) or "unknown"
