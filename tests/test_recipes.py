"""The recipes users know, as a study's first trials."""

from __future__ import annotations

import math
from pathlib import Path

import onnx
import optuna
import pytest
from graphs import int8_slower
from typer.testing import CliRunner

import search
from search._record import Key, StudyKey
from search.compress import Finetune
from search.model import LayerInfo, describe_layers
from search.plan import Plan, SearchSpace, suggest_plan
from search.study import recipe_params, recipe_rules
from search.study._recipes import stacked_rules
from search.study._exclude import quantization_measured_slower

QUICK = dict(finetune=Finetune(steps=2), pruner="none", cost_model=False, sensitivity=False)
CNN_RECIPES = ["int8 everywhere", "prune 0.25", "prune 0.5", "width 0.75", "width 0.5"]


def _plans(task, space: SearchSpace, blocks=None) -> dict:
    layers = describe_layers(task.model, task.example_input)
    params = recipe_params(recipe_rules(space, blocks), space, layers, blocks)
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


def test_each_structural_recipe_is_stacked_on_int8_too(tiny_task):
    space = SearchSpace()
    layers = describe_layers(tiny_task.model, tiny_task.example_input)
    params = recipe_params(stacked_rules(recipe_rules(space, None)), space, layers, None)
    stacked = {name: suggest_plan(optuna.trial.FixedTrial(p), space, layers, None) for name, p in params.items()}
    assert list(stacked) == [f"int8 on {name}" for name in CNN_RECIPES[1:]]
    recipes = _plans(tiny_task, space)
    for name, plan in stacked.items():
        alone = recipes[name.removeprefix("int8 on ")]
        assert {entry.quantization.bits for entry in plan.layers.values()} == {8}
        assert plan.width == alone.width
        assert {n: e.pruning for n, e in plan.layers.items()} == {n: e.pruning for n, e in alone.layers.items()}


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
    study = search.run(tiny_task, trials=11, profiler=fast_profiler, results_dir=tmp_path, **QUICK)
    frame = search.load_trials(study)
    assert list(frame[Key.RECIPE][:5]) == CNN_RECIPES
    assert list(frame[Key.RECIPE][5:9]) == [f"int8 on {name}" for name in CNN_RECIPES[1:]]  # then the study's own
    assert all(not isinstance(value, str) for value in frame[Key.RECIPE][9:])  # then the sampler's plans
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


def test_a_structure_is_exported_once_a_study_without_its_weights(tiny_task, fast_profiler, tmp_path, monkeypatch):
    """prune 0.25 and int8 on prune 0.25 share a graph (int8 everywhere is the teacher's
    structure): three graphs in nine trials, one traced, the others reshaped from it (one form); each
    trial's file with its own weights (its score)."""
    from search.artifacts import OnnxModule, _graphs

    exported, export = [], _graphs.export_raw

    def export_raw(model, *args, **kwargs):
        exported.append(kwargs.get("weights"))
        return export(model, *args, **kwargs)

    monkeypatch.setattr(_graphs, "export_raw", export_raw)
    study = search.run(tiny_task, trials=9, profiler=fast_profiler, results_dir=tmp_path, **QUICK)
    assert exported == [False]
    graphs = sorted((tmp_path / study.study_name / "graphs").glob("*.onnx"))
    assert len(graphs) == 3 and len(list((tmp_path / study.study_name / "graphs" / "forms").iterdir())) == 1
    for path in graphs:  # the weights' data left out
        graph = onnx.load(str(path), load_external_data=False).graph
        weights = [init for init in graph.initializer if init.name.endswith(".weight")]
        assert weights
        assert all(init.data_location == onnx.TensorProto.EXTERNAL and not init.raw_data for init in weights)
    for trial in study.trials:  # each file holds its own trial's weights, written into a shared graph
        score = tiny_task.score(OnnxModule(Path(trial.user_attrs[Key.ARTIFACTS]) / "model.onnx"))
        assert score == pytest.approx(trial.user_attrs[Key.METRIC])


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


def _study_with_int8_recipe(int8_ms: float, teacher_ms: float = 1.0) -> optuna.Study:
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.set_user_attr(StudyKey.BASELINE, {Key.LATENCY_MS: teacher_ms})
    study.add_trial(optuna.trial.create_trial(
        values=[0.9, int8_ms], user_attrs={Key.RECIPE: "int8 everywhere", Key.LATENCY_MS: int8_ms},
    ))  # fmt: skip
    return study


def test_int8_is_no_longer_offered_once_int8_everywhere_measured_no_faster_than_the_teacher():
    conv = LayerInfo("conv", "Conv2d", (8, 8, 3, 3), prunable=True, two_four=True, edge=False)
    matmul = LayerInfo("ffn", "Linear", (64, 32), prunable=True, two_four=True, edge=False, matmul=True)
    space, precisions = SearchSpace(), ["fp32", "int8", "int4-weight-only"]
    excluded, note = quantization_measured_slower(
        _study_with_int8_recipe(1.3), space, [conv, matmul], precisions, ["metric", "latency"]
    )
    assert excluded == {"conv.bits": [8, 4, 1], "ffn.bits": [8, 4, 1]}  # the MatMul's int4 MatMulNBits too
    assert note == "int4 and int8 not offered after trial 0: int8 everywhere measured 1.3000 ms, the teacher 1.0000 ms"
    _, conv_only = quantization_measured_slower(
        _study_with_int8_recipe(1.3), space, [conv], precisions, ["metric", "latency"]
    )
    assert conv_only.startswith("int8 not offered after trial 0")
    for study, objectives in (
        (_study_with_int8_recipe(0.8), ["metric", "latency"]),  # int8 pays: offered
        (_study_with_int8_recipe(1.3), ["metric", "latency", "size"]),  # int8 still makes the model smaller
        (optuna.create_study(directions=["maximize", "minimize"]), ["metric", "latency"]),  # not measured yet
    ):
        assert quantization_measured_slower(study, space, [conv, matmul], precisions, objectives) == ({}, None)


def test_after_a_slower_int8_recipe_the_sampler_s_plans_keep_every_layer_float(
    tiny_task, fast_profiler, tmp_path, monkeypatch
):
    int8_slower(fast_profiler, monkeypatch)
    study = search.run(tiny_task, trials=13, profiler=fast_profiler, results_dir=tmp_path, **QUICK)
    stacked = [t for t in study.trials if t.user_attrs.get(Key.RECIPE, "").startswith("int8 on")]
    for trial in stacked:  # queued before int8 was measured slower: built float, their recipe's very model
        plan = Plan.from_dict(trial.user_attrs[Key.PLAN])
        assert {entry.quantization.bits for entry in plan.layers.values()} == {32}
        assert Key.DUPLICATE_OF in trial.user_attrs
    sampled = [t for t in study.trials if Key.RECIPE not in t.user_attrs]
    assert len(stacked) == 4 and len(sampled) == 4  # a CNN's pruning is queued on no width
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in sampled)
    for trial in sampled:  # at random, each of the four would be all-float one time in 16
        plan = Plan.from_dict(trial.user_attrs[Key.PLAN])
        assert {entry.quantization.bits for entry in plan.layers.values()} == {32}
        assert not [name for name in trial.params if name.endswith(".bits")]  # one choice left: not asked
    assert study.user_attrs[StudyKey.NOT_OFFERED].startswith("int8 not offered after trial 0")
    from search import cli

    output = CliRunner().invoke(cli.app, ["results", str(tmp_path / study.study_name)]).output
    assert "int8 not offered after trial 0" in output


def test_the_sensitivity_mixes_queued_before_int8_was_measured_slower_keep_their_pruning_in_float(
    tiny_task, fast_profiler, tmp_path, monkeypatch
):
    """The mixes are 8 bits wherever 8 is offered, queued with the recipes before ``int8 everywhere``
    is measured: once it runs slower than the teacher they are built float, with their pruning."""
    int8_slower(fast_profiler, monkeypatch)
    options = {**QUICK, "sensitivity": True}
    study = search.run(tiny_task, trials=8, profiler=fast_profiler, results_dir=tmp_path, **options)
    mixes = [t for t in study.trials if t.user_attrs.get(Key.RECIPE, "").startswith("sensitivity mix")]
    assert len(mixes) == 3 and all(t.state == optuna.trial.TrialState.COMPLETE for t in mixes)
    plans = [Plan.from_dict(t.user_attrs[Key.PLAN]) for t in mixes]
    assert all({entry.quantization.bits for entry in plan.layers.values()} == {32} for plan in plans)
    assert any(entry.pruning.ratio > 0 for plan in plans for entry in plan.layers.values())


def test_a_promotion_of_a_plan_not_asked_its_bits_continues_the_very_same_plan(
    tiny_task, fast_profiler, tmp_path, monkeypatch
):
    """A promotion is queued with its parent's parameters, which lack the bit widths the parent was
    not asked: it must not sample them afresh (it would load its parent's state into another model)."""
    int8_slower(fast_profiler, monkeypatch)

    def latest_sampled(study, finetune, teacher, window):
        trials = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        screened = [t for t in trials if not {Key.RECIPE, Key.CONTINUE_FROM, Key.DUPLICATE_OF} & t.user_attrs.keys()]
        promoted = {t.user_attrs.get(Key.CONTINUE_FROM) for t in trials}
        return next((t for t in reversed(screened) if t.number not in promoted), None)

    monkeypatch.setattr("search.study._promote.next_promotion", latest_sampled)
    study = search.run(
        tiny_task, trials=12, budget="10x", profiler=fast_profiler, results_dir=tmp_path, sensitivity=False,
        cost_model=False, finetune=Finetune(steps=4, eval_every=2, rungs=2, reduction=2),
    )  # fmt: skip
    trials = study.get_trials(deepcopy=False)
    promotions = [t for t in trials if Key.CONTINUE_FROM in t.user_attrs and Key.RECIPE not in t.user_attrs]
    assert promotions and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    for child in promotions:
        parent = trials[child.user_attrs[Key.CONTINUE_FROM]]
        assert not [name for name in parent.params if name.endswith(".bits")]
        assert child.user_attrs[Key.PLAN] == parent.user_attrs[Key.PLAN] and child.params == parent.params
