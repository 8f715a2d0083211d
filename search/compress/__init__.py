"""Building a candidate from the teacher and a plan, and recovering its accuracy: one transform per
plan entry type (channel and head pruning, depth, sparsity masks, quantizers), distillation from
the teacher, and the candidate's size at its true bit widths."""

from search.compress._distill import (
    DISTILL_LOSSES,
    SCHEDULES,
    Distillation,
    DistillLoss,
    Finetune,
    check_distill_loss,
    distill,
    distillation_loss,
)
from search.compress._quant import (
    CALIBRATION_BATCHES,
    BinarizeWeight,
    FakeQuantWeight,
    InputFakeQuant,
    WeightMask,
    bake,
    baked_state_dict,
    calibrate_input_quant,
)
from search.compress._size import packed_size_bytes
from search.compress._transformer_pruning import drop_blocks, prune_heads_and_ffn
from search.compress._transforms import (
    ROUND_CHANNELS_TO,
    add_compression,
    apply_plan,
    build_structure,
    register_transform,
)

__all__ = [
    "CALIBRATION_BATCHES",
    "DISTILL_LOSSES",
    "ROUND_CHANNELS_TO",
    "SCHEDULES",
    "BinarizeWeight",
    "Distillation",
    "DistillLoss",
    "FakeQuantWeight",
    "Finetune",
    "InputFakeQuant",
    "WeightMask",
    "add_compression",
    "apply_plan",
    "bake",
    "baked_state_dict",
    "calibrate_input_quant",
    "build_structure",
    "check_distill_loss",
    "distill",
    "distillation_loss",
    "drop_blocks",
    "packed_size_bytes",
    "prune_heads_and_ffn",
    "register_transform",
]
