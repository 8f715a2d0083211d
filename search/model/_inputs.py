"""How the code calls a task's model: its inputs, its batches and the tensor its output reduces to.

Inputs are a tensor, a tuple (or list) of tensors, or a dict of tensors by argument name (such as
``{"input_ids": ..., "attention_mask": ...}``; integer tensors are fine). A batch is ``(inputs,
labels)``, labels ``None`` for unlabelled data. A model may return a tensor or a model-output object
(a tuple, a dict, a transformers ``ModelOutput``): ``Task.output`` reduces it to one tensor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeAlias

import torch
from torch import nn

from search._errors import UsageError

Inputs: TypeAlias = torch.Tensor | tuple[torch.Tensor, ...] | list[torch.Tensor] | Mapping[str, torch.Tensor]
Output: TypeAlias = Callable[[Any], torch.Tensor]

FORMS = "a tensor, a tuple of tensors or a dict of tensors by argument name"


def arguments(inputs: Inputs) -> tuple[tuple, dict[str, Any]]:
    """The positional and keyword arguments ``inputs`` stand for: ``(x,)``, ``x`` itself as a
    tuple, or ``x`` as keywords, by its form."""
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def call(model: nn.Module, inputs: Inputs) -> Any:
    """``model(x)``, ``model(*x)`` or ``model(**x)``, by the form of ``inputs``."""
    args, kwargs = arguments(inputs)
    return model(*args, **kwargs)


def _tensors_or_none(inputs: Any) -> tuple[torch.Tensor, ...] | None:
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, Mapping):
        values = tuple(inputs.values()) if all(isinstance(key, str) for key in inputs) else ()
    else:
        values = tuple(inputs) if isinstance(inputs, (tuple, list)) else ()
    return values if values and all(isinstance(v, torch.Tensor) for v in values) else None


def describe(inputs: Any) -> str:
    """``dict(input_ids=int64[1, 16], ...)``: the form, dtypes and shapes, for error messages."""
    values = _tensors_or_none(inputs)
    if values is None:
        return type(inputs).__name__
    shapes = [f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}" for t in values]
    if isinstance(inputs, torch.Tensor):
        return f"tensor {shapes[0]}"
    if isinstance(inputs, Mapping):
        return "dict(" + ", ".join(f"{key}={shape}" for key, shape in zip(inputs, shapes)) + ")"
    return f"{type(inputs).__name__}({', '.join(shapes)})"


def tensors(inputs: Inputs) -> tuple[torch.Tensor, ...]:
    """The tensors of ``inputs`` in order (a dict's in key order)."""
    values = _tensors_or_none(inputs)
    if values is None:
        raise UsageError(f"model inputs must be {FORMS}; got {describe(inputs)}")
    return values


def check_example_input(inputs: Any) -> None:
    """A UsageError unless ``inputs`` has one of the accepted forms and batch size 1 on every tensor."""
    values = _tensors_or_none(inputs)
    if values is None or any(t.shape[:1] != (1,) for t in values):
        raise UsageError(
            f"Task.example_input must be {FORMS}, each with batch size 1 (the shape latency is "
            f"measured at); got {describe(inputs)}"
        )


def batch_size(inputs: Inputs) -> int:
    """The batch size of ``inputs``: its first tensor's first dimension (1 for a 0-d tensor)."""
    first = tensors(inputs)[0]
    return first.shape[0] if first.dim() > 0 and first.shape[0] > 0 else 1


def split_batch(batch: Any) -> tuple[Inputs, torch.Tensor | None]:
    """``(inputs, labels)`` of one batch of a task's ``train`` or ``val``."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise UsageError(
            f"a task's batches must be (inputs, labels) pairs, labels None for unlabelled data; "
            f"got {type(batch).__name__}{f' of {len(batch)}' if isinstance(batch, (tuple, list)) else ''}"
        )
    return batch[0], batch[1]


def reduce_output(out: Any, output: Output | None = None) -> torch.Tensor:
    """The one tensor a model's output ``out`` stands for: ``output(out)``, or ``out`` itself."""
    try:
        reduced = out if output is None else output(out)
    except Exception as exc:
        raise UsageError(f"Task.output raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(reduced, torch.Tensor):
        raise UsageError(
            f"Task.output returned {type(reduced).__name__}, not a tensor"
            if output is not None
            else f"the model returned {type(out).__name__}, not a tensor: set Task.output to a function "
            "that reduces it to one tensor, such as lambda out: out.last_hidden_state or lambda out: out[0]"
        )
    return reduced


@contextlib.contextmanager
def reduced_output(model: nn.Module, output: Output | None = None) -> Iterator[nn.Module]:
    """Inside the block, ``model``'s forward returns ``reduce_output(its output, output)``.

    A forward hook rather than a wrapper module: an ONNX export of the model then keeps the model's
    own parameter names (a wrapper would prefix them), and plan entries map to the graph through them.
    """
    handle = model.register_forward_hook(lambda module, args, out: reduce_output(out, output))
    try:
        yield model
    finally:
        handle.remove()
