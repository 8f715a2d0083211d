"""``motifs``: a Conv1d classifier of 4-channel signals that its teacher is not over-sized for.

Each signal is noise with a few short motifs added at random places, drawn from 64 motifs; its
class is decided by which motifs it holds (each motif adds its own random vote to every class). A
classifier needs about one detector per motif, and the teacher has 64 channels where the motifs
are detected: a student of half its width, distilled from it, loses about 2–3 points (measured
when the task was made), unlike the digits teacher, which keeps its accuracy at 12× less work.
The data are generated (seeded), so nothing is downloaded; the teacher trains on first use
(about two minutes on 2 cores) and is cached under ``results/teachers``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from search.tasks._task import Task
from search.tasks._teachers import cached_teacher, train_classifier

TEACHER_VERSION = 1
CHANNELS, LENGTH, CLASSES = 4, 128, 10
MOTIFS, PER_SIGNAL, MOTIF_LENGTH = 64, 4, 9
NOISE = 0.25
TRAIN, VAL = 12_000, 2_000
WIDTH = 64


def motifs_cnn(width: int = WIDTH) -> nn.Sequential:
    """About 7.5 M MACs per signal: two convolutions at full length, two at half, a global max."""

    def block(c_in: int, c_out: int, kernel: int, stride: int = 1) -> list[nn.Module]:
        conv = nn.Conv1d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False)
        return [conv, nn.BatchNorm1d(c_out), nn.ReLU()]

    return nn.Sequential(
        *block(CHANNELS, width, 7), *block(width, width, 5), *block(width, 2 * width, 3, 2),
        *block(2 * width, 2 * width, 3), nn.AdaptiveMaxPool1d(1), nn.Flatten(), nn.Linear(2 * width, CLASSES),
    )  # fmt: skip


def motif_signals(count: int, seed: int) -> TensorDataset:
    """``count`` signals and their classes; the motifs and their votes are the same for every seed."""
    shared = torch.Generator().manual_seed(1000)
    motifs = torch.randn(MOTIFS, CHANNELS, MOTIF_LENGTH, generator=shared)
    motifs *= 6 / motifs.flatten(1).norm(dim=1).view(MOTIFS, 1, 1)
    votes = torch.randn(MOTIFS, CLASSES, generator=shared)
    generator = torch.Generator().manual_seed(seed)
    signals = NOISE * torch.randn(count, CHANNELS, LENGTH, generator=generator)
    chosen = torch.randint(0, MOTIFS, (count, PER_SIGNAL), generator=generator)
    starts = torch.randint(0, LENGTH - MOTIF_LENGTH, (count, PER_SIGNAL), generator=generator)
    scale = 0.8 + 0.4 * torch.rand(count, PER_SIGNAL, generator=generator)
    for j in range(PER_SIGNAL):
        where = (starts[:, j, None] + torch.arange(MOTIF_LENGTH)).unsqueeze(1).expand(count, CHANNELS, MOTIF_LENGTH)
        signals.scatter_add_(2, where, scale[:, j, None, None] * motifs[chosen[:, j]])
    return TensorDataset(signals, votes[chosen].sum(1).argmax(1))


def motifs(cache_dir: str | os.PathLike | None = None) -> Task:
    """The motifs classifier (see the module's doc); the teacher is cached under ``results/teachers``."""
    train_set, val_set = motif_signals(TRAIN, seed=1), motif_signals(VAL, seed=2)
    train = DataLoader(train_set, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    val = DataLoader(val_set, batch_size=500)
    cache = Path(cache_dir or Path("results") / "teachers") / f"motifs-cnn-v{TEACHER_VERSION}.pt"
    model = cached_teacher(motifs_cnn(), cache, lambda model: train_classifier(model, train, epochs=10, max_lr=3e-3))
    return Task(model=model, train=train, val=val, example_input=val_set[0][0][None], name="motifs-cnn")
