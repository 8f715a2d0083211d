"""What a trial tries and under which budget: the plan (frozen data keyed by module name), the
search space it is sampled from, and the latency budget."""

from search.plan._budget import Budget, parse_budget
from search.plan._plan import (
    BITS,
    PLAN_VERSION,
    SPARSITY_PATTERNS,
    ChannelPruning,
    Depth,
    HeadPruning,
    LayerPlan,
    Plan,
    Quantization,
    WeightSparsity,
)
from search.plan._space import TWO_FOUR, SearchSpace, depth_choices, kept_blocks, suggest_plan

__all__ = [
    "BITS",
    "PLAN_VERSION",
    "SPARSITY_PATTERNS",
    "TWO_FOUR",
    "Budget",
    "ChannelPruning",
    "Depth",
    "HeadPruning",
    "LayerPlan",
    "Plan",
    "Quantization",
    "SearchSpace",
    "WeightSparsity",
    "depth_choices",
    "kept_blocks",
    "parse_budget",
    "suggest_plan",
]
