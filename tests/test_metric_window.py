"""A task's metric window: the span below the teacher's metric, in the metric's own units, that a
study judges its front over (promotions, the bit widths sensitivity rules out)."""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from pathlib import Path

import optuna
import pytest

import search
from search import Finetune, UsageError, run
from search.study import _run
from search.tasks import METRIC_WINDOW, top1_accuracy

SHORT = dict(finetune=Finetune(steps=6, eval_every=3), recipes=False)


def percent(model, val) -> float:
    return 100 * top1_accuracy(model, val)


def test_a_tasks_metric_window_is_a_positive_number_in_its_metrics_units(tiny_task):
    assert tiny_task.window == METRIC_WINDOW == 0.1
    assert dataclasses.replace(tiny_task, metric_window=10).window == 10.0
    for bad in (0, -1.0, math.inf, math.nan, "10", True):
        with pytest.raises(UsageError, match=r"Task.metric_window .*: expected None or a positive number"):
            dataclasses.replace(tiny_task, metric_window=bad)


def test_a_study_judges_its_front_in_its_tasks_metric_units(tiny_task, fast_profiler, tmp_path, monkeypatch):
    """A metric in percent with no window is warned of, and rules out the bit widths that drop it by
    a tenth of a point; with ``metric_window=10`` the study records it, promotes and rules out by
    it, and a resumed run must keep it."""
    seen = []

    def spy(function, *args):
        seen.append((function.__name__, args[-1]))
        return function(*args)

    for name in ("promote", "without_promise", "exclusions"):
        monkeypatch.setattr(_run, name, functools.partial(spy, getattr(_run, name)))
    unset = dataclasses.replace(tiny_task, metric=percent)
    with pytest.warns(UserWarning, match=r"outside \[-1, 1\], and the task sets no metric_window.*metric_window=10"):
        loose = run(unset, trials=1, profiler=fast_profiler, results_dir=tmp_path, study_name="unset", **SHORT)
    assert loose.user_attrs["metric_window"] == METRIC_WINDOW

    seen.clear()
    task = dataclasses.replace(tiny_task, metric=percent, metric_window=10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        study = run(task, trials=2, profiler=fast_profiler, results_dir=tmp_path, study_name="percent", **SHORT)
    assert not [w for w in caught if "metric_window" in str(w.message)]
    assert study.user_attrs["metric_window"] == 10
    assert {name for name, _ in seen} == {"promote", "without_promise", "exclusions"}
    assert all(window == 10 for _, window in seen)

    rows = study.user_attrs["sensitivity"]
    strict, judged = search.load_sensitivity(loose), search.load_sensitivity(study)
    between = [r for r in rows if r["kind"] != "block" and r["pruning"] == 0 and 0.1 < r["drop"] <= 10]
    assert between  # a bit width that costs a few tenths of a point to some layer: out at 0.1, offered at 10
    assert strict["excluded"].sum() > judged["excluded"].sum()
    bits = judged[(judged["pruning"] == 0) & (judged["kind"] != "block") & judged["error"].isna()]
    assert not bits[bits["drop"] <= 10]["excluded"].any() and bits[bits["drop"] > 10]["excluded"].all()

    with pytest.raises(UsageError, match=r"made with metric_window 10.0, not 5.0; the task's metric_window"):
        run(dataclasses.replace(task, metric_window=5), trials=3, profiler=fast_profiler, results_dir=tmp_path,
            study_name="percent", **SHORT)  # fmt: skip


def test_the_commands_show_this_packages_warnings_as_one_line(capsys):
    from search import cli

    shown = []
    here = Path(_run.__file__)
    cli._show_warning(lambda *args: shown.append(args), UserWarning("scale"), UserWarning, str(here), 1)
    assert "warning: scale" in capsys.readouterr().err and not shown
    cli._show_warning(lambda *args: shown.append(args), UserWarning("theirs"), UserWarning, optuna.__file__, 1)
    assert len(shown) == 1 and "theirs" not in capsys.readouterr().err
