"""Hardware-aware compression search: an Optuna study over combined pruning, sparsity,
quantization and distillation plans, each candidate built, fine-tuned and measured on the target.

Public names load on first use (PEP 562): ``targets`` and ``profilers`` import ``search._errors``,
and ``search.run`` imports them, so an eager ``__init__`` would be a circular import.
"""

import importlib

from search._errors import (
    CandidateError,
    SearchError,
    TargetFileError,
    TargetUnavailableError,
    UnknownTargetError,
    UsageError,
)

_LAZY = {
    "search._budget": ("Budget", "parse_budget"),
    "search._deploy": ("export",),
    "search._distill": ("Finetune",),
    "search._plan": ("ChannelPruning", "Depth", "HeadPruning", "LayerPlan", "Plan", "Quantization", "WeightSparsity"),
    "search._results": ("load_trials", "open_study"),
    "search._space": ("SearchSpace",),
    "search._study": ("run",),
    "search._task": ("Task", "load_task", "top1_accuracy"),
    "search._transforms": ("apply_plan", "build_structure"),
}
_HOME = {name: module for module, names in _LAZY.items() for name in names}

__all__ = sorted(
    [
        *_HOME,
        "CandidateError",
        "SearchError",
        "TargetFileError",
        "TargetUnavailableError",
        "UnknownTargetError",
        "UsageError",
    ]
)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'search' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
