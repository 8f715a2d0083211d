"""Building an engine: the network and builder flags from the target's precisions, the graph and
the TensorRT version (:func:`build_plan`: 10.x builds weakly typed networks with precision flags;
11.x has only strongly typed networks and rejects the FP16/INT8 flags), and the build itself
against a ``tensorrt`` module passed in (:func:`build_serialized_engine`)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from profilers._errors import MeasurementError
from profilers.tensorrt._graph import GraphSummary

logger = logging.getLogger(__name__)

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


# trtexec's spelling of each flag a BuildPlan sets
_TRTEXEC_FLAGS = {
    "STRONGLY_TYPED": "--stronglyTyped", "FP16": "--fp16", "INT8": "--int8", "SPARSE_WEIGHTS": "--sparsity=enable",
}  # fmt: skip


def trtexec_command(onnx_file: str, device: Mapping[str, object]) -> str | None:
    """The ``trtexec`` command that builds, from ``onnx_file``, the engine a TensorRT measurement
    built: its ``device`` record's network and builder flags and workspace cap, the engine saved
    beside the file. None for a measurement by another runtime (no builder flags recorded). The
    files this project exports have static shapes, so no ``--shapes`` is needed."""
    if "builder_flags" not in device:
        return None
    engine = f"{onnx_file.removesuffix('.onnx')}.engine"
    words = ["trtexec", f"--onnx={onnx_file}", f"--saveEngine={engine}"]
    words += [_TRTEXEC_FLAGS[flag] for flag in (*device.get("network_flags", ()), *device["builder_flags"])]
    if device.get("workspace_bytes"):
        words.append(f"--memPoolSize=workspace:{max(1, int(device['workspace_bytes']) // 2**20)}M")
    return " ".join(words)


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

    Raises :class:`~profilers.MeasurementError` with TensorRT's own reason when the parser
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
        raise MeasurementError(
            f"{onnx_path}: TensorRT {plan.tensorrt_version} cannot parse the model: "
            f"{parser_errors(parser) or logged_text(log)}{hint}"
        )
    config = builder.create_builder_config()
    for name in plan.builder_flags:
        flag = getattr(trt.BuilderFlag, name, None)
        if flag is None:
            raise MeasurementError(
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
        raise MeasurementError(
            f"{onnx_path}: TensorRT {plan.tensorrt_version} failed to build an engine: "
            f"{type(exc).__name__}: {exc}{hint}"
        ) from exc
    if serialized is None:
        raise MeasurementError(
            f"{onnx_path}: TensorRT {plan.tensorrt_version} could not build an engine: "
            f"{logged_text(log)}{hint}"
        )
    return bytes(serialized)


def profile_shapes(
    network_inputs: Mapping[str, Sequence[int]],
    input_shapes: Mapping[str, Sequence[int]],
    onnx_path: str | Path = "the model",
) -> dict[str, tuple[int, ...]]:
    """The shape to fix each dynamic network input to (those with a -1 dimension), from
    ``input_shapes``; static inputs need no profile. Raises MeasurementError for a dynamic input
    without a shape, or a shape that does not fit the input's static dimensions."""
    shapes = {}
    for name, dims in network_inputs.items():
        if all(d >= 0 for d in dims):
            continue
        if name not in input_shapes:
            raise MeasurementError(
                f"{onnx_path}: input {name!r} has dynamic dimensions {list(dims)} and no shape to "
                f"build for; given: {sorted(input_shapes)}"
            )
        shape = tuple(int(d) for d in input_shapes[name])
        if len(shape) != len(dims) or any(
            d >= 0 and d != s for d, s in zip(dims, shape, strict=True)
        ):
            raise MeasurementError(
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


def logged_text(log: Any) -> str:
    errors = getattr(log, "errors", None)
    return "; ".join(errors) if errors else "TensorRT gave no reason"
