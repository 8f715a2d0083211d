"""The per-layer report on ONNX Runtime: a few runs under the session's own profiler
(``SessionOptions.enable_profiling``), its JSON trace read into one entry per layer of the graph ORT
ran, in the shape of TensorRT's report (:func:`profilers.tensorrt.layer_report`).

ORT runs an optimized graph: Q/DQ groups fused into ``QLinearConv``/``QGemm``, convolutions fused
with their activation (``FusedConv``) or rewritten to the blocked NCHWc layout with ``ReorderInput``/
``ReorderOutput`` around them, and ``Transpose`` nodes for the NHWC int8 kernels. A *layer* here is a
compute node and the overhead nodes it brought with it: the Q/DQ, reorder and transpose nodes on its
input side (through other overhead nodes), else on its output side. Every other node (pooling,
reshapes, element-wise ops that were not fused) is an entry of its own, so the entries add up to
the whole run. ``onnx_nodes`` names the nodes of the *measured file* each entry came from, found
through the weights they share (by name, else by value: the NCHWc rewrite renames a weight it
reorders), and through node names ORT kept.
"""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

# The nodes that do a layer's work in ORT's optimized graph.
COMPUTE_OPS = frozenset({
    "Conv", "ConvTranspose", "FusedConv", "QLinearConv", "NhwcQLinearConv", "ConvInteger", "MatMul",
    "FusedMatMul", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
    "MatMulNBits", "Gemm", "FusedGemm", "QGemm", "Attention", "QAttention",
})  # fmt: skip
# Nodes that convert between precisions or memory layouts around a compute node.
OVERHEAD_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ReorderInput", "ReorderOutput",
    "Transpose",
})  # fmt: skip
_INTEGER_OPS = frozenset({
    "QLinearConv", "NhwcQLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger",
    "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QGemm", "QAttention",
})  # fmt: skip
_ORT_SUFFIX = re.compile(r"(?:_token_\d+|_nchwc)+$")  # what ORT appends to the names of nodes it rewrites
PROFILE_WARMUP_RUNS = 2  # profiled runs left out of the figures: the first runs allocate
PROFILE_RUNS = 10  # profiled runs whose per-node median is reported


def node_times(events: Sequence[Mapping], skip_runs: int = PROFILE_WARMUP_RUNS) -> dict[str, float]:
    """Each node's median milliseconds per run in an ORT profiling trace (the list
    ``end_profiling()``'s JSON file holds), the first ``skip_runs`` runs left out."""
    runs = sorted(
        (e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"
    )
    kept = runs[skip_runs:] or runs
    per_run: dict[str, list[float]] = {}
    for event in events:
        name = event.get("name", "")
        if event.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        run = next((i for i, (start, end) in enumerate(kept) if start <= event["ts"] <= end), None)
        if run is None:
            continue
        times = per_run.setdefault(name.removesuffix("_kernel_time"), [0.0] * len(kept))
        times[run] += event["dur"] / 1000.0  # µs -> ms; a node can run more than once (a loop)
    return {name: statistics.median(times) for name, times in per_run.items()}


def read_trace(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def source_nodes(
    optimized: onnx.GraphProto,
    original: onnx.GraphProto,
    optimized_weights: Callable[[], Mapping[str, np.ndarray]] | None = None,
    original_weights: Callable[[], Mapping[str, np.ndarray]] | None = None,
) -> dict[str, tuple[str, ...]]:
    """For each node ORT runs, the nodes of the original (measured) graph it came from: those that
    consume the same weights (tensors of more than one value), and the one whose name it kept. A
    compute node none of whose weights is found by name is matched by value: its weights against
    the original's, zeros left out (a reordered or padded copy holds the same non-zero values).
    The weight loaders are called only then."""
    # Weights and biases, not the scales and zero points that neighbouring Q/DQ nodes share.
    original_inits = {init.name for init in original.initializer if int(np.prod(init.dims)) > 1}
    consumers: dict[str, list[str]] = {}
    names = {node.name for node in original.node}
    for node in original.node:
        for name in node.input:
            if name in original_inits:
                consumers.setdefault(name, []).append(node.name)
    optimized_inits = {init.name for init in optimized.initializer}
    found: dict[str, tuple[str, ...]] = {}
    unmatched = []
    for node in optimized.node:
        sources = [c for name in node.input if name in original_inits for c in consumers.get(name, ())]
        if node.op_type in COMPUTE_OPS and not sources:
            unmatched.append(node)
        kept = _ORT_SUFFIX.sub("", node.name)
        sources += [n for n in (node.name, kept) if n in names]
        found[node.name] = tuple(dict.fromkeys(sources))
    if unmatched and optimized_weights is not None and original_weights is not None:
        by_value = _match_by_value(
            {w for node in unmatched for w in node.input if w in optimized_inits},
            optimized_weights(),
            original_weights(),
        )
        for node in unmatched:
            extra = [c for w in node.input for c in consumers.get(by_value.get(w, ""), ())]
            found[node.name] = tuple(dict.fromkeys([*extra, *found[node.name]]))
    return found


def _match_by_value(
    wanted: Iterable[str], optimized: Mapping[str, np.ndarray], original: Mapping[str, np.ndarray]
) -> dict[str, str]:
    """Optimized weight name -> the original weight holding the same non-zero values."""

    def nonzero(array: np.ndarray) -> np.ndarray:
        flat = np.asarray(array).ravel()
        return np.sort(flat[flat != 0])

    candidates: dict[int, list[tuple[str, np.ndarray]]] = {}
    for name, array in original.items():
        if np.asarray(array).size >= 2:
            values = nonzero(array)
            candidates.setdefault(values.size, []).append((name, values))
    matched = {}
    for name in wanted:
        if name not in optimized or np.asarray(optimized[name]).size < 2:
            continue
        values = nonzero(optimized[name])
        for other, other_values in candidates.get(values.size, ()):
            if values.dtype == other_values.dtype and np.array_equal(values, other_values):
                matched[name] = other
                break
    return matched


def layer_entries(
    optimized: onnx.GraphProto, node_ms: Mapping[str, float], sources: Mapping[str, Sequence[str]]
) -> tuple[dict[str, object], ...]:
    """One entry per layer ORT ran, slowest first, with TensorRT's keys (``name``, ``type``, ``ms``,
    ``share`` of the summed time, ``precision``, ``tactic``, ``onnx_nodes``, ``note``) and
    ``overhead_ms``: the time of the Q/DQ, reorder and transpose nodes counted in ``ms``. Nodes the
    trace did not time are left out."""
    nodes = [node for node in optimized.node if node.name in node_ms]
    producer = {out: node for node in nodes for out in node.output}
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in nodes:
        for name in node.input:
            users.setdefault(name, []).append(node)
    owner: dict[str, str] = {node.name: node.name for node in nodes if node.op_type not in OVERHEAD_OPS}

    def follow(node: onnx.NodeProto, step: Callable[[onnx.NodeProto], list[onnx.NodeProto]]) -> str | None:
        seen, frontier = set(), [node]
        while frontier:
            current = frontier.pop()
            for nxt in step(current):
                if nxt.name in seen:
                    continue
                seen.add(nxt.name)
                if nxt.op_type in COMPUTE_OPS:
                    return nxt.name
                if nxt.op_type in OVERHEAD_OPS:
                    frontier.append(nxt)
        return None

    def downstream(node):
        return [user for out in node.output for user in users.get(out, ())]

    def upstream(node):
        return [producer[name] for name in node.input if name in producer]

    for node in nodes:
        if node.op_type in OVERHEAD_OPS:
            owner[node.name] = follow(node, downstream) or follow(node, upstream) or node.name
    weights = {init.name: init.data_type for init in optimized.initializer}
    total = sum(node_ms[node.name] for node in nodes)
    entries = []
    for head in (node for node in nodes if owner[node.name] == node.name):
        members = [node for node in nodes if owner[node.name] == head.name]
        ms = sum(node_ms[node.name] for node in members)
        overhead = sum(node_ms[node.name] for node in members if node.op_type in OVERHEAD_OPS and node is not head)
        entries.append({
            "name": head.name,
            "type": head.op_type,
            "ms": ms,
            "share": ms / total if total > 0 else 0.0,
            "precision": _precision(head, weights, producer),
            "tactic": _tactic(head),
            "onnx_nodes": list(dict.fromkeys(s for node in members for s in sources.get(node.name, ()))),
            "note": _note(head, producer, ms, overhead),
            "overhead_ms": overhead,
        })  # fmt: skip
    entries.sort(key=lambda entry: -entry["ms"])
    return tuple(entries)


def _precision(node: onnx.NodeProto, weights: Mapping[str, int], producer: Mapping) -> str | None:
    if node.op_type in _INTEGER_OPS:
        return "int8"
    if node.op_type == "MatMulNBits":
        bits = next((a.i for a in node.attribute if a.name == "bits"), 4)
        return f"int{bits}-weight-only"
    if node.op_type in COMPUTE_OPS:
        types = {weights.get(name) for name in node.input}
        if onnx.TensorProto.FLOAT16 in types:
            return "fp16"
        return "bf16" if onnx.TensorProto.BFLOAT16 in types else "fp32"
    if node.op_type == "QuantizeLinear" or node.op_type.startswith("QLinear"):
        return "int8"
    return None


def _tactic(node: onnx.NodeProto) -> str | None:
    """How ORT runs a compute node beyond its op type: the NCHWc blocked layout, a fused activation."""
    parts = []
    if node.domain == "com.microsoft.nchwc":
        parts.append("NCHWc")
    activation = next((a.s.decode() for a in node.attribute if a.name == "activation"), None)
    if activation:
        parts.append(f"+{activation}")
    return " ".join(parts) or None


def _note(node: onnx.NodeProto, producer: Mapping[str, onnx.NodeProto], ms: float, overhead: float) -> str | None:
    notes = []
    if node.op_type in COMPUTE_OPS and node.op_type not in _INTEGER_OPS and node.op_type != "MatMulNBits":
        if any(name in producer and producer[name].op_type == "DequantizeLinear" for name in node.input):
            notes.append(
                "its input comes through a DequantizeLinear that did not fuse into an integer kernel: "
                "the layer computes in float"
            )
    if ms > 0 and overhead > ms / 2:
        notes.append(
            f"Q/DQ, reorder and transpose nodes around it take {overhead / ms:.0%} of its time"
        )
    return "; ".join(notes) or None


def scaled_to(entries: Sequence[Mapping[str, object]], latency_ms: float) -> tuple[dict[str, object], ...]:
    """``entries`` with ``ms`` each one's share of ``latency_ms``, the profiled figure kept as
    ``profiled_ms``. ORT's profiler stamps every node it times in whole microseconds and adds a
    few of them to each: on the 0.06 ms digits CNN the profiled nodes sum to a quarter more than
    the timed runs. The shares are what it measured; the milliseconds then add up to the latency
    the measurement reports."""
    scaled = []
    for entry in entries:
        ms = float(entry["share"]) * latency_ms
        factor = ms / entry["ms"] if entry["ms"] else 0.0
        scaled.append({**entry, "profiled_ms": entry["ms"], "ms": ms, "overhead_ms": entry["overhead_ms"] * factor})
    return tuple(scaled)


def graph_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """A model's initializers as arrays (its external data must be loaded)."""
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
