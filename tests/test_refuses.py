"""What ``search`` refuses (docs/refuses.md), each case through the console entry point in its own
process: one line of error, the exit status (1 for a user error, 2 for a usage error), no traceback,
and nothing left behind. Bad task modules are written into ``tmp_path``, which goes on PYTHONPATH."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch

from search._record import Key, StudyKey
from search.artifacts import export_float
from search.plan import Plan
from search.study import RunSpec, make_storage

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def search_cli(tmp_path: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """``python -m search ARGS`` in ``tmp_path``, which is on PYTHONPATH with tests/ (``worker_task:tiny``)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(TESTS), str(ROOT)]),
        "SEARCH_TEST_TEACHER": str(tmp_path / "teacher.pt"),
        "COLUMNS": "200",
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", "search", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
    )


def one_error(result: subprocess.CompletedProcess, status: int = 1) -> str:
    """The one line of error a refusal prints, after checking the exit status and that there is no more."""
    output = result.stdout + result.stderr
    lines = [line for line in output.splitlines() if line.strip()]
    assert result.returncode == status, output
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    return lines[0]


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# ---------------------------------------------------------------------------------------- numbers


@pytest.mark.parametrize(
    "args, status, message",
    [
        (["--budget", "1e999ms"], 1, "budget '1e999ms': out of range; expected a time from 1us to 3600s"),
        (["--budget", "9e308ms"], 1, "budget '9e308ms': out of range"),
        (["--budget", "1e-300ms"], 1, "budget '1e-300ms': out of range"),
        (["--trials", "0"], 2, "Invalid value for '--trials': 0 is not in the range 1 to 100000"),
        (["--timeout", "nan"], 2, "Invalid value for '--timeout': nan is not in the range 0.001 to 2592000"),
        (["--workers", "100000"], 2, "Invalid value for '--workers': 100000 is not in the range 1 to 256"),
    ],
    ids=["budget-overflow", "budget-huge", "budget-tiny", "trials-zero", "timeout-nan", "workers-huge"],
)
def test_a_number_out_of_range_is_one_line(tmp_path, args, status, message):
    line = one_error(search_cli(tmp_path, "run", "--task", "worker_task:tiny", *args), status)
    assert message in line, line
    assert files_under(tmp_path) == set()


# ------------------------------------------------------------------------------------------ files


def test_a_space_file_that_is_not_utf8_is_one_line(tmp_path):
    (tmp_path / "space.toml").write_bytes(b"bits = [32, 8]\n# caf\xe9\n")
    line = one_error(search_cli(tmp_path, "run", "--space", "space.toml"))
    assert "search space file space.toml: not UTF-8 text" in line, line
    assert files_under(tmp_path) == {"space.toml"}


@pytest.mark.parametrize("where", ["/proc/search-results", "/sys/search-results", "a-file", "a-file/results"])
def test_a_results_dir_that_cannot_hold_a_study_is_one_line(tmp_path, where):
    (tmp_path / "a-file").write_text("not a folder\n")
    line = one_error(search_cli(tmp_path, "run", "--task", "worker_task:tiny", "--results-dir", where))
    assert f"results folder {where}:" in line and "--results-dir" in line, line
    assert files_under(tmp_path) == {"a-file"}
    assert not Path(where).exists() or where.startswith("a-file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_a_read_only_results_dir_is_one_line(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    line = one_error(search_cli(tmp_path, "run", "--results-dir", "locked/results"))
    assert "results folder locked/results: cannot make folders in" in line, line
    assert files_under(tmp_path) == {"locked"}


# ---------------------------------------------------------------------------------------- tasks

TASKS = '''
import math
import torch
from torch import nn
from search import Task


def _task(metric=None, model=None):
    torch.manual_seed(0)
    x, y = torch.randn(16, 1, 8, 8), torch.arange(16) % 4
    model = model or nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 4))
    return Task(model=model.eval(), train=[(x, y)], val=[(x, y)], example_input=x[:1], metric=metric, name="bad")


def words():
    return _task(metric=lambda model, val: "ninety per cent")


def nan():
    return _task(metric=lambda model, val: math.nan)


class DataDependent(nn.Module):
    """Runs in eager mode; its branch on a tensor's value does not export."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(256, 4)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:
            y = y * 2
        return self.head(y.flatten(1))


def unexportable():
    return _task(model=DataDependent())


def good():
    return _task()
'''


@pytest.fixture
def tasks(tmp_path):
    (tmp_path / "bad_tasks.py").write_text(TASKS)
    return "bad_tasks"


@pytest.mark.parametrize(
    "source, message",
    [
        ("raise KeyError('TEACHER_WEIGHTS')\n", "importing module 'broken_task' raised KeyError: 'TEACHER_WEIGHTS'"),
        ("def make(:\n    pass\n", "module 'broken_task' has a syntax error: invalid syntax"),
    ],
    ids=["raises", "syntax-error"],
)
def test_a_task_module_that_does_not_import_is_one_line(tmp_path, source, message):
    (tmp_path / "broken_task.py").write_text(source)
    line = one_error(search_cli(tmp_path, "run", "--task", "broken_task:make"))
    assert f"task 'broken_task:make': {message}" in line, line
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize(
    "function, message",
    [
        ("words", "metric <lambda>() returned 'ninety per cent' (str); expected a number"),
        ("nan", "the task's metric is nan on the teacher"),
        ("unexportable", "the task's model cannot be exported to ONNX"),
    ],
)
def test_a_task_is_checked_before_any_study_state_is_written(tmp_path, tasks, function, message):
    line = one_error(search_cli(tmp_path, "run", "--task", f"{tasks}:{function}", "--no-sensitivity"))
    assert message in line, line
    assert not (tmp_path / "results").exists()  # no study.db, no baseline/, not even the folder


def test_the_corrected_rerun_of_a_failed_first_run_is_accepted(tmp_path, tasks):
    """The first run fails before its first trial; the rerun, with another budget, is not refused."""
    args = ["run", "--study-name", "s", "--no-sensitivity", "--no-recipes", "--cost-model", "off"]
    one_error(search_cli(tmp_path, *args, "--task", f"{tasks}:unexportable", "--budget", "0.5x"))
    assert not (tmp_path / "results").exists()
    result = search_cli(tmp_path, *args, "--task", f"{tasks}:good", "--budget", "2ms", "--timeout", "0.001")
    assert result.returncode == 0, result.stdout + result.stderr
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'results/s/study.db'}")
    assert study.user_attrs[StudyKey.RUN_SPEC]["budget"] == "2ms"
    assert (tmp_path / "results/s/baseline/model.onnx").exists()


# ---------------------------------------------------------------------- damaged studies, export


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x).mean(dim=(2, 3))


@pytest.fixture(scope="module")
def made_study(tmp_path_factory) -> Path:
    """A study of two front trials with sound files, made directly (no search): ``<folder>/made``."""
    root = tmp_path_factory.mktemp("made")
    folder = root / "made"
    folder.mkdir()
    storage = make_storage(f"sqlite:///{folder / 'study.db'}")
    study = optuna.create_study(storage=storage, study_name="made", directions=["maximize", "minimize"])
    spec = RunSpec(target="cpu", study_name="made", results_dir=root)
    study.set_user_attr(StudyKey.RUN_SPEC, spec.to_dict())
    model, example = _Tiny().eval(), torch.randn(1, 1, 8, 8)
    for number, (metric, latency) in enumerate([(0.9, 2.0), (0.5, 1.0)]):
        artifacts = folder / "trials" / str(number)
        artifacts.mkdir(parents=True)
        export_float(model, example, artifacts / "model.onnx")
        (artifacts / "plan.json").write_text(Plan().to_json())
        torch.save({"plan": Plan().to_json(), "state_dict": model.state_dict()}, artifacts / "checkpoint.pt")
        relative = str(artifacts.relative_to(root))  # the CLI runs in a copy's parent folder
        attrs = {Key.METRIC: metric, Key.LATENCY_MS: latency, Key.SIZE_BYTES: 1024, Key.ARTIFACTS: relative}
        study.add_trial(
            optuna.create_trial(
                values=[metric, latency], user_attrs=attrs, constraints={"latency_over_budget_ms": -1.0}
            )
        )
    return folder


@pytest.fixture
def study_copy(made_study, tmp_path) -> Path:
    """A copy of ``made_study`` in ``tmp_path``, whose trials' files (named relative to it) are this
    test's own to break."""
    folder = tmp_path / "made"
    shutil.copytree(made_study, folder)
    return folder


@pytest.mark.parametrize("command", ["results", "export"])
def test_a_truncated_study_file_is_one_line(study_copy, tmp_path, command):
    database = study_copy / "study.db"
    database.write_bytes(database.read_bytes()[: database.stat().st_size // 3])
    line = one_error(search_cli(tmp_path, command, "made"))
    assert f"study file {database} cannot be read (database disk image is malformed)" in line, line
    assert not (tmp_path / "deploy").exists() and not (study_copy / "pareto.png").exists()


def _garbage_plan(folder: Path) -> None:
    (folder / "plan.json").write_text('{"_type": "Plan", "width": ')


def _truncated_checkpoint(folder: Path) -> None:
    path = folder / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[:200])


def _corrupt_onnx(folder: Path) -> None:
    (folder / "model.onnx").write_bytes(b"\x08\x07garbage" * 10)


def _missing_onnx(folder: Path) -> None:
    (folder / "model.onnx").unlink()


@pytest.mark.parametrize(
    "damage, message",
    [
        (_garbage_plan, "plan.json is not a plan (JSONDecodeError"),
        (_truncated_checkpoint, "checkpoint.pt cannot be loaded ("),
        (_corrupt_onnx, "model.onnx cannot be loaded by ONNX Runtime ("),
        (_missing_onnx, "model.onnx missing from"),
    ],
    ids=["plan", "checkpoint", "onnx", "no-onnx"],
)
def test_export_checks_each_file_and_leaves_nothing_half_written(study_copy, tmp_path, damage, message):
    damage(study_copy / "trials" / "1")
    line = one_error(search_cli(tmp_path, "export", "made", "--out", "deploy"))
    assert line.startswith("error: trial 1: ") and message in line and "--skip-broken" in line, line
    assert not (tmp_path / "deploy").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".deploy")]  # no partial folder either


def test_export_skip_broken_exports_the_rest_and_lists_what_it_skipped(study_copy, tmp_path):
    _truncated_checkpoint(study_copy / "trials" / "1")
    result = search_cli(tmp_path, "export", "made", "--out", "deploy", "--skip-broken")
    assert result.returncode == 0, result.stdout + result.stderr
    skipped = [line for line in result.stderr.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == 1 and skipped[0].startswith("skipped trial 1: ") and "checkpoint.pt" in skipped[0]
    assert files_under(tmp_path / "deploy") == {
        "trial-00000", "trial-00000/model.onnx", "trial-00000/plan.json", "trial-00000/checkpoint.pt", "front.csv",
    }  # fmt: skip
