"""The graph optimizations ONNX Runtime's CPU sessions run without, here and in the scoring.

``WeightBiasQuantization`` always: it would quantize the float layers of a mixed-precision graph.
A fusion whose fused kernel runs slower on this CPU than the ops it replaces is left out too, as
measured on first use (about 45 ms, once a process): on an Intel Xeon with AMX, ORT 1.32's
``SkipLayerNormalization`` took 2.6-7.6× the time of the ``Add`` and ``LayerNormalization`` it
fuses, at every shape from [1, 8, 384] to [1, 512, 1024], and MiniLM at 32 tokens ran 26-28 %
faster at int8 (11 % in fp32) without the fusion (``benchmarks/ort_fusions.py``). Where the fused
kernel is as fast, ORT's default stands.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np

ALWAYS_DISABLED = ("WeightBiasQuantization",)
SLOWER_BY = 1.25  # a fusion is left out when its kernel takes this many times the unfused ops' time
_PROBE_SHAPE = (1, 64, 384)  # batch, tokens, hidden: a small encoder's residual stream
_ROUNDS, _RUNS = 5, 40


def disabled_optimizers(chosen: Sequence[str] | None = None) -> tuple[str, ...]:
    """The ``disabled_optimizers`` of every CPU session: :data:`ALWAYS_DISABLED` and the fusions
    measured slower on this CPU (:func:`slower_fusions`), or the optimizations ``chosen`` instead
    (a target's ``disabled_optimizers``: its deployment's, or one list for every machine)."""
    if chosen is None:
        return ALWAYS_DISABLED + slower_fusions()
    return ALWAYS_DISABLED + tuple(name for name in chosen if name not in ALWAYS_DISABLED)


@functools.cache
def slower_fusions() -> tuple[str, ...]:
    """The fusions whose fused kernel takes :data:`SLOWER_BY` times or more the time of the ops
    it replaces on this CPU (one thread), measured once a process."""
    fused, unfused = timed_in_turn([_skip_layer_norm_session(fused=True), _skip_layer_norm_session(fused=False)])
    return ("SkipLayerNormFusion",) if fused >= SLOWER_BY * unfused else ()


def timed_in_turn(calls: Sequence[Callable[[], object]], rounds: int = _ROUNDS, runs: int = _RUNS) -> list[float]:
    """Each call's time in seconds: its fastest round's median, over rounds taken in turn (a slow
    spell of the machine falls on every call alike)."""
    medians: list[list[float]] = [[] for _ in calls]
    for _ in range(rounds):
        for call, times in zip(calls, medians):
            call()  # warm
            samples = []
            for _ in range(runs):
                started = time.perf_counter()
                call()
                samples.append(time.perf_counter() - started)
            times.append(statistics.median(samples))
    return [min(times) for times in medians]


def _skip_layer_norm_session(fused: bool) -> Callable[[], object]:
    """One run of :func:`residual_layer_norm` in a session that fuses it into
    ``SkipLayerNormalization`` (ORT's default), or not."""
    session = one_thread_session(residual_layer_norm(), [] if fused else ["SkipLayerNormFusion"])
    rng = np.random.default_rng(0)
    feeds = {name: rng.random(_PROBE_SHAPE, dtype=np.float32) for name in ("x", "skip")}
    return functools.partial(session.run, None, feeds)


def one_thread_session(model: bytes | str, disabled: Sequence[str]):
    """An ONNX Runtime CPU session of ``model`` (its bytes, or a path) on one thread, run without
    :data:`ALWAYS_DISABLED` and the graph optimizations ``disabled``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    options.log_severity_level = 3
    return ort.InferenceSession(
        model, options, providers=["CPUExecutionProvider"], disabled_optimizers=[*ALWAYS_DISABLED, *disabled]
    )


def residual_layer_norm(shape: tuple[int, int, int] = _PROBE_SHAPE) -> bytes:
    """A residual ``Add`` then ``LayerNormalization`` over ``shape`` (batch, tokens, hidden), as an
    encoder exports it: the pattern ORT's ``SkipLayerNormFusion`` fuses."""
    from onnx import TensorProto, helper, numpy_helper

    hidden = shape[-1]
    rng = np.random.default_rng(0)
    values = [helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)) for name in ("x", "skip", "y")]
    weights = [numpy_helper.from_array(rng.random(hidden, dtype=np.float32), name) for name in ("gamma", "beta")]
    nodes = [
        helper.make_node("Add", ["x", "skip"], ["sum"]),
        helper.make_node("LayerNormalization", ["sum", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-12),
    ]
    graph = helper.make_graph(nodes, "residual_layer_norm", values[:2], values[2:], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
