"""Building a candidate from the teacher and a plan, and recovering its accuracy: one transform per
plan entry type (channel and head pruning, depth, sparsity masks, quantizers), distillation from
the teacher, and the candidate's size at its true bit widths.

Names load on first use (PEP 562): :class:`Finetune`, the fine-tune's settings, without PyTorch."""

from search._lazy import lazy_names

__getattr__, __dir__, __all__ = lazy_names(
    __name__,
    {
        "search.compress._distill": (
            "DISTILL_LOSSES", "Distillation", "DistillLoss", "check_distill_loss", "distill", "distillation_loss",
        ),
        "search.compress._finetune": ("SCHEDULES", "Finetune"),
        "search.compress._quant": (
            "CALIBRATION_BATCHES", "BinarizeWeight", "FakeQuantWeight", "InputFakeQuant", "WeightMask", "bake",
            "baked_state_dict", "calibrate_input_quant",
        ),
        "search.compress._size": ("packed_size_bytes",),
        "search.compress._teacher": ("TEACHER_CACHE_BYTES", "TeacherOutputs"),
        "search.compress._refit": ("ACTIVITY_BATCHES", "Activity", "channel_activity", "mean_squares"),
        "search.compress._transformer_pruning": ("drop_blocks", "prune_heads_and_ffn"),
        "search.compress._transforms": (
            "ROUND_CHANNELS_TO", "add_compression", "apply_plan", "build_structure", "register_transform",
        ),
    },
)  # fmt: skip
