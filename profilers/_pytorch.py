"""PyTorch as the runtime (``runtime = "pytorch-cuda"``, the ``gpu`` target's fallback where
TensorRT is absent; ``"pytorch-cpu"``): the candidate module itself, not its ONNX file.

The module runs in the float precision the target accelerates (fp16, else bf16, else fp32, as
TensorRT runs float layers in fp16 when the target lists it), its int8 Linear layers through
torchao's int8 kernels (dynamic per-token activations, per-channel weights), its 2:4 Linear
layers as semi-structured sparse tensors (cuSPARSELt / CUTLASS, CUDA only), compiled with
``torch.compile``, and timed on the GPU with CUDA events. A compression this profiler has no
kernel for (int4 and binarized layers, int8 convolutions, 2:4 where the shape or device does not
allow it) runs in the float precision, and the measurement's notes say so: it gets no speedup.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.metadata
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from profilers._base import Measurement, Profiler
from profilers._cpuinfo import cpu_info
from profilers._energy import EnergyReader, optional_energy_reader, sensor_device_state
from search._errors import CandidateError, TargetUnavailableError, UsageError
from search._io import Inputs, call
from search._layers import compressible_layers
from search._plan import Plan
from targets import Target

RUNTIMES = ("pytorch-cuda", "pytorch-cpu")
_FLOAT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_PRECISION_ORDER = ("sparse-2:4", "int8", "fp16", "bf16", "fp32")


def float_precision(precisions: tuple[str, ...]) -> str:
    """The float precision a model runs in on a target that accelerates ``precisions``."""
    return next((p for p in ("fp16", "bf16") if p in precisions), "fp32")


@functools.cache
def torchao_version() -> str | None:
    """torchao's version where it is installed (``pip install '.[cuda]'``), else None (read once:
    every layer of every candidate asks)."""
    try:
        return importlib.metadata.version("torchao")
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class Prepared:
    """A candidate made ready to run: what each compressible layer runs as, and why a layer does
    not run as its plan asked."""

    model: nn.Module
    dtype: str
    layer_precision: Mapping[str, str]
    notes: tuple[str, ...]

    @property
    def precision(self) -> str:
        """The precisions the model computes in, such as ``"int8+fp16"``."""
        used = {part for value in self.layer_precision.values() for part in value.split("+")} | {self.dtype}
        return "+".join(p for p in _PRECISION_ORDER if p in used)


def prepare(model: nn.Module, plan: Plan, precisions: tuple[str, ...], device: torch.device) -> Prepared:
    """A copy of ``model`` (a baked candidate; ``plan`` in its own module names) on ``device``, in
    :func:`float_precision`, with the layers the target accelerates at int8 or 2:4 converted."""
    dtype = float_precision(precisions)
    model = copy.deepcopy(model).eval().to(device=device, dtype=_FLOAT_DTYPES[dtype])
    layer_precision, notes, int8 = {}, [], set()
    for name, layer in compressible_layers(model).items():
        entry, runs_as = plan.layer(name), dtype
        bits = entry.quantization.bits
        if bits != 32:
            why = _why_not_int(layer, bits, precisions)
            if why is None:
                int8.add(name)
                runs_as = "int8"
            else:
                notes.append(f"{name}: {bits}-bit planned, runs as {dtype} ({why})")
        if entry.sparsity.pattern == "2:4" and entry.sparsity.ratio > 0 and "sparse-2:4" in precisions:
            why = _two_four(layer) if runs_as != "int8" else "2:4 is not combined with int8 here"
            if why is None:
                runs_as = f"sparse-2:4+{runs_as}"
            else:
                notes.append(f"{name}: 2:4 planned, runs dense ({why})")
        layer_precision[name] = runs_as
    if int8:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        quantize_(model, Int8DynamicActivationInt8WeightConfig(), filter_fn=lambda _, fqn: fqn in int8)
    return Prepared(model, dtype, layer_precision, tuple(notes))


def _why_not_int(layer: nn.Module, bits: int, precisions: tuple[str, ...]) -> str | None:
    """Why a ``bits``-bit layer cannot run on integer kernels here; None when torchao's int8 can."""
    if bits != 8 or not isinstance(layer, nn.Linear):
        return f"this profiler has no {bits}-bit {type(layer).__name__} kernel"
    if "int8" not in precisions:
        return "the target does not list int8"
    if torchao_version() is None:
        return "torchao is not installed: pip install '.[cuda]'"
    return None


def _two_four(layer: nn.Module) -> str | None:
    """Make ``layer``'s weight a semi-structured sparse tensor in place; the reason it cannot be
    (not a Linear, not on CUDA, a shape or dtype the kernels do not take), or None once done."""
    if not isinstance(layer, nn.Linear):
        return f"PyTorch's 2:4 kernels take Linear layers, not {type(layer).__name__}"
    try:
        sparse = torch.sparse.to_sparse_semi_structured(layer.weight.detach().contiguous())
    except (RuntimeError, ValueError) as exc:
        return str(exc).split("\n")[0]
    layer.weight = nn.Parameter(sparse, requires_grad=False)
    return None


def _to_device(inputs: Inputs, device: torch.device, dtype: torch.dtype) -> Inputs:
    """``inputs`` on ``device``, their float tensors in ``dtype`` (integer ids and masks kept)."""
    if isinstance(inputs, Mapping):
        return {key: _to_device(value, device, dtype) for key, value in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_to_device(value, device, dtype) for value in inputs)
    return inputs.to(device=device, dtype=dtype if inputs.is_floating_point() else inputs.dtype)


class PyTorchProfiler(Profiler):
    """Measures the candidate module with PyTorch on the target's device (see the module's doc).

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

    def measure(self, onnx_path: str | Path, inputs: Mapping[str, np.ndarray] | None = None) -> Measurement:
        raise UsageError(
            f"{self.runtime} measures PyTorch modules, not ONNX files such as {onnx_path}: "
            "use measure_candidate with the module, or a target measured by TensorRT or ONNX Runtime"
        )

    def measure_candidate(
        self, onnx_path: str | Path, model: nn.Module, example_input: Inputs, plan: Plan | None = None
    ) -> Measurement:
        if self.compile_mode:
            # Every candidate's forward is the same code object to Dynamo: without a reset, the
            # ninth would pass its recompile limit and silently run eagerly (and the CUDA graphs
            # recorded for earlier candidates would stay).
            torch._dynamo.reset()
        try:
            prepared = prepare(model, plan or Plan(), self.target.precisions, self.device)
            inputs = _to_device(example_input, self.device, _FLOAT_DTYPES[prepared.dtype])
            module = torch.compile(prepared.model, mode=self.compile_mode) if self.compile_mode else prepared.model
        except (RuntimeError, ValueError, TypeError) as exc:  # out of GPU memory, a torchao refusal
            raise CandidateError(f"cannot prepare the model for {self.runtime}: {exc}") from exc

        @contextlib.contextmanager
        def session(index: int):
            if index == 0 and self.compile_mode:  # compile, then CUDA graphs' warm-up and recording,
                for _ in range(3):  # before the warm-up whose time cap the compile alone would use up
                    call(module, inputs)
            yield self._timed_run(module, inputs)

        threads = torch.get_num_threads()
        try:
            if self.device.type == "cpu":
                torch.set_num_threads(self.target.threads)
            with torch.inference_mode():
                timings = self._time_sessions(session, self._energy, self_timed=self.device.type == "cuda")
        except (RuntimeError, ValueError, TypeError) as exc:  # a compile or kernel failure
            raise CandidateError(f"{self.runtime} failed to run the model: {' '.join(str(exc).split())[:500]}") from exc
        finally:
            torch.set_num_threads(threads)
        torchao = torchao_version()
        return self._summarise(
            timings,
            runtime=self.runtime,
            runtime_version=f"torch {torch.__version__}" + (f", torchao {torchao}" if torchao else ""),
            precision=prepared.precision,
            device={**self._device(), "compile_mode": self.compile_mode, "dtype": prepared.dtype,
                    "layer_precision": dict(prepared.layer_precision), "notes": list(prepared.notes)},
        )  # fmt: skip

    def _timed_run(self, module: nn.Module, inputs: Inputs):
        """One inference: on the GPU timed by CUDA events on the current stream (returns ms);
        on the CPU timed by the profiler's host clock."""
        if self.device.type != "cuda":
            return lambda: call(module, inputs)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def run() -> float:
            start.record()
            call(module, inputs)
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
