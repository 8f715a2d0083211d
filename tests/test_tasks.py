"""The built-in tasks (``search/tasks/``): the digits teacher cache loads weights, never code."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from pickles import code_running_checkpoint
from search._errors import UsageError
from search.tasks import TEACHER_VERSION, digits

REPO = Path(__file__).resolve().parents[1]
CONTROL = "# control: unpickles on purpose"


def test_a_teacher_cache_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "marker"
    cache = code_running_checkpoint(tmp_path / f"digits-cnn-v{TEACHER_VERSION}.pt", marker)
    # Control: the payload is live. Unpickled without weights_only it writes the marker.
    control = code_running_checkpoint(tmp_path / "control.pt", marker)
    torch.load(control, weights_only=False)  # control: unpickles on purpose
    assert marker.exists()
    marker.unlink()

    with pytest.raises(UsageError) as info:
        digits(cache_dir=tmp_path)
    message = str(info.value)
    assert f"teacher cache {cache} is not a weights-only state dict" in message
    assert "refuses to call" in message and "Delete the file to retrain the teacher" in message
    assert not marker.exists()
    assert cache.exists()  # left for the user to look at, not silently retrained over


def test_a_damaged_teacher_cache_names_the_file(tmp_path):
    cache = tmp_path / f"digits-cnn-v{TEACHER_VERSION}.pt"
    torch.save({"fc.weight": torch.zeros(10, 256)}, cache)
    cache.write_bytes(cache.read_bytes()[:200])  # cut short, as by a full disk
    with pytest.raises(UsageError, match="Delete the file to retrain") as info:
        digits(cache_dir=tmp_path)
    assert f"teacher cache {cache} is not a weights-only state dict" in str(info.value)


PICKLERS = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib"}


def _is(node: ast.AST | None, value: bool) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def _unpickles(call: ast.Call) -> bool:
    """Whether a call can unpickle: ``torch.load`` without ``weights_only=True``, ``np.load`` with
    ``allow_pickle`` not False, a pickle-family ``load``/``loads``/``Unpickler``, ``read_pickle``."""
    func = call.func
    if not isinstance(func, ast.Attribute):
        return False
    owner = func.value.id if isinstance(func.value, ast.Name) else ""
    keywords = {k.arg: k.value for k in call.keywords}
    if (owner, func.attr) == ("torch", "load"):
        return not _is(keywords.get("weights_only"), True)
    if (owner, func.attr) in (("np", "load"), ("numpy", "load")):
        return "allow_pickle" in keywords and not _is(keywords["allow_pickle"], False)
    return (owner in PICKLERS and func.attr in ("load", "loads", "Unpickler")) or func.attr == "read_pickle"


def test_nothing_in_the_repo_unpickles_except_weights_only():
    """torch.load only with ``weights_only=True``; no pickle, joblib, read_pickle or
    ``allow_pickle=True`` anywhere (the one control above is marked)."""
    sources = [
        path for path in REPO.rglob("*.py")
        if not {".venv", "build", ".git", "results"} & set(path.relative_to(REPO).parts)
    ]  # fmt: skip
    assert REPO / "search" / "tasks" / "_digits.py" in sources
    offenders = {}
    for path in sources:
        lines = path.read_text().splitlines()
        found = [
            f"{node.lineno}: {ast.unparse(node)}"
            for node in ast.walk(ast.parse("\n".join(lines)))
            if isinstance(node, ast.Call) and _unpickles(node) and not lines[node.lineno - 1].endswith(CONTROL)
        ]
        if found:
            offenders[str(path.relative_to(REPO))] = found
    assert not offenders
