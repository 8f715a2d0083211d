"""The recipes users already know, as a study's first trials: the teacher at int8 everywhere, uniform
channel pruning at each ratio of the space, each student width; for a Transformer, uniform int8,
uniform FFN pruning, fewer blocks. Each is a plan of the search space, enqueued through Optuna with
its ``recipe`` name, so the front starts from them and is never worse than the best of them. The
study's own plans follow them: the sensitivity mixes, and each structural recipe at int8 (or, for a
Transformer where int8 measured no faster than the teacher, each FFN pruning on each smaller student)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import optuna

from search._record import Key
from search.plan import SearchSpace, suggest_plan

if TYPE_CHECKING:  # annotations only: search.model imports PyTorch
    from search.model import EncoderBlocks, LayerInfo

Rule = Callable[[str, list], Any]  # (parameter name, its choices) -> the recipe's choice
INT8 = "int8 everywhere"  # post-training quantization: users run it without a fine-tune, and so does the study
MIX = "sensitivity mix"  # the study's own recipes, from layer sensitivity: "sensitivity mix (mild)", ...
ON = " on "  # the study's own recipes stack one on another: "int8 on prune 0.25", "prune 0.25 on 2 of 3 blocks"
STACKED = f"int8{ON}"  # a structural recipe at int8


class _NotInSpace(Exception):
    """A recipe asks for a value the search space does not offer."""


class _Recipe:
    """Stands in for an Optuna trial: :func:`suggest_plan` asks it as it asks a trial, and the
    recipe's rule answers, so a recipe's parameters are named and conditioned as a sampled plan's."""

    def __init__(self, rule: Rule) -> None:
        self.rule = rule
        self.params: dict[str, Any] = {}

    def suggest_categorical(self, name: str, choices: Sequence) -> Any:
        value = self.rule(name, list(choices))
        if value not in choices:
            raise _NotInSpace(name)
        self.params[name] = value
        return value


def uncompressed(name: str, choices: list) -> Any:
    """The choice that leaves a module as the teacher has it."""
    if name.endswith((".bits", "width", "depth")):
        return max(choices)
    return 0.0  # sparsity, pruning, heads


def _rule(**overrides: Any) -> Rule:
    """Uncompressed but for the parameter kinds in ``overrides`` (``bits``, ``pruning``, ``width``,
    ``depth``), set to the given value."""

    def choose(name: str, choices: list) -> Any:
        kind = name.rpartition(".")[2]
        return overrides[kind] if kind in overrides else uncompressed(name, choices)

    return choose


def _students(space: SearchSpace, blocks: EncoderBlocks | None) -> dict[str, dict[str, Any]]:
    """The smaller students of a space, by recipe name: each width below 1 (a CNN), each number of
    blocks below the teacher's (a Transformer)."""
    if blocks is None:
        return {f"width {width:g}": {"width": width} for width in space.width if width < 1}
    shares = sorted({max(1, round(share * blocks.blocks)) for share in space.depth if share < 1}, reverse=True)
    return {f"{kept} of {blocks.blocks} blocks": {"depth": kept} for kept in shares}


def recipe_rules(space: SearchSpace, blocks: EncoderBlocks | None) -> dict[str, Rule]:
    """The recipes users know for a space, by name."""
    rules = {INT8: _rule(bits=8)}
    rules.update({f"prune {ratio:g}": _rule(pruning=ratio) for ratio in space.pruning if ratio > 0})
    rules.update({name: _rule(**student) for name, student in _students(space, blocks).items()})
    return rules


def combined_rules(space: SearchSpace, blocks: EncoderBlocks | None) -> dict[str, Rule]:
    """A Transformer's each uniform FFN pruning of ``space`` on each student of fewer ``blocks``,
    in float: "prune 0.5 on 2 of 3 blocks". Where int8 does not pay, these are the plans faster than
    any structural recipe, as the recipes at int8 are where it does: depth and FFN width are two
    knobs, and the sampler, a few dozen plans into a study, seldom turns both. None for a CNN,
    whose width and pruning thin the same channels (on a hard-swish MobileNet, where int8 runs
    slower, the four pruned widths all screened far below the recipes: benchmarks/RESULTS.md)."""
    if blocks is None:
        return {}
    ratios = [ratio for ratio in space.pruning if ratio > 0]
    return {
        f"prune {ratio:g}{ON}{name}": _rule(pruning=ratio, **student)
        for name, student in _students(space, blocks).items() for ratio in ratios
    }  # fmt: skip


def stacked_rules(rules: Mapping[str, Rule]) -> dict[str, Rule]:
    """Each structural recipe of ``rules`` (pruning, a width, fewer blocks) at int8 too, 8 bits
    wherever 8 is offered: int8 everywhere and a smaller model, the two recipes users run one after
    the other. Where int8 runs fast (MiniLM's MatMuls on a VNNI CPU: 2.7x the teacher) no float plan
    comes near it, and these are the plans faster than int8 alone."""

    def at_int8(rule: Rule) -> Rule:
        def choose(name: str, choices: list) -> Any:
            return 8 if name.endswith(".bits") and 8 in choices else rule(name, choices)

        return choose

    return {f"{STACKED}{name}": at_int8(rule) for name, rule in rules.items() if name != INT8}


def recipe_params(
    rules: Mapping[str, Rule],
    space: SearchSpace,
    layers: Sequence[LayerInfo],
    blocks: EncoderBlocks | None,
    exclude: Mapping[str, Sequence] | None = None,
    drops: Sequence[float] | None = None,
) -> dict[str, dict[str, Any]]:
    """Each recipe's trial parameters; a recipe the space cannot express (int8 where ``bits`` has
    no 8, a ratio that is not offered) is left out, and so is one equal to an earlier one. A
    student of fewer blocks has parameters for the blocks it keeps: those the study's trials keep
    (``drops``, as :func:`~search.plan.suggest_plan` takes them)."""
    found: dict[str, dict[str, Any]] = {}
    for name, rule in rules.items():
        trial = _Recipe(rule)
        try:
            suggest_plan(trial, space, layers, blocks, exclude, drops)
        except _NotInSpace:
            continue
        if trial.params not in found.values():
            found[name] = trial.params
    return found


def users_know(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether ``trial`` runs a recipe users know (not one of the study's own: a sensitivity mix, a
    recipe stacked on another, the sampler's plans)."""
    name = trial.user_attrs.get(Key.RECIPE, MIX)
    return not name.startswith(MIX) and ON not in name


def enqueue_recipes(study: optuna.Study, recipes: Mapping[str, Mapping[str, Any]]) -> None:
    """Queue the recipes as the study's first trials, each marked with its name (and int8 PTQ as a
    plan that is scored as calibrated, never fine-tuned)."""
    for name, params in recipes.items():
        attrs = {Key.RECIPE: name, **({Key.POST_TRAINING: True} if name == INT8 else {})}
        study.enqueue_trial(dict(params), user_attrs=attrs)
