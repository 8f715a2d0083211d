"""The errors of this package: one base, each subclass also a matching builtin.

User errors (:class:`UsageError`) stop a run before the study starts. A :class:`CandidateError`
fails only its own trial; the study goes on. The packages below have their own:
``targets.TargetError`` and ``profilers.ProfilerError`` (whose ``MeasurementError`` also fails
only its trial); the CLI prints each of them as one line.
"""


class SearchError(Exception):
    """Base class of every error this package raises on purpose."""


class UsageError(SearchError, ValueError):
    """Bad input from the user: a flag, a file, a task. Raised before any work starts."""


class CandidateError(SearchError, RuntimeError):
    """A candidate failed to build, fine-tune or export; only its trial fails."""
