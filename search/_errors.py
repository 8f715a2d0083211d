"""The project's exceptions: one base, each subclass also a matching builtin.

User errors (:class:`UsageError` and its subclasses) stop a run before the study starts.
A :class:`CandidateError` fails only its own trial; the study goes on.
"""


class SearchError(Exception):
    """Base class of every error this project raises on purpose."""


class UsageError(SearchError, ValueError):
    """Bad input from the user: a flag, a file, a task. Raised before any work starts."""


class UnknownTargetError(UsageError):
    """A ``--target`` that names no known target and no readable file."""


class TargetFileError(UsageError):
    """A target file that cannot be read or has a bad field."""


class TargetUnavailableError(SearchError, RuntimeError):
    """The target exists but cannot be measured from this machine."""


class CandidateError(SearchError, RuntimeError):
    """A candidate failed to build, fine-tune, export or measure; only its trial fails."""
