"""Fine-tuning a candidate by knowledge distillation from the teacher (QAT: quantizers stay active)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeAlias

import torch
from torch import nn
from torch.nn import functional as F

from search._errors import CandidateError, UsageError
from search.compress._finetune import Finetune
from search.compress._teacher import TeacherOutputs
from search.model import Output, call, reduce_output, split_batch

LossFunction: TypeAlias = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
DistillLoss: TypeAlias = str | LossFunction
DISTILL_LOSSES = ("kl", "mse", "cosine")


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


class Distillation:
    """A fine-tune of ``student`` by distillation from ``teacher`` that can stop at any step and go
    on later from where it stopped (:meth:`state_dict`), keeping the student's best state and
    going back to it when a score falls below it (``config.backtrack``).

    ``loss`` and ``output`` are the task's ``distill_loss`` and ``output`` (see
    :class:`~search.Task`); ``teacher_outputs``: the teacher's outputs remembered across fine-tunes
    (a :class:`TeacherOutputs` of ``teacher`` and ``output``; default: the teacher runs on every
    batch). The learning-rate schedule spans ``config.steps``, the longest
    fine-tune, and a fine-tune continued later goes on with the batches and the random draws it
    stopped at: it ends as one run at once would. Its randomness is ``config.seed``'s alone (torch's
    and ``train``'s own generator are seeded at its first batch), and scoring it takes none of it.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        train: Iterable,
        config: Finetune,
        *,
        loss: DistillLoss = "kl",
        output: Output | None = None,
        teacher_outputs: TeacherOutputs | None = None,
    ) -> None:
        check_distill_loss(loss)
        if config.steps is None:
            raise ValueError("the fine-tune's length is not resolved yet: steps is None")
        if teacher_outputs is None:
            teacher_outputs = TeacherOutputs(teacher, output, max_bytes=0)
        elif teacher_outputs.teacher is not teacher or teacher_outputs.output is not output:
            raise ValueError("teacher_outputs must be the outputs of this teacher, reduced by this output")
        self.student, self.config = student, config
        self.loss, self.output, self.teacher_outputs = loss, output, teacher_outputs
        self.optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=config.lr)
        self.scheduler = _scheduler(self.optimizer, config)
        self.step = 0
        self.losses: list[float] = []
        self.best_metric: float | None = None
        self.best_step: int | None = None
        self._best_state: dict[str, torch.Tensor] | None = None
        self._train = train
        self._batches: Iterator | None = None  # drawn from at the first step
        self._pass_start: tuple[torch.Tensor, torch.Tensor | None] | None = None  # the RNG as this pass began
        self._drawn = 0  # batches drawn in this pass over ``train``
        self._resume: dict | None = None  # where a loaded state stopped drawing

    def score(self, evaluate: Callable[[], float]) -> float:
        """``evaluate()`` of the student as it is now; kept as the best state when it beats the best."""
        self.student.eval()
        states = _rng_states(self._train)
        try:
            value = float(evaluate())
        finally:  # a pass over a DataLoader draws from the RNG: the fine-tune's draws stay its own
            _set_rng_states(self._train, states)
        if math.isfinite(value) and (self.best_metric is None or value > self.best_metric):
            self.best_metric, self.best_step = value, self.step
            self._best_state = {key: tensor.detach().clone() for key, tensor in self.student.state_dict().items()}
        return value

    def run(
        self,
        until: int,
        evaluate: Callable[[], float] | None = None,
        on_eval: Callable[[int, float], None] | None = None,
        deadline: float | None = None,
    ) -> None:
        """Train to step ``until``. With ``evaluate``, the student is scored every
        ``config.eval_interval`` steps and at ``until`` (:meth:`score`), and ``on_eval(step,
        value)`` hears each score (it may raise ``optuna.TrialPruned``). With a ``deadline``
        (``time.monotonic()``), no step starts after it: the fine-tune stops there, its last step
        scored as ``until``'s would be, and may go on later. A non-finite loss fails the candidate."""
        student, config = self.student, self.config
        student.train()
        scored_at = self.step
        while self.step < until:
            if deadline is not None and time.monotonic() >= deadline:
                break
            inputs, labels = split_batch(self._next_batch())
            teacher_out = self.teacher_outputs(inputs)
            value = distillation_loss(
                reduce_output(call(student, inputs), self.output), teacher_out, labels, config, self.loss
            )
            if not math.isfinite(value.item()):
                raise CandidateError(f"fine-tuning diverged: loss is {value.item()} at step {self.step + 1}")
            self.optimizer.zero_grad()
            value.backward()
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            self.losses.append(value.item())
            if evaluate is not None and (self.step % config.eval_interval == 0 or self.step == until):
                scored_at = self._evaluate(evaluate, on_eval)
        if evaluate is not None and self.step != scored_at:  # stopped at the deadline between two scores
            self._evaluate(evaluate, on_eval)
        student.eval()

    def _evaluate(self, evaluate: Callable[[], float], on_eval: Callable[[int, float], None] | None) -> int:
        """Score the student (:meth:`score`), tell ``on_eval``, go back to the best state if the
        score fell below it; the step scored."""
        scored = self.score(evaluate)
        if on_eval is not None:
            on_eval(self.step, scored)
        if self.config.backtrack is not None and self.best_metric is not None and scored < self.best_metric:
            self._backtrack(self.config.backtrack)
        self.student.train()
        return self.step

    def _backtrack(self, factor: float) -> None:
        """Back to the best state, the learning rate times ``factor`` from here on; Adam's moments
        go with the steps undone."""
        self.student.load_state_dict(self._best_state)
        self.optimizer.state.clear()
        self.scheduler.base_lrs = [lr * factor for lr in self.scheduler.base_lrs]
        for group in self.optimizer.param_groups:
            group["lr"] *= factor

    def _next_batch(self):
        if self._batches is None:
            self._batches = self._passes()
            generator = _generator(self._train)
            if self._resume is None:  # a fine-tune from its start
                torch.manual_seed(self.config.seed)
                if generator is not None:
                    generator.manual_seed(self.config.seed)
            else:  # where the saved fine-tune stopped: the pass it was in, its batches drawn again
                _set_rng_states(self._train, (self._resume["pass_rng"], self._resume["pass_generator"]))
                for _ in range(self._resume["drawn"]):
                    next(self._batches)
                torch.set_rng_state(self._resume["rng"])
        return next(self._batches)

    def _passes(self) -> Iterator:
        """``train``'s batches, pass after pass, keeping the RNG each pass began with."""
        while True:
            self._pass_start, self._drawn = _rng_states(self._train), 0
            for batch in self._train:
                self._drawn += 1
                yield batch
            if self._drawn == 0:
                raise UsageError("the task's training data yielded no batch: nothing to fine-tune on")

    def restore_best(self) -> None:
        """Put the best state scored back into the student (its state now, if none was scored)."""
        if self._best_state is not None:
            self.student.load_state_dict(self._best_state)

    def state_dict(self) -> dict:
        """Everything needed to go on later: the student, the optimizer and schedule, the step,
        the best state and its score, the first and last losses. Tensors and plain data only, so
        it loads with ``torch.load(..., weights_only=True)``."""
        return {
            "step": self.step,
            "student": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "best_metric": self.best_metric,
            "best_step": self.best_step,
            "best_state": None if self.best_step == self.step else self._best_state,  # else: the student's own
            "losses_first_last": self.first_last_losses(),
            "data": None if self._batches is None else {
                "pass_rng": self._pass_start[0], "pass_generator": self._pass_start[1], "drawn": self._drawn,
                "rng": torch.get_rng_state(),
            },
        }  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        self.best_metric, self.best_step = state["best_metric"], state["best_step"]
        best = state["best_state"] if state["best_state"] is not None else state["student"]
        self._best_state = {key: tensor.detach().clone() for key, tensor in best.items()}
        self.losses = list(state["losses_first_last"][:1])
        self._resume = state.get("data")  # a state saved without it: the batches start from the seed

    def first_last_losses(self) -> list[float]:
        return [self.losses[0], self.losses[-1]] if self.losses else []


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

    ``on_eval(step)`` runs every ``eval_interval`` steps before the last (it may raise
    ``optuna.TrialPruned``). A non-finite loss fails the candidate. (:class:`Distillation` is the
    same fine-tune, resumable and keeping the best state.)
    """
    run = Distillation(student, teacher, train, config, loss=loss, output=output)
    for step in range(config.eval_interval, config.steps, config.eval_interval) if on_eval else ():
        run.run(step)
        student.train()  # as it trains: the callback may score it (and leave it in eval mode)
        on_eval(step)
    run.run(config.steps)
    return run.losses


def _generator(train: Iterable) -> torch.Generator | None:
    """A DataLoader's own generator (its shuffle draws from it, not from torch's), if it has one."""
    generator = getattr(train, "generator", None)
    return generator if isinstance(generator, torch.Generator) else None


def _rng_states(train: Iterable) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What a fine-tune's random draws come from: torch's RNG, and ``train``'s own generator."""
    generator = _generator(train)
    return torch.get_rng_state(), None if generator is None else generator.get_state()


def _set_rng_states(train: Iterable, states: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    torch.set_rng_state(states[0])
    generator = _generator(train)
    if generator is not None and states[1] is not None:
        generator.set_state(states[1])


def _scheduler(optimizer: torch.optim.Optimizer, config: Finetune) -> torch.optim.lr_scheduler.LRScheduler:
    """``cosine``: a pretrained model whose loss is already low is not walked away from its
    optimum by full-size Adam steps to the end (measured on MiniLM: see search/tasks/_minilm.py).
    ``stable-decay``: the full rate up to the last rung's stretch (what a screened or once-promoted
    plan is scored after, as with ``constant``), then a cosine decay to 0 over that stretch, so the
    longest fine-tune ends with its rate decayed: better where it is long enough to recover the plan,
    worse where it is not (both measured: benchmarks/RESULTS.md, "Eighth session")."""
    if config.schedule == "constant" or not config.steps:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if config.schedule == "stable-decay":
        start = (0, *config.rung_ends())[-2]  # where the last rung's stretch begins
        warmup, decay = 0, config.steps - start
    else:
        start, warmup = 0, max(1, config.steps // 10)
        decay = config.steps - warmup

    def factor(step: int) -> float:
        if step < start:
            return 1.0
        if step < start + warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - start - warmup) / max(1, decay)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
