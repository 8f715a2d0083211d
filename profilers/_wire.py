"""What the profiler service and its client agree on beyond the HTTP routes."""

DEFAULT_PORT = 8765
TOKEN_ENV = "SEARCH_PROFILER_TOKEN"  # where both ends read the token when none is passed
