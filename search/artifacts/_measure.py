"""A candidate measured on the target: what its profiler takes, handed over."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from profilers import Measurement, Profiler
from search._errors import CandidateError
from search.artifacts._pytorch import module_artifact
from search.model import Inputs
from search.plan import Plan


def measure_candidate(
    profiler: Profiler, onnx_path: str | Path, model: nn.Module, example_input: Inputs, plan: Plan | None = None
) -> Measurement:
    """Measure a candidate on ``profiler``: its exported ONNX file ``onnx_path``, or, on a runtime
    that runs PyTorch modules (``profiler.measures_onnx`` False), ``model`` itself (baked, built
    from ``plan``) made ready for the target (:func:`module_artifact`), called on ``example_input``.

    Raises :class:`~profilers.MeasurementError` when the runtime cannot run it, and
    :class:`~search.CandidateError` when the module cannot be made ready for it."""
    if profiler.measures_onnx:
        return profiler.measure(onnx_path)
    try:
        artifact = module_artifact(model, example_input, plan or Plan(), profiler.target.precisions, profiler.device)
    except (RuntimeError, ValueError, TypeError) as exc:  # out of GPU memory, a torchao refusal
        raise CandidateError(f"cannot prepare the model for {profiler.runtime}: {exc}") from exc
    return profiler.measure_module(artifact)
