"""What a study does not offer of its search space.

- Options that can only cost accuracy for the run's objectives: with size not among them, a bit
  width below 8 that the target runs at int8 anyway (int4 and 1-bit convolutions on ONNX Runtime:
  the same latency, a lower metric), and weight sparsity the target does not accelerate (all of it
  on ONNX Runtime's CPU; all but 2:4 on TensorRT). They stay offered when size is an objective.
- The bit widths layer sensitivity ruled out (:func:`~search.study.excluded_bits`).
- Once the study measured its ``int8 everywhere`` recipe no faster than the teacher (a network whose
  activations ONNX Runtime has no int8 kernel for, such as hard-swish, pays a Q/DQ pair around each;
  a small Transformer's short MatMuls, where quantizing each call's input costs more than it saves),
  with size not an objective: every bit width below 32, a MatMul's int4 included
  (:func:`quantization_measured_slower`). This one is decided during the study.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import optuna
from optuna.trial import TrialState

from search._record import Key, StudyKey
from search.artifacts import runtime_precision
from search.model import LayerInfo
from search.plan import TWO_FOUR, SearchSpace
from search.study._recipes import INT8
from search.study._sensitivity import excluded_bits
from search.tasks import METRIC_WINDOW


def unhelpful_options(
    space: SearchSpace, layers: Sequence[LayerInfo], precisions: Sequence[str], objectives: Sequence[str]
) -> dict[str, list]:
    """Per parameter, the options that cannot improve any of ``objectives`` on a target that
    accelerates ``precisions`` (see the module's doc)."""
    if "size" in objectives:
        return {}
    excluded: dict[str, list] = {}
    for layer in layers:
        at_int8 = runtime_precision(8, precisions, layer.matmul)
        bits = [b for b in space.bits if b < 8 and runtime_precision(b, precisions, layer.matmul) == at_int8]
        if bits:
            excluded[f"{layer.name}.bits"] = bits
        sparsity = [r for r in space.sparsity if r > 0] + ([] if "sparse-2:4" in precisions else [TWO_FOUR])
        if sparsity:
            excluded[f"{layer.name}.sparsity"] = sparsity
    return excluded


def exclusions(
    space: SearchSpace,
    layers: Sequence[LayerInfo],
    precisions: Sequence[str],
    objectives: Sequence[str],
    sensitivity: Sequence[Mapping],
    window: float = METRIC_WINDOW,
) -> dict[str, list]:
    """Everything the study does not offer, per parameter (see the module's doc); ``window``: the
    metric span its front is judged over."""
    return merged(unhelpful_options(space, layers, precisions, objectives), excluded_bits(sensitivity, window))


def merged(*exclusions: Mapping[str, Sequence]) -> dict[str, list]:
    """The options excluded by any of ``exclusions``, per parameter."""
    union: dict[str, list] = {}
    for excluded in exclusions:
        for name, values in excluded.items():
            union[name] = list(dict.fromkeys([*union.get(name, ()), *values]))
    return union


def quantization_measured_slower(
    study: optuna.Study,
    space: SearchSpace,
    layers: Sequence[LayerInfo],
    precisions: Sequence[str],
    objectives: Sequence[str],
) -> tuple[dict[str, list], str | None]:
    """Per layer, its bit widths below 32, once the study's ``int8 everywhere`` recipe was measured
    no faster than the teacher (and size is not an objective), and why; otherwise nothing.

    Quantizing some layers leaves float islands, each behind its own Q/DQ: it gains less than
    quantizing all of them (RUNTIME_FACTS: half of ResNet-18's convolutions 1.1–1.6× where all give
    3.3×), so where all gave nothing, a plan with int8 layers only costs the study a measurement.
    A MatMul loses its int4 ``MatMulNBits`` too: measured, it gains less than int8 wherever int8
    gains, and more only on a Linear of 4096² at one token (9.0× against 7.3×), not on the short
    sequences' small MatMuls where int8 loses (RUNTIME_FACTS: 0.96× against 2.84× on an MLP of
    384→1536 at 64 tokens). A layer loses all its bit widths below 32 or none: a parameter's
    choices cannot change within a study, but one left with a single choice is not asked
    (:func:`~search.plan.suggest_plan`)."""
    teacher_ms = study.user_attrs.get(StudyKey.BASELINE, {}).get(Key.LATENCY_MS)
    if "size" in objectives or teacher_ms is None:
        return {}, None
    int8 = next(
        (t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
         if t.user_attrs.get(Key.RECIPE) == INT8 and Key.LATENCY_MS in t.user_attrs),
        None,
    )  # fmt: skip
    if int8 is None or int8.user_attrs[Key.LATENCY_MS] < teacher_ms:
        return {}, None
    quantized = [b for b in space.bits if b < 32]
    excluded, lost = {}, set()
    for layer in layers:
        kinds = {runtime_precision(b, precisions, layer.matmul) for b in quantized}
        if quantized and "fp32" not in kinds:
            excluded[f"{layer.name}.bits"] = quantized
            lost |= kinds
    note = (
        f"{' and '.join(sorted(lost))} not offered after trial {int8.number}: "
        f"{INT8} measured {int8.user_attrs[Key.LATENCY_MS]:.4f} ms, the teacher {teacher_ms:.4f} ms"
    )
    return excluded, note if excluded else None
