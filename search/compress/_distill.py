"""Fine-tuning a candidate by knowledge distillation from the teacher (QAT: quantizers stay active)."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterable
from typing import TypeAlias

import torch
from torch import nn
from torch.nn import functional as F

from search._errors import CandidateError, UsageError
from search.model import Output, call, reduce_output, split_batch

LossFunction: TypeAlias = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
DistillLoss: TypeAlias = str | LossFunction
DISTILL_LOSSES = ("kl", "mse", "cosine")
SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass(frozen=True)
class Finetune:
    """``loss = alpha · T² · KL(teacher_T ‖ student_T) + (1 − alpha) · CE(student, labels)`` for the
    ``"kl"`` distillation loss; the other losses use only ``steps``, ``lr`` and ``eval_every``."""

    steps: int = 80
    alpha: float = 0.7
    temperature: float = 4.0
    lr: float = 1e-3
    eval_every: int = 20  # steps between intermediate scores reported to the pruner
    schedule: str = "constant"  # or "cosine": 10 % linear warm-up, then cosine decay to 0

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"fine-tune steps must be >= 0, got {self.steps}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"distillation alpha must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0 or self.lr <= 0:
            raise ValueError(f"temperature and lr must be positive, got {self.temperature}, {self.lr}")
        if self.eval_every < 1:
            raise ValueError(f"eval_every must be >= 1, got {self.eval_every}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"learning-rate schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")


def check_distill_loss(loss: DistillLoss) -> None:
    if not callable(loss) and loss not in DISTILL_LOSSES:
        raise UsageError(
            f"distillation loss {loss!r}: expected one of {', '.join(map(repr, DISTILL_LOSSES))} or a "
            "function (student_out, teacher_out, labels) -> scalar tensor"
        )


def distillation_loss(
    student_out: torch.Tensor,
    teacher_out: torch.Tensor,
    labels: torch.Tensor | None,
    config: Finetune,
    loss: DistillLoss = "kl",
) -> torch.Tensor:
    """One batch's loss. ``"kl"`` on logits (class dimension 1): the soft term, plus the hard one
    where labels are given; ``"mse"``; ``"cosine"``: 1 − cosine similarity along the last dimension
    (embeddings), averaged; or the task's own function."""
    check_distill_loss(loss)
    if callable(loss):
        return loss(student_out, teacher_out, labels)
    if loss == "mse":
        return F.mse_loss(student_out, teacher_out)
    if loss == "cosine":
        return (1.0 - F.cosine_similarity(student_out, teacher_out, dim=-1)).mean()
    t = config.temperature
    soft = F.kl_div(
        F.log_softmax(student_out / t, dim=1), F.log_softmax(teacher_out / t, dim=1),
        reduction="batchmean", log_target=True,
    ) * t * t  # fmt: skip
    if labels is None:
        return soft
    hard = F.cross_entropy(student_out, labels)
    return config.alpha * soft + (1.0 - config.alpha) * hard


def distill(
    student: nn.Module,
    teacher: nn.Module,
    train: Iterable,
    config: Finetune,
    on_eval: Callable[[int], None] | None = None,
    *,
    loss: DistillLoss = "kl",
    output: Output | None = None,
) -> list[float]:
    """Train ``student`` in place for ``config.steps`` batches; returns the loss of every step.

    ``loss`` and ``output`` are the task's ``distill_loss`` and ``output`` (see :class:`~search.Task`).
    ``on_eval(step)`` runs every ``eval_every`` steps (it may raise ``optuna.TrialPruned``).
    A non-finite loss fails the candidate.
    """
    check_distill_loss(loss)
    teacher.eval()
    student.train()
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=config.lr)
    scheduler = _scheduler(optimizer, config)
    batches = itertools.chain.from_iterable(itertools.repeat(train))
    losses = []
    for step, batch in zip(range(1, config.steps + 1), batches):
        inputs, labels = split_batch(batch)
        with torch.no_grad():
            teacher_out = reduce_output(call(teacher, inputs), output)
        value = distillation_loss(reduce_output(call(student, inputs), output), teacher_out, labels, config, loss)
        if not math.isfinite(value.item()):
            raise CandidateError(f"fine-tuning diverged: loss is {value.item()} at step {step}")
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        scheduler.step()
        losses.append(value.item())
        if on_eval is not None and step % config.eval_every == 0 and step < config.steps:
            on_eval(step)
            student.train()
    student.eval()
    return losses


def _scheduler(optimizer: torch.optim.Optimizer, config: Finetune) -> torch.optim.lr_scheduler.LRScheduler:
    """``cosine``: a pretrained model whose loss is already low is not walked away from its
    optimum by full-size Adam steps to the end (measured on MiniLM: see search/tasks.py)."""
    if config.schedule == "constant" or config.steps == 0:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    warmup = max(1, config.steps // 10)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, config.steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
