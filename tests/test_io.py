import pytest
import torch
from models import ModelOutput, TinyText, TinyTextWithOutput, TwoInputNet, text_inputs, two_inputs
from torch import nn

from search._errors import UsageError
from search.model import (
    batch_size,
    call,
    check_example_input,
    reduce_output,
    reduced_output,
    split_batch,
    tensors,
)


class _Arguments(nn.Module):
    """Returns how it was called."""

    def forward(self, *args, **kwargs):
        return args, kwargs


def test_call_passes_a_tensor_a_tuple_and_a_dict_as_the_model_takes_them():
    x, y = torch.zeros(1, 2), torch.ones(1, 3)
    assert call(_Arguments(), x) == ((x,), {})
    assert call(_Arguments(), (x, y)) == ((x, y), {})
    assert call(_Arguments(), [x, y]) == ((x, y), {})  # a DataLoader collates tuples into lists
    assert call(_Arguments(), {"input_ids": x, "attention_mask": y}) == ((), {"input_ids": x, "attention_mask": y})
    model = TinyText()
    torch.testing.assert_close(call(model, text_inputs(2)), model(**text_inputs(2)))
    assert call(TwoInputNet(), two_inputs(3)).shape == (3, 5)


def test_tensors_and_batch_size_of_every_form():
    inputs = text_inputs(4)
    assert tensors(inputs) == (inputs["input_ids"], inputs["attention_mask"])
    assert [batch_size(x) for x in (torch.zeros(3, 2), two_inputs(5), inputs, torch.tensor(1.0))] == [3, 5, 4, 1]
    with pytest.raises(UsageError, match="a tensor, a tuple of tensors or a dict of tensors by argument name; got str"):
        tensors("input_ids")


@pytest.mark.parametrize(
    "inputs",
    [torch.zeros(1, 4), two_inputs(1), text_inputs(1), {"x": torch.zeros(1, dtype=torch.long)}],
    ids=["tensor", "tuple", "dict", "int-vector"],
)
def test_an_example_input_with_batch_size_1_everywhere_is_accepted(inputs):
    check_example_input(inputs)


@pytest.mark.parametrize(
    "inputs, shown",
    [
        (torch.zeros(2, 4), r"tensor float32\[2, 4\]"),
        ((torch.zeros(1, 8), torch.zeros(2, 4)), r"tuple\(float32\[1, 8\], float32\[2, 4\]\)"),
        (
            {"input_ids": torch.zeros(1, 16, dtype=torch.long), "attention_mask": torch.zeros(3, 16)},
            r"dict\(input_ids=int64\[1, 16\], attention_mask=float32\[3, 16\]\)",
        ),
        (torch.tensor(1.0), r"tensor float32\[\]"),
        ((), "tuple"),
        ({1: torch.zeros(1, 2)}, "dict"),  # names must be strings: they name the ONNX inputs
        ((torch.zeros(1, 2), "mask"), "tuple"),
        ([[0.0] * 4], "list"),
    ],
)
def test_a_bad_example_input_names_what_it_got(inputs, shown):
    with pytest.raises(UsageError, match=f"batch size 1 .*; got {shown}"):
        check_example_input(inputs)


def test_split_batch_takes_pairs_with_or_without_labels():
    x, y = torch.zeros(2, 3), torch.tensor([0, 1])
    assert split_batch((x, y)) == (x, y)
    assert split_batch([x, None]) == (x, None)
    for batch, got in ((x, "Tensor"), ((x, y, y), "tuple of 3")):
        with pytest.raises(UsageError, match=f"batches must be \\(inputs, labels\\) pairs.*; got {got}$"):
            split_batch(batch)


def test_reduce_output_picks_the_tensor_and_names_task_output_when_it_cannot():
    out = TinyTextWithOutput()(**text_inputs(2))
    assert isinstance(out, ModelOutput)
    assert reduce_output(out, lambda o: o.sentence_embedding) is out["sentence_embedding"]
    tensor = torch.zeros(2)
    assert reduce_output(tensor) is tensor
    with pytest.raises(UsageError, match="the model returned ModelOutput, not a tensor: set Task.output"):
        reduce_output(out)
    with pytest.raises(UsageError, match="Task.output returned tuple, not a tensor"):
        reduce_output(out, lambda o: tuple(o.values()))


def test_reduced_output_holds_only_inside_the_block():
    model, x = TinyTextWithOutput().eval(), text_inputs(2)
    with reduced_output(model, lambda o: o.sentence_embedding) as reduced:
        assert reduced is model
        torch.testing.assert_close(call(model, x), TinyText.forward(model, **x))
    assert isinstance(call(model, x), ModelOutput)
    assert not model._forward_hooks
