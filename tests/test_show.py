"""`search show`: per-layer times on ONNX Runtime, the table against the teacher, the picture, and
`search results --all/--sort`."""

from __future__ import annotations

import copy
import json

import onnx
import pandas as pd
import pytest
from typer.testing import CliRunner

import search
import search.report
from profilers.tensorrt import layer_report, parse_engine_information
from search import UsageError, cli
from search._record import Key, StudyKey
from search.artifacts import export_candidate, export_float
from search.compress import add_compression, baked_state_dict, build_structure
from search.plan import ChannelPruning, LayerPlan, Plan, Quantization, WeightSparsity
from search.report import OTHER, layer_frame, layer_times, plot_layers

runner = CliRunner()
CONVS = ("conv1", "conv2", "conv3")


@pytest.fixture(scope="module")
def shown(finished):
    """The shared study of the three first recipes (conftest's ``finished``): the study, its
    folder, and its trials' numbers by recipe."""
    study, results = finished
    recipes = {t.user_attrs.get(Key.RECIPE): t.number for t in study.trials}
    return study, results / "done", recipes


def test_an_int8_trial_runs_qlinearconv_and_the_teacher_conv(shown):
    _, folder, recipes = shown
    frame = search.load_layers(folder, recipes["int8 everywhere"]).set_index("layer")
    for name in CONVS:
        assert frame.loc[name, "kernel"] == "QLinearConv" and frame.loc[name, "precision"] == "int8"
        assert frame.loc[name, "teacher_kernel"] in ("Conv", "FusedConv")
        assert frame.loc[name, "speedup"] == pytest.approx(frame.loc[name, "teacher_ms"] / frame.loc[name, "ms"])
    assert frame.loc["fc", "kernel"] == "QGemm"
    assert not frame["unaccelerated"].any()


def test_an_fp32_trial_runs_conv_with_fewer_channels(shown):
    _, folder, recipes = shown
    frame = search.load_layers(folder, recipes["prune 0.5"]).set_index("layer")
    for name in CONVS:
        assert frame.loc[name, "kernel"] in ("Conv", "FusedConv") and frame.loc[name, "precision"] == "fp32"
        assert frame.loc[name, "channels_after"] == frame.loc[name, "channels_before"] // 2
        assert frame.loc[name, "pruning"] == 0.5 and frame.loc[name, "bits"] == 32


def test_the_layer_times_add_up_to_the_latency(shown):
    study, folder, _ = shown
    for trial in study.trials:
        frame = search.load_layers(folder, trial.number)
        latency = trial.user_attrs[Key.LATENCY_MS]
        assert frame["ms"].sum() == pytest.approx(latency, rel=0.2)
        assert frame.set_index("layer").loc[list(CONVS), "share"].sum() > 0.5  # the convs do most of the work
        # the profiler's own figures, before they are put in proportion to the latency, leave nothing out
        # (they run higher: the profiler adds to each node, and a busy moment is not filtered out of 10 runs)
        profiled = sum(entry["profiled_ms"] for entry in trial.user_attrs[Key.LAYER_TIMES])
        assert profiled > 0.5 * latency
    teacher = study.user_attrs[StudyKey.BASELINE]
    assert sum(e["ms"] for e in teacher["measurement"]["layers"]) == pytest.approx(teacher[Key.LATENCY_MS], rel=0.2)
    assert teacher["measurement"]["device"]["layer_profile_ms"] > 0


def test_the_figures_say_where_they_came_from(shown):
    _, folder, recipes = shown
    figures = {f["figure"]: f for f in search.load_layers(folder, recipes["int8 everywhere"]).attrs["figures"]}
    assert figures["latency"]["kind"] == "measured" and figures["latency"]["source"] == "measured:onnxruntime-cpu"
    assert figures["metric"]["kind"] == "measured" and figures["size"]["kind"] == "counted"
    assert figures["energy"]["kind"] in ("measured", "estimated") and figures["latency"]["teacher"] > 0


def test_an_unknown_trial_is_a_usage_error(shown):
    _, folder, _ = shown
    with pytest.raises(UsageError, match=r"trial 99: study 'done' has trials 0 to 2"):
        search.load_layers(folder, 99)


@pytest.fixture(scope="module")
def flagged(tiny_task, fast_profiler, tmp_path_factory):
    """The digits CNN with int4 on conv2, 50 % sparsity on conv3 and a binarized fc, built, exported
    and measured as a trial is; and the teacher measured beside it."""
    folder = tmp_path_factory.mktemp("flagged")
    model, x = tiny_task.model, tiny_task.example_input
    plan = Plan(layers={
        "conv1": LayerPlan(quantization=Quantization(8)),
        "conv2": LayerPlan(quantization=Quantization(4)),
        "conv3": LayerPlan(sparsity=WeightSparsity(0.5)),
        "fc": LayerPlan(quantization=Quantization(1)),
    })  # fmt: skip
    structure = build_structure(model, plan, x)
    candidate = add_compression(copy.deepcopy(structure), plan, x)
    structure.load_state_dict(baked_state_dict(candidate))
    exported = export_candidate(
        structure, x, folder / "model.onnx", plan=plan, precisions=("int8", "fp32"), calibration=tiny_task.train
    )
    export_float(model, x, folder / "teacher.onnx")
    trial, teacher = fast_profiler.measure(exported.path), fast_profiler.measure(folder / "teacher.onnx")
    layers = list(plan.layers)
    frame = layer_frame(
        plan, layer_times(trial.to_dict()["layers"], exported.path, layers),
        layer_times(teacher.to_dict()["layers"], folder / "teacher.onnx", layers),
        layers=layers, runtime=trial.runtime, layer_precision=exported.layer_precision, latency_ms=trial.latency_ms,
    )  # fmt: skip
    frame.attrs.update(trial=7, state="COMPLETE", runtime=trial.runtime, study="flagged", figures=[], layer_times=True)
    return plan, frame, folder


def test_the_flag_shows_on_an_int4_conv_a_sparse_and_a_binarized_layer(flagged):
    _, frame, _ = flagged
    rows = frame.set_index("layer")
    assert rows.loc["conv2", "kernel"] == "QLinearConv" and rows.loc["conv2", "precision"] == "int8"
    assert rows.loc["conv2", "unaccelerated"] and "int4 asked, ran at int8" in rows.loc["conv2", "flag"]
    assert rows.loc["conv3", "unaccelerated"] and "sparse weights ran on a dense kernel" in rows.loc["conv3", "flag"]
    assert rows.loc["fc", "unaccelerated"] and "no 1-bit kernel" in rows.loc["fc", "flag"]
    assert not rows.loc["conv1", "unaccelerated"] and pd.isna(rows.loc["conv1", "flag"])


def test_the_picture_is_written(flagged, shown, tmp_path):
    _, frame, _ = flagged
    path = plot_layers(frame, tmp_path / "layers.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_a_tensorrt_report_renders_the_same_table(flagged, capsys):
    """TensorRT's per-layer report (parsed from an engine inspector's JSON, as its profiler does)
    names the ONNX nodes each engine layer ran: the rows come out as ONNX Runtime's do."""
    plan, ort_frame, folder = flagged
    graph = onnx.load(str(folder / "teacher.onnx")).graph
    compute = [node.name for node in graph.node if node.op_type in ("Conv", "Gemm")]
    information = {"Layers": [
        {"Name": f"{name} + relu", "LayerType": "CaskConvolution", "ParameterType": "Convolution",
         "Inputs": [{"Name": "in", "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}],
         "Metadata": f"[ONNX Layer: {name}]", "TacticName": "sm90_xmma_fprop_implicit_gemm_f16f16"}
        for name in compute
    ] + [{"Name": "pool", "LayerType": "Reduce", "Metadata": "[ONNX Layer: node_mean]"}]}  # fmt: skip
    layer_ms = {layer["Name"]: 0.01 * (i + 1) for i, layer in enumerate(information["Layers"])}
    entries = [dict(e) for e in layer_report(parse_engine_information(json.dumps(information)), layer_ms)]
    layers = list(plan.layers)
    times = layer_times(entries, folder / "teacher.onnx", layers)
    frame = layer_frame(Plan(), times, times, layers=layers, runtime="tensorrt", latency_ms=sum(layer_ms.values()))
    assert list(frame["layer"]) == list(ort_frame["layer"]) and list(frame.columns) == list(ort_frame.columns)
    rows = frame.set_index("layer")
    assert set(rows.loc[layers, "kernel"]) == {"CaskConvolution"} and set(rows.loc[layers, "precision"]) == {"fp16"}
    assert rows["ms"].sum() == pytest.approx(sum(layer_ms.values()))
    assert rows.loc[OTHER, "ms"] == pytest.approx(layer_ms["pool"])
    frame.attrs.update(ort_frame.attrs, runtime="tensorrt 10.8.0")
    cli._print_layers(frame)
    printed = capsys.readouterr().out
    assert "CaskConvolution" in printed and all(name in printed for name in layers)


# --- The commands ---------------------------------------------------------------------------------


def test_show_prints_the_table_and_the_figures(shown, tmp_path):
    _, folder, recipes = shown
    result = runner.invoke(
        cli.app, ["show", str(folder), str(recipes["int8 everywhere"]), "--plot", "--out", str(tmp_path / "l.png")]
    )
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "QLinearConv" in text and "teacher ms" in text and "conv3" in text
    assert "latency:" in text and "measured (measured:onnxruntime-cpu)" in text
    assert (tmp_path / "l.png").read_bytes()[:4] == b"\x89PNG"


def test_show_is_a_thin_layer_over_load_layers(shown, monkeypatch):
    _, folder, _ = shown
    calls = []
    real = search.report.load_layers

    def fake(study, trial, study_name=None):
        calls.append((study, trial, study_name))
        return real(study, trial, study_name)

    monkeypatch.setattr(search.report, "load_layers", fake)  # the command imports it when it runs
    result = runner.invoke(cli.app, ["show", str(folder), "1", "--study-name", "done"])
    assert result.exit_code == 0, result.output
    assert calls == [(str(folder), 1, "done")]


def test_show_of_an_unknown_trial_is_one_line(shown):
    _, folder, _ = shown
    result = runner.invoke(cli.app, ["show", str(folder), "42"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == ["error: trial 42: study 'done' has trials 0 to 2"]


def test_results_all_lists_every_trial_sorted(shown):
    study, folder, _ = shown
    result = runner.invoke(cli.app, ["results", str(folder), "--all", "--sort", "latency_ms"])
    assert result.exit_code == 0, result.output
    rows = [line.split("│")[1].strip() for line in result.output.splitlines() if line.startswith("│")]
    by_latency = sorted(study.trials, key=lambda t: t.user_attrs[Key.LATENCY_MS])
    assert rows == [str(t.number) for t in by_latency]


def test_results_all_gives_the_reason_of_a_pruned_trial(shown, monkeypatch):
    study, folder, _ = shown
    frame = search.load_trials(study)
    frame.loc[0, "state"] = "PRUNED"
    frame.loc[0, Key.PRUNED_REASON] = "cost model predicts 9 ms, over the 1 ms budget"
    monkeypatch.setattr(cli, "load_trials", lambda *args, **kwargs: frame)
    result = runner.invoke(cli.app, ["results", str(folder), "--all"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "pruned" in text and "cost model predicts 9 ms" in text


def test_results_all_says_what_a_queued_promotion_waits_for(shown, monkeypatch):
    study, folder, _ = shown
    frame = search.load_trials(study)
    frame.loc[2, "state"] = "WAITING"
    frame.loc[2, Key.CONTINUE_FROM] = 1
    monkeypatch.setattr(cli, "load_trials", lambda *args, **kwargs: frame)
    result = runner.invoke(cli.app, ["results", str(folder), "--all"])
    assert result.exit_code == 0, result.output
    assert "queued: goes on with trial 1's fine-tune" in " ".join(result.output.split())


def test_sort_by_an_unknown_column_names_the_accepted_ones(shown):
    _, folder, _ = shown
    for args in (["--all", "--sort", "latncy"], ["--sort", "latncy"]):
        result = runner.invoke(cli.app, ["results", str(folder), *args])
        assert result.exit_code == 1
        line = result.output.strip()
        assert line.startswith("error: --sort 'latncy': not a column of the trials; accepted: number, state,")
        assert "latency_ms" in line and len(line.splitlines()) == 1


def test_a_transformers_rows_are_its_blocks_attention_and_ffn(capsys):
    from search.plan import Depth

    blocks = [f"encoder.layer.{i}" for i in range(2)]
    parts = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
             "intermediate.dense", "output.dense")  # fmt: skip
    layers = [f"{block}.{part}" for block in blocks for part in parts] + ["pooler.dense"]
    teacher = {name: {"ms": 0.1, "kernel": "MatMul", "precision": "fp32"} for name in layers}
    # the student keeps block 1 only, renumbered 0; its FFN at int8
    plan = Plan(
        layers={f"encoder.layer.1.{p}": LayerPlan(quantization=Quantization(8)) for p in parts[4:]},
        depth=Depth("encoder.layer", (1,)),
    )  # fmt: skip
    student = {f"encoder.layer.0.{p}": {"ms": 0.05, "kernel": "MatMulInteger", "precision": "int8"} for p in parts}
    student["pooler.dense"] = {"ms": 0.1, "kernel": "Gemm", "precision": "fp32"}
    frame = layer_frame(plan, student, teacher, layers=layers, runtime="onnxruntime-cpu")
    rows = frame.set_index("layer")
    assert set(rows.loc[[f"encoder.layer.0.{p}" for p in parts], "kernel"]) == {"removed"}
    assert rows.loc["encoder.layer.1.intermediate.dense", "kernel"] == "MatMulInteger"
    assert rows.loc["encoder.layer.1.intermediate.dense", "speedup"] == pytest.approx(2.0)
    assert rows.loc["encoder.layer.1.attention.self.key", "part"] == "attention"
    assert rows.loc["encoder.layer.1.output.dense", "part"] == "ffn"
    assert rows.loc["encoder.layer.1.output.dense", "block"] == "encoder.layer.1"
    assert pd.isna(rows.loc["pooler.dense", "block"])
    frame.attrs.update(trial=3, state="COMPLETE", runtime="onnxruntime-cpu", study="bert", figures=[], layer_times=True)
    cli._print_layers(frame)
    lines = [line.split("│")[1].strip() for line in capsys.readouterr().out.splitlines() if line.startswith("│")]
    assert lines[:3] == ["encoder.layer.0", "attention", "attention.self.query"]
    assert lines[3:5] == ["attention.self.key", "attention.self.value"]
    assert "ffn" in lines and "intermediate.dense" in lines and lines[-1] == "pooler.dense"


@pytest.mark.parametrize(
    "block, parts",
    [
        ("encoder.layers.encoder_layer_1", {"self_attention.out_proj": "attention", "mlp.0": "ffn", "mlp.3": "ffn"}),
        ("encoder.layers.1", {"self_attn.out_proj": "attention", "linear1": "ffn", "linear2": "ffn"}),
    ],
    ids=["torchvision-vit", "nn.TransformerEncoder"],
)
def test_a_vit_s_and_pytorch_s_encoder_rows_name_their_blocks_and_parts(block, parts):
    layers = [f"{block}.{part}" for part in parts] + ["head"]
    teacher = {name: {"ms": 0.1, "kernel": "MatMul", "precision": "fp32"} for name in layers}
    rows = layer_frame(Plan(), teacher, teacher, layers=layers, runtime="onnxruntime-cpu").set_index("layer")
    assert {part: rows.loc[f"{block}.{part}", "part"] for part in parts} == parts
    assert set(rows.loc[[f"{block}.{part}" for part in parts], "block"]) == {block}
    assert pd.isna(rows.loc["head", "block"])


def test_a_packed_projection_row_takes_its_out_proj_bits_and_nothing_else():
    attention = "encoder.layers.0.self_attn"
    layers = [f"{attention}.in_proj", f"{attention}.out_proj", "head"]
    out_proj = LayerPlan(ChannelPruning(0.0), WeightSparsity(0.5), Quantization(4))
    plan = Plan(layers={f"{attention}.out_proj": out_proj})
    times = {name: {"ms": 0.1, "kernel": "MatMul", "precision": "fp32"} for name in layers}
    rows = layer_frame(
        plan, times, times, layers=layers, runtime="onnxruntime-cpu", packed={layers[0]: layers[1]}
    ).set_index("layer")
    assert rows.loc[layers[0], ["bits", "sparsity", "part"]].tolist() == [4, 0.0, "attention"]
    assert rows.loc[layers[1], ["bits", "sparsity"]].tolist() == [4, 0.5]
