"""Layer sensitivity: the task's metric with one layer compressed at a time, before any fine-tune.

For every layer the search may compress and every option the space offers it (bit widths below 32,
each channel-pruning ratio: each FFN layer's, for a Transformer), the teacher with only that layer
changed is built and scored, its int8 activations calibrated as the export's are. This is the
signal HAWQ and modelopt's AutoQuantize build on. A Transformer whose space offers fewer blocks
has one row more per block: the teacher with only that block removed. A study uses it three times:

- **sensitivity-aware recipes** (:func:`mixed_rules`), mild to strong: int8 everywhere, and on
  each prunable layer the largest ratio whose drop is within the level's share of all the pruning
  drops, so the layers that lose least lose most;
- it **prunes the sampler** (:func:`excluded_bits`): a bit width that alone drops the metric by
  more than the front's whole window (:data:`METRIC_WINDOW`) is not offered to that layer. Pruning ratios
  are never ruled out: a structure recovers through distillation far more than its drop before
  fine-tuning suggests;
- a student of fewer blocks keeps the blocks whose removal costs most (:func:`block_drops`): on
  MiniLM, 3 of 6 blocks kept so score 0.77 before any fine-tune where 3 spread evenly score 0.67.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from search._errors import CandidateError
from search.plan import ChannelPruning, Depth, LayerPlan, Plan, Quantization, SearchSpace, depth_choices
from search.study._front import METRIC_WINDOW
from search.study._recipes import MIX, Rule, uncompressed
from search.study._scoring import FILE, TORCH, FasterScoring, int8_static_only, write_file

if TYPE_CHECKING:  # annotations only: these import PyTorch, which reading a study's sensitivity does not need
    from torch import nn

    from search.model import EncoderBlocks, LayerInfo
    from search.tasks import Task
    from targets import Target

COLUMNS = ("layer", "kind", "option", "bits", "pruning", "metric", "drop", "scored_on", "error")
SENSITIVITY_CALIBRATION_BATCHES = 2  # one quantizer's input range: a couple of batches set it
MIX_LEVELS = {"mild": 0.25, "medium": 0.5, "strong": 0.75}  # quantile of the pruning drops each mix tolerates
BLOCK = "block"  # the kind of a row that removes a whole block


def _block_names(model: nn.Module, blocks: EncoderBlocks) -> list[str]:
    """The blocks' module names, in order: ``encoder.layer.0``, torchvision's ``encoder.layers.encoder_layer_0``."""
    return [f"{blocks.container}.{name}" for name, _ in model.get_submodule(blocks.container).named_children()]


def _fewer_blocks(space: SearchSpace, blocks: EncoderBlocks | None) -> bool:
    """Whether ``space`` offers a student of fewer of ``blocks`` (a Transformer's)."""
    return blocks is not None and min(depth_choices(space, blocks)) < blocks.blocks


def _options(layer: LayerInfo, space: SearchSpace, blocks: EncoderBlocks | None) -> list[tuple[int, float]]:
    """(bits, pruning ratio) pairs to try on ``layer``: each lower bit width the space offers it,
    and each pruning ratio where it leads a pruning group (a Transformer's FFN layers)."""
    transformer = blocks is not None
    bits = [b for b in space.bits if b < 32 and (not layer.edge or b >= space.edge_min_bits) and not (transformer and b == 1)]
    prunable = layer.name in blocks.ffn if transformer else layer.prunable
    ratios = [r for r in space.pruning if r > 0] if prunable else []
    return [(b, 0.0) for b in bits] + [(32, r) for r in ratios]


def layer_sensitivity(
    task: Task,
    layers: Sequence[LayerInfo],
    space: SearchSpace,
    blocks: EncoderBlocks | None,
    target: Target,
    teacher_metric: float,
    deadline: float | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """One row per layer and option: the metric of the teacher with only that layer compressed and
    its drop from ``teacher_metric`` (the teacher's, on its exported file); for a Transformer whose
    space offers fewer blocks, first one row per block removed alone (kind ``block``, option
    ``drop``). A candidate that cannot be built records its error instead.

    Each option is scored in PyTorch or on its ONNX file for ``target`` (as a trial's file is),
    whichever scores options of its kind (a structure: a block or a pruning; bits) faster
    (:class:`~search.study._scoring.FasterScoring`); ``scored_on`` says which. Options go breadth
    first: the blocks, every layer's smallest pruning ratio, then the next, then every layer's 8
    bits, 4, 1. With a ``deadline`` (``time.monotonic()``), options not reached by then are left
    out: a run's time is not spent on its preparation (a Transformer has hundreds of options), and
    the mixed recipes still rank every layer by its mildest pruning. ``progress(text)`` is told of
    each option before it is scored."""
    import copy

    from search.artifacts import OnnxModule, StructureGraphs  # PyTorch: measuring needs it, reading rows not
    from search.compress import add_compression, baked_state_dict, build_structure, calibrate_input_quant

    calibration = task.calibration_batches()
    options = sorted(
        [
            (layer.name, layer.kind, bits, ratio)
            for layer in layers
            if not space.layers or layer.name in space.layers
            for bits, ratio in _options(layer, space, blocks)
        ],
        key=lambda option: (option[3] == 0, option[3], -option[2]),
    )
    names = _block_names(task.model, blocks) if _fewer_blocks(space, blocks) else []
    options = [(name, BLOCK, 32, 0.0) for name in names] + options
    rows = []
    with tempfile.TemporaryDirectory(prefix="search-sensitivity-") as tmp:

        def in_torch(candidate, structure, plan: Plan) -> float:
            calibrate_input_quant(candidate, calibration, count=SENSITIVITY_CALIBRATION_BATCHES)
            return task.score(candidate)

        graphs = StructureGraphs(Path(tmp, "graphs"), task.example_input, task.output)

        def on_file(candidate, structure, plan: Plan) -> float:
            """An option scored on its file: its structure's graph (the teacher's for a bit width; for
            a pruning, most often another pruning's reshaped; traced for a removed block) with its weights."""
            structure.load_state_dict(baked_state_dict(candidate))
            written = write_file(task, target, structure, plan, Path(tmp, "option.onnx"), graphs(structure))
            return task.score(OnnxModule(written.path))

        scorings = {pruned: FasterScoring({FILE: on_file, TORCH: in_torch}) for pruned in (True, False)}
        for number, (name, kind, bits, ratio) in enumerate(options, 1):
            if deadline is not None and time.monotonic() > deadline:
                break
            if kind == BLOCK:
                kept = tuple(index for index, block in enumerate(names) if block != name)
                plan, option = Plan(depth=Depth(blocks.container, kept)), "drop"
            else:
                plan = Plan(layers={name: LayerPlan(pruning=ChannelPruning(ratio), quantization=Quantization(bits))})
                option = f"bits={bits}" if ratio == 0 else f"pruning={ratio:g}"
            if progress is not None:
                progress(f"layer sensitivity: option {number} of {len(options)}, {name}: {option}")
            row = {"layer": name, "kind": kind, "option": option, "bits": bits, "pruning": ratio,
                   "metric": math.nan, "drop": math.nan, "scored_on": None, "error": None}  # fmt: skip
            try:
                structure = build_structure(task.model, plan, task.example_input, task.activity())
                candidate = add_compression(
                    copy.deepcopy(structure), plan, task.example_input, dynamic_matmuls=not int8_static_only(target)
                )
                scoring = scorings[kind == BLOCK or ratio > 0]
                row["metric"] = scoring(candidate, structure, plan)
                row["drop"], row["scored_on"] = teacher_metric - row["metric"], scoring.last
            except CandidateError as exc:
                row["error"] = str(exc)
            rows.append(row)
    return rows


def sensitivity_frame(rows: Sequence[Mapping]) -> pd.DataFrame:
    """The rows as a DataFrame, most sensitive first within each option."""
    frame = pd.DataFrame(list(rows), columns=list(COLUMNS))
    return frame.sort_values(["option", "drop"], ascending=[True, False], ignore_index=True)


def excluded_bits(rows: Sequence[Mapping], window: float = METRIC_WINDOW) -> dict[str, list[int]]:
    """Per ``<layer>.bits`` parameter, the bit widths that alone drop the metric by more than
    ``window`` (or cannot be built): not offered to that layer."""
    excluded: dict[str, list[int]] = {}
    for row in rows:
        if row["kind"] != BLOCK and row["pruning"] == 0 and (row["error"] is not None or row["drop"] > window):
            excluded.setdefault(f"{row['layer']}.bits", []).append(row["bits"])
    return excluded


def block_drops(rows: Sequence[Mapping], blocks: EncoderBlocks | None) -> tuple[float, ...] | None:
    """Per block of ``blocks``, what removing it alone drops the metric by (:func:`layer_sensitivity`);
    None unless every block was scored (a CNN, a study without sensitivity, a pass cut short)."""
    if blocks is None:
        return None
    found = [row for row in rows if row["kind"] == BLOCK]  # written in the blocks' order
    scored = all(row["error"] is None and math.isfinite(row["drop"]) for row in found)
    return tuple(row["drop"] for row in found) if len(found) == blocks.blocks and scored else None


def mixed_rules(rows: Sequence[Mapping]) -> dict[str, Rule]:
    """The sensitivity-aware recipes, from mild to strong (:data:`MIX_LEVELS`): 8 bits where 8 is
    offered (below 8 gains no latency on most runtimes, and slows short sequences' MatMuls), and
    per prunable layer the largest ratio whose drop is within the level's quantile of all the
    pruning drops measured, so the layers that lose least are pruned most. None without rows
    (an empty dict)."""
    if not rows:
        return {}
    pruning = [(row["layer"], row["pruning"], row["drop"]) for row in rows if row["pruning"] > 0 and row["error"] is None]

    def rule(tolerance: float) -> Rule:
        pruned: dict[str, float] = {}
        for layer, ratio, drop in pruning:
            if drop <= tolerance and ratio > pruned.get(layer, 0.0):
                pruned[layer] = ratio

        def choose(name: str, choices: list):
            layer, _, kind = name.rpartition(".")
            if kind == "bits":
                return 8 if 8 in choices else max(choices)
            if kind == "pruning":
                return pruned.get(layer, 0.0)
            return uncompressed(name, choices)  # width, depth, sparsity, heads

        return choose

    tolerances = np.quantile([drop for _, _, drop in pruning], list(MIX_LEVELS.values())) if pruning else [-math.inf] * 3
    return {f"{MIX} ({level})": rule(t) for level, t in zip(MIX_LEVELS, tolerances)}
