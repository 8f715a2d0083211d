"""What a study does not offer of its search space.

- Options that can only cost accuracy for the run's objectives: with size not among them, a bit
  width below 8 that the target runs at int8 anyway (int4 and 1-bit convolutions on ONNX Runtime:
  the same latency, a lower metric), and weight sparsity the target does not accelerate (all of it
  on ONNX Runtime's CPU; all but 2:4 on TensorRT). They stay offered when size is an objective.
- The bit widths layer sensitivity ruled out (:func:`~search.study.excluded_bits`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from search.artifacts import runtime_precision
from search.model import LayerInfo
from search.plan import TWO_FOUR, SearchSpace
from search.study._sensitivity import excluded_bits


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
) -> dict[str, list]:
    """Everything the study does not offer, per parameter (see the module's doc)."""
    merged = unhelpful_options(space, layers, precisions, objectives)
    for name, values in excluded_bits(sensitivity).items():
        merged[name] = sorted({*merged.get(name, ()), *values})
    return merged
