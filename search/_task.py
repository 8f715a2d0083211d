"""What gets compressed: the teacher, its data and how it is scored."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from search._errors import UsageError

Metric = Callable[[nn.Module, Iterable], float]


@torch.no_grad()
def top1_accuracy(model: nn.Module, val: Iterable) -> float:
    """Share of ``(inputs, labels)`` batches' samples whose arg-max logit is the label."""
    correct = total = 0
    for inputs, labels in val:
        correct += int((model(inputs).argmax(dim=1) == labels).sum())
        total += len(labels)
    return correct / total


@dataclasses.dataclass
class Task:
    """A trained teacher and its data.

    ``train`` and ``val`` are iterables of ``(inputs, labels)`` batches (DataLoaders); ``example_input``
    has batch size 1 and fixes the shape latency is measured at; ``metric(model, val)`` is higher-is-better
    and is called on the exported ONNX model (wrapped as an ``nn.Module``) as well as on torch models.
    ``spec`` is the ``module:function`` that made the task (set by :func:`load_task`): worker
    processes load the task by it.
    """

    model: nn.Module
    train: Iterable
    val: Iterable
    example_input: torch.Tensor
    metric: Metric | None = None
    name: str = "task"
    spec: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise UsageError(f"Task.model must be a torch.nn.Module, got {type(self.model).__name__}")
        if not isinstance(self.example_input, torch.Tensor) or self.example_input.shape[:1] != (1,):
            raise UsageError("Task.example_input must be a tensor with batch size 1")
        if self.metric is None:
            self.metric = top1_accuracy

    def fingerprint(self) -> str:
        """sha256 of the teacher's weights: every worker of a study must compress the same model."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def score(self, model: nn.Module) -> float:
        model.eval()
        with torch.no_grad():
            return float(self.metric(model, self.val))


DEFAULT_TASK = "search.tasks:digits"


def load_task(spec: str) -> Task:
    """``module:function`` → the Task that zero-argument function returns.

    The module is imported from the current directory or an installed package.
    """
    module_name, sep, function_name = spec.partition(":")
    if not sep or not module_name or not function_name:
        raise UsageError(f"task {spec!r}: expected module:function, such as {DEFAULT_TASK}")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"task {spec!r}: cannot import module {module_name!r} ({exc})") from exc
    function = getattr(module, function_name, None)
    if not callable(function):
        raise UsageError(f"task {spec!r}: module {module_name!r} has no function {function_name!r}")
    try:
        task = function()
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"task {spec!r}: {function_name}() raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(task, Task):
        raise UsageError(f"task {spec!r}: {function_name}() returned {type(task).__name__}, not a search.Task")
    task.spec = spec
    return task
