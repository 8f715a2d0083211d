"""The PyTorch profiler: the candidate module itself, in the precision the target accelerates.

On these CPU machines it runs as ``pytorch-cpu`` (eager, host clock); the ``pytorch-cuda`` path
(fp16, torchao int8, 2:4 through cuSPARSELt, torch.compile, CUDA events, NVML energy) runs only in
the tests marked ``gpu``, skipped without a CUDA GPU."""

from __future__ import annotations

import dataclasses
import math

import optuna
import pytest
import torch
from torch import nn

import search
from profilers import ProfilerUsageError, PyTorchProfiler, get_profiler
from search import Finetune, Plan, TargetUnavailableError, UsageError
from search.artifacts import float_precision, measure_candidate, prepare
from search.plan import LayerPlan, Quantization, WeightSparsity
from targets import TargetFileError, load_target

FAST_TIMING = dict(warmup_runs=2, warmup_s=0.01, min_runs=20, min_time_s=0.02, max_time_s=0.5, sessions=2)
TWO_FOUR = LayerPlan(sparsity=WeightSparsity(0.5, "2:4"))
INT8 = LayerPlan(quantization=Quantization(8))


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64)).eval()


def pytorch_target(tmp_path, runtime="pytorch-cpu", precisions=("fp32", "int8", "sparse-2:4"), sensor="none"):
    path = tmp_path / f"{runtime}.toml"
    path.write_text(
        f'description = "test"\nruntime = "{runtime}"\nprecisions = {list(precisions)!r}\n'
        f'power_sensor = "{sensor}"\npower_w = 10.0\nsource = "test"\n[peak]\nfp32_gflops = 100.0\n'
    )
    return load_target(path)


def test_float_precision_is_the_fastest_float_the_target_accelerates():
    assert float_precision(("fp32", "fp16", "int8")) == "fp16"
    assert float_precision(("fp32", "bf16")) == "bf16"
    assert float_precision(("fp32", "int8")) == "fp32"


def test_int8_linear_layers_run_through_torchao_and_the_rest_say_why_not():
    pytest.importorskip("torchao")
    model, x = mlp(), torch.randn(1, 128)
    plan = Plan(layers={"0": INT8, "2": TWO_FOUR, "4": LayerPlan(quantization=Quantization(4))})
    prepared = prepare(model, plan, ("fp32", "int8", "sparse-2:4"), torch.device("cpu"))
    assert dict(prepared.layer_precision) == {"0": "int8", "2": "fp32", "4": "fp32"}
    assert prepared.precision == "int8+fp32"
    assert "Int8" in type(prepared.model[0].weight).__name__  # torchao's int8 tensor, not a float one
    assert isinstance(model[0].weight, nn.Parameter) and type(model[0].weight.data) is torch.Tensor  # a copy
    notes = "\n".join(prepared.notes)
    assert "2: 2:4 planned, runs dense" in notes and "CUDA" in notes
    assert "4: 4-bit planned, runs as fp32" in notes
    with torch.no_grad():
        cosine = nn.functional.cosine_similarity(prepared.model(x), model(x)).item()
    assert cosine > 0.99


def test_a_layer_at_a_precision_the_target_does_not_list_runs_as_float():
    plan = Plan(layers={"0": INT8, "2": TWO_FOUR})
    prepared = prepare(mlp(), plan, ("fp32",), torch.device("cpu"))
    assert set(prepared.layer_precision.values()) == {"fp32"} and prepared.precision == "fp32"
    assert isinstance(prepared.model[0].weight, nn.Parameter) and type(prepared.model[0].weight.data) is torch.Tensor
    assert "0: 8-bit planned, runs as fp32 (the target does not list int8)" in prepared.notes


def test_without_torchao_int8_runs_as_float_and_the_note_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr("search.artifacts._pytorch.torchao_version", lambda: None)
    prepared = prepare(mlp(), Plan(layers={"0": INT8}), ("fp32", "int8"), torch.device("cpu"))
    assert prepared.layer_precision["0"] == "fp32"
    assert "torchao is not installed: pip install '.[cuda]'" in prepared.notes[0]


def test_an_int8_convolution_has_no_pytorch_kernel(cnn):
    name = next(n for n, m in cnn.named_modules() if isinstance(m, nn.Conv2d))
    prepared = prepare(cnn, Plan(layers={name: INT8}), ("fp32", "int8"), torch.device("cpu"))
    assert prepared.layer_precision[name] == "fp32"
    assert f"{name}: 8-bit planned, runs as fp32 (this profiler has no 8-bit Conv2d kernel)" in prepared.notes


def test_measures_the_module_on_the_cpu(cnn, cnn_input, tmp_path):
    profiler = PyTorchProfiler(pytorch_target(tmp_path), compile_mode=None, **FAST_TIMING)
    result = measure_candidate(profiler, tmp_path / "unused.onnx", cnn, cnn_input)
    assert result.runtime == "pytorch-cpu" and result.runtime_version.startswith(f"torch {torch.__version__}")
    assert result.source == "measured" and result.precision == "fp32"
    assert result.latency_ms > 0 and result.runs >= 2 * FAST_TIMING["min_runs"]
    assert len(result.session_medians_ms) == 2
    assert result.energy_source == "estimated:spec-power"
    assert result.device["threads"] == 1 and result.device["compile_mode"] is None
    assert profiler.setting() == result.setting  # what a study checks before any work is what it will measure
    layers = {name for name, m in cnn.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    assert set(result.device["layer_precision"]) == layers


@pytest.mark.slow
def test_the_compiled_module_is_what_gets_timed(cnn, cnn_input, tmp_path):
    """torch.compile on the CPU (inductor's C++ backend; about 30 s here), as the GPU path compiles."""
    profiler = PyTorchProfiler(pytorch_target(tmp_path), compile_mode="default", **FAST_TIMING)
    result = measure_candidate(profiler, tmp_path / "unused.onnx", cnn, cnn_input)
    assert result.device["compile_mode"] == "default" and result.latency_ms > 0


def test_dynamo_starts_afresh_for_every_compiled_candidate(cnn, cnn_input, tmp_path, monkeypatch):
    """Every candidate's forward is one code object to Dynamo: past its recompile limit (8) a
    candidate would run eagerly, unless each starts from a reset."""
    calls = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: calls.append("reset"))
    monkeypatch.setattr(torch, "compile", lambda model, mode: calls.append(mode) or model)
    profiler = PyTorchProfiler(pytorch_target(tmp_path), compile_mode="reduce-overhead", **FAST_TIMING)
    for _ in range(2):
        measure_candidate(profiler, tmp_path / "unused.onnx", cnn, cnn_input)
    assert calls == ["reset", "reduce-overhead"] * 2


def test_a_model_that_fails_to_run_fails_the_candidate(tmp_path):
    profiler = PyTorchProfiler(pytorch_target(tmp_path), compile_mode=None, **FAST_TIMING)
    with pytest.raises(search.MeasurementError, match="pytorch-cpu failed to run the model"):
        measure_candidate(profiler, tmp_path / "unused.onnx", mlp(), torch.randn(1, 7))


def test_an_onnx_file_is_refused_with_what_to_do(tmp_path):
    profiler = PyTorchProfiler(pytorch_target(tmp_path), compile_mode=None)
    assert not profiler.measures_onnx
    with pytest.raises(ProfilerUsageError, match="measures PyTorch modules, not ONNX files"):
        profiler.measure(tmp_path / "model.onnx")


def test_get_profiler_picks_pytorch_for_a_pytorch_target(tmp_path):
    profiler = get_profiler(pytorch_target(tmp_path), **FAST_TIMING)
    assert isinstance(profiler, PyTorchProfiler) and profiler.runtime == "pytorch-cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_the_gpu_target_falls_back_to_pytorch_cuda_and_says_why_neither_runs_here():
    gpu = load_target("gpu")
    assert gpu.runtime == "tensorrt" and gpu.fallback_runtime == "pytorch-cuda"
    with pytest.raises(TargetUnavailableError, match=r"TensorRT or pytorch-cuda .*sees no CUDA GPU"):
        get_profiler(gpu)


def test_a_target_file_with_an_unknown_fallback_runtime_names_the_field(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(
        'description = "x"\nruntime = "tensorrt"\nfallback_runtime = "tflite"\nprecisions = ["fp32"]\n'
        'power_sensor = "none"\npower_w = 1.0\nsource = "x"\n[peak]\n'
    )
    with pytest.raises(TargetFileError, match="field 'fallback_runtime' has 'tflite'; accepted: onnxruntime-cpu"):
        load_target(path)


def test_the_profiler_service_refuses_a_runtime_that_cannot_measure_onnx(tmp_path):
    from profilers import create_app

    with pytest.raises(ProfilerUsageError, match="not the ONNX files clients upload"):
        create_app(PyTorchProfiler(pytorch_target(tmp_path), compile_mode=None), token="t")


@pytest.mark.slow
def test_a_study_measures_its_candidates_and_teacher_with_pytorch_and_export_remeasures_them(tiny_task, tmp_path):
    target = pytorch_target(tmp_path, precisions=("fp32",))
    profiler = PyTorchProfiler(target, compile_mode=None, **FAST_TIMING)
    study = search.run(
        tiny_task, target=target, trials=3, profiler=profiler, results_dir=tmp_path / "results",
        finetune=Finetune(steps=6, eval_every=3), pruner=optuna.pruners.NopPruner(),
    )  # fmt: skip
    frame = search.load_trials(study)
    done = frame[frame["state"] == "COMPLETE"]
    assert len(done) >= 1
    assert (done["latency_source"] == "measured:pytorch-cpu").all()
    assert done["runtime"].str.startswith("pytorch-cpu torch ").all()
    assert study.user_attrs["baseline"]["latency_ms"] > 0
    with pytest.raises(UsageError, match="not started with a 'module:function' task.*pass the task"):
        search.export(study, tmp_path / "refused", profiler=profiler)  # started with a Task object
    exported = search.export(study, tmp_path / "export", profiler=profiler, task=tiny_task)
    assert len(exported) >= 1
    assert (exported["latency_source"] == "measured:pytorch-cpu").all()
    assert all(math.isfinite(v) and v > 0 for v in exported["export_latency_ms"])


# --- on a CUDA GPU --------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (PyTorch sees none here)")


@pytest.mark.gpu
@gpu
def test_on_the_gpu_int8_and_2_4_layers_run_as_planned_and_the_energy_is_read(tmp_path):
    pytest.importorskip("torchao")
    target = dataclasses.replace(load_target("gpu"), path=str(tmp_path / "gpu.toml"))
    profiler = get_profiler(target, **FAST_TIMING)
    if not isinstance(profiler, PyTorchProfiler):
        pytest.skip("TensorRT is installed here: the gpu target is measured by TensorRT")
    model = nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 1024), nn.ReLU(), nn.Linear(1024, 1024))
    with torch.no_grad():  # a 2:4 pattern, as the plan's sparsity leaves it
        model[2].weight.view(-1, 4)[:, :2] = 0
    plan = Plan(layers={"0": INT8, "2": TWO_FOUR})
    result = measure_candidate(profiler, tmp_path / "unused.onnx", model.eval(), torch.randn(64, 1024))
    assert result.precision == "fp16"  # no plan: every layer in the target's float precision
    planned = measure_candidate(profiler, tmp_path / "unused.onnx", model.eval(), torch.randn(64, 1024), plan)
    precisions = dict(planned.device["layer_precision"])
    assert precisions == {"0": "int8", "2": "sparse-2:4+fp16", "4": "fp16"}, planned.device["notes"]
    assert planned.precision == "sparse-2:4+int8+fp16"
    assert planned.runtime == "pytorch-cuda" and planned.device["gpu"]
    assert planned.energy_source.startswith("measured:nvml") or planned.energy_source == "estimated:spec-power"
