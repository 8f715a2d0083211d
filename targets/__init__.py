"""Targets are data: one TOML file per device in this package, loaded into a :class:`Target`.

This package imports neither ``profilers`` nor ``search``: they import it."""

from targets._errors import TargetError, TargetFileError, UnknownTargetError
from targets._load import list_targets, load_target
from targets._spec import PRECISIONS, RUNTIMES, Target

__all__ = [
    "PRECISIONS",
    "RUNTIMES",
    "Target",
    "TargetError",
    "TargetFileError",
    "UnknownTargetError",
    "list_targets",
    "load_target",
]
