"""ONNX Runtime on the CPU (``runtime = "onnxruntime-cpu"``)."""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from profilers._base import Measurement, Profiler, random_inputs
from profilers._cpuinfo import cpu_info
from profilers._errors import MeasurementError
from profilers.energy import EnergyReader, energy_reader
from targets import Target

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
    graph. Energy comes from RAPL when it can be read."""

    def __init__(self, target: Target, *, energy: EnergyReader | None = None, **timing: float) -> None:
        super().__init__(target, **timing)
        self._energy = energy or energy_reader(target)

    def measure(
        self, onnx_path: str | Path, inputs: Mapping[str, np.ndarray] | None = None
    ) -> Measurement:
        path = Path(onnx_path)
        cpus = _measurement_cpus(self.target.threads)
        first, precision = self._session(path, cpus, inspect=True)
        feeds = dict(inputs) if inputs is not None else random_inputs(path)
        # ORT's errors share no base class but Exception.
        try:
            first.run(None, feeds)
        except Exception as exc:
            raise MeasurementError(f"{path}: ONNX Runtime failed to run the model: {exc}") from exc

        @contextlib.contextmanager
        def fresh_session(index: int):
            session = first if index == 0 else self._session(path, cpus)[0]
            with _pinned(cpus):
                yield functools.partial(session.run, None, feeds)

        timings = self._time_sessions(fresh_session, self._energy)
        return self._summarise(
            timings,
            runtime=self.target.runtime,
            runtime_version=ort.__version__,
            precision=precision,
            device={**cpu_info(), "threads": self.target.threads, "pinned_cpus": list(cpus)},
        )

    def _session(
        self, path: Path, cpus: tuple[int, ...], inspect: bool = False
    ) -> tuple[ort.InferenceSession, str | None]:
        """A new session, and with ``inspect`` the precisions of the graph ORT will actually run
        (after fusing; None without ``inspect``)."""
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.target.threads
        options.inter_op_num_threads = 1
        if len(cpus) > 1:  # the calling thread is intra-op thread 1; pin the pool's others (1-based ids)
            affinities = ";".join(str(cpu + 1) for cpu in cpus[1:])
            options.add_session_config_entry("session.intra_op_thread_affinities", affinities)
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # saving an ORT_ENABLE_ALL graph always warns
        with tempfile.TemporaryDirectory() as tmp:
            optimized = Path(tmp) / "optimized.onnx"
            if inspect:
                options.optimized_model_filepath = str(optimized)
                # Weights go to a side file: the graph is read for its node types only.
                options.add_session_config_entry(
                    "session.optimized_model_external_initializers_file_name", "weights.bin"
                )
            try:
                session = ort.InferenceSession(
                    str(path),
                    options,
                    providers=["CPUExecutionProvider"],
                    disabled_optimizers=["WeightBiasQuantization"],
                )
            except Exception as exc:
                raise MeasurementError(
                    f"{path}: ONNX Runtime cannot build a CPU session: {exc}"
                ) from exc
            if not inspect:
                return session, None
            graph = onnx.load(str(optimized), load_external_data=False).graph
        return session, graph_precision(graph)


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
