"""What an exported ONNX file holds, and what ONNX Runtime makes of it, for tests that check a
technique really reached the graph."""

from __future__ import annotations

import collections

import onnx


def initializer_shapes(path) -> dict[str, tuple[int, ...]]:
    """Every initializer of the file by name, with its shape."""
    return {init.name: tuple(init.dims) for init in onnx.load(str(path)).graph.initializer}


def optimized_ops(path, tmp_path, disabled=None) -> collections.Counter:
    """The op types of the graph ONNX Runtime runs (after its fusions), as the CPU profiler loads it,
    or with the graph optimizations ``disabled`` left out instead."""
    import onnxruntime as ort

    from profilers import disabled_optimizers

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    disabled = list(disabled_optimizers() if disabled is None else disabled)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
    return collections.Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)


def int8_slower(profiler, monkeypatch) -> None:
    """``profiler`` reports a graph with int8 layers 3× slower, as ONNX Runtime runs a hard-swish
    MobileNet (a Q/DQ pair around every activation) or a small Transformer's short MatMuls."""
    import dataclasses

    measure = profiler.measure

    def scaled(path, *args, **kwargs):
        measured = measure(path, *args, **kwargs)
        if any(node.op_type == "QuantizeLinear" for node in onnx.load(str(path)).graph.node):
            return dataclasses.replace(measured, latency_ms=3 * measured.latency_ms)
        return measured

    monkeypatch.setattr(profiler, "measure", scaled)
