"""Shared fixtures for the tests. Tiny models live in ``tests/models.py``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

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
    from search._task import Task
    from search.tasks import _digits_data

    train_set, val_set = _digits_data()
    train = DataLoader(train_set, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    val = DataLoader(val_set, batch_size=256)
    torch.manual_seed(0)
    model = SmallCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        for inputs, labels in train:
            loss = nn.functional.cross_entropy(model(inputs), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return Task(model.eval(), train, val, example_input=val_set[0][0][None], name="tiny-digits")


@pytest.fixture(scope="session")
def fast_profiler():
    """The cpu target's ONNX Runtime profiler with short timing: numbers for plumbing, not for claims."""
    from profilers import get_profiler
    from targets import load_target

    return get_profiler(
        load_target("cpu"), warmup_runs=2, warmup_s=0.01, min_runs=20, min_time_s=0.02, max_time_s=0.5
    )


@pytest.fixture(scope="module")
def loopback_service():
    """The cpu target's ONNX Runtime profiler behind the profiler service on loopback, for one
    module; yields its ``host:port`` (the token is ``loopback.TOKEN``). Clients send the timing."""
    from loopback import serving

    from profilers import OnnxRuntimeCpuProfiler
    from targets import load_target

    with serving(OnnxRuntimeCpuProfiler(load_target("cpu"))) as (_, address):
        yield address
