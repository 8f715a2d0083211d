"""Shared fixtures for the tests. Tiny models live in ``tests/models.py``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import models` under any import mode

from models import SmallCNN, example_input, settle  # noqa: E402

# The test models are tiny: on a 2-core machine OpenMP's thread hand-off costs more than the work
# (a 16-channel conv on 8×8 takes ~30 ms with 2 threads, ~0.2 ms with 1).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same random state, so tolerances hold run after run."""
    torch.manual_seed(0)


@pytest.fixture
def cnn() -> SmallCNN:
    """A SmallCNN with settled BatchNorm statistics and random weights, in eval mode."""
    return settle(SmallCNN())


@pytest.fixture
def cnn_input(cnn) -> torch.Tensor:
    return example_input(cnn)


@pytest.fixture(scope="session")
def tiny_task():
    """The digits data with a SmallCNN teacher trained for 3 epochs (about a second; ~90 % accuracy).

    Shared by the whole session: tests must not train or modify ``tiny_task.model``.
    """
    from worker_task import tiny_task

    return tiny_task()


@pytest.fixture(scope="session")
def fast_profiler():
    """The cpu target's ONNX Runtime profiler with short timing: numbers for plumbing, not for claims."""
    from profilers import get_profiler
    from targets import load_target

    return get_profiler(
        load_target("cpu"), warmup_runs=2, warmup_s=0.01, min_runs=20, min_time_s=0.02, max_time_s=0.5
    )


@pytest.fixture(scope="session")
def finished(tiny_task, fast_profiler, tmp_path_factory):
    """A study of the three first recipes (int8 everywhere, then two uniform prunings, fp32), run
    once and only read by the tests: (the study, its results folder; the study's is ``done``)."""
    import optuna

    from search import Finetune, run

    results = tmp_path_factory.mktemp("results")
    study = run(
        tiny_task, budget="2x", trials=3, profiler=fast_profiler, results_dir=results,
        finetune=Finetune(steps=6, eval_every=3), pruner=optuna.pruners.NopPruner(), study_name="done",
    )  # fmt: skip
    return study, results


@pytest.fixture
def activities_built_with(monkeypatch) -> list:
    """The ``activity`` each plan of a study in this test is built with, in build order (None: a
    promotion that loads its parent's state, and needs no ranking of channels)."""
    from search.study import _objective

    given, build = [], _objective.build_structure

    def build_structure(teacher, plan, example_input, activity=None):
        given.append(activity)
        return build(teacher, plan, example_input, activity)

    monkeypatch.setattr(_objective, "build_structure", build_structure)
    return given


@pytest.fixture
def worker_env(tmp_path, monkeypatch):
    """Worker processes load ``worker_task:tiny`` with one teacher file; returns that task."""
    from search.tasks import load_task

    tests = Path(__file__).resolve().parent
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("SEARCH_TEST_TEACHER", str(tmp_path / "teacher.pt"))
    return load_task("worker_task:tiny")


@pytest.fixture(scope="module")
def loopback_service():
    """The cpu target's ONNX Runtime profiler behind the profiler service on loopback, for one
    module; yields its ``host:port`` (the token is ``loopback.TOKEN``). Clients send the timing."""
    from loopback import serving

    from profilers import OnnxRuntimeCpuProfiler
    from targets import load_target

    with serving(OnnxRuntimeCpuProfiler(load_target("cpu"))) as (_, address):
        yield address


@pytest.fixture(scope="session")
def postgres_url():
    """A real PostgreSQL server on loopback for the session (Debian's package; tests/install-postgres.sh).

    Skipped where the package is missing, except in CI, where that is a failure."""
    from postgres import postgres_server, server_binaries

    if server_binaries() is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not installed: .ci/run should have run tests/install-postgres.sh")
        pytest.skip("PostgreSQL server binaries not found: run tests/install-postgres.sh")
    with postgres_server() as url:
        yield url
