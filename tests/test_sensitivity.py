"""Layer sensitivity: one layer compressed at a time, no fine-tune; what a study does with it."""

from __future__ import annotations

import math
import time

import pytest
import torch
from optuna.trial import TrialState
from typer.testing import CliRunner

import search
from search.artifacts import OnnxModule
from search.compress import Finetune, apply_plan
from search.model import EncoderBlocks, describe_blocks, describe_layers
from search.plan import ChannelPruning, Depth, LayerPlan, Plan, SearchSpace, kept_blocks
from search.study import METRIC_WINDOW, layer_sensitivity
from search.study._sensitivity import block_drops, excluded_bits, mixed_rules
from targets import load_target


def _expected(task, space: SearchSpace) -> set[tuple[str, str]]:
    rows = set()
    for layer in describe_layers(task.model, task.example_input):
        bits = [b for b in space.bits if b < 32 and (not layer.edge or b >= space.edge_min_bits)]
        rows |= {(layer.name, f"bits={b}") for b in bits}
        if layer.prunable:
            rows |= {(layer.name, f"pruning={r:g}") for r in space.pruning if r > 0}
    return rows


def _sensitivity(task, **options) -> list[dict]:
    """The pass as a study makes it, on the cpu target, with the teacher's metric 0.9."""
    layers = describe_layers(task.model, task.example_input)
    return layer_sensitivity(task, layers, SearchSpace(), None, load_target("cpu"), 0.9, **options)


def test_the_sensitivity_table_has_one_row_per_layer_and_option(tiny_task):
    rows = _sensitivity(tiny_task)
    assert sorted((r["layer"], r["option"]) for r in rows) == sorted(_expected(tiny_task, SearchSpace()))
    for row in rows:
        assert row["error"] is None and 0.0 <= row["metric"] <= 1.0
        assert row["drop"] == pytest.approx(0.9 - row["metric"])  # from the teacher's metric it is given
    eight = {r["layer"]: r["drop"] for r in rows if r["option"] == "bits=8"}
    one = {r["layer"]: r["drop"] for r in rows if r["option"] == "bits=1"}
    assert all(one[name] >= eight[name] - 0.02 for name in one)  # a binarized layer costs more than an int8 one


ROWS = [
    {"layer": "a", "kind": "Conv2d", "option": "bits=8", "bits": 8, "pruning": 0.0, "drop": 0.001, "error": None},
    {"layer": "a", "kind": "Conv2d", "option": "bits=4", "bits": 4, "pruning": 0.0, "drop": 0.001, "error": None},
    {"layer": "a", "kind": "Conv2d", "option": "bits=1", "bits": 1, "pruning": 0.0, "drop": 0.5, "error": None},
    {"layer": "b", "kind": "Conv2d", "option": "bits=8", "bits": 8, "pruning": 0.0, "drop": 0.01, "error": None},
    {"layer": "b", "kind": "Conv2d", "option": "bits=4", "bits": 4, "pruning": 0.0, "drop": 0.05, "error": None},
    {"layer": "a", "kind": "Conv2d", "option": "pruning=0.25", "bits": 32, "pruning": 0.25, "drop": 0.3, "error": None},
    {"layer": "a", "kind": "Conv2d", "option": "pruning=0.5", "bits": 32, "pruning": 0.5, "drop": 0.6, "error": None},
    {"layer": "b", "kind": "Conv2d", "option": "pruning=0.25", "bits": 32, "pruning": 0.25, "drop": 0.05, "error": None},
    {"layer": "b", "kind": "Conv2d", "option": "pruning=0.5", "bits": 32, "pruning": 0.5, "drop": 0.2, "error": None},
]


def _block_row(index: int, drop: float, error: str | None = None) -> dict:
    return {"layer": f"blocks.{index}", "kind": "block", "option": "drop", "bits": 32, "pruning": 0.0,
            "drop": drop, "error": error}  # fmt: skip


def test_a_bit_width_that_alone_drops_the_metric_out_of_the_window_is_not_offered():
    assert excluded_bits(ROWS) == {"a.bits": [1]}  # pruning is never ruled out, however it drops
    assert excluded_bits([*ROWS, _block_row(0, 0.5)]) == {"a.bits": [1]}  # nor is a block's float
    assert METRIC_WINDOW == 0.1


def test_the_drops_of_every_block_or_none():
    blocks = EncoderBlocks("blocks", 3, {}, {})
    rows = [*ROWS, _block_row(0, 0.2), _block_row(1, 0.05), _block_row(2, 0.4)]
    assert block_drops(rows, blocks) == (0.2, 0.05, 0.4)
    assert block_drops(rows[:-1], blocks) is None  # a pass cut short: blocks stay evenly spread
    assert block_drops([*rows[:-1], _block_row(2, math.nan, error="could not build")], blocks) is None
    assert block_drops(rows, None) is None and block_drops([], blocks) is None


def _bert_task():
    """A 4-block BERT embedding task; its space: half the blocks or all, heads, int8 on one layer."""
    pytest.importorskip("transformers", reason="a Transformer's blocks need transformers")
    from models import BertSentences, text_task

    torch.manual_seed(0)
    space = SearchSpace(
        bits=(32, 8), pruning=(0.0,), heads=(0.0, 0.5), sparsity=(0.0,), two_four=False, depth=(1.0, 0.5),
        layers=("bert.pooler.dense",),
    )  # fmt: skip
    return text_task(BertSentences().eval(), "tiny-bert"), space


def test_a_transformer_s_blocks_are_scored_first_each_removed_alone():
    task, space = _bert_task()
    layers, blocks = describe_layers(task.model, task.example_input), describe_blocks(task.model)
    rows = layer_sensitivity(task, layers, space, blocks, load_target("cpu"), 1.0)
    names = [f"bert.encoder.layer.{index}" for index in range(4)]
    assert [(r["layer"], r["kind"], r["option"]) for r in rows] == [
        *[(name, "block", "drop") for name in names], ("bert.pooler.dense", "Linear", "bits=8")
    ]
    for index, row in enumerate(rows[:4]):  # the teacher without that one block
        plan = Plan(depth=Depth(blocks.container, tuple(i for i in range(4) if i != index)))
        assert row["metric"] == pytest.approx(task.score(apply_plan(task.model, plan, task.example_input)), abs=1e-3)
        assert row["drop"] == pytest.approx(1.0 - row["metric"]) and row["error"] is None
    assert block_drops(rows, blocks) == tuple(row["drop"] for row in rows[:4])
    assert len({round(row["drop"], 3) for row in rows[:4]}) > 1  # the blocks are told apart
    every_block_kept = layer_sensitivity(task, layers, space.replace(depth=(1.0,)), blocks, load_target("cpu"), 1.0)
    assert [row["kind"] for row in every_block_kept] == ["Linear"]


def test_a_study_s_students_keep_the_blocks_whose_removal_costs_most(fast_profiler, tmp_path):
    task, space = _bert_task()
    study = search.run(
        task, trials=2, space=space, profiler=fast_profiler, results_dir=tmp_path, finetune=Finetune(steps=2),
        pruner="none", cost_model=False,
    )  # fmt: skip
    drops = {row["layer"]: row["drop"] for row in study.user_attrs["sensitivity"] if row["kind"] == "block"}
    costliest = sorted(sorted(drops, key=drops.get, reverse=True)[:2])
    (student,) = [trial for trial in study.trials if trial.params.get("depth") == 2]
    assert student.user_attrs["recipe"] == "2 of 4 blocks" and student.state == TrialState.COMPLETE
    kept = Plan.from_dict(student.user_attrs["plan"]).depth.keep
    assert [f"bert.encoder.layer.{index}" for index in kept] == costliest
    # queued with the kept blocks' parameters: every head stays, none sampled
    assert student.params.items() <= student.system_attrs["fixed_params"].items()
    assert {name for name in student.params if name.endswith(".heads")} == {
        f"bert.encoder.layer.{index}.attention.self.heads" for index in kept
    }
    assert not any(student.params[name] for name in student.params if name.endswith(".heads"))
    assert kept != kept_blocks(4, 2)  # evenly spread: 0 and 3, which these drops do not rank first
    frame = search.load_sensitivity(study)
    assert sorted(frame[frame["kind"] == "block"]["layer"]) == sorted(drops) and not frame["excluded"].any()
    from search import cli

    output = CliRunner().invoke(cli.app, ["results", str(tmp_path / study.study_name), "--sensitivity"]).output
    assert "a student keeps the blocks whose removal costs most" in output
    assert all(f"bert.encoder.layer.{index} " in output for index in range(4)), output


def test_the_mixed_recipes_spend_bits_and_pruning_where_they_cost_least():
    """Pruning drops 0.05, 0.2, 0.3, 0.6: the mixes tolerate their quartiles, 0.16, 0.25, 0.38."""
    rules = mixed_rules(ROWS)
    assert list(rules) == ["sensitivity mix (mild)", "sensitivity mix (medium)", "sensitivity mix (strong)"]
    pruning = {level: (rule("a.pruning", [0.0, 0.25, 0.5]), rule("b.pruning", [0.0, 0.25, 0.5])) for level, rule in rules.items()}
    assert list(pruning.values()) == [(0.0, 0.25), (0.0, 0.5), (0.25, 0.5)]
    mild = rules["sensitivity mix (mild)"]
    assert mild("a.bits", [32, 8, 4, 1]) == 8 and mild("b.bits", [32, 4]) == 32
    assert mild("width", [1.0, 0.5]) == 1.0 and mild("a.sparsity", [0.0, 0.5]) == 0.0
    assert mixed_rules([]) == {}


def test_a_study_records_the_sensitivity_prints_it_and_seeds_a_recipe(tiny_task, fast_profiler, tmp_path):
    told = []
    study = search.run(
        tiny_task, trials=6, profiler=fast_profiler, results_dir=tmp_path, finetune=Finetune(steps=2),
        pruner="none", cost_model=False, on_setup=told.append,
    )  # fmt: skip
    frame = search.load_sensitivity(tmp_path / study.study_name)
    assert sorted(zip(frame["layer"], frame["option"])) == sorted(_expected(tiny_task, SearchSpace()))
    # what the run prepared before its first trial, in order: a command line's status shows it
    rows = study.user_attrs["sensitivity"]  # in the pass's order
    assert told[0] == "measuring the uncompressed teacher on cpu" and told[1].startswith("choosing the fine-tune's")
    assert told[2].startswith("measuring the teacher's activity")
    assert told[3:] == [f"layer sensitivity: option {n} of {len(rows)}, {row['layer']}: {row['option']}"
                        for n, row in enumerate(rows, 1)]  # fmt: skip
    assert "excluded" in frame and all(math.isfinite(v) for v in frame["metric"])
    assert study.trials[5].user_attrs.get("recipe", "").startswith("sensitivity mix")
    from search import cli

    output = CliRunner().invoke(cli.app, ["results", str(tmp_path / study.study_name), "--sensitivity"]).output
    assert all(name in output for name in ("conv1", "conv2", "conv3", "fc", "bits=8", "pruning=0.5", "torch"))


def test_the_pass_has_its_share_of_the_timeout_after_the_teacher_s_activity_is_measured(
    tiny_task, fast_profiler, tmp_path, monkeypatch
):
    """The activity every plan's build needs is not taken out of the pass's tenth: measured in more
    than that tenth (here 7 s of a 60 s run), it leaves the pass its 6 s all the same."""
    measure, measured = tiny_task.activity, []

    def slow():  # the first call measures, the others read what it measured
        if not measured:
            time.sleep(7)
            measured.append(True)
        return measure()

    monkeypatch.setattr(tiny_task, "activity", slow)
    study = search.run(
        tiny_task, trials=1, timeout=60, profiler=fast_profiler, results_dir=tmp_path, finetune=Finetune(steps=2),
        pruner="none", cost_model=False, recipes=False,
    )  # fmt: skip
    assert len(study.user_attrs["sensitivity"]) >= 3


def test_the_pass_goes_breadth_first_every_layers_mildest_pruning_before_any_stronger_option(tiny_task):
    rows = _sensitivity(tiny_task)
    order = [layer.name for layer in describe_layers(tiny_task.model, tiny_task.example_input)]
    groups = [(r["pruning"] == 0, r["pruning"], -r["bits"]) for r in rows]
    assert groups == sorted(groups) and groups[0] == (False, 0.25, -32) and groups[-1] == (True, 0.0, -1)
    for group in set(groups):  # within one option, the layers in the model's order
        names = [r["layer"] for r, g in zip(rows, groups) if g == group]
        assert names == sorted(names, key=order.index)
    assert len({r["layer"] for r in rows if r["pruning"] > 0}) > 1


def test_each_kind_of_option_is_scored_on_its_file_and_in_torch_first_then_the_faster_way(tiny_task, monkeypatch):
    """Each row says truly where it was scored: one score per option, an ONNX model when on its file."""
    on_file, score = [], tiny_task.score

    def recorded(model):
        on_file.append(isinstance(model, OnnxModule))
        return score(model)

    monkeypatch.setattr(tiny_task, "score", recorded)
    rows = _sensitivity(tiny_task)
    assert [row["scored_on"] == "file" for row in rows] == on_file
    for pruned in (True, False):  # each kind times both ways, the file first
        assert [row["scored_on"] for row in rows if (row["pruning"] > 0) == pruned][:2] == ["file", "torch"]
    first = next(row for row in rows if row["pruning"] > 0)  # a float plan: the file scores as PyTorch does
    plan = Plan(layers={first["layer"]: LayerPlan(pruning=ChannelPruning(first["pruning"]))})
    candidate = apply_plan(tiny_task.model, plan, tiny_task.example_input, tiny_task.activity())
    assert first["scored_on"] == "file" and first["metric"] == pytest.approx(score(candidate), abs=0.005)  # a sample or so
