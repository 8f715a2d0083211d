"""Targets are data: one TOML file per device in this package, loaded into a :class:`Target`."""

from targets._load import list_targets, load_target
from targets._spec import PRECISIONS, Target

__all__ = ["PRECISIONS", "Target", "list_targets", "load_target"]
