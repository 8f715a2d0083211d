"""ONNX Runtime on the CPU (``runtime = "onnxruntime-cpu"``)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from profilers._base import Measurement, Profiler, measurement_setting, random_inputs
from profilers._cpuinfo import cpu_info
from profilers._errors import MeasurementError
from profilers._onnxruntime_fusions import disabled_optimizers
from profilers._onnxruntime_layers import (
    PROFILE_RUNS,
    PROFILE_WARMUP_RUNS,
    graph_weights,
    layer_entries,
    node_times,
    read_trace,
    scaled_to,
    source_nodes,
)
from profilers.energy import EnergyReader, energy_reader
from targets import Target

logger = logging.getLogger(__name__)

# Kernels that compute on integers, as named in ORT's optimized graph (fused QDQ groups).
_INT8_OPS = frozenset({
    "QGemm", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
    "QAttention", "DynamicQuantizeLSTM", "QEmbedLayerNormalization", "NhwcQLinearConv",
})  # fmt: skip
# Float kernels that do the bulk of the work; element-wise ops do not decide the precision.
_FLOAT_OPS = frozenset({
    "Conv", "ConvTranspose", "FusedConv", "NchwcConv", "MatMul", "FusedMatMul", "Gemm",
    "FusedGemm", "Attention", "MultiHeadAttention", "GroupQueryAttention", "LSTM", "GRU", "RNN",
    "Einsum",
})  # fmt: skip
_PRECISION_ORDER = ("int4-weight-only", "int8", "fp16", "bf16", "fp32")


class OnnxRuntimeCpuProfiler(Profiler):
    """One ``InferenceSession`` on ``CPUExecutionProvider`` with the target's intra-op threads,
    one inter-op thread, sequential execution and every graph optimization but
    ``WeightBiasQuantization``, which would quantize the float layers of a mixed-precision
    graph, and the fusions measured slower on this CPU, or those the target names instead
    (:func:`disabled_optimizers`, recorded as ``device["disabled_optimizers"]``). Energy comes from
    RAPL when it can be read.

    The first session also profiles itself for the per-layer report (:attr:`Measurement.layers
    <profilers.Measurement.layers>`): ``profile_runs`` runs under ORT's profiler before any timed
    run, the profiler then stopped (``end_profiling``), so the timed runs are not profiled. The
    report's cost is recorded as ``device["layer_profile_ms"]``. Each entry's ``ms`` is its share
    of the profiled time times the measured latency (:func:`scaled_to`). ``profile_runs=0``: no
    report.
    """

    def __init__(
        self,
        target: Target,
        *,
        energy: EnergyReader | None = None,
        profile_runs: int = PROFILE_RUNS,
        **timing: float,
    ) -> None:
        super().__init__(target, **timing)
        if profile_runs < 0:
            raise ValueError(f"profile_runs must be >= 0, got {profile_runs}")
        self._energy = energy or energy_reader(target)
        self.profile_runs = profile_runs

    def measure(
        self, onnx_path: str | Path, inputs: Mapping[str, np.ndarray] | None = None
    ) -> Measurement:
        path = Path(onnx_path)
        cpus = _measurement_cpus(self.target.threads)
        with tempfile.TemporaryDirectory(prefix="ort-profile-") as tmp:
            first, precision, inspected = self._session(path, cpus, inspect=Path(tmp))
            feeds = dict(inputs) if inputs is not None else random_inputs(path)
            # ORT's errors share no base class but Exception.
            try:
                first.run(None, feeds)
                started = time.perf_counter()  # what the report adds to a measurement
                for _ in range(PROFILE_WARMUP_RUNS + self.profile_runs if self.profile_runs else 0):
                    first.run(None, feeds)
            except Exception as exc:
                raise MeasurementError(f"{path}: ONNX Runtime failed to run the model: {exc}") from exc
            layers, profile_ms = (), None
            if self.profile_runs:  # the first run checked the model, the next warmed up; profiling stops here
                trace = first.end_profiling()
                try:
                    times = node_times(read_trace(trace), skip_runs=1 + PROFILE_WARMUP_RUNS)
                    layers = layer_entries(inspected.graph, times, inspected.sources())
                except (OSError, ValueError, KeyError) as exc:  # the report only explains; the latency stands
                    logger.warning("%s: no per-layer report from ONNX Runtime's profiler: %s", path, exc)
                profile_ms = (time.perf_counter() - started) * 1000.0

        @contextlib.contextmanager
        def fresh_session(index: int):
            session = first if index == 0 else self._session(path, cpus)[0]
            with _pinned(cpus):
                yield functools.partial(session.run, None, feeds)

        timings = self._time_sessions(fresh_session, self._energy)
        measurement = self._summarise(
            timings,
            runtime=self.target.runtime,
            runtime_version=ort.__version__,
            precision=precision,
            device={
                **self._machine(), "pinned_cpus": list(cpus), "layer_profile_runs": self.profile_runs,
                "layer_profile_ms": profile_ms,
            },
        )  # fmt: skip
        return dataclasses.replace(measurement, layers=scaled_to(layers, measurement.latency_ms))

    def _machine(self) -> dict[str, object]:
        """What a measurement's ``device`` says of the machine and the sessions' settings."""
        return {**cpu_info(), "threads": self.target.threads, "disabled_optimizers": self._disabled()}

    def setting(self) -> str:
        return measurement_setting(f"{self.target.runtime} {ort.__version__}", self._machine())

    def _disabled(self) -> list[str]:
        """The graph optimizations its sessions run without: the target's list, else the probe's."""
        return list(disabled_optimizers(self.target.disabled_optimizers))

    def _session(
        self, path: Path, cpus: tuple[int, ...], inspect: Path | None = None
    ) -> tuple[ort.InferenceSession, str | None, _Inspected | None]:
        """A new session; with ``inspect`` (a scratch folder that outlives the session's use), the
        precisions of the graph ORT will actually run (after fusing) and that graph, and the
        session profiles its runs until ``end_profiling`` (when :attr:`profile_runs` is not 0)."""
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.target.threads
        options.inter_op_num_threads = 1
        if len(cpus) > 1:  # the calling thread is intra-op thread 1; pin the pool's others (1-based ids)
            affinities = ";".join(str(cpu + 1) for cpu in cpus[1:])
            options.add_session_config_entry("session.intra_op_thread_affinities", affinities)
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # saving an ORT_ENABLE_ALL graph always warns
        if inspect is not None:
            optimized = inspect / "optimized.onnx"
            options.optimized_model_filepath = str(optimized)
            # Weights go to a side file: the graph is read for its node types, the weights only if needed.
            options.add_session_config_entry(
                "session.optimized_model_external_initializers_file_name", "weights.bin"
            )
            if self.profile_runs:
                options.enable_profiling = True
                options.profile_file_prefix = str(inspect / "profile")
        try:
            session = ort.InferenceSession(
                str(path),
                options,
                providers=["CPUExecutionProvider"],
                disabled_optimizers=self._disabled(),
            )
        except Exception as exc:
            raise MeasurementError(
                f"{path}: ONNX Runtime cannot build a CPU session: {exc}"
            ) from exc
        if inspect is None:
            return session, None, None
        inspected = _Inspected(path, optimized)
        return session, graph_precision(inspected.graph), inspected


class _Inspected:
    """The graph ORT runs for a model (saved by its session) and the model's own graph."""

    def __init__(self, original: Path, optimized: Path) -> None:
        self.original, self.optimized = original, optimized
        self.graph = onnx.load(str(optimized), load_external_data=False).graph

    def sources(self) -> dict[str, tuple[str, ...]]:
        """For each node ORT runs, the nodes of the model's file it came from (:func:`source_nodes`)."""
        original = onnx.load(str(self.original), load_external_data=False)

        def optimized_weights():
            model = onnx.load(str(self.optimized))
            return graph_weights(model)

        def original_weights():
            return graph_weights(onnx.load(str(self.original)))

        return source_nodes(self.graph, original.graph, optimized_weights, original_weights)


def _measurement_cpus(threads: int) -> tuple[int, ...]:
    """The last ``threads`` CPUs this thread may run on; empty where affinity is not supported."""
    if not hasattr(os, "sched_getaffinity"):
        return ()
    return tuple(sorted(os.sched_getaffinity(0))[-threads:])


@contextlib.contextmanager
def _pinned(cpus: tuple[int, ...]):
    """Pin the calling thread (ONNX Runtime's first intra-op thread) to ``cpus`` while timing, so
    the scheduler cannot migrate it between runs; its affinity is restored afterwards."""
    if not cpus:
        yield
        return
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus[:1])
    try:
        yield
    finally:
        os.sched_setaffinity(0, allowed)


def graph_precision(graph: onnx.GraphProto) -> str:
    """The precisions a graph computes in, such as ``"int8+fp32"``, judged from its heavy nodes.

    Quantize/DequantizeLinear nodes left unfused do not count as int8: the layer between them
    runs in float, which is what happens to some convolutions with int8 activations.
    """
    weight_types = {weight.name: weight.data_type for weight in graph.initializer}
    found = set()
    for node in graph.node:
        if node.op_type in _INT8_OPS or node.op_type.startswith("QLinear"):
            found.add("int8")
        elif node.op_type == "MatMulNBits":
            bits = next((a.i for a in node.attribute if a.name == "bits"), 4)
            found.add(f"int{bits}-weight-only")
        elif node.op_type in _FLOAT_OPS:
            types = {weight_types.get(name) for name in node.input}
            if onnx.TensorProto.FLOAT16 in types:
                found.add("fp16")
            elif onnx.TensorProto.BFLOAT16 in types:
                found.add("bf16")
            else:
                found.add("fp32")
    order = {precision: i for i, precision in enumerate(_PRECISION_ORDER)}
    return "+".join(sorted(found, key=lambda p: order.get(p, -1))) or "fp32"
