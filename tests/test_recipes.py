"""The recipes users know, as a study's first trials."""

from __future__ import annotations

import math

import pytest
from typer.testing import CliRunner

import search
from search._record import Key
from search.compress import Finetune
from search.model import describe_layers
from search.plan import SearchSpace, suggest_plan
from search.study import recipe_params, recipe_rules

QUICK = dict(finetune=Finetune(steps=2), pruner="none", cost_model=False, sensitivity=False)
CNN_RECIPES = ["int8 everywhere", "prune 0.25", "prune 0.5", "width 0.75", "width 0.5"]


def _plans(task, space: SearchSpace, blocks=None) -> dict:
    layers = describe_layers(task.model, task.example_input)
    params = recipe_params(recipe_rules(space, blocks), space, layers, blocks)
    import optuna

    return {name: suggest_plan(optuna.trial.FixedTrial(p), space, layers, blocks) for name, p in params.items()}


def test_the_recipes_are_the_plans_users_know(tiny_task):
    plans = _plans(tiny_task, SearchSpace())
    assert list(plans) == CNN_RECIPES
    layers = describe_layers(tiny_task.model, tiny_task.example_input)
    assert {entry.quantization.bits for entry in plans["int8 everywhere"].layers.values()} == {8}
    pruned = plans["prune 0.5"]
    assert {n for n, e in pruned.layers.items() if e.pruning.ratio == 0.5} == {layer.name for layer in layers if layer.prunable}
    assert all(e.quantization.bits == 32 and e.sparsity.ratio == 0 for e in pruned.layers.values())
    assert plans["width 0.5"].width == 0.5 and all(e.quantization.bits == 32 for e in plans["width 0.5"].layers.values())


def test_a_recipe_the_space_cannot_express_is_left_out(tiny_task):
    plans = _plans(tiny_task, SearchSpace(bits=(32, 4), pruning=(0.0,), width=(1.0, 0.5)))
    assert list(plans) == ["width 0.5"]


def test_a_transformer_s_recipes_are_int8_ffn_pruning_and_fewer_blocks():
    pytest.importorskip("transformers")
    from models import text_inputs, tiny_bert

    from search.model import find_blocks
    from search.tasks import Task

    model = tiny_bert()
    task = Task(model, [(text_inputs(2), None)], [(text_inputs(2), None)], text_inputs(1), metric=lambda m, v: 0.0,
                output=lambda out: out.last_hidden_state, distill_loss="mse")  # fmt: skip
    blocks = find_blocks(model)
    plans = _plans(task, SearchSpace(), blocks)
    assert list(plans) == ["int8 everywhere", "prune 0.25", "prune 0.5", "3 of 4 blocks", "2 of 4 blocks"]
    assert plans["2 of 4 blocks"].depth.keep == (0, 3)
    assert set(plans["2 of 4 blocks"].heads.values()) == {search.plan.HeadPruning()}
    assert set(plans["prune 0.5"].layers[name].pruning.ratio for name in blocks.ffn) == {0.5}


def test_the_recipes_are_the_first_trials_and_marked_in_the_dataframe_and_the_front_table(
    tiny_task, fast_profiler, tmp_path
):
    study = search.run(tiny_task, trials=7, profiler=fast_profiler, results_dir=tmp_path, **QUICK)
    frame = search.load_trials(study)
    assert list(frame[Key.RECIPE][:5]) == CNN_RECIPES
    assert all(not isinstance(value, str) for value in frame[Key.RECIPE][5:])  # then the sampler's plans
    assert all(frame["state"] == "COMPLETE")
    from search import cli

    output = CliRunner().invoke(cli.app, ["results", str(tmp_path / study.study_name)]).output
    on_front = frame[frame["pareto"] & frame[Key.RECIPE].map(lambda r: isinstance(r, str))]
    for recipe in on_front[Key.RECIPE]:
        assert recipe in output


def test_no_recipes_and_no_more_recipes_than_trials(tiny_task, fast_profiler, tmp_path):
    off = search.run(tiny_task, trials=2, profiler=fast_profiler, results_dir=tmp_path, study_name="off",
                     **{**QUICK, "recipes": False})  # fmt: skip
    assert all(Key.RECIPE not in t.user_attrs for t in off.trials)
    few = search.run(tiny_task, trials=2, profiler=fast_profiler, results_dir=tmp_path, study_name="few", **QUICK)
    assert [t.user_attrs[Key.RECIPE] for t in few.trials] == CNN_RECIPES[:2]  # none left waiting
    assert math.isfinite(few.trials[0].values[0])


def test_int8_ptq_is_scored_as_calibrated_and_a_plan_that_builds_an_earlier_plan_s_model_is_not_run_again(
    tiny_task, fast_profiler, tmp_path
):
    """On this CNN, width 0.5 keeps the very channels prune 0.5 keeps (both rank by L2 magnitude)."""
    study = search.run(tiny_task, trials=5, profiler=fast_profiler, results_dir=tmp_path, **QUICK)
    trials = {t.user_attrs[Key.RECIPE]: t for t in study.trials}
    int8 = trials["int8 everywhere"].user_attrs
    assert int8[Key.FINETUNE_SKIPPED].startswith("post-training quantization")
    assert int8[Key.FINETUNE_STEPS] == 0 and Key.FINETUNE_CURVE not in int8
    for width, prune in (("width 0.5", "prune 0.5"), ("width 0.75", "prune 0.25")):
        copy = trials[width]
        assert copy.user_attrs[Key.DUPLICATE_OF] == trials[prune].number
        assert copy.values == trials[prune].values
        assert copy.user_attrs[Key.PLAN]["width"] == float(width.split()[1])  # its own plan, the other's result
    assert Key.DUPLICATE_OF not in trials["prune 0.5"].user_attrs and trials["prune 0.5"].user_attrs[Key.FINETUNE_STEPS] > 0


def test_the_build_digest_tells_plans_apart_by_what_they_build():
    import copy

    import torch
    from models import SmallCNN

    from search.compress import add_compression, build_structure
    from search.plan import LayerPlan, Plan, Quantization, WeightSparsity
    from search.study._objective import build_digest

    model, example = SmallCNN(), torch.randn(1, 1, 8, 8)

    def digest(plan: Plan) -> str:
        return build_digest(add_compression(copy.deepcopy(build_structure(model, plan, example)), plan, example), plan)

    name = next(n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d))
    float_plan = Plan(layers={name: LayerPlan()})
    assert digest(float_plan) == digest(Plan())  # an entry that changes nothing
    assert digest(Plan(layers={name: LayerPlan(quantization=Quantization(8))})) != digest(Plan())
    assert digest(Plan(layers={name: LayerPlan(sparsity=WeightSparsity(0.5))})) != digest(Plan())
    assert digest(Plan(width=0.5)) != digest(Plan())
