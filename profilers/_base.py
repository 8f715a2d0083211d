"""The :class:`Profiler` interface, its :class:`Measurement`, and what every profiler shares:
random inputs for a graph, and the timing loop."""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

import numpy as np
import onnx

from targets import Target

if TYPE_CHECKING:
    from profilers._energy import EnergyWindow


@dataclass(frozen=True)
class Measurement:
    """Latency (and energy, per inference) of one model on one target.

    ``spread`` is the coefficient of variation of ``samples_ms``; ``stable`` is False when
    the median had not settled before the time limit. ``energy_source`` says whether the
    energy was ``"measured:<sensor>"`` or ``"estimated:spec-power"`` (the target's
    ``power_w`` times the median latency).

    ``layers`` is the runtime's per-layer report where it gives one (TensorRT), slowest first:
    one mapping per engine layer with its ``name``, ``type``, ``ms`` per inference, ``share`` of
    the summed layer time, ``precision``, ``tactic``, the ``onnx_nodes`` it came from and a
    ``note`` saying why it may not be as fast as the plan wanted. Empty for other runtimes.
    """

    latency_ms: float
    latency_p90_ms: float
    runs: int
    spread: float
    stable: bool
    energy_mj: float | None
    energy_source: str
    runtime: str
    runtime_version: str
    precision: str
    device: Mapping[str, object] = field(hash=False)
    samples_ms: tuple[float, ...]
    source: str = "measured"
    layers: tuple[Mapping[str, object], ...] = field(default=(), hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", MappingProxyType(dict(self.device)))
        object.__setattr__(self, "samples_ms", tuple(self.samples_ms))
        object.__setattr__(self, "layers", tuple(_frozen(layer) for layer in self.layers))

    def to_dict(self) -> dict[str, object]:
        """A JSON-serialisable summary; the samples are left out to keep it small."""
        summary = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "samples_ms"}
        summary["device"] = _plain(self.device)
        summary["layers"] = [_plain(layer) for layer in self.layers]
        return summary


def _frozen(mapping: Mapping[str, object]) -> Mapping[str, object]:
    """A read-only copy of ``mapping`` whose list values are tuples (JSON gives lists back)."""
    return MappingProxyType(
        {key: tuple(value) if isinstance(value, list) else value for key, value in mapping.items()}
    )


def _plain(mapping: Mapping[str, object]) -> dict[str, object]:
    """A dict copy of ``mapping`` whose tuple values are lists, as JSON has them."""
    return {
        key: list(value) if isinstance(value, tuple) else value for key, value in mapping.items()
    }


class Profiler(abc.ABC):
    """Measures ONNX models on one :class:`~targets.Target`.

    A subclass implements :meth:`measure` with :meth:`_warm_up`, :meth:`_time` and
    :meth:`_summarise`, so every runtime stops timing by the same rule: after at least
    ``min_runs`` runs and ``min_time_s`` seconds, once the median moves by less than
    ``tolerance`` between two rounds, or at ``max_time_s`` (then the result is not stable).
    """

    def __init__(
        self,
        target: Target,
        *,
        warmup_runs: int = 10,
        warmup_s: float = 0.1,
        min_runs: int = 100,
        min_time_s: float = 0.5,
        max_time_s: float = 3.0,
        tolerance: float = 0.02,
    ) -> None:
        if not 1 <= min_runs or not 0 <= min_time_s <= max_time_s or not 0 < tolerance:
            raise ValueError(
                "timing needs min_runs >= 1, 0 <= min_time_s <= max_time_s and tolerance > 0, "
                f"got min_runs={min_runs}, min_time_s={min_time_s}, max_time_s={max_time_s}, "
                f"tolerance={tolerance}"
            )
        self.target = target
        self.warmup_runs = warmup_runs
        self.warmup_s = warmup_s
        self.min_runs = min_runs
        self.min_time_s = min_time_s
        self.max_time_s = max_time_s
        self.tolerance = tolerance

    @abc.abstractmethod
    def measure(
        self, onnx_path: str | Path, inputs: Mapping[str, np.ndarray] | None = None
    ) -> Measurement:
        """Measure the model in ``onnx_path`` on random inputs (see :func:`random_inputs`)
        unless ``inputs`` are given. Raises :class:`~search._errors.CandidateError` when the
        model cannot be built or run."""

    def _warm_up(self, run: Callable[[], object]) -> None:
        """Run until both ``warmup_runs`` runs and ``warmup_s`` seconds are done, or
        ``max_time_s`` seconds have passed (a model slow enough for that needs no more)."""
        start = time.perf_counter()
        runs = 0
        while True:
            run()
            runs += 1
            elapsed = time.perf_counter() - start
            done = runs >= self.warmup_runs and elapsed >= self.warmup_s
            if done or elapsed >= self.max_time_s:
                return

    def _time(
        self, run: Callable[[], object], *, self_timed: bool = False
    ) -> tuple[list[float], bool]:
        """Timed runs in rounds, each of about a tenth of ``min_runs``; returns the samples in
        milliseconds and whether the median settled before ``max_time_s``.

        Each run is timed on the host clock, unless ``self_timed``: then ``run`` returns its own
        duration in milliseconds (a GPU runtime times itself with CUDA events on its stream, which
        leaves out the launch and synchronisation overhead the host clock would add). The time
        limits always follow the host clock."""
        round_runs = max(1, self.min_runs // 10)
        samples_ms: list[float] = []
        previous_median = None
        start = time.perf_counter_ns()
        deadline = start + int(self.max_time_s * 1e9)
        while True:
            for _ in range(round_runs):
                t0 = time.perf_counter_ns()
                result = run()
                t1 = time.perf_counter_ns()
                samples_ms.append(float(result) if self_timed else (t1 - t0) / 1e6)
                if t1 >= deadline:
                    break
            elapsed_s = (time.perf_counter_ns() - start) / 1e9
            median = float(np.median(samples_ms))
            if (
                len(samples_ms) >= self.min_runs
                and elapsed_s >= self.min_time_s
                and previous_median is not None
                and abs(median - previous_median) < self.tolerance * previous_median
            ):
                return samples_ms, True
            if elapsed_s >= self.max_time_s:
                return samples_ms, False
            previous_median = median

    def _summarise(
        self,
        samples_ms: list[float],
        stable: bool,
        energy: EnergyWindow | None,
        **fields: object,
    ) -> Measurement:
        """A :class:`Measurement` of ``samples_ms``. ``energy`` is the window the target's power
        sensor read over all the timed runs (see :func:`~profilers._energy.energy_reader`); when
        it is None or read nothing, the energy is estimated from the target's ``power_w``."""
        samples = np.asarray(samples_ms)
        median = float(np.median(samples))
        if energy is None or energy.energy_mj is None:
            energy_mj = self.target.power_w * median  # W x ms = mJ
            energy_source = "estimated:spec-power"
        else:
            energy_mj = energy.energy_mj / len(samples)
            energy_source = energy.source
        return Measurement(
            latency_ms=median,
            latency_p90_ms=float(np.percentile(samples, 90)),
            runs=len(samples),
            spread=float(samples.std() / samples.mean()),
            stable=stable,
            energy_mj=energy_mj,
            energy_source=energy_source,
            samples_ms=tuple(samples_ms),
            **fields,
        )


def random_inputs(onnx_path: str | Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Random arrays for the graph inputs of ``onnx_path``, with symbolic or unknown dimensions
    (such as a dynamic batch) set to 1. Integer inputs get 0s and 1s, valid as token ids,
    indices and masks alike."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    weights = {initializer.name for initializer in model.graph.initializer}
    rng = np.random.default_rng(seed)
    arrays = {}
    for value in model.graph.input:
        if value.name in weights:
            continue
        tensor = value.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in tensor.shape.dim)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)
        if np.issubdtype(dtype, np.floating):
            arrays[value.name] = rng.standard_normal(shape).astype(dtype)
        else:
            arrays[value.name] = rng.integers(0, 2, shape).astype(dtype)
    return arrays
