import pytest
import torch
from torch import nn

from models import SmallCNN
from search._errors import CandidateError, UsageError
from search.compress import Distillation, Finetune, apply_plan, distill, distillation_loss
from search.plan import Plan


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
        ({"seed": -1}, "seed must be a whole number >= 0, got -1"),
        ({"seed": 1.5}, "seed must be a whole number >= 0, got 1.5"),
        ({"backtrack": 0.0}, r"backtrack must be in \(0, 1\] or None, got 0.0"),
        ({"backtrack": 2}, r"backtrack must be in \(0, 1\] or None, got 2"),
    ],
)
def test_bad_finetune_settings_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Finetune(**kwargs)


def _text_batches(n=4, batch=16):
    from models import text_inputs

    return [(text_inputs(batch, seed=10 + i), None) for i in range(n)]  # unlabelled


@pytest.mark.parametrize("loss", ["mse", "cosine"])
def test_embedding_losses_go_down_on_unlabelled_dict_batches(loss):
    from models import TinyText, text_inputs

    teacher = TinyText().eval()
    student = apply_plan(teacher, Plan(width=0.5), text_inputs(1))
    losses = distill(student, teacher, _text_batches(), Finetune(steps=30, lr=3e-3), loss=loss)
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses


def test_a_model_output_object_is_reduced_before_the_loss():
    from models import TinyTextWithOutput

    calls = []

    def loss(student_out, teacher_out, labels):
        calls.append((student_out.shape, teacher_out.shape, labels, teacher_out.requires_grad))
        return nn.functional.mse_loss(student_out, teacher_out)

    losses = distill(
        TinyTextWithOutput(), TinyTextWithOutput().eval(), _text_batches(2), Finetune(steps=3), loss=loss,
        output=lambda out: out.sentence_embedding,
    )  # fmt: skip
    assert calls == [((16, 32), (16, 32), None, False)] * 3  # the teacher's output carries no gradient
    assert len(losses) == 3


def test_kl_without_labels_is_the_soft_term_alone():
    student, teacher = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.0, 1.0, 0.0]])
    labelled = distillation_loss(student, teacher, torch.tensor([0]), Finetune(alpha=0.5))
    soft = distillation_loss(student, teacher, torch.tensor([0]), Finetune(alpha=1.0))
    assert distillation_loss(student, teacher, None, Finetune(alpha=0.5)) == pytest.approx(float(soft))
    assert float(labelled) != pytest.approx(float(soft))


def test_the_named_losses_compute_what_they_say():
    a, b = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    assert distillation_loss(a, b, None, Finetune(), "mse") == pytest.approx(float(((a - b) ** 2).mean()))
    assert distillation_loss(a, b, None, Finetune(), "cosine") == pytest.approx(0.5)  # cos 0 and cos 1
    assert distillation_loss(a, 3 * a, None, Finetune(), "cosine") == pytest.approx(0.0, abs=1e-6)


def test_an_unknown_loss_is_refused_with_the_accepted_forms():
    with pytest.raises(UsageError, match="distillation loss 'l1': expected one of 'kl', 'mse', 'cosine' or a function"):
        distill(SmallCNN(), SmallCNN(), [], Finetune(steps=1), loss="l1")


def _rates(config: Finetune) -> list[float]:
    """The learning rate of each of ``config.steps`` steps under the fine-tune's schedule."""
    from search.compress._distill import _scheduler

    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=config.lr)
    scheduler = _scheduler(optimizer, config)
    rates = []
    for _ in range(config.steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_the_cosine_schedule_warms_up_then_decays_to_zero():
    config = Finetune(steps=50, lr=0.1, schedule="cosine")
    rates = _rates(config)
    assert rates[0] == pytest.approx(0.1 / 5)  # 10 % of the steps warm up
    assert rates[:5] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1]) and max(rates) == pytest.approx(0.1)
    assert rates[-1] < 0.002 and all(a >= b for a, b in zip(rates[4:], rates[5:]))


def test_stable_decay_keeps_the_full_rate_until_the_last_rung_then_decays_to_zero():
    """Rungs end at steps 10, 30 and 90: a screened or once-promoted plan trains at the full rate
    (as with a constant one), and the last rung's stretch decays it to nearly 0 by step 90."""
    config = Finetune(steps=90, lr=0.1, schedule="stable-decay", rungs=3, reduction=3)
    assert config.rung_ends() == (10, 30, 90)
    rates = _rates(config)
    assert rates[:31] == pytest.approx([0.1] * 31)
    assert rates[31] < 0.1 and rates[-1] < 0.001 and all(a > b for a, b in zip(rates[30:], rates[31:]))


def test_an_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="schedule must be one of constant, cosine, stable-decay, got 'linear'"):
        Finetune(schedule="linear")


def test_a_fine_tune_that_makes_the_plan_worse_keeps_its_step_0_state(tiny_task):
    """A learning rate far too high wrecks the student; the best state scored (before step 1) is
    what the fine-tune leaves, and it says that step 0 was best."""
    student = apply_plan(tiny_task.model, Plan(), tiny_task.example_input)
    before = {key: value.clone() for key, value in student.state_dict().items()}
    run = Distillation(student, tiny_task.model, tiny_task.train, Finetune(steps=6, eval_every=3, lr=50.0))
    start = run.score(lambda: tiny_task.score(student))
    scores = []
    run.run(6, evaluate=lambda: tiny_task.score(student), on_eval=lambda step, value: scores.append((step, value)))
    assert [step for step, _ in scores] == [3, 6] and all(value < start for _, value in scores)
    run.restore_best()
    assert run.best_step == 0 and run.best_metric == start and run.step == 6
    assert all(torch.equal(before[key], value) for key, value in student.state_dict().items())
    assert tiny_task.score(student) == start


def test_a_score_below_the_best_sends_the_student_back_to_it_at_a_smaller_rate(tiny_task, tmp_path):
    """Wrecked by a rate far too high, the student goes back to its step-0 weights with a tenth of
    the rate and a fresh Adam; a fine-tune saved and loaded there goes on at that rate. With
    ``backtrack=None`` it goes on from where it is, at the rate it had."""
    student = apply_plan(tiny_task.model, Plan(), tiny_task.example_input)
    before = {key: value.clone() for key, value in student.state_dict().items()}
    run = Distillation(student, tiny_task.model, tiny_task.train, Finetune(steps=9, eval_every=3, lr=50.0))
    start = run.score(lambda: tiny_task.score(student))
    scores = []
    run.run(3, evaluate=lambda: tiny_task.score(student), on_eval=lambda step, value: scores.append(value))
    assert scores[0] < start and run.best_step == 0
    assert all(torch.equal(before[key], value) for key, value in student.state_dict().items())
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(5.0) and not run.optimizer.state
    torch.save(run.state_dict(), tmp_path / "state.pt")
    again = Distillation(
        apply_plan(tiny_task.model, Plan(), tiny_task.example_input), tiny_task.model, tiny_task.train, run.config
    )
    again.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    again.run(4)  # no scores: nothing to go back to
    assert again.optimizer.param_groups[0]["lr"] == pytest.approx(5.0) and again.scheduler.base_lrs == [5.0]

    kept = apply_plan(tiny_task.model, Plan(), tiny_task.example_input)
    reckless = Finetune(steps=9, eval_every=3, lr=50.0, backtrack=None)
    going_on = Distillation(kept, tiny_task.model, tiny_task.train, reckless)
    going_on.score(lambda: tiny_task.score(kept))
    going_on.run(3, evaluate=lambda: tiny_task.score(kept))
    assert going_on.best_step == 0 and going_on.optimizer.param_groups[0]["lr"] == 50.0
    assert not all(torch.equal(before[key], value) for key, value in kept.state_dict().items())


def test_a_fine_tune_takes_no_step_after_its_deadline_and_scores_where_it_stopped(tiny_task, monkeypatch):
    """A clock that ticks once a step: the deadline falls after step 4, between the scores at 3
    and 6. The fine-tune stops there, scored at step 4; a deadline already past takes no step and
    scores nothing; without one it goes on to the end."""
    from search.compress import _distill

    ticks = iter(range(10**6))
    monkeypatch.setattr(_distill, "time", type("Clock", (), {"monotonic": staticmethod(lambda: next(ticks))}))
    student = apply_plan(tiny_task.model, Plan(width=0.5), tiny_task.example_input)
    run = Distillation(student, tiny_task.model, tiny_task.train, Finetune(steps=9, eval_every=3))
    scored = []
    score, on_eval = (lambda: tiny_task.score(student)), (lambda step, value: scored.append(step))
    run.run(9, evaluate=score, on_eval=on_eval, deadline=4)  # the clock reads 0, 1, 2, 3 before steps 1-4
    assert run.step == 4 and scored == [3, 4] and not student.training
    run.run(9, evaluate=score, on_eval=on_eval, deadline=0)
    assert run.step == 4 and scored == [3, 4]
    run.run(9, evaluate=score, on_eval=on_eval)
    assert run.step == 9 and scored == [3, 4, 6, 9]


def _dropout_student(tiny_task) -> nn.Module:
    """A pruned copy of the teacher with dropout: its fine-tune draws from torch's RNG as well."""
    return nn.Sequential(apply_plan(tiny_task.model, Plan(width=0.5), tiny_task.example_input), nn.Dropout(0.2))


def _fine_tune(tiny_task, config: Finetune, until: int, state: dict | None = None) -> tuple[nn.Module, Distillation]:
    """A fine-tune to step ``until``, scored every ``eval_every`` steps; from ``state`` if given."""
    student = _dropout_student(tiny_task)
    run = Distillation(student, tiny_task.model, tiny_task.train, config)
    if state is not None:
        run.load_state_dict(state)
    run.run(until, evaluate=lambda: tiny_task.score(student))
    return student, run


@pytest.mark.parametrize("schedule", ["cosine", "stable-decay"])
@pytest.mark.parametrize("stop", [4, 23, 30])  # in the first pass over the 23 batches, at its end, in the second
def test_a_fine_tune_goes_on_from_its_saved_state_as_if_it_had_not_stopped(tiny_task, tmp_path, schedule, stop):
    """Stopped, saved to a file, and continued in a new run after other fine-tunes drew from the
    same loader and from torch's RNG (a promotion): the same losses and weights as one run; the
    step count and the schedule go on, and so do the batches and the dropout's draws."""
    config = Finetune(steps=40, eval_every=5, lr=1e-3, schedule=schedule)
    whole_student, whole = _fine_tune(tiny_task, config, 40)
    _, first = _fine_tune(tiny_task, config, stop)
    torch.save(first.state_dict(), tmp_path / "state.pt")
    distill(_dropout_student(tiny_task), tiny_task.model, tiny_task.train, Finetune(steps=7, seed=5))
    torch.manual_seed(123)
    second_student, second = _fine_tune(tiny_task, config, 40, torch.load(tmp_path / "state.pt", weights_only=True))
    assert second.step == 40 and second.scheduler.last_epoch == whole.scheduler.last_epoch == 40
    assert second.first_last_losses() == pytest.approx(whole.first_last_losses(), rel=1e-6)
    assert (second.best_step, second.best_metric) == (whole.best_step, whole.best_metric)
    for key, value in whole_student.state_dict().items():
        assert torch.allclose(second_student.state_dict()[key], value, atol=1e-6), key


def test_a_fine_tune_draws_from_its_seed_alone_and_scoring_it_draws_nothing(tiny_task):
    """Whatever ran before it, and whether or not it is scored along the way, a fine-tune with the
    same seed trains on the same batches with the same dropout; another seed on others."""

    def losses(seed: int, scored: bool, before: int) -> list[float]:
        torch.manual_seed(before)
        tiny_task.train.generator.manual_seed(before)
        student = _dropout_student(tiny_task)
        run = Distillation(student, tiny_task.model, tiny_task.train, Finetune(steps=30, eval_every=3, seed=seed))
        run.run(30, evaluate=(lambda: tiny_task.score(student)) if scored else None)
        return run.losses

    reference = losses(seed=0, scored=False, before=1)
    assert losses(seed=0, scored=True, before=2) == reference
    assert losses(seed=1, scored=False, before=1) != reference


def test_a_fine_tune_on_data_with_no_batch_says_so(tiny_task):
    with pytest.raises(UsageError, match="the task's training data yielded no batch"):
        distill(SmallCNN(), tiny_task.model, [], Finetune(steps=1))


@pytest.mark.parametrize(
    "steps, rungs, reduction, ends",
    [(900, 3, 3, (100, 300, 900)), (6, 3, 3, (1, 2, 6)), (10, 1, 3, (10,)), (2, 3, 3, (1, 2)), (0, 3, 3, (0,))],
)
def test_rung_ends_divide_the_longest_fine_tune(steps, rungs, reduction, ends):
    assert Finetune(steps=steps, rungs=rungs, reduction=reduction).rung_ends() == ends


def test_an_unresolved_fine_tune_has_no_rungs_yet():
    with pytest.raises(ValueError, match="not resolved yet"):
        Finetune(epochs=3).rung_ends()
    with pytest.raises(ValueError, match="fine-tune epochs must be > 0"):
        Finetune(epochs=0)
