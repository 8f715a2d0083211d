"""Fine-tuning a candidate by knowledge distillation from the teacher (QAT: quantizers stay active)."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn import functional as F

from search._errors import CandidateError


@dataclasses.dataclass(frozen=True)
class Finetune:
    """``loss = alpha · T² · KL(teacher_T ‖ student_T) + (1 − alpha) · CE(student, labels)``."""

    steps: int = 80
    alpha: float = 0.7
    temperature: float = 4.0
    lr: float = 1e-3
    eval_every: int = 20  # steps between intermediate scores reported to the pruner

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"fine-tune steps must be >= 0, got {self.steps}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"distillation alpha must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0 or self.lr <= 0:
            raise ValueError(f"temperature and lr must be positive, got {self.temperature}, {self.lr}")
        if self.eval_every < 1:
            raise ValueError(f"eval_every must be >= 1, got {self.eval_every}")


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, config: Finetune
) -> torch.Tensor:
    t = config.temperature
    soft = F.kl_div(
        F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
        reduction="batchmean", log_target=True,
    ) * t * t  # fmt: skip
    hard = F.cross_entropy(student_logits, labels)
    return config.alpha * soft + (1.0 - config.alpha) * hard


def distill(
    student: nn.Module,
    teacher: nn.Module,
    train: Iterable,
    config: Finetune,
    on_eval: Callable[[int], None] | None = None,
) -> list[float]:
    """Train ``student`` in place for ``config.steps`` batches; returns the loss of every step.

    ``on_eval(step)`` runs every ``eval_every`` steps (it may raise ``optuna.TrialPruned``).
    A non-finite loss fails the candidate.
    """
    teacher.eval()
    student.train()
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=config.lr)
    batches = itertools.chain.from_iterable(itertools.repeat(train))
    losses = []
    for step, (inputs, labels) in zip(range(1, config.steps + 1), batches):
        with torch.no_grad():
            teacher_logits = teacher(inputs)
        loss = distillation_loss(student(inputs), teacher_logits, labels, config)
        if not math.isfinite(loss.item()):
            raise CandidateError(f"fine-tuning diverged: loss is {loss.item()} at step {step}")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if on_eval is not None and step % config.eval_every == 0 and step < config.steps:
            on_eval(step)
            student.train()
    student.eval()
    return losses
