"""A task written the way a user writes one, from the README's task interface alone (public API,
its own model, data and training loop), for an architecture the search was never tuned on: a
MobileNetV3-style network (inverted residuals with depthwise convolutions, squeeze-and-excitation
from torchvision, hard-swish), 10 classes of 3×32×32 images.

    python benchmarks/front_vs_recipes.py --task benchmarks.unseen_mobilenet:make

The images are generated (seeded, nothing downloaded): noise with one of its class's 7×7 patterns
(4 per class) and two patterns of no class pasted at random places. The teacher trains on first
use (about ten minutes on 2 cores) and is cached under ``results/teachers``. (torchvision's own
``mobilenet_v3_small`` learned nothing here in 2–3 epochs: its early strides leave a 32×32 image
at 1×1 before the patterns are told apart.)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.ops import SqueezeExcitation

from search import Task

SIZE, CLASSES, PER_CLASS, PATTERN_SIZE, NOISE = 32, 10, 4, 7, 0.6
DISTRACTOR_BANK, DISTRACTORS = 24, 2
TRAIN, VAL, EPOCHS = 12_000, 2_000, 10


def pattern_images(count: int, seed: int) -> TensorDataset:
    """``count`` images and their classes; the patterns are the same for every seed. An image holds
    one of its class's patterns and ``DISTRACTORS`` patterns of no class, at random places."""
    shared = torch.Generator().manual_seed(2000)
    patterns = torch.randn(CLASSES * PER_CLASS + DISTRACTOR_BANK, 3, PATTERN_SIZE, PATTERN_SIZE, generator=shared)
    patterns *= 8 / patterns.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (count,), generator=generator)
    own = labels * PER_CLASS + torch.randint(0, PER_CLASS, (count,), generator=generator)
    others = CLASSES * PER_CLASS + torch.randint(0, DISTRACTOR_BANK, (count, DISTRACTORS), generator=generator)
    chosen = torch.cat([own[:, None], others], 1)
    images = NOISE * torch.randn(count, 3, SIZE, SIZE, generator=generator)
    corners = torch.randint(0, SIZE - PATTERN_SIZE, (count, chosen.shape[1], 2), generator=generator)
    for i in range(count):
        for j in range(chosen.shape[1]):
            y, x = corners[i, j].tolist()
            images[i, :, y : y + PATTERN_SIZE, x : x + PATTERN_SIZE] += patterns[chosen[i, j]]
    return TensorDataset(images, labels)


class InvertedResidual(nn.Module):
    """MobileNetV2/V3's block: 1×1 expansion, 3×3 depthwise, optional squeeze-and-excitation, 1×1
    projection, and a residual add where the shape allows."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int = 3, squeeze: bool = False) -> None:
        super().__init__()
        hidden = c_in * expand
        layers = [
            nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.Hardswish(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.Hardswish(),
        ]  # fmt: skip
        if squeeze:
            layers.append(SqueezeExcitation(hidden, hidden // 4, scale_activation=nn.Hardsigmoid))
        layers += [nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


def mobilenet(classes: int = CLASSES) -> nn.Sequential:
    """A small MobileNetV3-style network for 32×32 images."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.Hardswish(),
        InvertedResidual(32, 32, 1), InvertedResidual(32, 48, 2), InvertedResidual(48, 48, 1, squeeze=True),
        InvertedResidual(48, 64, 2), InvertedResidual(64, 64, 1, squeeze=True),
        nn.Conv2d(64, 192, 1, bias=False), nn.BatchNorm2d(192), nn.Hardswish(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(192, classes),
    )  # fmt: skip


def train_classifier(model: nn.Module, train: DataLoader, epochs: int, max_lr: float, weight_decay: float) -> None:
    """Cross-entropy, AdamW with a one-cycle schedule peaking at ``max_lr``."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=max_lr / 2, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr, total_steps=epochs * len(train))
    model.train()
    for _ in range(epochs):
        for images, labels in train:
            loss = nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()


def cached(model: nn.Module, name: str, train: Callable[[nn.Module], None]) -> nn.Module:
    """``model`` with the weights of ``results/teachers/<name>``; trained by ``train`` (seeded) and
    written there on first use."""
    cache = Path("results", "teachers", name)
    if cache.exists():
        model.load_state_dict(torch.load(cache, weights_only=True))
    else:
        torch.manual_seed(0)
        train(model)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), f"{cache}.{os.getpid()}")
        os.replace(f"{cache}.{os.getpid()}", cache)
    return model.eval()


def make() -> Task:
    train_set, val_set = pattern_images(TRAIN, seed=1), pattern_images(VAL, seed=2)
    train = DataLoader(train_set, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    val = DataLoader(val_set, batch_size=500)
    model = cached(mobilenet(), "unseen-mobilenet-v1.pt", lambda m: train_classifier(m, train, EPOCHS, 4e-3, 1e-4))
    return Task(model=model, train=train, val=val, example_input=val_set[0][0][None], name="unseen-mobilenet")
