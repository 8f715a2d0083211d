"""The built-in tasks' teachers: trained here on first use, then loaded from a cache file."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from search._errors import UsageError


def train_classifier(model: nn.Module, train: DataLoader, epochs: int, max_lr: float) -> None:
    """Cross-entropy, Adam with a one-cycle schedule peaking at ``max_lr``."""
    optimizer = torch.optim.Adam(model.parameters(), lr=max_lr / 2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr, total_steps=epochs * len(train))
    model.train()
    for _ in range(epochs):
        for inputs, labels in train:
            loss = nn.functional.cross_entropy(model(inputs), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()


def cached_teacher(model: nn.Module, cache: Path, train: Callable[[nn.Module], None]) -> nn.Module:
    """``model`` with the weights in ``cache``; where there are none yet, ``train(model)`` (seeded)
    trains it and the weights are written there (atomically: never a half-written cache)."""
    if cache.exists():
        _load_teacher(model, cache)
    else:
        torch.manual_seed(0)
        train(model)
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        torch.save(model.state_dict(), partial)
        os.replace(partial, cache)
    return model.eval()


def _load_teacher(model: nn.Module, cache: Path) -> None:
    """Load the cached teacher's state dict into ``model``. ``weights_only=True``: tensors and plain
    containers only, so a file that would run code when unpickled is refused, and nothing in it runs."""
    try:
        model.load_state_dict(torch.load(cache, weights_only=True, map_location="cpu"))
    except Exception as exc:  # UnpicklingError: a refused object; RuntimeError, EOFError: damage, other keys
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        detail = " ".join(str(exc).split())
        reason = (
            f"it names {refused.group(1)}, which a weights-only load refuses to call"
            if refused else f"{type(exc).__name__}: {detail[:300]}{'…' if len(detail) > 300 else ''}"
        )  # fmt: skip
        raise UsageError(
            f"teacher cache {cache} is not a weights-only state dict of this teacher ({reason}); "
            "nothing in it was run. Delete the file to retrain the teacher."
        ) from exc
