"""``--budget``: an absolute latency (5ms, 500us, 0.005s) or a ratio to the uncompressed model (0.5x)."""

from __future__ import annotations

import dataclasses
import math
import re

from search._errors import UsageError

_FORMS = "a time such as 5ms, 500us, 0.005s, or a ratio to the uncompressed model such as 0.5x"
_PATTERN = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)(?:e([+-]?\d+))?\s*(ms|us|µs|s|x)\s*", re.IGNORECASE)
_TO_MS = {"s": 1000.0, "ms": 1.0, "us": 1e-3, "µs": 1e-3}
# What a latency budget can mean: no model runs in under a microsecond, and a budget over an hour,
# or a ratio far from the teacher's latency, is a typo (a unit, an exponent) rather than a wish.
MS_RANGE = (1e-3, 3.6e6)
RATIO_RANGE = (1e-3, 1e3)
_RANGES = "from 1us to 3600s, or a ratio from 0.001x to 1000x"


@dataclasses.dataclass(frozen=True)
class Budget:
    """A latency budget: ``ms`` milliseconds, or ``ratio`` times the baseline's measured latency."""

    ms: float | None = None
    ratio: float | None = None
    text: str = ""

    def resolve(self, baseline_ms: float) -> float:
        return self.ms if self.ms is not None else self.ratio * baseline_ms

    def __str__(self) -> str:
        return self.text


def parse_budget(text: str) -> Budget:
    """``text`` as a :class:`Budget`, within :data:`MS_RANGE` milliseconds or :data:`RATIO_RANGE`."""
    match = _PATTERN.fullmatch(text)
    if match is None:
        raise UsageError(f"budget {text!r}: expected {_FORMS}")
    number, exponent, unit = match.groups()
    value = float(f"{number}e{exponent or 0}")  # inf or 0.0 when out of a float's range, never an error
    if float(number) == 0:
        raise UsageError(f"budget {text!r}: must be greater than zero; expected {_FORMS}")
    unit = unit.lower()
    ms = value * _TO_MS.get(unit, 1.0)
    low, high = RATIO_RANGE if unit == "x" else MS_RANGE
    if not (math.isfinite(ms) and low <= ms <= high):
        raise UsageError(f"budget {text!r}: out of range; expected a time {_RANGES}")
    if unit == "x":
        return Budget(ratio=value, text=text.strip())
    return Budget(ms=ms, text=text.strip())
