"""Models measured in turn, so that their latencies compare: a shared machine's speed drifts by
10-30 % over minutes (seen on this project's VMs), and two measurements minutes apart carry that
drift into their ratio. Measured back to back, round after round, they share the host's state."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import TypeVar

from profilers._base import Measurement
from profilers._errors import MeasurementError

K = TypeVar("K", bound=Hashable)


def measure_in_turn(
    measures: Mapping[K, Callable[[], Measurement]],
    rounds: int = 3,
    before_each: Callable[[K, int], None] | None = None,
) -> tuple[dict[K, Measurement], dict[K, MeasurementError]]:
    """Call each of ``measures`` (by any key) once a round, in their order, for ``rounds`` rounds
    (a, b, c, a, b, c, …), ``before_each(key, round)`` first where given (progress). Returns each
    one's measurement of median latency (of an even count, the slower middle one: a measurement
    taken, not an average of two), and the :class:`~profilers.MeasurementError` of each one that
    raised (it is measured no more)."""
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
        raise ValueError(f"rounds {rounds!r}: expected a whole number of at least 1")
    taken: dict[K, list[Measurement]] = {key: [] for key in measures}
    failed: dict[K, MeasurementError] = {}
    for round_ in range(rounds):
        for key, measure in measures.items():
            if key not in failed:
                if before_each is not None:
                    before_each(key, round_)
                try:
                    taken[key].append(measure())
                except MeasurementError as exc:
                    failed[key] = exc
    median = {
        key: sorted(found, key=lambda m: m.latency_ms)[len(found) // 2]
        for key, found in taken.items()
        if key not in failed
    }
    return median, failed
