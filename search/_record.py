"""What a study records, by name: a trial's user attrs (:class:`Key`) and the study's own
(:class:`StudyKey`). The objective writes them, the DataFrame promotes them to columns
(:data:`COLUMNS`), the CLI prints them and the cost model learns from them, all by these names.
"""


STAGES = ("build", "export", "measure", "fine-tune", "evaluate")  # a trial's stages, in order: Key.STAGE's values


class Key:
    """The user attrs of a trial."""

    WORKER = "worker"  # which process runs the trial: host, pid, start time
    STAGE = "stage"  # what the trial is doing (build, fine-tune, export, evaluate, measure)
    PLAN = "plan"  # the plan as JSON data (Plan.to_dict)
    CHANNELS = "channels"  # output channels per compressible layer (and packed projection) of the built candidate
    PACKED = "packed_projections"  # the teacher's: each attention's packed Q/K/V projection -> its planned out_proj
    COST_FEATURES = "cost_features"  # the cost model's features of the built candidate
    COST_FEATURE_VERSION = "cost_feature_version"  # their layout (FEATURE_VERSION): another's are not learned from
    FINETUNE_CURVE = "finetune_curve"  # {step: metric} reported to the pruner during the fine-tune
    FINETUNE_LOSS = "finetune_loss_first_last"
    SCORED_ON_FILE = "scored_on_file"  # the curve's steps scored on the trial's file (ONNX Runtime), not in PyTorch
    SCORE_SECONDS = "score_seconds"  # what scoring the student last took, per way ("file", "torch")
    FINETUNE_STEPS = "finetune_steps"  # the steps the plan was fine-tuned for, over all its rungs
    BEST_STEP = "best_step"  # the step whose state was kept (0: the fine-tune improved nothing)
    RUNG = "rung"  # 0: screened with the shortest fine-tune; each promotion one more
    CONTINUE_FROM = "continue_from"  # a promotion: the trial whose fine-tune it goes on with
    FINETUNE_FROM = "finetune_from"  # where a promotion's fine-tune started: its parent's saved state
    RECIPE = "recipe"  # a plan users know (int8 everywhere, uniform pruning, a student width, ...)
    FINETUNE_SKIPPED = "finetune_skipped"  # why the plan was not fine-tuned (over the budget, a PTQ recipe)
    FINETUNE_CUT = "finetune_cut"  # why the fine-tune stopped before its rung's end (the run's timeout), and where
    POST_TRAINING = "post_training"  # a recipe users run without a fine-tune (int8 PTQ): scored as calibrated
    BUILD_DIGEST = "build_digest"  # sha256 of the built candidate: two plans that build the same model share it
    # The measured record: what the front and the DataFrame are made of.
    METRIC = "metric"
    METRIC_SOURCE = "metric_source"
    METRIC_TORCH = "metric_torch"
    LATENCY_MS = "latency_ms"
    LATENCY_P90_MS = "latency_p90_ms"
    LATENCY_RUNS = "latency_runs"
    LATENCY_SPREAD = "latency_spread"
    LATENCY_STABLE = "latency_stable"
    LATENCY_SESSION_MEDIANS_MS = "latency_session_medians_ms"
    LATENCY_QUIET_SHARE = "latency_quiet_share"
    LATENCY_MEASUREMENTS = "latency_measurements"  # the latency is the fastest of these (2: first just over the budget)
    LATENCY_SOURCE = "latency_source"
    ENERGY_MJ = "energy_mj"
    ENERGY_SOURCE = "energy_source"
    SIZE_BYTES = "size_bytes"
    SIZE_SOURCE = "size_source"
    ONNX_BYTES = "onnx_bytes"
    PRECISION = "precision"
    LAYER_PRECISION = "layer_precision"
    RUNTIME = "runtime"
    MEASURED_ON = "measured_on"
    DEVICE = "device"
    LAYER_TIMES = "layer_times"
    ARTIFACTS = "artifacts"
    SECONDS = "seconds"  # each stage's seconds (build, export, measure, fine-tune, evaluate), pruned trials too
    # The cost model's prediction, made before the fine-tune.
    PREDICTED_LATENCY_MS = "predicted_latency_ms"
    PREDICTED_LATENCY_LOW_MS = "predicted_latency_low_ms"
    PREDICTED_HEADROOM = "predicted_headroom"
    PREDICTED_SOURCE = "predicted_source"
    PREDICTED_ENERGY_MJ = "predicted_energy_mj"
    # Why a trial did not complete, or completed without a fine-tune of its own.
    PRUNED_BY = "pruned_by"
    PRUNED_REASON = "pruned_reason"
    DUPLICATE_OF = "duplicate_of"
    FAIL_REASON = "fail_reason"
    INTERRUPTED = "interrupted"
    SURPLUS = "surplus"
    # Columns the DataFrame derives from the others and from the storage.
    FEASIBLE = "feasible"  # completed within every constraint (the budget)
    PARETO = "pareto"  # on the feasible Pareto front
    LATENCY_PREDICTION_ERROR = "latency_prediction_error"
    ENERGY_PREDICTION_ERROR = "energy_prediction_error"
    RETRY_OF = "retry_of"
    SUPERSEDED_BY = "superseded_by"  # the promotion that fine-tuned this plan further


# Trial user attrs promoted to plain DataFrame columns, in this order; the rest stay user_attrs_*.
COLUMNS = (
    Key.METRIC, Key.METRIC_SOURCE, Key.METRIC_TORCH,
    Key.LATENCY_MS, Key.LATENCY_P90_MS, Key.LATENCY_RUNS, Key.LATENCY_SPREAD, Key.LATENCY_STABLE,
    Key.LATENCY_SESSION_MEDIANS_MS, Key.LATENCY_QUIET_SHARE, Key.LATENCY_MEASUREMENTS, Key.LATENCY_SOURCE,
    Key.ENERGY_MJ, Key.ENERGY_SOURCE, Key.SIZE_BYTES, Key.SIZE_SOURCE, Key.ONNX_BYTES,
    Key.PREDICTED_LATENCY_MS, Key.PREDICTED_LATENCY_LOW_MS, Key.PREDICTED_HEADROOM, Key.PREDICTED_SOURCE,
    Key.LATENCY_PREDICTION_ERROR,
    Key.PREDICTED_ENERGY_MJ, Key.ENERGY_PREDICTION_ERROR,
    Key.RECIPE, Key.RUNG, Key.FINETUNE_STEPS, Key.BEST_STEP, Key.CONTINUE_FROM, Key.SUPERSEDED_BY,
    Key.FINETUNE_SKIPPED, Key.FINETUNE_CUT, Key.PRUNED_BY, Key.PRUNED_REASON, Key.DUPLICATE_OF,
    Key.PRECISION, Key.RUNTIME, Key.MEASURED_ON, Key.FAIL_REASON, Key.RETRY_OF, Key.ARTIFACTS,
    Key.SECONDS,
)  # fmt: skip


class StudyKey:
    """The user attrs of a study."""

    RUN_SPEC = "run_spec"  # the RunSpec, as one versioned JSON document
    TASK = "task"  # the task's name: a resumed or joined study must compress the same task
    TEACHER_SHA256 = "teacher_sha256"  # and the same teacher weights
    BASELINE = "baseline"  # the uncompressed teacher, scored and measured once
    TEACHER_AT_END = "teacher_at_end"  # the teacher measured again as the latest run ended: the host's drift
    BUDGET_MS = "budget_ms"  # the budget in ms, resolved once against the baseline
    METRIC_WINDOW = "metric_window"  # the metric span the front is judged over: the task's (Task.window)
    COST_MODEL_WARM_START = "cost_model_warm_start"  # measurements from earlier studies
    FINETUNE_NOTE = "finetune_note"  # how the longest fine-tune was chosen
    SENSITIVITY = "sensitivity"  # each layer's metric with only it compressed, per option
    NOT_OFFERED = "not_offered"  # what the study stopped offering as it went, and why (a line)
