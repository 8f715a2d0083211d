"""How long a plan is fine-tuned: the longest fine-tune in the task's terms."""

from __future__ import annotations

import pytest

import search
from search.compress import Finetune
from search.study import resolve_finetune
from search.study import _fidelity


def test_steps_as_set_are_kept(tiny_task):
    finetune, note = resolve_finetune(Finetune(steps=17), tiny_task, timeout=None)
    assert finetune.steps == 17 and note == "17 steps, as set"


def test_epochs_are_passes_over_the_task_s_training_data(tiny_task):
    batches = len(tiny_task.train)
    finetune, note = resolve_finetune(Finetune(epochs=2.5), tiny_task, timeout=None)
    assert finetune.steps == round(2.5 * batches) and f"{len(tiny_task.train.dataset)} samples" in note


def test_the_default_comes_from_the_data_s_size_and_fits_the_run_s_time(tiny_task, monkeypatch):
    samples, batches = len(tiny_task.train.dataset), len(tiny_task.train)
    monkeypatch.setattr(_fidelity, "_step_seconds", lambda task, finetune: 1e-6)  # fast: the data decide
    finetune, _ = resolve_finetune(Finetune(), tiny_task, timeout=None)
    epochs = min(max(_fidelity.DEFAULT_SAMPLES / samples, _fidelity.EPOCHS[0]), _fidelity.EPOCHS[1])
    assert finetune.steps == pytest.approx(epochs * batches, abs=1)
    monkeypatch.setattr(_fidelity, "_step_seconds", lambda task, finetune: 0.5)  # slow: the time decides
    finetune, note = resolve_finetune(Finetune(), tiny_task, timeout=100)
    assert finetune.steps == 20 and "10% of the timeout" in note  # 10 s at 0.5 s a step
    finetune, _ = resolve_finetune(Finetune(), tiny_task, timeout=None)
    assert finetune.steps == int(_fidelity.DEFAULT_FINETUNE_S / 0.5)


def test_a_resumed_study_keeps_the_fine_tune_it_chose(tiny_task, fast_profiler, tmp_path, monkeypatch):
    kwargs = dict(profiler=fast_profiler, results_dir=tmp_path, study_name="kept", cost_model=False, recipes=False,
                  sensitivity=False, pruner="none")  # fmt: skip
    monkeypatch.setattr(_fidelity, "_step_seconds", lambda task, finetune: _fidelity.DEFAULT_FINETUNE_S / 3)
    first = search.run(tiny_task, trials=1, **kwargs)
    assert first.trials[0].user_attrs["finetune_steps"] == 3
    monkeypatch.setattr(_fidelity, "_step_seconds", lambda task, finetune: _fidelity.DEFAULT_FINETUNE_S / 5)
    again = search.run(tiny_task, trials=2, **kwargs)
    assert again.trials[1].user_attrs["finetune_steps"] == 3  # not 5: the study's trials stay comparable
    assert search.study.spec_of(again).finetune["steps"] == 3
