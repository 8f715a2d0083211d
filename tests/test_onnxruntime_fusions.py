"""ONNX Runtime's fusions that run slower on this CPU are left out of every CPU session: measured,
recorded with each measurement, and the same in the profiler's sessions and the scoring's."""

import collections
import dataclasses

import onnxruntime
import pytest

from profilers import OnnxRuntimeCpuProfiler, disabled_optimizers
from profilers import _onnxruntime_fusions as fusions
from search.artifacts import OnnxModule
from targets import load_target

from graphs import optimized_ops

SHORT = {"warmup_s": 0.01, "min_runs": 20, "min_time_s": 0.02, "max_time_s": 0.5}


@pytest.fixture
def measured(monkeypatch):
    """``measured(fused, unfused)``: the probe's timings, as if measured so."""

    def set_times(fused: float, unfused: float) -> None:
        monkeypatch.setattr(fusions, "timed_in_turn", lambda calls: [fused, unfused])
        fusions.slower_fusions.cache_clear()

    yield set_times
    fusions.slower_fusions.cache_clear()


def test_the_probe_times_the_fused_kernel_against_the_ops_it_replaces(tmp_path):
    model = tmp_path / "residual.onnx"
    model.write_bytes(fusions.residual_layer_norm())
    assert optimized_ops(model, tmp_path, fusions.ALWAYS_DISABLED) == {"SkipLayerNormalization": 1}
    assert optimized_ops(model, tmp_path, [*fusions.ALWAYS_DISABLED, "SkipLayerNormFusion"]) == {
        "Add": 1, "LayerNormalization": 1,
    }  # fmt: skip


def test_a_fusion_is_left_out_only_where_its_kernel_is_slower(measured):
    measured(fused=3.0, unfused=1.0)
    assert disabled_optimizers() == ("WeightBiasQuantization", "SkipLayerNormFusion")
    measured(fused=1.1, unfused=1.0)  # within SLOWER_BY: ORT's default stands
    assert disabled_optimizers() == ("WeightBiasQuantization",)


def test_the_probe_measures_once_a_process(monkeypatch):
    calls = []
    monkeypatch.setattr(fusions, "timed_in_turn", lambda timed: calls.append(1) or [1.0, 1.0])
    fusions.slower_fusions.cache_clear()
    try:
        disabled_optimizers(), disabled_optimizers()
    finally:
        fusions.slower_fusions.cache_clear()
    assert len(calls) == 1


@pytest.mark.parametrize("slower", [True, False])
def test_the_profiler_and_the_scoring_run_the_graph_without_the_slower_fusion(tmp_path, monkeypatch, measured, slower):
    measured(fused=3.0 if slower else 1.0, unfused=1.0)
    path = tmp_path / "residual.onnx"
    path.write_bytes(fusions.residual_layer_norm())
    disabled_optimizers()  # the probe's own sessions
    created = []

    class Recording(onnxruntime.InferenceSession):
        def __init__(self, model, options=None, **kwargs):
            created.append(kwargs["disabled_optimizers"])
            super().__init__(model, options, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", Recording)
    profiler = OnnxRuntimeCpuProfiler(load_target("cpu"), **SHORT, sessions=1)
    session, _, inspected = profiler._session(path, (0,), inspect=tmp_path)
    ran = collections.Counter(node.op_type for node in inspected.graph.node)
    assert (ran["SkipLayerNormalization"] == 1) is not slower
    measurement = profiler.measure(path)
    OnnxModule(path)
    expected = ["WeightBiasQuantization", *(["SkipLayerNormFusion"] if slower else [])]
    assert measurement.device["disabled_optimizers"] == expected
    assert created and all(disabled == expected for disabled in created)


@pytest.mark.parametrize("chosen", [(), ("SkipLayerNormFusion", "WeightBiasQuantization")])
def test_a_target_that_names_its_disabled_optimizers_is_measured_with_those(tmp_path, monkeypatch, chosen):
    """Its deployment's session options, or one list for every machine: the probe is not asked."""
    monkeypatch.setattr(fusions, "slower_fusions", lambda: pytest.fail("the probe ran"))
    path = tmp_path / "residual.onnx"
    path.write_bytes(fusions.residual_layer_norm())
    target = dataclasses.replace(load_target("cpu"), disabled_optimizers=list(chosen))
    profiler = OnnxRuntimeCpuProfiler(target, **SHORT, sessions=1)
    _, _, inspected = profiler._session(path, (0,), inspect=tmp_path)
    ran = collections.Counter(node.op_type for node in inspected.graph.node)
    assert ran["SkipLayerNormalization"] == (0 if chosen else 1)
    expected = ["WeightBiasQuantization", *(["SkipLayerNormFusion"] if chosen else [])]  # always, and once
    measurement = profiler.measure(path)
    assert measurement.device["disabled_optimizers"] == expected
    assert profiler.setting() == measurement.setting  # what a study checks before any work is what it will measure
