"""Hardware-aware compression search: an Optuna study over combined pruning, sparsity,
quantization and distillation plans, each candidate built, fine-tuned and measured on the target."""

from search._budget import Budget, parse_budget
from search._deploy import export
from search._distill import Finetune
from search._errors import (
    CandidateError,
    SearchError,
    TargetFileError,
    TargetUnavailableError,
    UnknownTargetError,
    UsageError,
)
from search._plan import ChannelPruning, LayerPlan, Plan, Quantization, WeightSparsity
from search._results import load_trials, open_study
from search._space import SearchSpace
from search._study import run
from search._task import Task, load_task, top1_accuracy
from search._transforms import apply_plan, build_structure

__all__ = [
    "Budget",
    "CandidateError",
    "ChannelPruning",
    "Finetune",
    "LayerPlan",
    "Plan",
    "Quantization",
    "SearchError",
    "SearchSpace",
    "TargetFileError",
    "TargetUnavailableError",
    "Task",
    "UnknownTargetError",
    "UsageError",
    "WeightSparsity",
    "apply_plan",
    "build_structure",
    "export",
    "load_task",
    "load_trials",
    "open_study",
    "parse_budget",
    "run",
    "top1_accuracy",
]
