"""Shared fixtures for the ``search`` tests. Tiny models live in ``tests/models.py``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import models` under any import mode

from models import SmallCNN, example_input, settle  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same random state, so tolerances hold run after run."""
    torch.manual_seed(0)


@pytest.fixture
def cnn() -> SmallCNN:
    """A SmallCNN with settled BatchNorm statistics, in eval mode."""
    return settle(SmallCNN())


@pytest.fixture
def cnn_input(cnn) -> torch.Tensor:
    return example_input(cnn)
