"""The CLI in-process: flags parsed into the API call, user errors as one line and exit 1."""

from __future__ import annotations

import json

import optuna
import pytest
from typer.testing import CliRunner

import profilers
from search import cli
from search._budget import Budget

runner = CliRunner()


@pytest.fixture
def captured(monkeypatch, tiny_task):
    calls = {}

    def fake_run(task, **kwargs):
        calls["task"], calls["kwargs"] = task, kwargs
        study = optuna.create_study(directions=["maximize", "minimize"])
        study.set_user_attr("results_dir", "results/fake")
        return study

    monkeypatch.setattr(cli, "run", fake_run)
    monkeypatch.setattr(cli, "load_task", lambda spec: calls.setdefault("spec", spec) and tiny_task)
    return calls


def test_run_passes_the_parsed_flags_to_the_api(captured, tmp_path):
    result = runner.invoke(
        cli.app,
        ["run", "--task", "mine:make", "--budget", "5ms", "--trials", "7", "--objectives", "metric,latency,size",
         "--bits", "32,8", "--width", "1,0.5", "--no-two-four", "--steps", "12", "--sampler", "random",
         "--seed", "3", "--study-name", "s", "--results-dir", str(tmp_path), "--cost-model", "off"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    kwargs = captured["kwargs"]
    assert captured["spec"] == "mine:make"
    assert kwargs["budget"] == Budget(ms=5.0, text="5ms")
    assert kwargs["trials"] == 7 and kwargs["seed"] == 3 and kwargs["sampler"] == "random"
    assert kwargs["objectives"] == ["metric", "latency", "size"]
    assert kwargs["space"].bits == (32, 8) and kwargs["space"].width == (1.0, 0.5)
    assert kwargs["space"].two_four is False
    assert kwargs["finetune"].steps == 12
    assert kwargs["cost_model"] is False
    assert kwargs["target"].name == "cpu" and kwargs["study_name"] == "s"
    assert "optuna-dashboard" in result.output


def test_space_file_and_flags_combine(captured, tmp_path):
    space = tmp_path / "space.toml"
    space.write_text("bits = [32, 8]\npruning = [0.0, 0.5]\n")
    result = runner.invoke(cli.app, ["run", "--space", str(space), "--pruning", "0,0.25"])
    assert result.exit_code == 0, result.output
    assert captured["kwargs"]["space"].bits == (32, 8)
    assert captured["kwargs"]["space"].pruning == (0.0, 0.25)  # the flag wins


@pytest.mark.parametrize(
    "args, message",
    [
        (["--budget", "5parsecs"], "expected a time such as 5ms"),
        (["--budget", "-1ms"], "expected a time such as 5ms"),
        (["--budget", "0x"], "greater than zero"),
        (["--target", "jetsn"], "known: cpu"),
        (["--target", "jetson"], "TensorRT"),
        (["--task", "nosuchmodule:fn"], "cannot import module 'nosuchmodule'"),
        (["--width", "big"], "comma-separated numbers"),
        (["--bits", "3"], "'bits' has [3]"),
        (["--objectives", "metric,speed"], "expected distinct names"),
    ],
)
def test_user_errors_are_one_line_and_exit_1(monkeypatch, tmp_path, args, message):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(cli.app, ["run", *args])
    assert result.exit_code == 1
    assert "error:" in result.output and message in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_trials_must_be_positive():
    result = runner.invoke(cli.app, ["run", "--trials", "0"])
    assert result.exit_code == 2 and "trials" in result.output


def test_dry_run_prints_the_resolved_run_and_does_nothing(captured):
    result = runner.invoke(cli.app, ["run", "--budget", "0.5x", "--dry-run"])
    assert result.exit_code == 0
    spec = json.loads(result.output)
    assert spec["budget"] == "0.5x" and spec["target"] == "cpu" and spec["space"]["bits"] == [32, 8, 4, 1]
    assert spec["cost_model"] == "on"
    assert "kwargs" not in captured


def test_run_with_a_profiler_service_parses(captured, monkeypatch):
    monkeypatch.delenv("SEARCH_PROFILER_TOKEN", raising=False)
    result = runner.invoke(cli.app, ["run", "--profiler", "127.0.0.1:1", "--token", "x", "--target", "cpu", "--dry-run"])
    assert result.exit_code == 0, result.output
    spec = json.loads(result.output)
    assert spec["profiler"] == "127.0.0.1:1" and "x" not in spec.values()  # the token is not printed
    assert "kwargs" not in captured


def test_run_passes_the_remote_profiler_to_the_api(captured, monkeypatch):
    checked = []
    monkeypatch.setattr(profilers.RemoteProfiler, "check", lambda self: checked.append(self.address))
    monkeypatch.setenv("SEARCH_PROFILER_TOKEN", "from-env")
    result = runner.invoke(cli.app, ["run", "--profiler", "10.0.0.2:8765"])
    assert result.exit_code == 0, result.output
    measurer = captured["kwargs"]["profiler"]
    assert isinstance(measurer, profilers.RemoteProfiler) and measurer.address == "10.0.0.2:8765"
    assert checked == ["10.0.0.2:8765"]  # the service is checked before any work


def test_run_on_a_service_without_token_is_an_error(monkeypatch):
    monkeypatch.delenv("SEARCH_PROFILER_TOKEN", raising=False)
    result = runner.invoke(cli.app, ["run", "--profiler", "127.0.0.1:1", "--dry-run"])
    assert result.exit_code == 1 and "SEARCH_PROFILER_TOKEN" in result.output


def test_run_on_jetson_without_a_service_says_how_to_serve_it(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(cli.app, ["run", "--target", "jetson"])
    message = " ".join(result.output.split())
    assert result.exit_code == 1
    assert "search serve --target jetson-orin-nano" in message and "--profiler host:port" in message


def test_serve_passes_the_parsed_flags_to_the_api(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "serve", lambda target, **kwargs: calls.append((target, kwargs)))
    monkeypatch.delenv("SEARCH_PROFILER_TOKEN", raising=False)
    result = runner.invoke(cli.app, ["serve", "--target", "cpu", "--port", "9000", "--token", "T"])
    assert result.exit_code == 0, result.output
    target, kwargs = calls[0]
    assert target.name == "cpu" and kwargs == {"host": "127.0.0.1", "port": 9000, "token": "T"}
    monkeypatch.setenv("SEARCH_PROFILER_TOKEN", "from-env")
    assert runner.invoke(cli.app, ["serve"]).exit_code == 0
    assert calls[1][1] == {"host": "127.0.0.1", "port": 8765, "token": "from-env"}


def test_serve_without_a_token_is_an_error(monkeypatch):
    monkeypatch.delenv("SEARCH_PROFILER_TOKEN", raising=False)
    result = runner.invoke(cli.app, ["serve"])
    assert result.exit_code == 1 and "needs a token" in result.output and "Traceback" not in result.output


def test_targets_lists_what_is_measurable_here():
    result = runner.invoke(cli.app, ["targets"])
    assert result.exit_code == 0
    lines = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") > 2}
    assert "yes" in lines["cpu"] and "no" in lines["gpu"]


def test_results_of_a_missing_study_is_an_error(tmp_path):
    result = runner.invoke(cli.app, ["results", str(tmp_path / "none")])
    assert result.exit_code == 1 and "no study" in result.output
