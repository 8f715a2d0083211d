"""A task written the way a user writes one, from the README's task interface alone (public API,
its own model, data and training loop), for an architecture the search was never tuned on: a small
signal Transformer built on PyTorch's own ``nn.TransformerEncoder`` (a strided Conv1d patch embedding,
a learned position table, 3 pre-norm blocks of ``nn.MultiheadAttention`` and a GELU FFN, a mean over
the 32 tokens), classifying the ``motifs`` task's 4-channel signals.

    python benchmarks/front_vs_recipes.py --task benchmarks.unseen_transformer:make

It trains on 48,000 generated signals (seeded, nothing downloaded; with 12,000 it overfits, 0.49 on
the validation set): about six minutes on 2 cores on first use, cached under ``results/teachers``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from benchmarks.unseen_mobilenet import cached, train_classifier
from search import Task
from search.tasks import motif_signals

TRAIN, VAL, EPOCHS, LEARNING_RATE = 48_000, 2_000, 8, 1e-3
CHANNELS, CLASSES, TOKENS = 4, 10, 32


class SignalTransformer(nn.Module):
    def __init__(self, dim: int = 64, heads: int = 4, ffn: int = 256, blocks: int = 3) -> None:
        super().__init__()
        self.embed = nn.Conv1d(CHANNELS, dim, 9, stride=4, padding=4)
        self.position = nn.Parameter(torch.zeros(1, TOKENS, dim))
        block = nn.TransformerEncoderLayer(
            dim, heads, ffn, dropout=0.1, batch_first=True, norm_first=True, activation="gelu"
        )
        self.encoder = nn.TransformerEncoder(block, blocks, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, CLASSES)

    def forward(self, signals: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(signals).transpose(1, 2) + self.position
        return self.head(self.norm(self.encoder(tokens)).mean(1))


def make() -> Task:
    train_set, val_set = motif_signals(TRAIN, seed=1), motif_signals(VAL, seed=2)
    train = DataLoader(train_set, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    val = DataLoader(val_set, batch_size=500)
    torch.manual_seed(0)  # its initial weights, for a teacher trained anew
    model = cached(
        SignalTransformer(), "unseen-signal-transformer-v1.pt",
        lambda m: train_classifier(m, train, EPOCHS, LEARNING_RATE, weight_decay=0.01),
    )  # fmt: skip
    return Task(model=model, train=train, val=val, example_input=val_set[0][0][None], name="unseen-transformer")
