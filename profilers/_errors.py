"""The errors of this package; each also inherits the builtin it matches.

A :class:`MeasurementError` is about one model: the search fails only that candidate's trial.
The others are about the set-up and stop a run before it starts.
"""


class ProfilerError(Exception):
    """Base class of the errors this package raises."""


class ProfilerUsageError(ProfilerError, ValueError):
    """Bad input to a profiler or its service: an address, a token, a sensor rail, a model kind
    the runtime does not take."""


class TargetUnavailableError(ProfilerError, RuntimeError):
    """The target exists but cannot be measured from this machine."""


class MeasurementError(ProfilerError, RuntimeError):
    """A model the runtime could not build, load or run; only that model's measurement fails."""


class MeasurementCancelled(ProfilerError, RuntimeError):
    """A measurement stopped between two runs because its profiler's
    :attr:`~profilers.Profiler.should_stop` said so: in the profiler service, the client left or
    the service is stopping. It says nothing about the model."""
