"""The TensorRT profiler: an engine built from the ONNX file (or taken from the cache), timed the
way trtexec times it, with a per-layer report."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from profilers._base import Measurement, Profiler, random_inputs
from profilers._errors import MeasurementError, TargetUnavailableError
from profilers.energy import EnergyReader, optional_energy_reader, sensor_device_state
from profilers.tensorrt._build import BuildPlan, build_plan
from profilers.tensorrt._cache import (
    DEFAULT_ENGINE_DIR,
    engine_cache_key,
    engine_path,
    write_atomically,
)
from profilers.tensorrt._cuda import Backend, CudaError, Session, TensorRTBackend
from profilers.tensorrt._graph import GraphSummary, qdq_hint, summarise_graph
from profilers.tensorrt._report import (
    engine_precision,
    layer_report,
    parse_engine_information,
)
from targets import Target

logger = logging.getLogger(__name__)


def default_timing(target: Target, **given: float) -> dict[str, float]:
    """trtexec-like timing for ``target``, overridden by ``given``: 200 ms of warm-up, then timed
    runs for at least 1 s on a discrete GPU and 3 s on a Jetson (trtexec's default duration),
    whose clocks settle more slowly and whose INA3221 rails are sampled every 10 ms; NVML's energy
    counter advances in steps of tens of ms, so shorter windows would quantise the energy. The
    time limit is twice that. A ``max_time_s`` given below the default ``min_time_s`` lowers it."""
    min_time_s = 3.0 if target.power_sensor == "ina3221" else 1.0
    timing = {"warmup_s": 0.2, "min_time_s": min_time_s, "max_time_s": 2 * min_time_s}
    timing.update(given)
    if "min_time_s" not in given:
        timing["min_time_s"] = min(timing["min_time_s"], timing["max_time_s"])
    return timing



class TensorRTProfiler(Profiler):
    """Builds a TensorRT engine from the ONNX file (or takes it from the engine cache), then
    times it the way trtexec does: warm-up, then inferences one at a time on a CUDA stream, each
    timed with CUDA events, until the median settles (see :func:`default_timing` for the knobs it
    defaults to through :func:`~profilers.get_profiler`). A few more inferences run with an
    ``IProfiler`` attached, for the per-layer report in :attr:`Measurement.layers
    <profilers.Measurement.layers>`; they are not in the latency.

    Engines are cached in ``engine_dir`` under :func:`engine_cache_key`, so a plan measured again
    never rebuilds. ``strongly_typed`` chooses the network kind on TensorRT 10 (see
    :func:`build_plan`); ``workspace_bytes`` caps the builder's workspace (TensorRT's default is
    the whole GPU memory); ``profile_runs`` is the number of profiled inferences. Energy comes
    from the target's power sensor (NVML on a GPU, INA3221 on a Jetson) when it can be read.
    ``backend`` replaces TensorRT and CUDA (tests pass a fake); by default they are imported on
    the first measurement.
    """

    def __init__(
        self,
        target: Target,
        *,
        engine_dir: str | Path = DEFAULT_ENGINE_DIR,
        strongly_typed: bool | None = None,
        workspace_bytes: int | None = None,
        profile_runs: int = 20,
        energy: EnergyReader | None = None,
        backend: Backend | None = None,
        **timing: float,
    ) -> None:
        super().__init__(target, **timing)
        if profile_runs < 0:
            raise ValueError(f"profile_runs must be >= 0, got {profile_runs}")
        self.engine_dir = Path(engine_dir)
        self.strongly_typed = strongly_typed
        self.workspace_bytes = workspace_bytes
        self.profile_runs = profile_runs
        self._energy = energy if energy is not None else optional_energy_reader(target)
        self._backend = backend
        self.builds = 0  # engines built by this profiler (not taken from the cache)

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            try:
                self._backend = TensorRTBackend()
            except (ImportError, OSError, RuntimeError) as exc:
                raise TargetUnavailableError(
                    f"target '{self.target.name}' cannot be measured here: {exc}"
                ) from exc
        return self._backend

    def measure(
        self, onnx_path: str | Path, inputs: Mapping[str, np.ndarray] | None = None
    ) -> Measurement:
        path = Path(onnx_path)
        try:
            model = onnx.load(str(path))
        except Exception as exc:  # protobuf's DecodeError, a missing external data file, ...
            raise MeasurementError(f"{path}: not a readable ONNX model: {exc}") from exc
        summary = summarise_graph(model)
        del model
        feeds = dict(inputs) if inputs is not None else random_inputs(path)
        shapes = {name: tuple(array.shape) for name, array in feeds.items()}
        backend = self.backend
        plan = build_plan(
            self.target.precisions, summary, backend.version, strongly_typed=self.strongly_typed
        )
        device = backend.device()
        key = engine_cache_key(
            path, target=self.target.name, plan=plan, gpu=str(device.get("gpu")),
            input_shapes=shapes, workspace_bytes=self.workspace_bytes,
        )  # fmt: skip
        cached = engine_path(self.engine_dir, self.target.name, key)
        engine, source, build_s = self._engine(path, plan, shapes, cached, summary)
        try:
            session = self._session(engine, feeds, path)
        except MeasurementError:
            if source != "cache":
                raise
            cached.unlink(missing_ok=True)  # stale or damaged: build it again, once
            engine, source, build_s = self._engine(path, plan, shapes, cached, summary)
            session = self._session(engine, feeds, path)
        report: dict[str, object] = {}

        @contextlib.contextmanager
        def fresh_session(index: int):
            current = session if index == 0 else self._session(engine, feeds, path)
            try:
                current.run()
                yield current.run
                if index == self.sessions - 1:  # the per-layer report, once
                    report["layer_ms"] = current.layer_times(self.profile_runs) if self.profile_runs else {}
                    report["information"] = current.engine_information()
            finally:
                current.close()

        try:  # the first session is taken at once, and each one closes itself
            timings = self._time_sessions(fresh_session, self._energy, self_timed=True)
        except CudaError as exc:
            raise MeasurementError(f"{path}: running the engine failed: {exc}") from exc
        layer_ms, information = report["layer_ms"], report["information"]
        engine_layers = parse_engine_information(information)
        layers = layer_report(
            engine_layers,
            layer_ms,
            int8_nodes=summary.int8_nodes,
            sparse_nodes=summary.sparse_nodes,
            sparse_enabled="SPARSE_WEIGHTS" in plan.builder_flags,
        )
        return self._summarise(
            timings,
            runtime=self.target.runtime,
            runtime_version=plan.tensorrt_version,
            precision=engine_precision(engine_layers),
            device={
                **sensor_device_state(self._energy),
                **device,
                "network_flags": list(plan.network_flags),
                "builder_flags": list(plan.builder_flags),
                "workspace_bytes": self.workspace_bytes,
                "tensorrt_notes": list(plan.notes),
                "engine": source,
                "engine_build_s": build_s,
                "engine_file": str(cached),
            },
            layers=layers,
        )

    def _session(self, engine: bytes, feeds: Mapping[str, np.ndarray], path: Path) -> Session:
        try:
            return self.backend.session(engine, feeds, str(path))
        except CudaError as exc:  # out of device memory for the buffers, most likely
            raise MeasurementError(f"{path}: cannot set up the engine on the GPU: {exc}") from exc

    def _engine(
        self, path: Path, plan: BuildPlan, shapes: Mapping[str, Sequence[int]], cached: Path,
        summary: GraphSummary,
    ) -> tuple[bytes, str, float | None]:  # fmt: skip
        """The serialized engine, from the cache or built (and cached), with where it came from
        and the build time in seconds."""
        with contextlib.suppress(FileNotFoundError):
            return cached.read_bytes(), "cache", None
        start = time.perf_counter()
        engine = self.backend.build(
            path, plan, shapes, workspace_bytes=self.workspace_bytes, hint=qdq_hint(summary)
        )
        build_s = time.perf_counter() - start
        self.builds += 1
        try:
            write_atomically(cached, engine)
        except OSError as exc:  # measured all the same; the next measurement builds again
            logger.warning("cannot cache the engine in %s: %s", cached.parent, exc.strerror or exc)
        return engine, "built", build_s
