"""The errors of this package: one base, each subclass also a matching builtin.

User errors (:class:`UsageError`) stop a run before the study starts. A :class:`CandidateError`
fails only its own trial; the study goes on. The packages below have their own:
``targets.TargetError`` and ``profilers.ProfilerError`` (whose ``MeasurementError`` also fails
only its trial); the CLI prints each of them as one line.
"""


import re

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def first_line(exc: BaseException | str) -> str:
    """An error from other code (an exporter, a task, a database) as one line: its type and the
    first line of its message, colour codes removed. Errors print one line each."""
    text = _ANSI.sub("", str(exc)).strip()
    line = text.splitlines()[0].strip() if text else ""
    if isinstance(exc, str):
        return line
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


class SearchError(Exception):
    """Base class of every error this package raises on purpose."""


class UsageError(SearchError, ValueError):
    """Bad input from the user: a flag, a file, a task. Raised before any work starts."""


class CandidateError(SearchError, RuntimeError):
    """A candidate failed to build, fine-tune or export; only its trial fails."""
