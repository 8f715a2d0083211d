"""``search.export`` (``search/study/_deploy.py``) with a checkpoint that would run code: copied, never unpickled.
The export of a sound study is tested in test_results.py."""

from __future__ import annotations

import pickle
from pathlib import Path

import optuna
import pytest
import torch

import search
from pickles import code_running_checkpoint


def test_export_copies_a_checkpoint_without_unpickling_it(tiny_task, fast_profiler, tmp_path):
    study = search.run(
        tiny_task, trials=1, profiler=fast_profiler, results_dir=tmp_path / "results", cost_model=False,
        finetune=search.Finetune(steps=2, eval_every=1), pruner=optuna.pruners.NopPruner(),
    )  # fmt: skip
    (trial,) = study.best_trials
    marker = tmp_path / "marker"
    code_running_checkpoint(Path(trial.user_attrs["artifacts"]) / "checkpoint.pt", marker)

    rows = search.export(study, tmp_path / "deploy", profiler=fast_profiler)

    copied = Path(rows["path"].iloc[0]).parent / "checkpoint.pt"
    assert copied.exists() and not marker.exists()
    # Loaded the documented way (weights_only=True), the copy is refused and still runs nothing.
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        torch.load(copied, weights_only=True)
    assert not marker.exists()
