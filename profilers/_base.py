"""The :class:`Profiler` interface, its :class:`Measurement`, and what every profiler shares:
random inputs for a graph, and the timing loop."""

from __future__ import annotations

import abc
import contextlib
import itertools
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

import numpy as np

from profilers._errors import MeasurementCancelled, ProfilerUsageError
from targets import Target

if TYPE_CHECKING:
    from torch import nn

    from profilers.energy import EnergyReader, EnergyWindow


@dataclass(frozen=True)
class Measurement:
    """Latency (and energy, per inference) of one model on one target.

    The model is timed in ``sessions`` fresh runtime sessions one after another (see
    :class:`Profiler`); ``session_medians_ms`` holds each one's median over all its runs.
    ``latency_ms``, ``latency_p90_ms`` and ``spread`` (coefficient of variation) describe the runs
    of the fastest session's quiet stretches (:func:`quiet_samples`), ``quiet_share`` the share of
    its runs they are; ``stable`` (False when that median had not settled before the time limit)
    and a measured energy describe that whole session. ``samples_ms`` and ``runs`` cover every
    session. ``energy_source`` says whether the energy was ``"measured:<sensor>"`` (over all the
    session's runs) or ``"estimated:spec-power"`` (the target's ``power_w`` times the latency).

    ``layers`` is the runtime's per-layer report where it gives one (TensorRT's engine layers, ONNX
    Runtime's compute nodes with their Q/DQ, reorder and transpose overhead), slowest first: one
    mapping per layer with its ``name``, ``type`` (the kernel), ``ms`` per inference, ``share`` of
    the summed layer time, ``precision``, ``tactic``, the ``onnx_nodes`` of the measured file it
    came from and a ``note`` saying why it may not be as fast as the plan wanted. Empty for
    PyTorch CUDA.
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
    session_medians_ms: tuple[float, ...] = ()
    quiet_share: float | None = None  # None: not known (a service that does not send it)

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", MappingProxyType(dict(self.device)))
        object.__setattr__(self, "samples_ms", tuple(self.samples_ms))
        object.__setattr__(self, "session_medians_ms", tuple(self.session_medians_ms))
        object.__setattr__(self, "layers", tuple(_frozen(layer) for layer in self.layers))

    @property
    def setting(self) -> str:
        """The machine and runtime settings it was taken under (:func:`measurement_setting`)."""
        return measurement_setting(f"{self.runtime} {self.runtime_version}", self.device)

    def to_dict(self) -> dict[str, object]:
        """A JSON-serialisable summary; the samples are left out to keep it small."""
        summary = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "samples_ms"}
        summary["device"] = _plain(self.device)
        summary["layers"] = [_plain(layer) for layer in self.layers]
        summary["session_medians_ms"] = list(self.session_medians_ms)
        return summary


# What a latency depends on besides the model, as the profilers record it in Measurement.device: the
# machine and the runtime settings that pick its kernels. Measurements that differ in one of them do
# not describe one cost function (a fusion left out made MiniLM's int8 file 27 % faster here).
SETTING_KEYS = ("cpu", "isa", "threads", "gpu", "compute_capability", "compile_mode", "disabled_optimizers")


def measurement_setting(runtime: str, device: Mapping[str, object]) -> str:
    """The machine and runtime settings a measurement was taken under, as one JSON text: ``runtime``
    (the runtime and its version, as ``f"{runtime} {runtime_version}"``) and the
    :data:`SETTING_KEYS` of its ``device`` record. Two latencies are comparable where their
    settings are equal. The kernel libraries a module ran on beside PyTorch, listed after its
    version (``"pytorch-cuda torch 2.11.0, torchao 0.10"``), are the plan's, not the setting's."""
    picked = {key: device[key] for key in SETTING_KEYS if key in device}
    return json.dumps({"runtime": runtime.split(", ")[0], **picked}, sort_keys=True)


@dataclass(frozen=True)
class ModuleArtifact:
    """What a profiler that runs PyTorch modules (:attr:`Profiler.measures_onnx` False) measures: a
    module made ready by the search for the target, on the profiler's device, in the precision
    the target runs, its layers on the kernels the target accelerates, called as
    ``module(*args, **kwargs)``.

    ``precision`` says what it computes in (``"int8+fp16"``); ``libraries`` names the kernel
    libraries its layers run on beside PyTorch (``"torchao 0.10"``); ``details`` (its dtype,
    each layer's precision, why a layer does not run as planned) goes into the measurement's
    ``device`` record.
    """

    module: nn.Module
    args: tuple = ()
    kwargs: Mapping[str, object] = field(default_factory=dict)
    precision: str = "fp32"
    libraries: tuple[str, ...] = ()
    details: Mapping[str, object] = field(default_factory=dict, hash=False)


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


# The timing knobs of every profiler (its constructor's keywords), with their types: recorded with
# a study, and sent with each request to a profiler service.
TIMING_KNOBS = {
    "warmup_runs": int,
    "warmup_s": float,
    "min_runs": int,
    "min_time_s": float,
    "max_time_s": float,
    "tolerance": float,
    "sessions": int,
}


class Profiler(abc.ABC):
    """Measures ONNX models on one :class:`~targets.Target`.

    A subclass implements :meth:`measure` with :meth:`_time_sessions` and :meth:`_summarise`,
    so every runtime stops timing by the same rule: after at least
    ``min_runs`` runs and ``min_time_s`` seconds, once the median of the quiet stretches (the
    figure reported) moves by less than ``tolerance`` between two rounds, or at ``max_time_s``
    (then the result is not stable).

    That is done in ``sessions`` fresh runtime sessions, one after another, and the fastest
    session's figures are reported. On a shared 2-vCPU VM the same ONNX file measured 5.6 ms in
    most sessions and 6.2–7.7 ms in about one in five: interference (or an unlucky memory
    placement) never makes a model faster, and the minimum over repeats is the figure that does
    not depend on it (as Python's ``timeit`` advises). Interference also comes and goes within a
    session, so each session's figure is the median of its quiet stretches (:func:`quiet_samples`).
    Every session's plain median is kept in the measurement.
    """

    measures_onnx = True  # False: it measures PyTorch modules (measure_module)
    # Asked before each session and after each warm-up and timed run (outside the timed span);
    # when it answers True the measurement stops with MeasurementCancelled. The profiler service
    # sets it on its per-request copy, so a client that left or a stopping service ends a
    # measurement within one run instead of at max_time_s.
    should_stop: Callable[[], bool] | None = None

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
        sessions: int = 3,
    ) -> None:
        if (
            not 1 <= min_runs
            or not 0 <= min_time_s <= max_time_s
            or not 0 < tolerance
            or not 1 <= sessions
        ):
            raise ValueError(
                "timing needs min_runs >= 1, 0 <= min_time_s <= max_time_s, tolerance > 0 and "
                f"sessions >= 1, got min_runs={min_runs}, min_time_s={min_time_s}, "
                f"max_time_s={max_time_s}, tolerance={tolerance}, sessions={sessions}"
            )
        self.target = target
        self.runtime = target.runtime  # what measures here; a fallback runtime sets its own
        self.warmup_runs = warmup_runs
        self.warmup_s = warmup_s
        self.min_runs = min_runs
        self.min_time_s = min_time_s
        self.max_time_s = max_time_s
        self.tolerance = tolerance
        self.sessions = sessions

    def timing(self) -> dict[str, float]:
        """This profiler's :data:`TIMING_KNOBS`, as its constructor takes them."""
        return {key: getattr(self, key) for key in TIMING_KNOBS}

    def setting(self) -> str | None:
        """The :func:`measurement_setting` its measurements will carry, where it is known before
        measuring (a runtime on this machine, a profiler service); None where only a measurement
        tells."""
        return None

    @abc.abstractmethod
    def measure(
        self, onnx_path: str | Path, inputs: Mapping[str, np.ndarray] | None = None
    ) -> Measurement:
        """Measure the model in ``onnx_path`` on random inputs (see :func:`random_inputs`)
        unless ``inputs`` are given. Raises :class:`~profilers.MeasurementError` when the
        model cannot be built or run."""

    def measure_module(self, artifact: ModuleArtifact) -> Measurement:
        """Measure a PyTorch module made ready for the target: only a runtime that runs modules
        (:attr:`measures_onnx` False) can."""
        raise ProfilerUsageError(
            f"{self.runtime} measures ONNX files, not PyTorch modules: export the model and call measure"
        )

    def _warm_up(self, run: Callable[[], object]) -> None:
        """Run until both ``warmup_runs`` runs and ``warmup_s`` seconds are done, or
        ``max_time_s`` seconds have passed (a model slow enough for that needs no more)."""
        start = time.perf_counter()
        runs = 0
        while True:
            run()
            self._stop_if_asked()
            runs += 1
            elapsed = time.perf_counter() - start
            done = runs >= self.warmup_runs and elapsed >= self.warmup_s
            if done or elapsed >= self.max_time_s:
                return

    def _time(
        self, run: Callable[[], object], *, self_timed: bool = False
    ) -> tuple[list[float], bool]:
        """Timed runs in rounds, each of about a tenth of ``min_runs``; returns the samples in
        milliseconds and whether the median of their quiet stretches settled before ``max_time_s``.

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
                self._stop_if_asked()
                if t1 >= deadline:
                    break
            elapsed_s = (time.perf_counter_ns() - start) / 1e9
            median = float(np.median(quiet_samples(samples_ms)))
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

    def _time_sessions(
        self,
        open_session: Callable[[int], contextlib.AbstractContextManager[Callable[[], object]]],
        energy: EnergyReader | None,
        *,
        self_timed: bool = False,
    ) -> list[SessionTiming]:
        """Warm up and time ``sessions`` fresh sessions in turn: ``open_session(index)`` is a
        context manager whose value is the session's run function. ``energy`` (the target's
        reader, or None) opens a window around each session's timed runs."""
        timings = []
        for index in range(self.sessions):
            self._stop_if_asked()
            with open_session(index) as run:
                self._warm_up(run)
                window = energy.window() if energy else None
                with window or contextlib.nullcontext():
                    samples_ms, stable = self._time(run, self_timed=self_timed)
            timings.append(SessionTiming(samples_ms, stable, window))
        return timings

    def _stop_if_asked(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise MeasurementCancelled("the measurement was cancelled")

    def _summarise(self, timings: Sequence[SessionTiming], **fields: object) -> Measurement:
        """A :class:`Measurement` of the fastest of ``timings`` (the lowest median of its quiet
        stretches, see :func:`quiet_samples`), with every session's samples and plain median. The
        energy is what the target's sensor read over that session's timed runs; without a reading
        it is estimated from the target's ``power_w``."""
        quiet = [quiet_samples(timing.samples_ms) for timing in timings]
        index = int(np.argmin([np.median(samples) for samples in quiet]))
        best, samples = timings[index], quiet[index]
        median = float(np.median(samples))
        if best.energy is None or best.energy.energy_mj is None:
            energy_mj = self.target.power_w * median  # W x ms = mJ
            energy_source = "estimated:spec-power"
        else:
            energy_mj = best.energy.energy_mj / len(best.samples_ms)
            energy_source = best.energy.source
        every_sample = tuple(itertools.chain.from_iterable(timing.samples_ms for timing in timings))
        return Measurement(
            latency_ms=median,
            latency_p90_ms=float(np.percentile(samples, 90)),
            runs=len(every_sample),
            spread=float(samples.std() / samples.mean()),
            stable=best.stable,
            energy_mj=energy_mj,
            energy_source=energy_source,
            samples_ms=every_sample,
            session_medians_ms=tuple(float(np.median(timing.samples_ms)) for timing in timings),
            quiet_share=len(samples) / len(best.samples_ms),
            **fields,
        )


@dataclass(frozen=True)
class SessionTiming:
    """One session's timed runs: their durations, whether the median settled, and the energy
    window open around them (None without a sensor reader)."""

    samples_ms: list[float]
    stable: bool
    energy: EnergyWindow | None


QUIET_BLOCK_RUNS = 25
QUIET_TOLERANCE = 0.05


def quiet_samples(
    samples_ms: Sequence[float], block_runs: int = QUIET_BLOCK_RUNS, tolerance: float = QUIET_TOLERANCE
) -> np.ndarray:
    """The runs of one session's quiet stretches: its samples (in the order they were timed) cut
    into blocks of ``block_runs`` runs, and the blocks whose median is within ``tolerance`` of the
    lowest block median kept (all of them when there are fewer than two blocks).

    On a shared VM another tenant slows a run for milliseconds at a time, not for whole sessions:
    the same session timed in 0.3 s windows read 0.075 ms in some and 0.10-0.13 ms in others, and
    its runs in stretches of 25 came either quiet or slowed. Interference never makes a run
    faster, so the runs of the fastest stretches are the model's own speed: measured in 10
    processes, the default teacher read 0.438-0.448 ms by this and 0.446-0.589 ms by the fastest
    session's plain median (``benchmarks/repeatability.py``).
    """
    samples = np.asarray(samples_ms, dtype=float)
    blocks = len(samples) // block_runs
    if blocks < 2:
        return samples
    medians = np.median(samples[: blocks * block_runs].reshape(blocks, block_runs), axis=1)
    keep = np.repeat(medians <= (1 + tolerance) * medians.min(), block_runs)
    return samples[: blocks * block_runs][keep]


def random_inputs(onnx_path: str | Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Random arrays for the graph inputs of ``onnx_path``, with symbolic or unknown dimensions
    (such as a dynamic batch) set to 1. Integer inputs get 0s and 1s, valid as token ids,
    indices and masks alike."""
    import onnx  # here: it takes a second to import, and nothing else in this module needs it

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
