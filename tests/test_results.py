"""Reading studies back (DataFrame, Parquet, plot) and exporting the front."""

from __future__ import annotations

import json
import warnings

import onnx
import optuna
import pandas as pd
import pytest
import torch

import search
from profilers import disabled_optimizers
from search import Plan, UsageError, build_structure
from search.artifacts import OnnxModule
from search.study import plot_front


def test_load_trials_from_folder_name_url_and_study(finished, monkeypatch):
    study, results = finished
    by_folder = search.load_trials(results / "done")
    by_url = search.load_trials(f"sqlite:///{results}/done/study.db", study_name="done")
    monkeypatch.chdir(results.parent)
    by_name = search.load_trials("done") if (results.parent / "results").exists() else by_folder
    for frame in (by_url, by_name, search.load_trials(study)):
        assert list(frame["number"]) == list(by_folder["number"])
    for column in ("metric", "latency_ms", "latency_p90_ms", "energy_mj", "size_bytes", "pareto", "plan",
                   "metric_source", "latency_source", "energy_source", "size_source", "params_width"):  # fmt: skip
        assert column in by_folder


def test_a_study_of_many_layers_loads_without_pandas_warnings():
    """A MobileNet's plan has ~150 parameter columns: the frame must not be assembled in pieces
    (pandas' PerformanceWarning then reached the CLI's output after every trial)."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    params, distributions = {}, {}
    for i in range(50):  # ints and floats interleaved, as a plan's knobs are
        for knob, value, choices in (("bits", 8, [32, 8]), ("pruning", 0.25, [0, 0.25]), ("sparsity", 0.0, [0, 0.5])):
            params[f"features.{i}.{knob}"] = value
            distributions[f"features.{i}.{knob}"] = optuna.distributions.CategoricalDistribution(choices)
    for number in range(2):
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions=distributions, values=[0.9, 1.0 + number],
            user_attrs={"plan": {"width": 1.0}, "metric": 0.9},
        ))  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frame = search.load_trials(study)
    assert list(frame["plan"]) == ['{"width": 1.0}'] * 2
    assert (frame.filter(like=".bits").to_numpy() == 8).all()
    assert (frame.filter(like=".pruning").to_numpy() == 0.25).all()


def test_an_unknown_study_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no study"):
        search.load_trials(tmp_path / "nothing")


def test_the_plot_is_written(finished, tmp_path):
    study, _ = finished
    path = plot_front(study, tmp_path / "front.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_export_writes_the_front_and_re_measures_it(finished, tiny_task, tmp_path):
    study, _ = finished
    rows = search.export(study, tmp_path / "deploy")
    front = search.load_trials(study).query("pareto")
    assert sorted(rows["number"]) == sorted(front["number"])
    for _, row in rows.iterrows():
        assert row["export_latency_ms"] > 0 and row["latency_source"] == "measured:onnxruntime-cpu"
        assert row["disabled_optimizers"] == list(disabled_optimizers())  # what a deployment sets
        onnx.checker.check_model(row["path"])
        folder = tmp_path / "deploy" / f"trial-{row['number']:05d}"
        checkpoint = torch.load(folder / "checkpoint.pt", weights_only=True)
        plan = Plan.from_json(checkpoint["plan"])
        model = build_structure(tiny_task.model, plan, tiny_task.example_input)
        model.load_state_dict(checkpoint["state_dict"])
        inputs = next(iter(tiny_task.val))[0]
        agree = (model.eval()(inputs).argmax(1) == OnnxModule(row["path"])(inputs).argmax(1)).float().mean()
        assert agree > 0.9  # the ONNX file adds uint8 activations; the checkpoint is its float twin
    table = pd.read_csv(tmp_path / "deploy" / "front.csv")  # the rows, beside the models
    assert list(table["number"]) == list(rows["number"]) and list(table["speedup"]) == pytest.approx(rows["speedup"])
    assert all((tmp_path / "deploy" / path).is_file() for path in table["path"])  # relative: the folder moves whole
    assert [json.loads(cell) for cell in table["disabled_optimizers"]] == list(rows["disabled_optimizers"])


def test_the_export_command_re_measures_locally_or_through_a_service(finished, loopback_service, tmp_path):
    from typer.testing import CliRunner

    from loopback import TOKEN
    from search import cli

    _, results = finished
    runner = CliRunner()
    local = runner.invoke(cli.app, ["export", str(results / "done"), "--out", str(tmp_path / "a")])
    assert local.exit_code == 0, local.output
    assert "disabled_optimizers" in local.output  # the sessions' setting, to deploy with
    remote = runner.invoke(
        cli.app,
        ["export", str(results / "done"), "--out", str(tmp_path / "b"), "--profiler", loopback_service,
         "--token", TOKEN],
    )  # fmt: skip
    assert remote.exit_code == 0, remote.output
    exported = sorted(p.name for p in (tmp_path / "b").iterdir())
    assert exported == sorted(p.name for p in (tmp_path / "a").iterdir()) and exported
    assert "re-measured ms" in " ".join(remote.output.split())
    wrong = runner.invoke(
        cli.app, ["export", str(results / "done"), "--out", str(tmp_path / "c"), "--profiler", "127.0.0.1:1",
                  "--token", TOKEN],
    )  # fmt: skip
    assert wrong.exit_code == 1 and "search serve" in " ".join(wrong.output.split())


def test_each_trial_and_the_front_table_say_which_graph_optimizations_the_sessions_ran_without(finished):
    """A deployment runs the files as measured only with the same ``disabled_optimizers``."""
    from search._record import Key
    from search.cli import _front_session_words, _session_words

    study, _ = finished
    frame = search.load_trials(study)
    measured = frame[f"user_attrs_{Key.DEVICE}"].dropna()
    assert len(measured) and all(device["disabled_optimizers"] == list(disabled_optimizers()) for device in measured)
    assert _front_session_words(frame) == f" with disabled_optimizers={sorted(disabled_optimizers())}"
    assert _front_session_words(frame.drop(columns=[f"user_attrs_{Key.DEVICE}"])) == ""
    assert _session_words([None, None]) == ""  # measured by TensorRT or PyTorch


def test_the_teacher_is_measured_again_as_a_run_ends_and_the_front_table_says_by_how_much_it_moved(finished):
    """The host's drift over the run, which the trials' latencies carry too: one more measurement."""
    from typer.testing import CliRunner

    from search import cli
    from search._record import Key, StudyKey

    study, results = finished
    again, baseline = study.user_attrs[StudyKey.TEACHER_AT_END], study.user_attrs[StudyKey.BASELINE]
    assert again[Key.LATENCY_MS] > 0
    assert again["change"] == pytest.approx(again[Key.LATENCY_MS] / baseline[Key.LATENCY_MS] - 1)
    shown = CliRunner().invoke(cli.app, ["results", str(results / "done")], terminal_width=400)
    assert shown.exit_code == 0, shown.output
    words = " ".join(shown.output.split())
    assert f"the teacher measured {again[Key.LATENCY_MS]:.4f} ms as the latest run ended ({again['change']:+.1%})" in words
