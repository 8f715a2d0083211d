"""The fine-tune's scores along the way: each way timed once, the file first, then the faster."""

from __future__ import annotations

import pytest

from search.study._scoring import FILE, TORCH, FasterScoring


@pytest.fixture
def clock(monkeypatch):
    """A clock that moves only when a scoring function says how long it took."""
    from search.study import _scoring

    now = [0.0]
    monkeypatch.setattr(_scoring.time, "perf_counter", lambda: now[0])
    return now


def _ways(clock, seconds: dict, calls: list):
    def way(name):
        def score():
            calls.append(name)
            clock[0] += seconds[name]
            return {FILE: 0.5, TORCH: 0.4}[name]

        return score

    return {FILE: way(FILE), TORCH: way(TORCH)}


@pytest.mark.parametrize("faster", [FILE, TORCH])
def test_each_way_is_tried_once_the_file_first_then_the_faster_one(clock, faster):
    seconds = {FILE: 1.0, TORCH: 6.0} if faster == FILE else {FILE: 2.7, TORCH: 1.5}
    calls: list[str] = []
    scoring = FasterScoring(_ways(clock, seconds, calls))
    values = [scoring() for _ in range(4)]
    assert calls == [FILE, TORCH, faster, faster] and scoring.last == faster
    assert values[:2] == [0.5, 0.4] and scoring.seconds == seconds


def test_timings_known_from_before_are_not_measured_again(clock):
    calls: list[str] = []
    scoring = FasterScoring(_ways(clock, {FILE: 2.7, TORCH: 1.5}, calls), {FILE: 2.7, TORCH: 1.5, "other": 0.1})
    scoring()
    assert calls == [TORCH] and scoring.seconds == {FILE: 2.7, TORCH: 1.5}  # a way it does not have is dropped


def test_a_way_that_became_slower_gives_way_to_the_other(clock):
    seconds = {FILE: 1.0, TORCH: 2.0}
    calls: list[str] = []
    scoring = FasterScoring(_ways(clock, seconds, calls))
    scoring(), scoring()
    seconds[FILE] = 3.0  # the file's scoring slowed down (a busier machine, a larger graph)
    scoring(), scoring(), scoring()
    assert calls == [FILE, TORCH, FILE, TORCH, TORCH]
