"""The tiny digits task, also loadable as ``worker_task:tiny`` by worker processes (PYTHONPATH=tests).

Worker processes must compress the same teacher, so ``tiny()`` keeps the trained weights in the file
``$SEARCH_TEST_TEACHER`` and loads them from there when it exists.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from models import SmallCNN
from torch import nn
from torch.utils.data import DataLoader

from search.tasks import Task
from search.tasks._digits import _digits_data


def tiny_task(weights: Path | None = None) -> Task:
    """The digits data with a SmallCNN teacher trained for 3 epochs (about a second; ~90 % accuracy),
    or loaded from ``weights`` when that file exists (and saved there when it does not)."""
    torch.set_num_threads(1)
    train_set, val_set = _digits_data()
    train = DataLoader(train_set, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    val = DataLoader(val_set, batch_size=256)
    torch.manual_seed(0)
    model = SmallCNN()
    if weights is not None and weights.exists():
        model.load_state_dict(torch.load(weights, weights_only=True))
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(3):
            for inputs, labels in train:
                loss = nn.functional.cross_entropy(model(inputs), labels)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        if weights is not None:
            torch.save(model.state_dict(), weights)
    return Task(model.eval(), train, val, example_input=val_set[0][0][None], name="tiny-digits")


def tiny() -> Task:
    return tiny_task(Path(os.environ["SEARCH_TEST_TEACHER"]))
