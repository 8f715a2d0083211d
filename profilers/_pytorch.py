"""PyTorch as the runtime (``runtime = "pytorch-cuda"``, the ``gpu`` target's fallback where
TensorRT is absent; ``"pytorch-cpu"``): a module, not an ONNX file.

The search hands over a :class:`~profilers.ModuleArtifact`: the candidate already on this
profiler's :attr:`~PyTorchProfiler.device`, in the float precision the target runs, its int8 and
2:4 layers already on their kernels. This profiler compiles it with ``torch.compile``, as a
deployment would, and times it: on the GPU with CUDA events.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from profilers._base import Measurement, ModuleArtifact, Profiler, measurement_setting
from profilers._cpuinfo import cpu_info
from profilers._errors import MeasurementError, ProfilerUsageError, TargetUnavailableError
from profilers.energy import EnergyReader, optional_energy_reader, sensor_device_state
from targets import Target

TORCH_VERSION = f"torch {torch.__version__}"  # the runtime's version; a module's kernel libraries follow it

RUNTIMES = ("pytorch-cuda", "pytorch-cpu")


class PyTorchProfiler(Profiler):
    """Measures a module with PyTorch on the target's device (see the module's doc).

    ``compile_mode`` is ``torch.compile``'s mode (``"reduce-overhead"`` replays CUDA graphs,
    which takes the per-kernel launch cost out of a batch-1 inference, as a deployment would),
    or None to run eagerly. The model is compiled once per measurement, before the first session's
    warm-up; later sessions time the same compiled model again (compiling anew would take far
    longer than it could tell). On the CPU it runs with the target's ``threads``.
    """

    measures_onnx = False

    def __init__(
        self,
        target: Target,
        *,
        runtime: str | None = None,
        compile_mode: str | None = "reduce-overhead",
        energy: EnergyReader | None = None,
        **timing: float,
    ) -> None:
        super().__init__(target, **timing)
        self.runtime = runtime or target.runtime
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime {self.runtime!r}: expected one of {', '.join(RUNTIMES)}")
        self.device = torch.device("cuda" if self.runtime == "pytorch-cuda" else "cpu")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise TargetUnavailableError(f"PyTorch {torch.__version__} sees no CUDA GPU")
        self.compile_mode = compile_mode
        self._energy = energy if energy is not None else optional_energy_reader(target)

    def measure(self, onnx_path: str | Path, inputs=None) -> Measurement:
        raise ProfilerUsageError(
            f"{self.runtime} measures PyTorch modules, not ONNX files such as {onnx_path}: "
            "use measure_module with the module, or a target measured by TensorRT or ONNX Runtime"
        )

    def measure_module(self, artifact: ModuleArtifact) -> Measurement:
        if self.compile_mode:
            # Every candidate's forward is the same code object to Dynamo: without a reset, the
            # ninth would pass its recompile limit and silently run eagerly (and the CUDA graphs
            # recorded for earlier candidates would stay).
            torch._dynamo.reset()
        try:
            module = torch.compile(artifact.module, mode=self.compile_mode) if self.compile_mode else artifact.module
        except (RuntimeError, ValueError, TypeError) as exc:
            raise MeasurementError(f"cannot compile the model for {self.runtime}: {exc}") from exc

        def forward() -> object:
            return module(*artifact.args, **artifact.kwargs)

        @contextlib.contextmanager
        def session(index: int):
            if index == 0 and self.compile_mode:  # compile, then CUDA graphs' warm-up and recording,
                for _ in range(3):  # before the warm-up whose time cap the compile alone would use up
                    forward()
            yield self._timed_run(forward)

        threads = torch.get_num_threads()
        try:
            if self.device.type == "cpu":
                torch.set_num_threads(self.target.threads)
            with torch.inference_mode():
                timings = self._time_sessions(session, self._energy, self_timed=self.device.type == "cuda")
        except (RuntimeError, ValueError, TypeError) as exc:  # a compile or kernel failure
            raise MeasurementError(f"{self.runtime} failed to run the model: {' '.join(str(exc).split())[:500]}") from exc
        finally:
            torch.set_num_threads(threads)
        return self._summarise(
            timings,
            runtime=self.runtime,
            runtime_version=", ".join((TORCH_VERSION, *artifact.libraries)),
            precision=artifact.precision,
            device={**self._machine(), **artifact.details},
        )

    def _machine(self) -> dict[str, object]:
        """What a measurement's ``device`` says of the machine and the compile mode."""
        return {**self._device(), "compile_mode": self.compile_mode}

    def setting(self) -> str:
        return measurement_setting(f"{self.runtime} {TORCH_VERSION}", self._machine())

    def _timed_run(self, forward):
        """One inference: on the GPU timed by CUDA events on the current stream (returns ms);
        on the CPU timed by the profiler's host clock."""
        if self.device.type != "cuda":
            return forward
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def run() -> float:
            start.record()
            forward()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)

        return run

    def _device(self) -> dict[str, object]:
        if self.device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(self.device)
            return {**sensor_device_state(self._energy), "gpu": torch.cuda.get_device_name(self.device),
                    "compute_capability": f"{major}.{minor}"}  # fmt: skip
        return {**cpu_info(), "threads": self.target.threads}
