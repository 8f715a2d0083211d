import pytest

from search.plan import Budget, parse_budget
from search._errors import UsageError


@pytest.mark.parametrize(
    "text, ms",
    [
        ("5ms", 5.0),
        ("500us", 0.5),
        ("500µs", 0.5),
        ("0.005s", 5.0),
        ("2s", 2000.0),
        (" 1.5MS ", 1.5),
        ("5e-3s", 5.0),
        (".5ms", 0.5),
    ],
)
def test_absolute_budgets_are_milliseconds(text, ms):
    budget = parse_budget(text)
    assert budget.ratio is None
    assert budget.ms == pytest.approx(ms)
    assert budget.resolve(baseline_ms=123.0) == pytest.approx(ms)  # the baseline does not matter
    assert str(budget) == text.strip()


@pytest.mark.parametrize("text, ratio", [("0.5x", 0.5), ("1x", 1.0), ("0.25X", 0.25)])
def test_ratio_budgets_resolve_against_the_baseline(text, ratio):
    budget = parse_budget(text)
    assert budget.ms is None
    assert budget.ratio == pytest.approx(ratio)
    assert budget.resolve(baseline_ms=8.0) == pytest.approx(8.0 * ratio)
    assert budget.resolve(baseline_ms=2.0) == pytest.approx(2.0 * ratio)


def test_budget_built_directly_resolves():
    assert Budget(ms=3.0).resolve(10.0) == 3.0
    assert Budget(ratio=0.5).resolve(10.0) == 5.0


@pytest.mark.parametrize("text", ["5parsecs", "5 parsecs", "-1ms", "0x", "0ms", "", "ms", "5", "x0.5", "1e3"])
def test_rejected_budgets_list_the_accepted_forms(text):
    with pytest.raises(UsageError) as info:
        parse_budget(text)
    message = str(info.value)
    assert repr(text) in message
    for form in ("5ms", "500us", "0.005s", "0.5x"):
        assert form in message


@pytest.mark.parametrize("text, accepted", [
    ("3600s", True), ("3601s", False), ("1us", True), ("0.9us", False), ("1000x", True), ("1001x", False),
    ("0.001x", True), ("1e999ms", False), ("1e-400ms", False), ("9e308ms", False),
])  # fmt: skip
def test_a_budget_lies_between_a_microsecond_and_an_hour_or_0_001x_and_1000x(text, accepted):
    if accepted:
        assert parse_budget(text).text == text
    else:
        with pytest.raises(UsageError, match=f"budget '{text}': out of range; expected a time from 1us to 3600s"):
            parse_budget(text)
