"""What gets compressed: the teacher, its data and how it is scored."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import inspect
import itertools
import numbers
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from search._errors import UsageError, first_line
from search.artifacts import OnnxModule
from search.compress import (
    ACTIVITY_BATCHES, CALIBRATION_BATCHES, DistillLoss, Finetune, TeacherOutputs, channel_activity,
    check_distill_loss,
)  # fmt: skip
from search.model import (
    Inputs, Output, call, check_example_input, find_blocks, reduce_output, reduced_output, split_batch,
)  # fmt: skip
from search.tasks._default import DEFAULT_TASK, METRIC_WINDOW

Metric = Callable[[nn.Module, Iterable], float]


@torch.no_grad()
def top1_accuracy(model: nn.Module, val: Iterable) -> float:
    """Share of ``(inputs, labels)`` batches' samples whose arg-max logit is the label."""
    correct = total = 0
    for batch in val:
        inputs, labels = split_batch(batch)
        if labels is None:
            raise UsageError(
                "the default metric, top-1 accuracy, needs labelled val batches; got (inputs, None): "
                "name the task's metric (Task.metric)"
            )
        correct += int((call(model, inputs).argmax(dim=1) == labels).sum())
        total += len(labels)
    return correct / total


@dataclasses.dataclass
class Task:
    """A trained teacher and its data.

    ``train`` and ``val`` are iterables of ``(inputs, labels)`` batches (DataLoaders); inputs are a
    tensor, a tuple of tensors or a dict of tensors by argument name (``model(x)``, ``model(*x)``,
    ``model(**x)``), labels ``None`` for unlabelled data. ``example_input`` has the same form with
    batch size 1 and fixes the shape latency is measured at. ``metric(model, val)`` is
    higher-is-better and is called on the exported ONNX model (wrapped as an ``nn.Module``) as well as
    on torch models; both return the same tensor: ``output(model's output)``, or the output itself.
    ``distill_loss``: ``"kl"`` (on logits, plus cross-entropy where labels are given), ``"mse"``,
    ``"cosine"`` (on the output tensors, such as embeddings), or ``loss(student_out, teacher_out,
    labels)`` returning a scalar tensor. ``finetune``: the fine-tune this teacher wants when the run
    names none (a pretrained Transformer needs a far smaller learning rate than a CNN trained from
    scratch). ``calibration``: ``(inputs, labels)`` batches at ``example_input``'s shape for static
    int8 calibration, when ``train``'s batches have another (e.g. trimmed padding); default ``train``.
    ``spec`` is the ``module:function`` that made the task and ``options`` the keywords it was
    called with (set by :func:`load_task`): worker processes load the task by them.
    ``metric_window``: the metric span, below the teacher's, a study judges its front over, in the
    metric's own units (:attr:`window`; None: :data:`METRIC_WINDOW`, for a metric in [0, 1]): a
    plan is promoted to a longer fine-tune for what it could add there, and a bit width that alone
    drops the metric by more is not offered to that layer. A metric in percent wants 10.
    """

    model: nn.Module
    train: Iterable
    val: Iterable
    example_input: Inputs
    metric: Metric | None = None
    name: str = "task"
    spec: str | None = None
    output: Output | None = None
    distill_loss: DistillLoss = "kl"
    finetune: Finetune | None = None
    calibration: Iterable | None = None
    metric_window: float | None = None
    options: dict = dataclasses.field(default_factory=dict)
    _calibration_batches: list | None = dataclasses.field(default=None, init=False, repr=False, compare=False)
    _activity: dict | None = dataclasses.field(default=None, init=False, repr=False, compare=False)
    _teacher_outputs: TeacherOutputs | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise UsageError(f"Task.model must be a torch.nn.Module, got {type(self.model).__name__}")
        check_example_input(self.example_input)
        if self.output is not None and not callable(self.output):
            raise UsageError(f"Task.output must be None or a function of the model's output, got {self.output!r}")
        check_distill_loss(self.distill_loss)
        if self.finetune is not None and not isinstance(self.finetune, Finetune):
            raise UsageError(f"Task.finetune must be a search.Finetune or None, got {type(self.finetune).__name__}")
        window = self.metric_window
        if window is not None and not (isinstance(window, numbers.Real) and not isinstance(window, bool)
                                       and 0 < window < float("inf")):  # fmt: skip
            raise UsageError(
                f"Task.metric_window {window!r}: expected None or a positive number in the metric's units "
                "(0.1 for an accuracy in [0, 1], 10 for one in percent)"
            )
        self._check_forward()
        if self.metric is None:
            self.metric = top1_accuracy

    @property
    def window(self) -> float:
        """The metric span a study judges its front over: ``metric_window``, or :data:`METRIC_WINDOW`."""
        return METRIC_WINDOW if self.metric_window is None else float(self.metric_window)

    def _check_forward(self) -> None:
        """The teacher runs on ``example_input`` and its output reduces to one tensor."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                out = call(self.model, self.example_input)
        except Exception as exc:
            raise UsageError(f"Task.model(example_input) raised {type(exc).__name__}: {exc}") from exc
        finally:
            self.model.train(was_training)
        reduce_output(out, self.output)

    def calibration_batches(self) -> list:
        """The batches that set int8 activation ranges: the first :data:`CALIBRATION_BATCHES` of
        ``calibration`` (default ``train``), drawn once in the order a fixed seed gives. Every plan
        is calibrated on the same data, so its int8 result does not depend on its trial's number."""
        if self._calibration_batches is None:
            self._calibration_batches = self._draw(CALIBRATION_BATCHES)
        return self._calibration_batches

    def _draw(self, count: int) -> list:
        """The first ``count`` batches of ``calibration`` (default ``train``) in the order a fixed
        seed gives; drawing them leaves the loaders' and torch's random state as it was."""
        loader = self.calibration or self.train
        generator = getattr(loader, "generator", None)
        state = generator.get_state() if isinstance(generator, torch.Generator) else None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            if state is not None:
                generator.manual_seed(0)
            try:
                return list(itertools.islice(loader, count))
            finally:
                if state is not None:
                    generator.set_state(state)

    def activity(self) -> dict[str, torch.Tensor]:
        """The teacher's :func:`~search.compress.channel_activity`, measured once: every plan built
        from this task refits by it the layers that read pruned channels, and ranks a Transformer's
        heads and FFN channels by it (a CNN's channels by weight magnitude). A Transformer's is
        measured on the first :data:`ACTIVITY_BATCHES` of ``calibration``, a CNN's on
        :meth:`calibration_batches` (each position of a batch is a row)."""
        if self._activity is None:
            blocks = find_blocks(self.model)
            batches = self.calibration_batches() if blocks is None else self._draw(ACTIVITY_BATCHES)
            self._activity = channel_activity(self.model, batches)
        return self._activity

    def teacher_outputs(self) -> TeacherOutputs:
        """The teacher's outputs on training batches, remembered for every fine-tune of this process."""
        outputs = self._teacher_outputs
        if outputs is None or outputs.teacher is not self.model or outputs.output is not self.output:
            self._teacher_outputs = TeacherOutputs(self.model, self.output)
        return self._teacher_outputs

    def fingerprint(self) -> str:
        """sha256 of the teacher's weights: every worker of a study must compress the same model."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def score(self, model: nn.Module) -> float:
        """``metric`` of a torch model of the task (its output reduced by ``output``) or of an
        :class:`~search._export.OnnxModule` (whose graph already ends in that reduction)."""
        model.eval()
        reduced = contextlib.nullcontext() if isinstance(model, OnnxModule) else reduced_output(model, self.output)
        with torch.no_grad(), reduced:
            value = self.metric(model, self.val)
        return metric_value(value, getattr(self.metric, "__name__", "metric"))


def metric_value(value: object, name: str = "metric") -> float:
    """A metric's result as a float: a Python or NumPy number, or a one-element tensor. Anything
    else is the task's mistake, the same for every candidate, so it stops the run
    (:class:`UsageError`) instead of failing each trial. NaN passes: a broken candidate can score NaN
    (the teacher may not: :func:`search.study.measure_baseline` checks)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UsageError(
            f"the task's metric {name}() returned {_short(value)} ({type(value).__name__}); expected a number "
            "(higher is better)"
        )
    return float(value)


def _short(value: object, limit: int = 60) -> str:
    text = repr(value).replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def load_task(spec: str, **options) -> Task:
    """``module:function`` → the Task that function returns, called with ``options`` as keywords
    (such as ``seq_len`` from ``--seq-len``), none by default.

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
    except SyntaxError as exc:
        raise UsageError(
            f"task {spec!r}: module {module_name!r} has a syntax error: {exc.msg} ({exc.filename}, line {exc.lineno})"
        ) from exc
    except Exception as exc:  # the module's own code failed as it ran: its error, in one line
        raise UsageError(f"task {spec!r}: importing module {module_name!r} raised {first_line(exc)}") from exc
    function = getattr(module, function_name, None)
    if not callable(function):
        raise UsageError(f"task {spec!r}: module {module_name!r} has no function {function_name!r}")
    _check_options(spec, function, options)
    try:
        task = function(**options)
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"task {spec!r}: {function_name}() raised {first_line(exc)}") from exc
    if not isinstance(task, Task):
        raise UsageError(f"task {spec!r}: {function_name}() returned {type(task).__name__}, not a search.Task")
    task.spec, task.options = spec, dict(options)
    return task


def _check_options(spec: str, function: Callable, options: dict) -> None:
    try:
        inspect.signature(function).bind(**options)
    except TypeError:
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in options)
        signature = f"{function.__name__}{inspect.signature(function)}"
        raise UsageError(f"task {spec!r} does not take {flags}: its function is {signature}") from None
