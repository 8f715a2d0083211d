"""How a candidate is fine-tuned: its settings, apart from the distillation that runs them (no
PyTorch here, so the command line shows the defaults without importing it)."""

from __future__ import annotations

import dataclasses
import math

SCHEDULES = ("constant", "cosine", "stable-decay")


def _whole_number(value: object) -> bool:
    """An int >= 0 (a bool is no count)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclasses.dataclass(frozen=True)
class Finetune:
    """How a candidate is fine-tuned by distillation.

    ``loss = alpha · T² · KL(teacher_T ‖ student_T) + (1 − alpha) · CE(student, labels)`` for the
    ``"kl"`` distillation loss; the other losses use only the schedule fields.

    The longest fine-tune a plan may get is ``steps`` batches, or ``epochs`` passes over the task's
    training data; with neither, a study derives it from the data's size and the run's time
    (:func:`search.study.resolve_finetune`). A study screens every plan with the shortest of
    ``rungs`` fine-tunes, each ``reduction`` times longer than the one before, and promotes a plan
    to the next while it could still reach the front. The student is scored every ``eval_every``
    steps (and before the first): the fine-tune keeps its best state, so it never ends worse than
    it started. A score below the best so far sends the student back to its best state with the
    learning rate times ``backtrack`` (None: it goes on from where it is): a plan that starts near
    the teacher (PTQ, a refitted pruning) is walked away from it by the task's rate, and goes on
    from its start at a smaller one.

    ``seed`` alone sets a fine-tune's randomness (the training batches' order, dropout): every plan
    is fine-tuned on the same batches in the same order, so plans differ by what they are, not by
    their draw, and on one machine a plan gives the same result in whatever trial, worker or process
    it runs.
    """

    steps: int | None = None
    epochs: float | None = None
    alpha: float = 0.7
    temperature: float = 4.0
    lr: float = 1e-3
    eval_every: int | None = None  # None: once per screening fine-tune's length
    # "constant"; "cosine": 10 % linear warm-up, then a cosine decay to 0 over `steps`; "stable-decay":
    # the full rate until the last rung's stretch, then a cosine decay to 0 over it
    schedule: str = "constant"
    rungs: int = 3
    reduction: int = 3
    seed: int = 0
    backtrack: float | None = 0.1

    def __post_init__(self) -> None:
        if self.steps is not None and not _whole_number(self.steps):
            raise ValueError(f"fine-tune steps must be a whole number >= 0, got {self.steps!r}")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"fine-tune epochs must be > 0, got {self.epochs!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"distillation alpha must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0 or self.lr <= 0:
            raise ValueError(f"temperature and lr must be positive, got {self.temperature}, {self.lr}")
        if self.eval_every is not None and self.eval_every < 1:
            raise ValueError(f"eval_every must be >= 1, got {self.eval_every}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"learning-rate schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not _whole_number(self.seed):
            raise ValueError(f"fine-tune seed must be a whole number >= 0, got {self.seed!r}")
        if self.backtrack is not None and not 0.0 < self.backtrack <= 1.0:
            raise ValueError(f"backtrack must be in (0, 1] or None, got {self.backtrack!r}")
        if self.rungs < 1 or self.reduction < 2:
            raise ValueError(f"fine-tune rungs must be >= 1 and reduction >= 2, got {self.rungs}, {self.reduction}")

    def rung_ends(self) -> tuple[int, ...]:
        """The step each rung's fine-tune ends at, shortest first: ``steps`` divided by
        ``reduction`` once for each rung above, rounded up (rungs that would repeat a length, or
        be shorter than one step, are left out)."""
        if self.steps is None:
            raise ValueError("the fine-tune's length is not resolved yet: steps is None")
        ends = [math.ceil(self.steps / self.reduction**k) for k in reversed(range(self.rungs))]
        return tuple(sorted({end for end in ends if end >= 1})) or (0,)

    @property
    def eval_interval(self) -> int:
        """Steps between scores: ``eval_every``, or the screening fine-tune's length (a score takes
        a pass over the task's validation data: a Transformer's can take as long as its steps)."""
        return self.eval_every or max(1, self.rung_ends()[0])
