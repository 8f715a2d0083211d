"""``--budget``: an absolute latency (5ms, 500us, 0.005s) or a ratio to the uncompressed model (0.5x)."""

from __future__ import annotations

import dataclasses
import re

from search._errors import UsageError

_FORMS = "a time such as 5ms, 500us, 0.005s, or a ratio to the uncompressed model such as 0.5x"
_PATTERN = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)(?:e([+-]?\d+))?\s*(ms|us|µs|s|x)\s*", re.IGNORECASE)
_TO_MS = {"s": 1000.0, "ms": 1.0, "us": 1e-3, "µs": 1e-3}


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
    match = _PATTERN.fullmatch(text)
    if match is None:
        raise UsageError(f"budget {text!r}: expected {_FORMS}")
    number, exponent, unit = match.groups()
    value = float(number) * 10.0 ** int(exponent or 0)
    if value <= 0:
        raise UsageError(f"budget {text!r}: must be greater than zero; expected {_FORMS}")
    unit = unit.lower()
    if unit == "x":
        return Budget(ratio=value, text=text.strip())
    return Budget(ms=value * _TO_MS[unit], text=text.strip())
