"""The default task: a CNN on scikit-learn's bundled 8×8 digits. It needs no download and trains
its teacher on first use (cached under ``results/teachers``)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from search.tasks._task import Task
from search.tasks._teachers import cached_teacher, train_classifier

TEACHER_VERSION = 1


def digits_cnn() -> nn.Sequential:
    """~20 M MACs per 8×8 image: about 0.2 ms on one core, well above ONNX Runtime's per-call overhead."""

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

    return nn.Sequential(
        *block(1, 32), *block(32, 64), *block(64, 128), nn.MaxPool2d(2),
        *block(128, 256), *block(256, 256),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 10),
    )  # fmt: skip


def _digits_data(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    images, labels = load_digits(return_X_y=True)
    images = torch.tensor(images, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    images = (images - images.mean()) / images.std()
    labels = torch.tensor(labels)
    train_idx, val_idx = train_test_split(
        range(len(labels)), test_size=0.2, random_state=seed, stratify=labels
    )
    return (
        TensorDataset(images[train_idx], labels[train_idx]),
        TensorDataset(images[val_idx], labels[val_idx]),
    )


def digits(cache_dir: str | os.PathLike | None = None) -> Task:
    """A CNN on scikit-learn's bundled 8×8 digits; the teacher is cached under ``results/teachers``."""
    train_set, val_set = _digits_data()
    train = DataLoader(train_set, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    val = DataLoader(val_set, batch_size=256)
    cache = Path(cache_dir or Path("results") / "teachers") / f"digits-cnn-v{TEACHER_VERSION}.pt"
    model = cached_teacher(digits_cnn(), cache, lambda model: train_classifier(model, train, epochs=12, max_lr=4e-3))
    return Task(model=model, train=train, val=val, example_input=val_set[0][0][None], name="digits-cnn")
