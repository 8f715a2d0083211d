"""How a student is scored before its plan's last file: in PyTorch, or on its graph with the
current weights written in (ONNX Runtime, as the trial's file is scored), whichever scores this
plan faster. A fine-tune scores its student so along the way, and the layer-sensitivity pass each
option.

Neither is faster everywhere. A small CNN with depthwise convolutions scores six times faster on
its file (the unseen MobileNet pruned by a quarter: 5.9 s in PyTorch, 0.1 s to write its weights
and 0.9 s to score the file), a Transformer or a plan quantized again at each write the other way
round (MiniLM pruned by a quarter: 1.5 s against 1.1 + 1.6 s; benchmarks/RESULTS.md, "Tenth
session"). So each plan times both ways once, the file first, and keeps the faster; a promotion
inherits the timings of the trial it goes on from.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only
    from torch import nn

    from search.artifacts import ExportedModel
    from search.plan import Plan
    from search.tasks import Task
    from targets import Target

FILE, TORCH = "file", "torch"  # the ways, in the order they are first tried


def int8_static_only(target: Target) -> bool:
    """Whether ``target`` takes int8 only as static symmetric Q/DQ on every layer (TensorRT); the
    other runtimes take uint8 activations, and quantize a MatMul's input per call."""
    return target.runtime == "tensorrt"


def write_file(task: Task, target: Target, structure: nn.Module, plan: Plan, path: Path, raw: Path) -> ExportedModel:
    """``path``: the plan's ONNX file for ``target``, ``raw`` (the plan's exported graph, in a
    folder of :class:`~search.artifacts.StructureGraphs`) with ``structure``'s weights; the
    quantized graphs are kept in that folder too."""
    from search.artifacts import QUANTIZED, export_candidate  # ONNX and PyTorch: reading a study's rows needs neither

    return export_candidate(
        structure, task.example_input, path,
        plan=plan, precisions=target.precisions, calibration=task.calibration_batches(),
        symmetric=int8_static_only(target), output=task.output, raw=raw, quantized_graphs=raw.parent / QUANTIZED,
    )  # fmt: skip


class FasterScoring:
    """``scoring(*args)`` scores the way that last took less time, after trying each once; each way
    is called with ``args``.

    ``ways``: each way's scoring function, by name (:data:`FILE`, :data:`TORCH`); ``seconds``:
    what each way last took, known from earlier (a promotion's parent). ``last``: the way of the
    latest score.
    """

    def __init__(self, ways: Mapping[str, Callable[..., float]], seconds: Mapping[str, float] | None = None) -> None:
        self.ways = dict(ways)
        self.seconds = {way: float(s) for way, s in (seconds or {}).items() if way in self.ways}
        self.last: str | None = None

    def __call__(self, *args) -> float:
        untried = [way for way in self.ways if way not in self.seconds]
        way = untried[0] if untried else min(self.seconds, key=self.seconds.__getitem__)
        start = time.perf_counter()
        value = self.ways[way](*args)
        self.seconds[way] = time.perf_counter() - start
        self.last = way
        return value
