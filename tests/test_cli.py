"""The CLI in-process: flags parsed into the API call, user errors as one line and exit 1."""

from __future__ import annotations

import dataclasses
import json
import sys
import uuid
from pathlib import Path

import optuna
import pytest
from typer.testing import CliRunner

import profilers
import search
import search.study
import search.tasks
from search import cli
from search.compress import Finetune
from search.plan import Budget

runner = CliRunner()
CPU_TARGET = Path(__file__).resolve().parents[1] / "targets" / "cpu.toml"


@pytest.fixture
def captured(monkeypatch, tiny_task):
    calls = {}

    def fake_run(task, spec, **kwargs):  # the settings as the run would use them, by name
        calls["task"], calls["kwargs"] = task, {**vars(spec), "finetune": spec.finetune_for(task.finetune), **kwargs}
        study = optuna.create_study(directions=["maximize", "minimize"])
        study.set_user_attr("results_dir", "results/fake")
        return study

    monkeypatch.setattr(search.study, "run", fake_run)  # the command imports it when it runs
    def fake_load_task(spec, **options):
        calls.setdefault("spec", spec)
        calls["options"] = options
        return calls.get("task_to_load", tiny_task)

    monkeypatch.setattr(search.tasks, "load_task", fake_load_task)
    return calls


def test_seq_len_goes_to_the_task_and_the_tasks_finetune_is_the_default(captured, tiny_task, tmp_path):
    captured["task_to_load"] = dataclasses.replace(tiny_task, finetune=Finetune(steps=7, lr=1e-4))
    args = ["run", "--task", "mine:make", "--results-dir", str(tmp_path), "--cost-model", "off"]
    result = runner.invoke(cli.app, [*args, "--seq-len", "32"])
    assert result.exit_code == 0, result.output
    assert captured["options"] == {"seq_len": 32}
    assert captured["kwargs"]["finetune"] == Finetune(steps=7, lr=1e-4)
    result = runner.invoke(cli.app, [*args, "--lr", "0.01"])  # a flag overrides only itself
    assert result.exit_code == 0, result.output
    assert captured["options"] == {}
    assert captured["kwargs"]["finetune"] == Finetune(steps=7, lr=0.01)
    result = runner.invoke(cli.app, [*args, "--lr-schedule", "cosine"])
    assert result.exit_code == 0, result.output
    assert captured["kwargs"]["finetune"] == Finetune(steps=7, lr=1e-4, schedule="cosine")


def test_metric_window_sets_the_tasks_and_the_task_keeps_its_own_without_it(captured, tiny_task, tmp_path):
    captured["task_to_load"] = dataclasses.replace(tiny_task, metric_window=5)
    args = ["run", "--task", "mine:make", "--results-dir", str(tmp_path), "--cost-model", "off"]
    result = runner.invoke(cli.app, [*args, "--metric-window", "10"])
    assert result.exit_code == 0, result.output
    assert captured["task"].metric_window == 10 and captured["task"].window == 10.0
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    assert captured["task"].metric_window == 5
    result = runner.invoke(cli.app, [*args, "--metric-window", "0"])
    assert result.exit_code == 2 and "0.0 is not in the range" in " ".join(result.output.replace("│", " ").split())


@pytest.mark.parametrize(
    ("flag", "status", "message"),
    [
        (["--alpha", "2"], 2, "2.0 is not in the range 0 to 1"),  # a usage error: the flag's own range
        (["--lr-schedule", "linear"], 1, "schedule must be one of constant"),
    ],
)
def test_a_bad_finetune_flag_fails_before_the_task_loads(captured, tmp_path, flag, status, message):
    result = runner.invoke(cli.app, ["run", "--task", "mine:make", *flag, "--results-dir", str(tmp_path)])
    assert result.exit_code == status and message in " ".join(result.output.replace("│", " ").split())
    assert "spec" not in captured


def test_run_passes_the_parsed_flags_to_the_api(captured, tmp_path):
    result = runner.invoke(
        cli.app,
        ["run", "--task", "mine:make", "--budget", "5ms", "--trials", "7", "--objectives", "metric,latency,size",
         "--bits", "32,8", "--width", "1,0.5", "--no-two-four", "--steps", "12", "--sampler", "random",
         "--seed", "3", "--study-name", "s", "--results-dir", str(tmp_path), "--cost-model", "off",
         "--workers", "3"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    kwargs = captured["kwargs"]
    assert captured["spec"] == "mine:make"
    assert kwargs["budget"] == Budget(ms=5.0, text="5ms")
    assert kwargs["trials"] == 7 and kwargs["seed"] == 3 and kwargs["sampler"] == "random"
    assert kwargs["objectives"] == ("metric", "latency", "size")
    assert kwargs["space"].bits == (32, 8) and kwargs["space"].width == (1.0, 0.5)
    assert kwargs["space"].two_four is False
    assert kwargs["finetune"].steps == 12
    assert kwargs["cost_model"] is False and kwargs["workers"] == 3
    assert kwargs["target"].name == "cpu" and kwargs["study_name"] == "s"
    assert "optuna-dashboard" in result.output


def test_worker_passes_its_options_to_the_api(monkeypatch, tmp_path):
    calls = {}

    def fake_work(study, study_name, **kwargs):
        calls.update(study=study, study_name=study_name, **kwargs)
        return optuna.create_study(study_name="joined")

    monkeypatch.setattr(search.study, "work", fake_work)
    url = "postgresql://search@db/studies"
    result = runner.invoke(
        cli.app,
        ["worker", url, "--study-name", "big", "--results-dir", str(tmp_path), "--seed", "5", "--timeout", "60",
         "--profiler", "jetson:8765", "--token", "T"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert calls["study"] == url and calls["study_name"] == "big" and calls["seed"] == 5
    assert calls["results_dir"] == tmp_path and calls["timeout"] == 60
    assert calls["service"] == "jetson:8765" and calls["token"] == "T"
    assert "joined: 0 trials finished" in result.output


def test_space_file_and_flags_combine(captured, tmp_path):
    space = tmp_path / "space.toml"
    space.write_text("bits = [32, 8]\npruning = [0.0, 0.5]\n")
    result = runner.invoke(cli.app, ["run", "--space", str(space), "--pruning", "0,0.25"])
    assert result.exit_code == 0, result.output
    assert captured["kwargs"]["space"].bits == (32, 8)
    assert captured["kwargs"]["space"].pruning == (0.0, 0.25)  # the flag wins


def error_line(result) -> str:
    """The one line a library error prints, after checking it is one line and exit status 1."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


BUDGET_FORMS = "expected a time such as 5ms, 500us, 0.005s, or a ratio to the uncompressed model such as 0.5x"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--budget", "5parsecs"], f"budget '5parsecs': {BUDGET_FORMS}"),
        (["--budget", "-1ms"], f"budget '-1ms': {BUDGET_FORMS}"),
        (["--budget", "0x"], f"budget '0x': must be greater than zero; {BUDGET_FORMS}"),
        (["--target", "jetsn"], "unknown target 'jetsn'; known: cpu, gpu, jetson,"),
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
    assert message in error_line(result)
    assert "Traceback" not in result.output
    assert not any(tmp_path.iterdir())  # stopped before any study was created


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
    monkeypatch.setattr(profilers, "serve", lambda target, **kwargs: calls.append((target, kwargs)))
    monkeypatch.delenv("SEARCH_PROFILER_TOKEN", raising=False)
    result = runner.invoke(cli.app, ["serve", "--target", "cpu", "--port", "9000", "--token", "T"])
    assert result.exit_code == 0, result.output
    target, kwargs = calls[0]
    assert target.name == "cpu"
    assert kwargs == {"host": "127.0.0.1", "port": 9000, "token": "T", "limits": profilers.ServiceLimits()}
    monkeypatch.setenv("SEARCH_PROFILER_TOKEN", "from-env")
    assert runner.invoke(cli.app, ["serve"]).exit_code == 0
    assert calls[1][1] == {"host": "127.0.0.1", "port": 8765, "token": "from-env", "limits": profilers.ServiceLimits()}
    limited = [
        "serve", "--token", "T", "--max-upload-mib", "8", "--max-model-memory-mib", "512", "--max-time-s", "5",
        "--max-sessions", "4", "--max-queue", "0",
    ]  # fmt: skip
    assert runner.invoke(cli.app, limited).exit_code == 0
    assert calls[2][1]["limits"] == profilers.ServiceLimits(
        max_bytes=8 * 2**20, max_model_memory=512 * 2**20, max_time_s=5, max_sessions=4, max_queue=0
    )


@pytest.mark.parametrize("flag", ["--max-upload-mib", "--max-time-s", "--max-sessions"])
def test_serve_refuses_a_limit_of_zero(monkeypatch, flag):
    monkeypatch.setattr(profilers, "serve", lambda target, **kwargs: pytest.fail("served"))
    result = runner.invoke(cli.app, ["serve", "--token", "T", flag, "0"])
    assert result.exit_code == 2 and flag in result.output


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


@pytest.mark.parametrize(
    "content, message",
    [
        ('threads = "4"', ["'threads'", "an integer >= 1"]),
        ('precisions = ["fp32", "int3"]', ["'precisions'", "int4-weight-only"]),
        ("threads = = 2", ["not a valid TOML file"]),
        (None, ["cannot read target file"]),  # a folder where the file should be
    ],
    ids=["bad-threads", "bad-precision", "bad-toml", "unreadable"],
)
def test_a_bad_target_file_stops_before_any_work(monkeypatch, tmp_path, content, message):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "board.toml"
    if content is None:
        path.mkdir()
    else:
        lines = [line for line in CPU_TARGET.read_text().splitlines() if not line.startswith(content.split()[0] + " ")]
        path.write_text("\n".join([*lines, content]) + "\n")
    line = error_line(runner.invoke(cli.app, ["run", "--target", str(path)]))
    assert str(path) in line and all(part in line for part in message), line
    assert not (tmp_path / "results").exists()


TASK_MODULE = """
import torch
from torch import nn
from search import Task

def boom():
    raise RuntimeError("teacher checkpoint missing")

def wrong():
    return {"model": "resnet18"}

def flat():
    x, y = torch.randn(8, 1, 8, 8), torch.arange(8) % 3
    return Task(model=nn.Sequential(nn.Flatten()), train=[(x, y)], val=[(x, y)], example_input=x[:1], name="flat")
"""


@pytest.fixture
def task_module(tmp_path, monkeypatch):
    """A task module in tmp_path, importable as the CLI imports one: from the current directory."""
    name = f"cli_task_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(TASK_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # load_task puts the cwd on it: undo afterwards
    yield name
    sys.modules.pop(name, None)


@pytest.mark.parametrize(
    "function, message",
    [
        ("boom", "task '{module}:boom': boom() raised RuntimeError: teacher checkpoint missing"),
        ("wrong", "task '{module}:wrong': wrong() returned dict, not a search.Task"),
        ("flat", "model Sequential has no Conv1d, Conv2d or Linear layer to compress"),
    ],
)
def test_a_bad_task_stops_before_any_work(task_module, tmp_path, function, message):
    """Through the real ``search.run``: the error comes before a study or a results folder exists."""
    result = runner.invoke(cli.app, ["run", "--task", f"{task_module}:{function}", "--trials", "1"])
    assert message.format(module=task_module) in error_line(result)
    assert not (tmp_path / "results").exists()


def test_resuming_a_study_with_another_task_or_target_is_refused(monkeypatch, tiny_task, fast_profiler, tmp_path):
    results = tmp_path / "results"
    search.run(
        tiny_task, trials=1, profiler=fast_profiler, results_dir=results, study_name="shared", cost_model=False,
        finetune=search.Finetune(steps=2, eval_every=1), pruner=optuna.pruners.NopPruner(),
    )  # fmt: skip
    files = sorted(results.rglob("*"))
    board = tmp_path / "board.toml"  # the cpu target under another name
    board.write_text(CPU_TARGET.read_text())
    attempts = [
        (dataclasses.replace(tiny_task, name="other-task"), "cpu", [f"task '{tiny_task.name}'", "'other-task'"]),
        (tiny_task, str(board), ["target 'cpu'", "'board'"]),
    ]
    for task, target, message in attempts:
        monkeypatch.setattr(search.tasks, "load_task", lambda spec, task=task: task)
        args = ["run", "--study-name", "shared", "--results-dir", str(results), "--target", target, "--trials", "2"]
        line = error_line(runner.invoke(cli.app, args))
        assert "study 'shared' was made with" in line and "--study-name" in line
        assert all(part in line for part in message), line
    study = optuna.load_study(study_name="shared", storage=f"sqlite:///{results / 'shared' / 'study.db'}")
    assert len(study.trials) == 1  # no trial added, nothing measured again
    assert sorted(results.rglob("*")) == files


def test_progress_prints_every_worker_s_finished_trials_once(capsys):
    study = optuna.create_study(directions=["maximize", "minimize"])
    for pid, metric in ((1234, 0.9), (None, 0.8)):
        attrs = {"metric": metric, "latency_ms": 0.1, "size_bytes": 2048}
        if pid:
            attrs["worker"] = {"host": "h", "pid": pid}
        study.add_trial(optuna.create_trial(values=[metric, 0.1], user_attrs=attrs))
    progress = cli._Progress(5)
    progress.trial_done(study)
    progress.trial_done(study)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].endswith("(worker 1234)") and "metric 0.8000" in lines[1]
    assert progress.done == 2


def test_a_trial_s_line_says_where_the_run_s_timeout_stopped_its_fine_tune():
    attrs = {
        "metric": 0.9, "latency_ms": 0.1, "size_bytes": 2048, "finetune_steps": 92, "rung": 2, "best_step": 92,
        "continue_from": 13, "finetune_cut": "stopped at step 92 of 200: the run's timeout",
    }  # fmt: skip
    line = cli._trial_line(optuna.create_trial(values=[0.9, 0.1], user_attrs=attrs))
    words = "fine-tuned 92 steps (rung 2, continues trial 13, best at 92; stopped at step 92 of 200: the run's timeout)"
    assert words in line


def test_run_help_shows_the_fine_tune_defaults():
    """Rich reads ``[default: ...]`` as markup and drops it unless escaped."""
    result = runner.invoke(cli.app, ["run", "--help"], env={"COLUMNS": "200"})
    text = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 0
    assert f"[default: {Finetune.alpha}]" in text and f"[default: the task's, or {Finetune.schedule}]" in text
    assert f"same order [default: {Finetune.seed}]" in text
