import sys
import textwrap
import uuid

import pytest
import torch
from torch import nn

from search._errors import UsageError
from search.tasks import Task, load_task, top1_accuracy

TASK_MODULE = """
import torch
from torch import nn
from search import Task

def make():
    x = torch.randn(8, 4)
    y = torch.arange(8) % 3
    return Task(model=nn.Linear(4, 3), train=[(x, y)], val=[(x, y)],
                example_input=x[:1], name="from-cwd")

def boom():
    raise RuntimeError("teacher checkpoint missing")

def wrong():
    return 42

not_callable = 7
"""


@pytest.fixture
def task_module(tmp_path, monkeypatch):
    """A task module written to tmp_path and made importable only as load_task would: from the cwd."""
    name = f"user_task_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(TASK_MODULE))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # load_task puts the cwd on it: undo afterwards
    yield name
    sys.modules.pop(name, None)


def test_a_task_module_in_the_cwd_loads(task_module):
    task = load_task(f"{task_module}:make")
    assert isinstance(task, Task)
    assert task.name == "from-cwd"
    assert task.example_input.shape == (1, 4)
    assert isinstance(task.model, nn.Linear)


def test_a_missing_module_is_a_usage_error():
    with pytest.raises(UsageError, match="cannot import module 'nosuchmodule_for_tests'"):
        load_task("nosuchmodule_for_tests:fn")


@pytest.mark.parametrize(
    "function, message",
    [
        ("boom", r"boom\(\) raised RuntimeError: teacher checkpoint missing"),
        ("wrong", r"wrong\(\) returned int, not a search.Task"),
        ("missing", "has no function 'missing'"),
        ("not_callable", "has no function 'not_callable'"),
    ],
)
def test_a_bad_task_function_is_a_usage_error(task_module, function, message):
    with pytest.raises(UsageError, match=message) as info:
        load_task(f"{task_module}:{function}")
    assert f"{task_module}:{function}" in str(info.value)


@pytest.mark.parametrize("spec", ["search.tasks", "search.tasks:", ":digits", ""])
def test_a_spec_without_module_and_function_is_a_usage_error(spec):
    with pytest.raises(UsageError, match="expected module:function, such as search.tasks:digits"):
        load_task(spec)


class _Constant(nn.Module):
    """Always predicts class 1."""

    def forward(self, x):
        return torch.tensor([0.0, 1.0, 0.0]).expand(len(x), 3)


def test_default_metric_is_top1_accuracy():
    x = torch.zeros(4, 2)
    val = [(x, torch.tensor([1, 1, 0, 2])), (x[:2], torch.tensor([1, 0]))]
    task = Task(model=_Constant(), train=val, val=val, example_input=x[:1])
    assert task.metric is top1_accuracy
    assert task.score(task.model) == pytest.approx(3 / 6)


def test_a_custom_metric_is_kept():
    x = torch.zeros(2, 2)
    task = Task(_Constant(), [], [(x, torch.tensor([0, 0]))], x[:1], metric=lambda model, val: -1.0)
    assert task.score(task.model) == -1.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"model": "resnet18"}, "Task.model must be a torch.nn.Module, got str"),
        ({"example_input": torch.zeros(2, 4)}, "batch size 1"),
        ({"example_input": [[0.0] * 4]}, "batch size 1"),
    ],
)
def test_a_malformed_task_is_a_usage_error(kwargs, message):
    fields = {"model": nn.Linear(4, 3), "train": [], "val": [], "example_input": torch.zeros(1, 4), **kwargs}
    with pytest.raises(UsageError, match=message):
        Task(**fields)


def _text_task(**kwargs):
    from models import TinyTextWithOutput, text_inputs

    val = [(text_inputs(4, seed=1), None)]
    fields = {
        "model": TinyTextWithOutput().eval(), "train": val, "val": val, "example_input": text_inputs(1),
        "output": lambda out: out.sentence_embedding, "metric": lambda model, val: 0.0, "distill_loss": "cosine",
        **kwargs,
    }  # fmt: skip
    return Task(**fields)


def test_a_task_on_dict_inputs_scores_the_reduced_output():
    from models import text_inputs

    seen = []

    def norms(model, val):
        for inputs, labels in val:
            seen.append(model(**inputs))
        return float(seen[-1].norm(dim=1).mean())

    task = _text_task(metric=norms)
    assert task.distill_loss == "cosine"
    assert task.score(task.model) == pytest.approx(1.0)  # unit-length sentence embeddings
    assert seen[0].shape == (4, 32)
    assert isinstance(task.model(**text_inputs(2)), dict)  # the reduction holds only while scoring


def test_the_default_metric_runs_tuple_inputs():
    from models import TwoInputNet, two_inputs

    model = TwoInputNet().eval()
    inputs = two_inputs(6)
    labels = model(*inputs).argmax(1)
    task = Task(model, [], [(inputs, labels), (list(inputs), (labels + 1) % 5)], two_inputs(1))
    assert task.score(model) == pytest.approx(0.5)


def test_the_default_metric_on_unlabelled_data_asks_for_a_metric():
    from models import TinyTextWithOutput

    with pytest.raises(UsageError, match=r"top-1 accuracy, needs labelled val batches.*Task.metric"):
        _text_task(metric=None).score(TinyTextWithOutput())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"distill_loss": "l2"}, "distillation loss 'l2': expected one of 'kl', 'mse', 'cosine' or a function"),
        ({"output": "sentence_embedding"}, "Task.output must be None or a function"),
        ({"output": None}, "the model returned ModelOutput, not a tensor: set Task.output"),
        ({"output": lambda out: out.pooler_output}, "Task.output raised AttributeError: pooler_output"),
        ({"example_input": {"input_ids": torch.zeros(1, 16, dtype=torch.long)}}, "raised TypeError"),
        ({"example_input": (torch.zeros(1, 16, dtype=torch.long),) * 3}, "raised TypeError"),
    ],
)
def test_a_task_whose_parts_do_not_fit_is_a_usage_error(kwargs, message):
    with pytest.raises(UsageError, match=message):
        _text_task(**kwargs)


def test_an_option_the_task_function_does_not_take_is_a_usage_error(task_module):
    with pytest.raises(UsageError, match=r"does not take --seq-len: its function is make\(\)"):
        load_task(f"{task_module}:make", seq_len=32)


def test_every_trial_calibrates_on_the_same_batches_and_drawing_them_leaves_the_loaders_as_they_were():
    from torch.utils.data import DataLoader, TensorDataset

    from search.compress import CALIBRATION_BATCHES

    data = TensorDataset(torch.arange(40.0).reshape(40, 1), torch.zeros(40, dtype=torch.long))
    generator = torch.Generator()
    train = DataLoader(data, batch_size=2, shuffle=True, generator=generator)
    task = Task(nn.Linear(1, 2), train, train, torch.zeros(1, 1))
    generator.manual_seed(123)
    expected_next = torch.Generator().set_state(generator.get_state())
    first = task.calibration_batches()
    assert len(first) == CALIBRATION_BATCHES
    assert torch.equal(generator.get_state(), expected_next.get_state())
    other = Task(nn.Linear(1, 2), train, train, torch.zeros(1, 1))
    generator.manual_seed(7)  # another trial's seed: the same batches all the same
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, other.calibration_batches()))
    assert task.calibration_batches() is first  # drawn once


def test_a_metric_may_return_a_one_element_tensor_but_not_text():
    from search.tasks._task import metric_value

    assert metric_value(torch.tensor([0.25])) == 0.25 and isinstance(metric_value(torch.tensor(1)), float)
    with pytest.raises(UsageError, match=r"metric accuracy\(\) returned 'high' \(str\); expected a number"):
        metric_value("high", "accuracy")
