"""``search.export`` (``search/study/_deploy.py``) with a checkpoint that would run code: refused, never unpickled.
The export of a sound study is tested in test_results.py."""

from __future__ import annotations

import pickle
from pathlib import Path

import optuna
import pytest
import torch

import search
from pickles import code_running_checkpoint


def test_export_refuses_a_checkpoint_that_would_run_code_without_running_it(tiny_task, fast_profiler, tmp_path):
    study = search.run(
        tiny_task, trials=1, profiler=fast_profiler, results_dir=tmp_path / "results", cost_model=False,
        finetune=search.Finetune(steps=2, eval_every=1), pruner=optuna.pruners.NopPruner(),
    )  # fmt: skip
    (trial,) = study.best_trials
    marker = tmp_path / "marker"
    checkpoint = Path(trial.user_attrs["artifacts"]) / "checkpoint.pt"
    code_running_checkpoint(checkpoint, marker)

    # Checked the documented way (weights_only=True) before it is copied: refused, nothing run, nothing written.
    with pytest.raises(search.UsageError, match=f"trial 0: {checkpoint} cannot be loaded .*Weights only load failed"):
        search.export(study, tmp_path / "deploy", profiler=fast_profiler)
    assert not marker.exists() and not (tmp_path / "deploy").exists()
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        torch.load(checkpoint, weights_only=True)
    assert not marker.exists()
