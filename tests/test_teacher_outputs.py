"""The teacher's outputs remembered across fine-tunes: the teacher runs once per batch, and a
fine-tune that reads them ends exactly where one that runs the teacher does."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import search
from search.compress import Distillation, Finetune, TeacherOutputs, apply_plan
from search.plan import Plan


class Counted(nn.Module):
    """``model``, counting the batches it runs on."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x):
        self.calls += 1
        return self.model(x)


def _fine_tune(task, teacher, outputs=None, steps=30):
    student = apply_plan(task.model, Plan(width=0.5), task.example_input)
    run = Distillation(student, teacher, task.train, Finetune(steps=steps, lr=1e-3), teacher_outputs=outputs)
    run.run(steps)
    return student, run


def test_a_second_fine_tune_runs_no_teacher_and_ends_as_one_that_does(tiny_task):
    """The second fine-tune draws the first one's 30 batches (its seed's): the teacher runs on none
    of them, and it ends as a fine-tune that runs the teacher on each."""
    teacher = Counted(tiny_task.model)
    outputs = TeacherOutputs(teacher)
    _fine_tune(tiny_task, teacher, outputs)
    assert teacher.calls == 30 and outputs.hits == 0
    student, run = _fine_tune(tiny_task, teacher, outputs)
    assert teacher.calls == 30 and outputs.hits == 30
    plain_student, plain = _fine_tune(tiny_task, teacher)
    assert teacher.calls == 60
    assert run.losses == plain.losses
    for key, value in plain_student.state_dict().items():
        assert torch.equal(student.state_dict()[key], value), key


def test_outputs_past_the_memory_bound_are_computed_each_time(tiny_task):
    teacher = Counted(tiny_task.model)
    one_batch = 64 * 10 * 4  # 64 samples' 10 float32 logits
    outputs = TeacherOutputs(teacher, max_bytes=2 * one_batch)
    for _ in range(2):
        _fine_tune(tiny_task, teacher, outputs, steps=10)
    assert outputs.bytes == 2 * one_batch and outputs.hits == 2 and teacher.calls == 18


def test_a_loss_that_changes_the_teacher_s_output_in_place_does_not_change_what_is_remembered():
    teacher = nn.Linear(4, 2)
    outputs = TeacherOutputs(teacher)
    x = torch.randn(3, 4)
    outputs(x).mul_(0)
    outputs(x).mul_(0)
    assert outputs.hits == 1 and torch.equal(outputs(x), teacher(x).detach())


def test_inputs_that_differ_in_names_shape_or_type_are_not_confused():
    teacher = nn.Identity()
    outputs = TeacherOutputs(teacher, output=lambda out: torch.as_tensor(out, dtype=torch.float32).reshape(-1))
    values = torch.arange(6, dtype=torch.int32)
    for x in (values, values.reshape(2, 3), values.to(torch.float32), values.view(torch.float32)):
        outputs(x)
    assert outputs.hits == 0 and len(outputs._stored) == 4


def test_a_fine_tune_refuses_another_teacher_s_outputs(tiny_task):
    student = apply_plan(tiny_task.model, Plan(width=0.5), tiny_task.example_input)
    with pytest.raises(ValueError, match="outputs of this teacher"):
        Distillation(student, tiny_task.model, tiny_task.train, Finetune(steps=1),
                     teacher_outputs=TeacherOutputs(nn.Identity()))  # fmt: skip


def test_a_study_s_fine_tunes_share_the_task_s_teacher_outputs(tiny_task, fast_profiler, tmp_path):
    """The task keeps one TeacherOutputs for the process: the second trial's fine-tune reads it."""
    task = dataclasses.replace(tiny_task)  # its own remembered outputs, not the session's task's
    search.run(task, trials=2, profiler=fast_profiler, results_dir=tmp_path, finetune=Finetune(steps=5),
               recipes=False, sensitivity=False, cost_model=False, sampler="random")  # fmt: skip
    outputs = task.teacher_outputs()
    assert outputs.teacher is task.model and outputs.hits > 0
