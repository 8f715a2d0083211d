import itertools
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize_static

from profilers import (
    Measurement,
    MeasurementCancelled,
    MeasurementError,
    OnnxRuntimeCpuProfiler,
    Profiler,
    RaplReader,
    RemoteProfiler,
    TargetUnavailableError,
    get_profiler,
    random_inputs,
)
from profilers._base import QUIET_BLOCK_RUNS, SessionTiming, quiet_samples
from targets import load_target

from loopback import TOKEN

REPO = Path(__file__).resolve().parents[1]
WIDTH = 256
SHORT = {"warmup_s": 0.01, "min_runs": 50, "min_time_s": 0.05, "max_time_s": 1.0}
LOCAL_PROFILERS = [OnnxRuntimeCpuProfiler]


def two_matmuls(path):
    """x[batch, 64, 256] -> MatMul -> Relu -> MatMul: about 70 us on one core."""
    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.standard_normal((WIDTH, WIDTH)).astype(np.float32), name)
        for name in ("w1", "w2")
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="first"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="second"),
    ]
    shape = ["batch", 64, WIDTH]
    graph = helper.make_graph(
        nodes,
        "two_matmuls",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, path)
    return path


def three_convs(path, channels=16):
    """x[batch, 16, 32, 32] -> (Conv 3x3 -> Relu) x 3: about 80 us on one core."""
    rng = np.random.default_rng(0)
    weights, nodes, previous = [], [], "x"
    for i in range(3):
        kernel = (0.1 * rng.standard_normal((channels, channels, 3, 3))).astype(np.float32)
        weights += [
            numpy_helper.from_array(kernel, f"w{i}"),
            numpy_helper.from_array(np.zeros(channels, np.float32), f"b{i}"),
        ]
        nodes += [
            helper.make_node(
                "Conv", [previous, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", pads=[1] * 4
            ),
            helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"),
        ]
        previous = f"r{i}"
    shape = ["batch", channels, 32, 32]
    graph = helper.make_graph(
        nodes,
        "three_convs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(previous, TensorProto.FLOAT, shape)],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, path)
    return path


class Calibration(CalibrationDataReader):
    def __init__(self, shape):
        rng = np.random.default_rng(1)
        self._batches = iter(
            [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(4)]
        )

    def get_next(self):
        return next(self._batches, None)


def quantized(fp32_path, path, exclude=()):
    shape = random_inputs(fp32_path)["x"].shape
    quantize_static(
        str(fp32_path),
        str(path),
        Calibration(shape),
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=list(exclude),
    )
    return path


@pytest.fixture(scope="module")
def fp32_model(tmp_path_factory):
    return two_matmuls(tmp_path_factory.mktemp("models") / "fp32.onnx")


@pytest.fixture(params=[*LOCAL_PROFILERS, RemoteProfiler], ids=lambda cls: cls.__name__)
def profiler(request) -> Profiler:
    """Every profiler; the remote one reaches the cpu target's through the service on loopback."""
    if request.param is RemoteProfiler:
        address = request.getfixturevalue("loopback_service")
        return RemoteProfiler(load_target("cpu"), address, TOKEN, **SHORT)
    return request.param(load_target("cpu"), **SHORT)


class TestProfilerContract:
    def test_measures_latency(self, profiler, fp32_model):
        result = profiler.measure(fp32_model)
        assert isinstance(result, Measurement)
        assert result.latency_ms > 0
        assert result.latency_p90_ms >= result.latency_ms
        assert result.runs >= SHORT["min_runs"]
        # The service sends no samples.
        remote = isinstance(profiler, RemoteProfiler)
        assert len(result.samples_ms) == (0 if remote else result.runs)
        assert result.spread >= 0
        assert 0 < result.quiet_share <= 1  # the service passes it on
        assert result.precision == "fp32"
        assert result.runtime == profiler.target.runtime
        assert result.runtime_version
        assert result.device["threads"] == profiler.target.threads
        assert result.source == "measured"

    def test_energy_is_labelled(self, profiler, fp32_model):
        result = profiler.measure(fp32_model)
        assert result.energy_mj > 0
        if RaplReader().read() is None:  # these machines: no readable RAPL
            assert result.energy_source == "estimated:spec-power"
            assert result.energy_mj == pytest.approx(profiler.target.power_w * result.latency_ms)
        else:
            assert result.energy_source == "measured:rapl"

    def test_quantized_model_reports_int8(self, profiler, fp32_model, tmp_path):
        result = profiler.measure(quantized(fp32_model, tmp_path / "int8.onnx"))
        assert "int8" in result.precision.split("+")

    def test_given_inputs_are_used(self, profiler, fp32_model):
        inputs = {"x": np.ones((3, 64, WIDTH), np.float32)}
        if isinstance(profiler, RemoteProfiler):  # the service makes its own inputs
            with pytest.raises(ValueError, match="inputs must be None"):
                profiler.measure(fp32_model, inputs)
            return
        assert profiler.measure(fp32_model, inputs).latency_ms > 0
        with pytest.raises(MeasurementError, match="fp32.onnx"):
            profiler.measure(fp32_model, {"not_x": inputs["x"]})

    def test_file_that_is_not_onnx_fails_the_candidate(self, profiler, tmp_path):
        path = tmp_path / "broken.onnx"
        path.write_bytes(b"this is not a protobuf")
        with pytest.raises(MeasurementError, match="broken.onnx"):
            profiler.measure(path)

    def test_unstable_when_out_of_time(self, profiler, fp32_model):
        profiler.min_runs, profiler.min_time_s, profiler.max_time_s = 10**6, 0.0, 0.05
        result = profiler.measure(fp32_model)
        assert not result.stable
        assert 0 < result.runs < 10**6

    def test_to_dict_is_json(self, profiler, fp32_model):
        summary = profiler.measure(fp32_model).to_dict()
        assert json.loads(json.dumps(summary)) == summary
        assert "samples_ms" not in summary
        assert summary["device"]["threads"] == profiler.target.threads


def test_mixed_precision_keeps_float_layers_float(tmp_path):
    """ORT's WeightBiasQuantization pass would turn the excluded middle conv into QLinearConv."""
    convs = three_convs(tmp_path / "convs.onnx")
    mixed = quantized(convs, tmp_path / "mixed.onnx", exclude=["conv1"])
    result = OnnxRuntimeCpuProfiler(load_target("cpu"), **SHORT).measure(mixed)
    assert result.precision == "int8+fp32"


def test_rapl_energy_is_labelled_measured(fp32_model, tmp_path):
    zone = tmp_path / "intel-rapl:0"
    zone.mkdir()
    (zone / "energy_uj").write_text("1000")
    (zone / "max_energy_range_uj").write_text("1000000")
    profiler = OnnxRuntimeCpuProfiler(load_target("cpu"), energy=RaplReader(tmp_path), **SHORT)
    result = profiler.measure(fp32_model)
    assert result.energy_source == "measured:rapl"
    assert result.energy_mj == 0.0  # the fake counter did not move


def test_random_inputs_set_symbolic_dims_to_one(fp32_model):
    inputs = random_inputs(fp32_model)
    assert list(inputs) == ["x"]
    assert inputs["x"].shape == (1, 64, WIDTH)
    assert inputs["x"].dtype == np.float32


def test_random_inputs_feed_a_text_model_int64_ids_and_mask(tmp_path):
    from models import TinyText, text_inputs

    from search.artifacts import export_float

    export_float(TinyText().eval(), text_inputs(1), tmp_path / "text.onnx")
    inputs = random_inputs(tmp_path / "text.onnx")
    assert {name: (a.dtype, a.shape) for name, a in inputs.items()} == {
        "input_ids": (np.int64, (1, 16)),
        "attention_mask": (np.int64, (1, 16)),
    }
    assert set(np.unique(inputs["input_ids"])) <= {0, 1}  # valid ids and a valid mask
    assert OnnxRuntimeCpuProfiler(load_target("cpu"), **SHORT).measure(tmp_path / "text.onnx").latency_ms > 0


def test_get_profiler_picks_by_runtime():
    assert isinstance(get_profiler(load_target("cpu"), **SHORT), OnnxRuntimeCpuProfiler)


@pytest.mark.parametrize("name", ["gpu", "jetson"])
def test_tensorrt_target_is_unavailable_here(name):
    with pytest.raises(TargetUnavailableError, match="TensorRT") as info:
        get_profiler(load_target(name))
    message = str(info.value)
    assert "pip install '.[tensorrt]'" in message
    assert f"search serve --target {load_target(name).name} --port N --token T" in message
    assert "--profiler host:port" in message
    assert "Known local targets: cpu" in message


def test_profiler_service_needs_a_token(monkeypatch):
    monkeypatch.delenv("SEARCH_PROFILER_TOKEN", raising=False)
    target = replace(load_target("cpu"), service="192.168.1.20:7777")
    with pytest.raises(TargetUnavailableError, match="192.168.1.20:7777") as info:
        get_profiler(target)
    assert "--token" in str(info.value) and "SEARCH_PROFILER_TOKEN" in str(info.value)


def test_profiler_service_gives_a_remote_profiler(monkeypatch):
    monkeypatch.setenv("SEARCH_PROFILER_TOKEN", "from-env")
    from_file = get_profiler(replace(load_target("cpu"), service="192.168.1.20:7777"), **SHORT)
    assert isinstance(from_file, RemoteProfiler) and from_file.address == "192.168.1.20:7777"
    assert from_file._headers["Authorization"] == "Bearer from-env"
    assert from_file.min_runs == SHORT["min_runs"]
    given = get_profiler(load_target("jetson"), service="10.0.0.2:8765", token="given")
    assert given.address == "10.0.0.2:8765" and given._headers["Authorization"] == "Bearer given"


def test_import_loads_no_gpu_runtime():
    code = "import sys, profilers; print(sorted({'tensorrt', 'pycuda'} & set(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert out.stdout.strip() == "[]"


def test_each_session_is_a_new_onnxruntime_session_and_only_the_first_is_inspected(fp32_model, monkeypatch):
    import onnxruntime

    created = []

    class Counting(onnxruntime.InferenceSession):
        def __init__(self, path, options, **kwargs):
            created.append(options.optimized_model_filepath)
            super().__init__(path, options, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", Counting)
    result = OnnxRuntimeCpuProfiler(load_target("cpu"), **SHORT, sessions=3).measure(fp32_model)
    assert len(created) == 3 and created[0] and not any(created[1:])
    assert len(result.session_medians_ms) == 3 and result.precision == "fp32"
    assert result.runs == len(result.samples_ms) >= 3 * SHORT["min_runs"]


def test_the_fastest_session_is_reported_with_every_median():
    profiler = OnnxRuntimeCpuProfiler(load_target("cpu"), **SHORT)
    timings = [SessionTiming([2.0, 2.2, 2.1], True, None), SessionTiming([1.0, 1.1, 1.3], True, None),
               SessionTiming([4.0, 9.0, 5.0], False, None)]  # fmt: skip
    result = profiler._summarise(
        timings, runtime="r", runtime_version="1", precision="fp32", device={}
    )
    assert result.latency_ms == 1.1 and result.stable
    assert result.latency_p90_ms == pytest.approx(np.percentile([1.0, 1.1, 1.3], 90))
    assert result.session_medians_ms == (2.1, 1.1, 5.0)
    assert result.runs == 9 and len(result.samples_ms) == 9
    assert result.energy_mj == pytest.approx(load_target("cpu").power_w * 1.1)


def test_the_latency_is_the_median_of_the_quiet_stretches_and_the_plain_medians_are_kept():
    """Interference that slows some stretches of a session does not move its latency; the session
    whose quiet stretches are fastest is reported, even when its plain median is not the lowest."""
    profiler = OnnxRuntimeCpuProfiler(load_target("cpu"), **SHORT)
    rng = np.random.default_rng(0)

    def stretches(*levels):
        return [float(x) for level in levels for x in level * rng.uniform(1.0, 1.02, QUIET_BLOCK_RUNS)]

    mostly_slow = stretches(1.0, 1.6, 1.6, 1.0, 1.6, 1.6)  # quiet 1/3 of the time
    steady = stretches(1.2, 1.2, 1.2, 1.2, 1.2, 1.2)
    result = profiler._summarise(
        [SessionTiming(steady, True, None), SessionTiming(mostly_slow, True, None)],
        runtime="r", runtime_version="1", precision="fp32", device={},
    )  # fmt: skip
    quiet = mostly_slow[:QUIET_BLOCK_RUNS] + mostly_slow[3 * QUIET_BLOCK_RUNS : 4 * QUIET_BLOCK_RUNS]
    assert result.latency_ms == pytest.approx(np.median(quiet)) and result.latency_ms < 1.02
    assert result.latency_p90_ms == pytest.approx(np.percentile(quiet, 90))
    assert result.quiet_share == pytest.approx(1 / 3)
    assert result.session_medians_ms == pytest.approx((np.median(steady), np.median(mostly_slow)))
    assert result.session_medians_ms[1] > result.session_medians_ms[0]
    assert result.runs == len(result.samples_ms) == 12 * QUIET_BLOCK_RUNS
    assert result.to_dict()["quiet_share"] == result.quiet_share


def test_timing_stops_once_the_quiet_median_settles_though_the_plain_median_still_climbs():
    """Two quiet stretches, then runs slower and slower: the plain median still climbs by more than
    the tolerance each round at ``min_runs``, the reported figure (the quiet median) has settled."""
    quiet = 2 * QUIET_BLOCK_RUNS
    durations = itertools.chain([1.0] * quiet, (1.5 + 0.05 * i for i in itertools.count()))
    profiler = OnnxRuntimeCpuProfiler(load_target("cpu"), min_runs=4 * quiet, min_time_s=0.0, max_time_s=5.0)
    samples, stable = profiler._time(lambda: next(durations), self_timed=True)
    assert stable and len(samples) == profiler.min_runs
    assert np.median(quiet_samples(samples)) == 1.0 and np.median(samples) > 3.0


def test_quiet_samples_keep_every_stretch_within_the_tolerance_and_short_sessions_whole():
    runs = QUIET_BLOCK_RUNS
    samples = [1.0] * runs + [1.04] * runs + [1.06] * runs + [1.0] * (runs - 1)  # a partial block at the end
    assert list(quiet_samples(samples)) == [1.0] * runs + [1.04] * runs
    assert list(quiet_samples(samples, tolerance=0.1)) == samples[: 3 * runs]
    short = [3.0, 1.0, 2.0] * (runs // 2)  # under two blocks: nothing to compare, all kept
    assert list(quiet_samples(short)) == short


@pytest.mark.parametrize("after_calls", [1, 3, 40])  # before the first session, in warm-up, in the timed runs
def test_should_stop_ends_a_measurement_within_one_run(fp32_model, after_calls):
    """The profiler service's way to cancel: asked between runs, never inside the timed span."""
    calls = itertools.count(1)
    profiler = OnnxRuntimeCpuProfiler(
        load_target("cpu"), warmup_runs=2, warmup_s=0, min_runs=10**6, min_time_s=60, max_time_s=60
    )
    profiler.should_stop = lambda: next(calls) >= after_calls
    started = time.monotonic()
    with pytest.raises(MeasurementCancelled, match="cancelled"):
        profiler.measure(fp32_model)
    assert time.monotonic() - started < 10  # not the 60 s asked for
    assert next(calls) == after_calls + 1  # it stopped at the first True
    assert OnnxRuntimeCpuProfiler.should_stop is None  # a local profiler is never cancelled


@pytest.mark.parametrize("sessions", [0, -1])
def test_at_least_one_session(sessions):
    with pytest.raises(ValueError, match=f"sessions={sessions}"):
        OnnxRuntimeCpuProfiler(load_target("cpu"), sessions=sessions)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="CPU affinity is Linux-only")
def test_the_timed_runs_are_pinned_and_the_affinity_restored(fp32_model):
    before = os.sched_getaffinity(0)
    seen = []

    class Watching(OnnxRuntimeCpuProfiler):
        def _time(self, run, **kwargs):
            seen.append(os.sched_getaffinity(0))
            return super()._time(run, **kwargs)

    result = Watching(load_target("cpu"), **SHORT, sessions=2).measure(fp32_model)
    assert len(result.device["pinned_cpus"]) == load_target("cpu").threads
    assert seen == [set(result.device["pinned_cpus"][:1])] * 2
    assert os.sched_getaffinity(0) == before
