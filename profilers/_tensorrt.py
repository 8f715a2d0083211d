"""TensorRT on an NVIDIA GPU or Jetson (``runtime = "tensorrt"``), written against the TensorRT
10+ Python API, with CUDA memory, streams and events from ``cuda-python``.

Neither ``tensorrt`` nor ``cuda-python`` is imported by this module: only building or running an
engine imports them (:func:`import_tensorrt`, :func:`import_cudart`), so ``import profilers``
works, and touches no GPU, on a machine without either. Everything that needs no GPU is a plain
function here, tested without one:

- :func:`summarise_graph`: what the ONNX holds that TensorRT cares about (Q/DQ nodes, fp16
  tensors, 2:4 sparse weights, Q/DQ that TensorRT cannot take);
- :func:`build_plan`: the network and builder flags, from the target's precisions, the graph and
  the TensorRT version (10.x builds weakly typed networks with precision flags; 11.x has only
  strongly typed networks and rejects the FP16/INT8 flags);
- :func:`engine_cache_key`: the engine cache key, so a repeated plan never rebuilds;
- :func:`build_serialized_engine`: the build itself, against a ``tensorrt`` module passed in;
- :func:`parse_engine_information` and :func:`layer_report`: the per-layer report from the engine
  inspector's JSON and the ``IProfiler`` callbacks;
- :func:`default_timing`: trtexec-like timing knobs for the target.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import numpy as np
import onnx
from onnx import numpy_helper

from profilers._base import Measurement, Profiler, random_inputs
from profilers._energy import EnergyReader, optional_energy_reader, sensor_device_state
from search._errors import CandidateError, TargetUnavailableError
from targets import Target

__all__ = [
    "BuildPlan",
    "DEFAULT_ENGINE_DIR",
    "EngineLayer",
    "GraphSummary",
    "LayerTimes",
    "TensorRTProfiler",
    "build_plan",
    "build_serialized_engine",
    "default_timing",
    "engine_cache_key",
    "engine_precision",
    "is_two_four_sparse",
    "layer_report",
    "parse_engine_information",
    "summarise_graph",
    "tensorrt_unavailable_reason",
]

logger = logging.getLogger(__name__)

DEFAULT_ENGINE_DIR = Path("results/engines")
# Bumped whenever the way an engine is built changes, so older cached engines are not reused.
_CACHE_LAYOUT = 1
_MISSING_TENSORRT = (
    "the TensorRT profiler needs the tensorrt package (10 or newer) on the device: "
    "pip install '.[tensorrt]' (on a Jetson, the one JetPack installs)"
)
_MISSING_CUDA = (
    "the TensorRT profiler needs CUDA's Python bindings for memory, streams and events: "
    "pip install cuda-python (a 12.x release on a CUDA 12 device such as a JetPack 6 Jetson)"
)
# Nodes whose weight (input 1) TensorRT can run at a reduced precision, with the axis of that
# weight the 2:4 pattern runs along (the input channels); Gemm depends on transB.
_WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_PASS_THROUGH = frozenset({"DequantizeLinear", "QuantizeLinear", "Identity", "Cast"})
_QDQ = frozenset({"QuantizeLinear", "DequantizeLinear"})
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


# --- What the ONNX graph holds ------------------------------------------------------------------


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


# --- Builder flags ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BuildPlan:
    """How to build one engine: ``NetworkDefinitionCreationFlag`` and ``BuilderFlag`` member
    names, and notes for the user on what the build will and will not do."""

    tensorrt_version: str
    network_flags: tuple[str, ...] = ()
    builder_flags: tuple[str, ...] = ()
    strongly_typed: bool = False
    notes: tuple[str, ...] = ()


def tensorrt_major(version: str) -> int:
    """The major version in a ``tensorrt.__version__`` such as ``"10.3.0"``."""
    head = version.split(".", 1)[0]
    if not head.isdigit():
        raise ValueError(f"TensorRT version {version!r}: expected something like 10.3.0")
    return int(head)


def build_plan(
    precisions: Iterable[str],
    graph: GraphSummary,
    tensorrt_version: str,
    *,
    strongly_typed: bool | None = None,
) -> BuildPlan:
    """The flags for building ``graph`` with TensorRT ``tensorrt_version`` for a target that
    accelerates ``precisions``.

    TensorRT 10.x, by default, builds a weakly typed network: ``FP16`` when the target lists
    fp16 (TensorRT may then run any float layer in fp16), and ``INT8`` when the graph holds Q/DQ
    nodes: explicit quantization, where int8 runs exactly where the Q/DQ nodes say (implicit
    calibration is deprecated and never used). ``strongly_typed=True`` builds it with
    ``STRONGLY_TYPED`` instead: every layer in the type the ONNX gives it, no precision flags.

    TensorRT 11.x has only strongly typed networks and no FP16/INT8 flags, so a float layer runs
    in the ONNX's own float type there. ``SPARSE_WEIGHTS`` (in both) lets TensorRT pick sparse
    kernels for the 2:4 weights, when the target lists sparse-2:4 and the graph has some.
    """
    precisions = tuple(precisions)
    major = tensorrt_major(tensorrt_version)
    if major < 10:
        raise ValueError(f"TensorRT {tensorrt_version} is too old: this profiler needs 10 or newer")
    notes = []
    if major >= 11:
        if strongly_typed is False:
            notes.append(f"TensorRT {tensorrt_version} builds only strongly typed networks")
        typed, network_flags = True, ()  # the default, and the only kind there is
    else:
        typed = bool(strongly_typed)
        network_flags = ("STRONGLY_TYPED",) if typed else ()
    builder_flags = []
    if not typed:
        if "fp16" in precisions:
            builder_flags.append("FP16")
        if graph.has_qdq:
            builder_flags.append("INT8")
            if "int8" not in precisions:
                notes.append(
                    "the graph holds Q/DQ nodes, so it runs int8 where they say, although the "
                    "target does not list int8"
                )
    elif "fp16" in precisions and not graph.has_fp16:
        notes.append(
            "strongly typed network: float layers run in fp32, as the ONNX types them; convert "
            "the ONNX to fp16 (ModelOpt AutoCast) for fp16 kernels"
        )
    if graph.sparse_nodes:
        if "sparse-2:4" in precisions:
            builder_flags.append("SPARSE_WEIGHTS")
        else:
            notes.append(
                f"{len(graph.sparse_nodes)} layer(s) have 2:4 sparse weights, but the target "
                "does not list sparse-2:4: built without SPARSE_WEIGHTS"
            )
    return BuildPlan(
        tensorrt_version=tensorrt_version,
        network_flags=network_flags,
        builder_flags=tuple(builder_flags),
        strongly_typed=typed,
        notes=tuple(notes),
    )


# --- Engine cache -------------------------------------------------------------------------------


def engine_cache_key(
    onnx_path: str | Path,
    *,
    target: str,
    plan: BuildPlan,
    gpu: str,
    input_shapes: Mapping[str, Sequence[int]],
    workspace_bytes: int | None = None,
) -> str:
    """The sha256 naming the engine built from ``onnx_path`` (its bytes and those of its external
    data files) for ``target`` on ``gpu`` with ``plan`` (TensorRT version and flags), for
    inputs of ``input_shapes``: everything the engine depends on, so that an equal key can reuse
    the engine and any change builds a new one."""
    path = Path(onnx_path)
    digest = hashlib.sha256()
    try:
        _hash_file(digest, path)
        for location in _external_data_files(path):
            digest.update(location.encode())
            _hash_file(digest, path.parent / location)
    except OSError as exc:
        raise CandidateError(f"{path}: cannot read the model: {exc.strerror or exc}") from exc
    settings = {
        "layout": _CACHE_LAYOUT,
        "target": target,
        "tensorrt": plan.tensorrt_version,
        "network_flags": sorted(plan.network_flags),
        "builder_flags": sorted(plan.builder_flags),
        "gpu": gpu,
        "input_shapes": {name: [int(d) for d in shape] for name, shape in input_shapes.items()},
        "workspace_bytes": workspace_bytes,
    }
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()


def _hash_file(digest: Any, path: Path) -> None:
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)


def _external_data_files(path: Path) -> list[str]:
    """The external data files the model at ``path`` names, relative to its folder, sorted."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise CandidateError(f"{path}: not an ONNX model: {exc}") from exc
    locations = set()
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            entries = {entry.key: entry.value for entry in tensor.external_data}
            if "location" in entries:
                locations.add(entries["location"])
    return sorted(locations)


def engine_path(engine_dir: str | Path, target: str, key: str) -> Path:
    return Path(engine_dir) / f"{target}-{key}.engine"


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, so a reader (or a
    concurrent worker) never sees half an engine."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --- Building an engine -------------------------------------------------------------------------


def build_serialized_engine(
    trt: ModuleType,
    onnx_path: str | Path,
    plan: BuildPlan,
    input_shapes: Mapping[str, Sequence[int]],
    *,
    workspace_bytes: int | None = None,
    hint: str = "",
    trt_logger: Any | None = None,
) -> bytes:
    """Build the engine for ``onnx_path`` with the ``tensorrt`` module ``trt``, following ``plan``;
    dynamic input dimensions are fixed to ``input_shapes`` (one optimization profile, min = opt
    = max). Profiling verbosity is DETAILED, so the engine inspector reports each layer's
    precision and tactic.

    Raises :class:`~search._errors.CandidateError` with TensorRT's own reason when the parser
    rejects the model (its errors, with the node) or the build fails (``build_serialized_network``
    returns None: an unsupported layer, out of memory; the reason is what TensorRT logged).
    ``hint`` is appended to those messages.
    """
    log = trt_logger if trt_logger is not None else capturing_logger(trt)
    builder = trt.Builder(log)
    flags = 0
    for name in plan.network_flags:
        flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, log)
    if not parser.parse_from_file(str(onnx_path)):
        raise CandidateError(
            f"{onnx_path}: TensorRT {plan.tensorrt_version} cannot parse the model: "
            f"{parser_errors(parser) or _logged(log)}{hint}"
        )
    config = builder.create_builder_config()
    for name in plan.builder_flags:
        flag = getattr(trt.BuilderFlag, name, None)
        if flag is None:
            raise CandidateError(
                f"TensorRT {getattr(trt, '__version__', '?')} has no BuilderFlag.{name} (the "
                f"flags were chosen for TensorRT {plan.tensorrt_version})"
            )
        config.set_flag(flag)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    inputs = {
        network.get_input(i).name: tuple(network.get_input(i).shape)
        for i in range(network.num_inputs)
    }
    shapes = profile_shapes(inputs, input_shapes, onnx_path)
    if shapes:
        profile = builder.create_optimization_profile()
        for name, shape in shapes.items():
            profile.set_shape(name, shape, shape, shape)
        config.add_optimization_profile(profile)
    try:
        serialized = builder.build_serialized_network(network, config)
    except Exception as exc:  # the bindings raise what the C++ side threw, of many types
        raise CandidateError(
            f"{onnx_path}: TensorRT {plan.tensorrt_version} failed to build an engine: "
            f"{type(exc).__name__}: {exc}{hint}"
        ) from exc
    if serialized is None:
        raise CandidateError(
            f"{onnx_path}: TensorRT {plan.tensorrt_version} could not build an engine: "
            f"{_logged(log)}{hint}"
        )
    return bytes(serialized)


def profile_shapes(
    network_inputs: Mapping[str, Sequence[int]],
    input_shapes: Mapping[str, Sequence[int]],
    onnx_path: str | Path = "the model",
) -> dict[str, tuple[int, ...]]:
    """The shape to fix each dynamic network input to (those with a -1 dimension), from
    ``input_shapes``; static inputs need no profile. Raises CandidateError for a dynamic input
    without a shape, or a shape that does not fit the input's static dimensions."""
    shapes = {}
    for name, dims in network_inputs.items():
        if all(d >= 0 for d in dims):
            continue
        if name not in input_shapes:
            raise CandidateError(
                f"{onnx_path}: input {name!r} has dynamic dimensions {list(dims)} and no shape to "
                f"build for; given: {sorted(input_shapes)}"
            )
        shape = tuple(int(d) for d in input_shapes[name])
        if len(shape) != len(dims) or any(
            d >= 0 and d != s for d, s in zip(dims, shape, strict=True)
        ):
            raise CandidateError(
                f"{onnx_path}: input {name!r} of dimensions {list(dims)} cannot take shape "
                f"{list(shape)}"
            )
        shapes[name] = shape
    return shapes


def parser_errors(parser: Any) -> str:
    """The ONNX parser's errors, one per line: code, description, and the node it was parsing."""
    lines = []
    for i in range(parser.num_errors):
        error = parser.get_error(i)
        node = _call_or_none(error, "node_name") or _call_or_none(error, "node")
        operator = _call_or_none(error, "node_operator")
        where = ""
        if node not in (None, "", -1):
            where = f" (node {node}{f', {operator}' if operator else ''})"
        lines.append(f"{_call_or_none(error, 'code')}: {_call_or_none(error, 'desc')}{where}")
    return "; ".join(lines)


def _call_or_none(obj: Any, method: str) -> Any:
    function = getattr(obj, method, None)
    if function is None:
        return None
    try:
        return function()
    except Exception:  # noqa: BLE001 (an accessor this version does not implement)
        return None


def capturing_logger(trt: ModuleType) -> Any:
    """A ``trt.ILogger`` that keeps TensorRT's error messages in ``.errors`` (the reason a build
    returned None) and passes warnings to this module's logger."""

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(msg)
            elif severity == trt.ILogger.Severity.WARNING:
                logger.debug("TensorRT: %s", msg)

    return _Logger()


def _logged(log: Any) -> str:
    errors = getattr(log, "errors", None)
    return "; ".join(errors) if errors else "TensorRT gave no reason"


# --- The per-layer report -----------------------------------------------------------------------


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


# --- Timing knobs -------------------------------------------------------------------------------


def default_timing(target: Target, **given: float) -> dict[str, float]:
    """trtexec-like timing for ``target``, overridden by ``given``: 200 ms of warm-up, then timed
    runs for at least 1 s on a discrete GPU and 3 s on a Jetson (trtexec's default duration),
    whose clocks settle more slowly and whose INA3221 rails are sampled every 10 ms; NVML's energy
    counter advances in steps of tens of ms, so shorter windows would quantise the energy. The
    time limit is twice that. A ``max_time_s`` given below the default ``min_time_s`` lowers it."""
    min_time_s = 3.0 if target.power_sensor == "ina3221" else 1.0
    timing = {"warmup_s": 0.2, "min_time_s": min_time_s, "max_time_s": 2 * min_time_s}
    timing.update(given)
    if "min_time_s" not in given:
        timing["min_time_s"] = min(timing["min_time_s"], timing["max_time_s"])
    return timing


# --- Runtime: tensorrt and cuda-python, imported only here ---------------------------------------


def import_tensorrt() -> ModuleType:
    """``tensorrt``, or ImportError naming what to install."""
    try:
        import tensorrt
    except ImportError as exc:
        raise ImportError(_MISSING_TENSORRT) from exc
    return tensorrt


def import_cudart() -> ModuleType:
    """CUDA's runtime API from ``cuda-python``: ``cuda.bindings.runtime`` (12.6 and newer) or
    ``cuda.cudart`` (older), or ImportError naming what to install."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError as exc:
            raise ImportError(_MISSING_CUDA) from exc
    return runtime


class CudaError(RuntimeError):
    """A CUDA runtime call that did not succeed."""


def cuda_call(result: Any, what: str) -> Any:
    """The value of a ``cuda-python`` call, which returns ``(error, value...)``; raises
    :class:`CudaError` naming the call and CUDA's error when the error is not success."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if int(error) != 0:
        raise CudaError(f"{what} failed: {getattr(error, 'name', error)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def cuda_device_count(cudart: ModuleType) -> tuple[int, str | None]:
    """How many CUDA GPUs this process sees, and CUDA's error when it cannot tell (no driver)."""
    error, count = cudart.cudaGetDeviceCount()
    if int(error) != 0:
        return 0, getattr(error, "name", str(error))
    return int(count), None


def tensorrt_unavailable_reason() -> str | None:
    """Why the TensorRT profiler cannot run here, or None when it can: tensorrt (10 or newer)
    and cuda-python import, and CUDA sees a GPU. Imports tensorrt and asks CUDA for its devices,
    so it is called only for a TensorRT target, never on ``import profilers``."""
    try:
        import tensorrt as trt
    except ModuleNotFoundError as exc:
        if exc.name != "tensorrt":
            return f"tensorrt cannot be imported: {exc}"
        return "the tensorrt package is not installed"
    except (ImportError, OSError) as exc:  # OSError: the wheel is there, its libraries are not
        return f"tensorrt cannot be imported: {exc}"
    version = getattr(trt, "__version__", "0")
    try:
        if tensorrt_major(version) < 10:
            return f"tensorrt {version} is installed; this profiler needs 10 or newer"
    except ValueError:
        return f"tensorrt reports version {version!r}"
    try:
        cudart = import_cudart()
    except (ImportError, OSError) as exc:
        return str(exc)
    count, error = cuda_device_count(cudart)
    if count == 0:
        return f"CUDA sees no GPU ({error or 'no device'})"
    return None


class Session(Protocol):
    """An engine ready to run on fixed inputs."""

    def run(self) -> float:
        """One inference; its GPU time in ms, from CUDA events around it on the stream."""

    def layer_times(self, runs: int) -> dict[str, float]:
        """``runs`` profiled inferences; each layer's mean ms per inference."""

    def engine_information(self) -> str:
        """The engine inspector's JSON for the whole engine."""

    def close(self) -> None: ...


class Backend(Protocol):
    """What :class:`TensorRTProfiler` needs from TensorRT and CUDA; tests pass a fake."""

    version: str

    def device(self) -> dict[str, object]:
        """At least ``gpu``: the GPU's name (part of the engine cache key)."""

    def build(
        self, onnx_path: Path, plan: BuildPlan, input_shapes: Mapping[str, Sequence[int]],
        *, workspace_bytes: int | None, hint: str,
    ) -> bytes: ...  # fmt: skip

    def session(self, engine: bytes, feeds: Mapping[str, np.ndarray], name: str) -> Session: ...


class TensorRTBackend:
    """The real :class:`Backend`: ``tensorrt`` for building and running, ``cuda-python`` for
    device memory, the stream and the events. Creating it imports both."""

    def __init__(self, device_index: int | None = None) -> None:
        self.trt = import_tensorrt()
        self.cudart = import_cudart()
        self.version = str(self.trt.__version__)
        self._log = capturing_logger(self.trt)  # must outlive every object made with it
        self._runtime = self.trt.Runtime(self._log)
        if device_index is None:
            device_index = cuda_call(self.cudart.cudaGetDevice(), "cudaGetDevice")
        self._device_index = int(device_index)

    def device(self) -> dict[str, object]:
        props = cuda_call(
            self.cudart.cudaGetDeviceProperties(self._device_index), "cudaGetDeviceProperties"
        )
        name = props.name
        name = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
        return {
            "gpu": name.rstrip("\x00").strip(),
            "compute_capability": f"{props.major}.{props.minor}",
            "cuda_device": self._device_index,
        }

    def build(self, onnx_path, plan, input_shapes, *, workspace_bytes, hint) -> bytes:
        self._log.errors.clear()
        return build_serialized_engine(
            self.trt, onnx_path, plan, input_shapes,
            workspace_bytes=workspace_bytes, hint=hint, trt_logger=self._log,
        )  # fmt: skip

    def session(self, engine: bytes, feeds: Mapping[str, np.ndarray], name: str) -> _CudaSession:
        self._log.errors.clear()
        cuda_engine = self._runtime.deserialize_cuda_engine(engine)
        if cuda_engine is None:
            raise CandidateError(f"{name}: TensorRT cannot load the engine: {_logged(self._log)}")
        return _CudaSession(self.trt, self.cudart, cuda_engine, feeds, name)


class _CudaSession:
    """One execution context with its inputs copied to the device once, and a stream and two
    events to time each inference with."""

    def __init__(
        self, trt: ModuleType, cudart: ModuleType, engine: Any,
        feeds: Mapping[str, np.ndarray], name: str,
    ) -> None:  # fmt: skip
        self.trt, self.cudart, self.engine, self.name = trt, cudart, engine, name
        self._pointers: list[Any] = []
        self._stream = self._start = self._end = None
        self._profiler: Any = None
        self.context = engine.create_execution_context()
        if self.context is None:
            raise CandidateError(
                f"{name}: TensorRT cannot create an execution context (out of GPU memory?)"
            )
        try:
            self._stream = cuda_call(cudart.cudaStreamCreate(), "cudaStreamCreate")
            self._start = cuda_call(cudart.cudaEventCreate(), "cudaEventCreate")
            self._end = cuda_call(cudart.cudaEventCreate(), "cudaEventCreate")
            self._bind(feeds)
        except BaseException:
            self.close()
            raise

    def _bind(self, feeds: Mapping[str, np.ndarray]) -> None:
        trt, cudart, engine, context = self.trt, self.cudart, self.engine, self.context
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        missing = [n for n in inputs if n not in feeds]
        if missing:
            raise CandidateError(
                f"{self.name}: no data for input(s) {missing}; given {sorted(feeds)}"
            )
        arrays = {}
        for n in inputs:
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(n)))
            arrays[n] = np.ascontiguousarray(feeds[n], dtype=dtype)
            if not context.set_input_shape(n, arrays[n].shape):
                raise CandidateError(
                    f"{self.name}: the engine does not take input {n!r} of shape {arrays[n].shape}"
                )
        copy = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        for n in names:
            shape = tuple(context.get_tensor_shape(n))
            if any(d < 0 for d in shape):
                raise CandidateError(
                    f"{self.name}: output {n!r} has a data-dependent shape {list(shape)}, which "
                    "this profiler does not allocate for"
                )
            dtype = engine.get_tensor_dtype(n)
            itemsize = getattr(dtype, "itemsize", None) or np.dtype(trt.nptype(dtype)).itemsize
            nbytes = max(1, math.ceil(int(np.prod(shape, dtype=np.int64)) * itemsize))  # int4: 0.5
            pointer = cuda_call(cudart.cudaMalloc(nbytes), "cudaMalloc")
            self._pointers.append(pointer)
            context.set_tensor_address(n, int(pointer))
            if n in arrays:
                array = arrays[n]
                cuda_call(
                    cudart.cudaMemcpyAsync(
                        pointer, array.ctypes.data, array.nbytes, copy, self._stream
                    ),
                    "cudaMemcpyAsync",
                )
        cuda_call(cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")

    def run(self) -> float:
        cudart = self.cudart
        cuda_call(cudart.cudaEventRecord(self._start, self._stream), "cudaEventRecord")
        ok = self.context.execute_async_v3(int(self._stream))
        cuda_call(cudart.cudaEventRecord(self._end, self._stream), "cudaEventRecord")
        cuda_call(cudart.cudaEventSynchronize(self._end), "cudaEventSynchronize")
        if not ok:
            raise CandidateError(f"{self.name}: TensorRT failed to run the engine")
        elapsed = cudart.cudaEventElapsedTime(self._start, self._end)
        return float(cuda_call(elapsed, "cudaEventElapsedTime"))

    def layer_times(self, runs: int) -> dict[str, float]:
        times = LayerTimes()
        base = self.trt.IProfiler

        class _Profiler(base):
            def __init__(self) -> None:
                base.__init__(self)

            def report_layer_time(self, layer_name: str, ms: float) -> None:
                times.report_layer_time(layer_name, ms)

        # Kept here: the context holds only a pointer to it, and reports to it from now on.
        self._profiler = _Profiler()
        self.context.profiler = self._profiler
        for _ in range(runs):
            self.run()
            times.runs += 1
        return times.per_inference()

    def engine_information(self) -> str:
        inspector = self.engine.create_engine_inspector()
        inspector.execution_context = self.context  # concrete shapes and formats
        return inspector.get_engine_information(self.trt.LayerInformationFormat.JSON)

    def close(self) -> None:
        cudart = self.cudart
        self.context = None
        for pointer in self._pointers:
            with contextlib.suppress(Exception):
                cudart.cudaFree(pointer)
        self._pointers = []
        for event in (self._start, self._end):
            if event is not None:
                with contextlib.suppress(Exception):
                    cudart.cudaEventDestroy(event)
        if self._stream is not None:
            with contextlib.suppress(Exception):
                cudart.cudaStreamDestroy(self._stream)
        self._stream = self._start = self._end = None


# --- The profiler -------------------------------------------------------------------------------


class TensorRTProfiler(Profiler):
    """Builds a TensorRT engine from the ONNX file (or takes it from the engine cache), then
    times it the way trtexec does: warm-up, then inferences one at a time on a CUDA stream, each
    timed with CUDA events, until the median settles (see :func:`default_timing` for the knobs it
    defaults to through :func:`~profilers.get_profiler`). A few more inferences run with an
    ``IProfiler`` attached, for the per-layer report in :attr:`Measurement.layers
    <profilers.Measurement.layers>`; they are not in the latency.

    Engines are cached in ``engine_dir`` under :func:`engine_cache_key`, so a plan measured again
    never rebuilds. ``strongly_typed`` chooses the network kind on TensorRT 10 (see
    :func:`build_plan`); ``workspace_bytes`` caps the builder's workspace (TensorRT's default is
    the whole GPU memory); ``profile_runs`` is the number of profiled inferences. Energy comes
    from the target's power sensor (NVML on a GPU, INA3221 on a Jetson) when it can be read.
    ``backend`` replaces TensorRT and CUDA (tests pass a fake); by default they are imported on
    the first measurement.
    """

    def __init__(
        self,
        target: Target,
        *,
        engine_dir: str | Path = DEFAULT_ENGINE_DIR,
        strongly_typed: bool | None = None,
        workspace_bytes: int | None = None,
        profile_runs: int = 20,
        energy: EnergyReader | None = None,
        backend: Backend | None = None,
        **timing: float,
    ) -> None:
        super().__init__(target, **timing)
        if profile_runs < 0:
            raise ValueError(f"profile_runs must be >= 0, got {profile_runs}")
        self.engine_dir = Path(engine_dir)
        self.strongly_typed = strongly_typed
        self.workspace_bytes = workspace_bytes
        self.profile_runs = profile_runs
        self._energy = energy if energy is not None else optional_energy_reader(target)
        self._backend = backend
        self.builds = 0  # engines built by this profiler (not taken from the cache)

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            try:
                self._backend = TensorRTBackend()
            except (ImportError, OSError, RuntimeError) as exc:
                raise TargetUnavailableError(
                    f"target '{self.target.name}' cannot be measured here: {exc}"
                ) from exc
        return self._backend

    def measure(
        self, onnx_path: str | Path, inputs: Mapping[str, np.ndarray] | None = None
    ) -> Measurement:
        path = Path(onnx_path)
        try:
            model = onnx.load(str(path))
        except Exception as exc:  # protobuf's DecodeError, a missing external data file, ...
            raise CandidateError(f"{path}: not a readable ONNX model: {exc}") from exc
        summary = summarise_graph(model)
        del model
        feeds = dict(inputs) if inputs is not None else random_inputs(path)
        shapes = {name: tuple(array.shape) for name, array in feeds.items()}
        backend = self.backend
        plan = build_plan(
            self.target.precisions, summary, backend.version, strongly_typed=self.strongly_typed
        )
        device = backend.device()
        key = engine_cache_key(
            path, target=self.target.name, plan=plan, gpu=str(device.get("gpu")),
            input_shapes=shapes, workspace_bytes=self.workspace_bytes,
        )  # fmt: skip
        cached = engine_path(self.engine_dir, self.target.name, key)
        engine, source, build_s = self._engine(path, plan, shapes, cached, summary)
        try:
            session = self._session(engine, feeds, path)
        except CandidateError:
            if source != "cache":
                raise
            cached.unlink(missing_ok=True)  # stale or damaged: build it again, once
            engine, source, build_s = self._engine(path, plan, shapes, cached, summary)
            session = self._session(engine, feeds, path)
        report: dict[str, object] = {}

        @contextlib.contextmanager
        def fresh_session(index: int):
            current = session if index == 0 else self._session(engine, feeds, path)
            try:
                current.run()
                yield current.run
                if index == self.sessions - 1:  # the per-layer report, once
                    report["layer_ms"] = current.layer_times(self.profile_runs) if self.profile_runs else {}
                    report["information"] = current.engine_information()
            finally:
                current.close()

        try:  # the first session is taken at once, and each one closes itself
            timings = self._time_sessions(fresh_session, self._energy, self_timed=True)
        except CudaError as exc:
            raise CandidateError(f"{path}: running the engine failed: {exc}") from exc
        layer_ms, information = report["layer_ms"], report["information"]
        engine_layers = parse_engine_information(information)
        layers = layer_report(
            engine_layers,
            layer_ms,
            int8_nodes=summary.int8_nodes,
            sparse_nodes=summary.sparse_nodes,
            sparse_enabled="SPARSE_WEIGHTS" in plan.builder_flags,
        )
        return self._summarise(
            timings,
            runtime=self.target.runtime,
            runtime_version=plan.tensorrt_version,
            precision=engine_precision(engine_layers),
            device={
                **sensor_device_state(self._energy),
                **device,
                "network_flags": list(plan.network_flags),
                "builder_flags": list(plan.builder_flags),
                "tensorrt_notes": list(plan.notes),
                "engine": source,
                "engine_build_s": build_s,
                "engine_file": str(cached),
            },
            layers=layers,
        )

    def _session(self, engine: bytes, feeds: Mapping[str, np.ndarray], path: Path) -> Session:
        try:
            return self.backend.session(engine, feeds, str(path))
        except CudaError as exc:  # out of device memory for the buffers, most likely
            raise CandidateError(f"{path}: cannot set up the engine on the GPU: {exc}") from exc

    def _engine(
        self, path: Path, plan: BuildPlan, shapes: Mapping[str, Sequence[int]], cached: Path,
        summary: GraphSummary,
    ) -> tuple[bytes, str, float | None]:  # fmt: skip
        """The serialized engine, from the cache or built (and cached), with where it came from
        and the build time in seconds."""
        with contextlib.suppress(FileNotFoundError):
            return cached.read_bytes(), "cache", None
        start = time.perf_counter()
        engine = self.backend.build(
            path, plan, shapes, workspace_bytes=self.workspace_bytes, hint=qdq_hint(summary)
        )
        build_s = time.perf_counter() - start
        self.builds += 1
        try:
            _write_atomically(cached, engine)
        except OSError as exc:  # measured all the same; the next measurement builds again
            logger.warning("cannot cache the engine in %s: %s", cached.parent, exc.strerror or exc)
        return engine, "built", build_s
