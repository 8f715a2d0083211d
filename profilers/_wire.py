"""What the profiler service and its client agree on beyond the HTTP routes, and the limits the
service holds its clients to (which its /health answer reports)."""

from __future__ import annotations

import dataclasses
import math

from profilers._base import TIMING_KNOBS
from profilers._errors import ProfilerUsageError

DEFAULT_PORT = 8765
TOKEN_ENV = "SEARCH_PROFILER_TOKEN"  # where both ends read the token when none is passed
# The timing knobs a service bounds: for each, the field of its limits (``ServiceLimits``, and
# the ``limits`` of its /health answer) and the ``search serve`` flag that sets it.
TIMING_LIMITS = {
    "warmup_s": ("max_time_s", "--max-time-s"),
    "min_time_s": ("max_time_s", "--max-time-s"),
    "max_time_s": ("max_time_s", "--max-time-s"),
    "sessions": ("max_sessions", "--max-sessions"),
}
MAX_BYTES = 256 * 2**20


@dataclasses.dataclass(frozen=True)
class ServiceLimits:
    """What one request may cost the profiler service; set when it starts (the ``search serve``
    flags), never by a client.

    ``max_bytes``: the largest upload. ``max_model_memory``: the bytes of the tensors a model may
    declare (inputs, outputs, initializers and every tensor shape inference sizes, summed).
    ``max_time_s``: the most a request may ask for ``warmup_s``, ``min_time_s`` and ``max_time_s``;
    ``max_sessions``: for ``sessions``. Run counts and ``tolerance`` need no bound of their own:
    no run count keeps a session past its ``max_time_s``, so one request holds the device for at
    most about ``sessions`` x 2 x ``max_time_s`` (warm-up, then timed runs) plus the session
    builds. ``max_queue``: requests waiting (uploading or queued) beside the one being measured.
    ``upload_idle_s``: the longest pause in an upload before it is refused (408), so a stalled
    client does not hold a place in the queue.
    """

    max_bytes: int = MAX_BYTES
    max_model_memory: int = 2**30
    max_time_s: float = 30.0
    max_sessions: int = 10
    max_queue: int = 2
    upload_idle_s: float = 30.0

    def __post_init__(self) -> None:
        positive = {
            "max_bytes": self.max_bytes, "max_model_memory": self.max_model_memory,
            "max_time_s": self.max_time_s, "max_sessions": self.max_sessions,
            "upload_idle_s": self.upload_idle_s,
        }  # fmt: skip
        bad = [f"{key}={value!r}" for key, value in positive.items() if not (value > 0 and math.isfinite(value))]
        if not self.max_queue >= 0:
            bad.append(f"max_queue={self.max_queue!r}")
        if bad:
            raise ProfilerUsageError(
                f"service limits {', '.join(bad)}: each must be a finite number > 0 (max_queue >= 0)"
            )

    def bounds(self) -> dict[str, tuple[float, float, str]]:
        """For each bounded timing knob: ``(lowest, highest, the search serve flag setting it)``."""
        return {
            key: (1 if TIMING_KNOBS[key] is int else 0, getattr(self, field), flag)
            for key, (field, flag) in TIMING_LIMITS.items()
        }
