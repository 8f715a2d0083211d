"""Building a candidate from the teacher and a plan, and recovering its accuracy: one transform per
plan entry type (channel and head pruning, depth, sparsity masks, quantizers), distillation from
the teacher, and the candidate's size at its true bit widths."""

from search.compress._distill import (
    DISTILL_LOSSES,
    SCHEDULES,
    DistillLoss,
    Finetune,
    check_distill_loss,
    distill,
    distillation_loss,
)
from search.compress._quant import BinarizeWeight, FakeQuantWeight, InputFakeQuant, WeightMask, bake
from search.compress._size import packed_size_bytes
from search.compress._transformer_pruning import drop_blocks, prune_heads_and_ffn
from search.compress._transforms import ROUND_CHANNELS_TO, apply_plan, build_structure, register_transform

__all__ = [
    "DISTILL_LOSSES",
    "ROUND_CHANNELS_TO",
    "SCHEDULES",
    "BinarizeWeight",
    "DistillLoss",
    "FakeQuantWeight",
    "Finetune",
    "InputFakeQuant",
    "WeightMask",
    "apply_plan",
    "bake",
    "build_structure",
    "check_distill_loss",
    "distill",
    "distillation_loss",
    "drop_blocks",
    "packed_size_bytes",
    "prune_heads_and_ffn",
    "register_transform",
]
