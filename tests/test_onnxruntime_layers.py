"""ONNX Runtime's per-layer report: its profiling trace read back, and each node traced to the nodes
of the measured file."""

from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

from profilers._onnxruntime_layers import node_times, scaled_to
from search.artifacts import export_float


def _run(ts: int, dur: int) -> dict:
    return {"cat": "Session", "name": "model_run", "ts": ts, "dur": dur}


def _node(name: str, ts: int, dur: int) -> dict:
    return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": "Conv"}}


def test_node_times_skip_the_first_runs_and_take_each_nodes_median():
    events = [_run(0, 100), _node("conv", 10, 90)]  # a cold first run, left out
    for start, conv in ((1000, 20), (2000, 22), (3000, 60)):
        events += [_run(start, 100), _node("conv", start + 1, conv), _node("relu", start + 50, 4)]
    times = node_times(events, skip_runs=1)
    assert times == {"conv": pytest.approx(0.022), "relu": pytest.approx(0.004)}  # µs -> ms


def test_scaled_entries_add_up_to_the_latency_and_keep_the_profiled_figure():
    entries = [{"ms": 0.03, "share": 0.75, "overhead_ms": 0.01}, {"ms": 0.01, "share": 0.25, "overhead_ms": 0.0}]
    scaled = scaled_to(entries, 0.02)
    assert [e["ms"] for e in scaled] == pytest.approx([0.015, 0.005])
    assert [e["profiled_ms"] for e in scaled] == [0.03, 0.01]
    assert scaled[0]["overhead_ms"] == pytest.approx(0.005)


def test_a_reordered_weight_without_a_bias_is_traced_by_value(fast_profiler, tmp_path):
    """ORT's NCHWc rewrite renames the weights it reorders (``reorder_token_1``); a conv with
    neither bias nor BatchNorm keeps no name of the file's, and is found by its weight's values."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, bias=False), nn.ReLU(), nn.Conv2d(16, 16, 3, bias=False)).eval()
    path = tmp_path / "convs.onnx"
    export_float(model, torch.randn(1, 8, 12, 12), path)
    graph = onnx.load(str(path)).graph
    convs = {node.name for node in graph.node if node.op_type == "Conv"}
    layers = fast_profiler.measure(path).layers
    ran = [layer for layer in layers if layer["type"] in ("Conv", "FusedConv")]
    assert len(ran) == 2
    assert {node for layer in ran for node in layer["onnx_nodes"]} >= convs
    assert sum(layer["share"] for layer in layers) == pytest.approx(1.0)
