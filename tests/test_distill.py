import pytest
import torch
from torch import nn

from models import SmallCNN
from search._distill import Finetune, distill, distillation_loss
from search._errors import CandidateError
from search._plan import Plan
from search._transforms import apply_plan


def test_distillation_loss_goes_down_on_the_digits(tiny_task):
    """``tiny_task``: a SmallCNN trained briefly on ``search.tasks._digits_data``."""
    teacher = tiny_task.model
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = apply_plan(teacher, Plan(width=0.5), tiny_task.example_input)  # a pruned copy: starts off worse
    config = Finetune(steps=60, lr=3e-3)
    losses = distill(student, teacher, tiny_task.train, config)
    assert len(losses) == 60
    assert all(loss == loss for loss in losses)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.6 * first, (first, last)
    assert not student.training  # handed back in eval mode
    for key, value in teacher.state_dict().items():  # the teacher only teaches
        assert torch.equal(value, teacher_state[key]), key


def test_on_eval_runs_every_eval_every_steps_but_not_after_the_last(tiny_task):
    student = SmallCNN()
    calls = []

    def on_eval(step):
        calls.append((step, student.training))
        student.eval()  # a scorer may leave eval mode on: distill goes back to training

    distill(student, tiny_task.model, tiny_task.train, Finetune(steps=9, eval_every=3), on_eval)
    assert calls == [(3, True), (6, True)]


def test_zero_steps_trains_nothing(tiny_task):
    student = SmallCNN()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    assert distill(student, tiny_task.model, tiny_task.train, Finetune(steps=0)) == []
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())


class _NaNModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(x.flatten(1)) * float("nan")


def test_a_nan_loss_is_a_candidate_error(tiny_task):
    with pytest.raises(CandidateError, match="fine-tuning diverged: loss is nan at step 1"):
        distill(_NaNModel(), tiny_task.model, tiny_task.train, Finetune(steps=5))


def test_distillation_loss_mixes_soft_and_hard_targets():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    labels = torch.tensor([0, 1])
    soft_only = Finetune(alpha=1.0)
    assert distillation_loss(logits, logits, labels, soft_only) == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(logits, logits.flip(1), labels, soft_only) > 0
    hard_only = Finetune(alpha=0.0)
    ce = nn.functional.cross_entropy(logits, labels)
    assert distillation_loss(logits, logits.flip(1), labels, hard_only) == pytest.approx(float(ce))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": -1}, "steps"),
        ({"alpha": 1.5}, "alpha"),
        ({"temperature": 0.0}, "temperature"),
        ({"lr": -1e-3}, "lr"),
        ({"eval_every": 0}, "eval_every"),
    ],
)
def test_bad_finetune_settings_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Finetune(**kwargs)
