"""The errors of this package; each also inherits the builtin it matches."""


class TargetError(Exception):
    """Base class of the errors this package raises."""


class UnknownTargetError(TargetError, ValueError):
    """A target name that names no built-in target and no readable file."""


class TargetFileError(TargetError, ValueError):
    """A target file that cannot be read or has a bad field."""
