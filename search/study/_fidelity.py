"""How long a plan is fine-tuned: the longest fine-tune, in the task's terms (epochs of its training
data), derived from the data's size and the run's time where the run does not set it."""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Iterable

from search.compress import Distillation, Finetune
from search.model import batch_size, split_batch
from search.tasks import Task

# The samples a longest fine-tune passes over by default: 50 epochs of 4000 samples, what uniform
# pruning plus distillation needed on a 4000-sample Conv1d task before it stopped improving.
DEFAULT_SAMPLES = 200_000
EPOCHS = (1.0, 60.0)  # the default's bounds
DEFAULT_FINETUNE_S = 120.0  # the longest fine-tune's time, at most, by default and without a timeout
TIMEOUT_SHARE = 0.1  # with a timeout: the longest fine-tune at most this share of it
PROBE_STEPS = 3  # distillation steps timed to convert time into steps


def resolve_finetune(finetune: Finetune, task: Task, timeout: float | None) -> tuple[Finetune, str]:
    """``finetune`` with its longest fine-tune in steps, and a line saying how it was chosen.

    ``steps`` given: as it is. ``epochs`` given: that many passes over ``task.train``. Neither:
    :data:`DEFAULT_SAMPLES` worth of epochs (within :data:`EPOCHS`), cut to what fits in
    :data:`TIMEOUT_SHARE` of ``timeout`` (else :data:`DEFAULT_FINETUNE_S`) at the speed of a
    few distillation steps of the teacher, timed here.
    """
    if finetune.steps is not None:
        return finetune, f"{finetune.steps} steps, as set"
    batches, samples = _epoch(task.train)
    if finetune.epochs is not None:
        steps = max(1, math.ceil(finetune.epochs * batches))
        return dataclasses.replace(finetune, steps=steps), (
            f"{finetune.epochs:g} epochs of {samples} samples ({batches} batches each) = {steps} steps, as set"
        )
    epochs = min(max(DEFAULT_SAMPLES / samples, EPOCHS[0]), EPOCHS[1])
    steps = max(1, math.ceil(epochs * batches))
    note = f"{epochs:.3g} epochs of {samples} samples ({batches} batches each) = {steps} steps"
    limit_s = TIMEOUT_SHARE * timeout if timeout else DEFAULT_FINETUNE_S
    step_s = _step_seconds(task, finetune)
    if steps * step_s > limit_s:
        steps = max(1, int(limit_s / step_s))
        note += (
            f", cut to {steps} steps ({steps / batches:.3g} epochs): {step_s * 1000:.0f} ms a step here, "
            f"{limit_s:.0f} s at most for the longest fine-tune"
            + (f" ({TIMEOUT_SHARE:.0%} of the timeout)" if timeout else "")
        )
    return dataclasses.replace(finetune, steps=steps, epochs=round(steps / batches, 3)), note


def _epoch(train: Iterable) -> tuple[int, int]:
    """Batches in one pass over ``train``, and the samples in them."""
    dataset = getattr(train, "dataset", None)
    try:
        batches = len(train)  # a DataLoader, a list of batches
    except TypeError:
        batches = sum(1 for _ in train)
    if dataset is not None and hasattr(dataset, "__len__"):
        return max(1, batches), len(dataset)
    first = next(iter(train), None)
    per_batch = batch_size(split_batch(first)[0]) if first is not None else 1
    return max(1, batches), max(1, batches * per_batch)


def _step_seconds(task: Task, finetune: Finetune) -> float:
    """Seconds a distillation step of the teacher into a copy of itself takes here (after one
    untimed step): a candidate is no larger than its teacher."""
    probe = Distillation(
        copy.deepcopy(task.model), task.model, task.train, dataclasses.replace(finetune, steps=PROBE_STEPS + 1),
        loss=task.distill_loss, output=task.output,
    )  # fmt: skip
    probe.run(1)
    start = time.perf_counter()
    probe.run(PROBE_STEPS + 1)
    return (time.perf_counter() - start) / PROBE_STEPS
