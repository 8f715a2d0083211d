"""Hardware-aware compression search: an Optuna study over combined pruning, sparsity,
quantization and distillation plans, each candidate built, fine-tuned and measured on the target.

The concerns live in subpackages, each importing only those below it::

    cli           the command line, over this API
    report        one trial, layer by layer: what the runtime ran, against the teacher
    study         RunSpec, run/work, one trial's objective, workers, baseline, results, export
    costmodel     features, the latency model, its measurements, the gate
    tasks         Task, load_task, the built-in tasks and their data
    artifacts     ONNX export and scoring, PyTorch modules for the runtime, measuring them
    compress      transforms, quantizers, distillation, size, Transformer pruning
    plan          Plan, SearchSpace, Budget
    model         calling a task's model, its layers and Transformer blocks

Below them all, ``profilers`` (measuring a built model) and ``targets`` (device data).

The public names below load on first use (PEP 562), so that ``import search`` stays light: it
imports neither torch nor any runtime until a name that needs one is used.
"""

from profilers import MeasurementError, TargetUnavailableError
from search._errors import CandidateError, SearchError, UsageError
from search._lazy import lazy_names
from targets import TargetFileError, UnknownTargetError

__getattr__, __dir__, _LAZY_NAMES = lazy_names(
    __name__,
    {
        "search.compress": ("Finetune", "apply_plan", "build_structure"),
        "search.plan": (
            "Budget", "ChannelPruning", "Depth", "HeadPruning", "LayerPlan", "Plan", "Quantization", "SearchSpace",
            "WeightSparsity", "parse_budget",
        ),
        "search.study": ("RunSpec", "export", "load_sensitivity", "load_trials", "open_study", "run", "work"),
        "search.report": ("load_layers", "plot_layers"),
        "search.tasks": ("Task", "load_task", "top1_accuracy"),
    },
)  # fmt: skip

__all__ = sorted(
    [
        *_LAZY_NAMES,
        "CandidateError",
        "MeasurementError",
        "SearchError",
        "TargetFileError",
        "TargetUnavailableError",
        "UnknownTargetError",
        "UsageError",
    ]
)
