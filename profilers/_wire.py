"""What the profiler service and its client agree on beyond the HTTP routes."""

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
