"""Transformer plans end to end below the study: plan entries, the search space, the transforms, and
the ONNX files ONNX Runtime runs. Each test fails if a technique is silently skipped."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import optuna
import pytest
import torch
from optuna.trial import FixedTrial

os.environ["HF_HUB_OFFLINE"] = "1"
pytest.importorskip("transformers", reason="the Transformer plans need transformers")

from graphs import initializer_shapes, optimized_ops  # noqa: E402
from models import text_inputs, tiny_bert  # noqa: E402

from profilers import disabled_optimizers  # noqa: E402
from search.compress import Finetune, distill  # noqa: E402
from search._errors import UsageError  # noqa: E402
from search.artifacts import OnnxModule, export_candidate, weight_name  # noqa: E402
from search.model import describe_layers  # noqa: E402
from search.plan import (  # noqa: E402
    ChannelPruning,
    Depth,
    HeadPruning,
    LayerPlan,
    Plan,
    Quantization,
    WeightSparsity,
)
from search.compress import bake  # noqa: E402
from search.compress import packed_size_bytes  # noqa: E402
from search.plan import SearchSpace, kept_blocks, suggest_plan  # noqa: E402
from search.model import describe_blocks  # noqa: E402
from search.compress import apply_plan, build_structure  # noqa: E402

CPU = ("fp32", "int8", "int4-weight-only")
LAYER = "encoder.layer"


class Hidden(torch.nn.Module):
    """tiny_bert's last hidden state as one tensor (the graph's output)."""

    def __init__(self, layers: int = 4) -> None:
        super().__init__()
        self.bert = tiny_bert(layers)

    def forward(self, input_ids, attention_mask):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


@pytest.fixture(scope="module")
def teacher() -> torch.nn.Module:
    torch.manual_seed(0)
    return Hidden().eval()


def _block(i: int, rest: str = "") -> str:
    return f"bert.{LAYER}.{i}{rest}"


def _export(tmp_path, model, plan, name="model.onnx"):
    bake(model).eval()
    return export_candidate(
        model, text_inputs(1), tmp_path / name, plan=plan, precisions=CPU, calibration=[(text_inputs(8), None)]
    )


# ---- plan entries --------------------------------------------------------------------------------


def test_depth_renames_the_teachers_modules_to_the_students():
    depth = Depth("bert.encoder.layer", (0, 2, 5))
    assert depth.rename("bert.encoder.layer.2.output.dense") == "bert.encoder.layer.1.output.dense"
    assert depth.rename("bert.encoder.layer.5.attention.self") == "bert.encoder.layer.2.attention.self"
    assert depth.rename("bert.encoder.layer.1.output.dense") is None
    assert depth.rename("bert.encoder.layer.10.output.dense") is None  # not block 1
    assert depth.rename("bert.embeddings") == "bert.embeddings"


def test_student_plan_drops_and_renumbers_entries():
    int8 = LayerPlan(quantization=Quantization(8))
    plan = Plan(
        layers={_block(0, ".output.dense"): int8, _block(1, ".output.dense"): int8, _block(3, ".output.dense"): int8},
        heads={_block(3, ".attention.self"): HeadPruning(0.5)},
        depth=Depth(f"bert.{LAYER}", (0, 3)),
    )
    student = plan.student()
    assert student.depth is None
    assert set(student.layers) == {_block(0, ".output.dense"), _block(1, ".output.dense")}
    assert student.heads == {_block(1, ".attention.self"): HeadPruning(0.5)}
    assert student.student() == student


def test_transformer_plan_round_trips_through_json():
    plan = Plan(
        layers={_block(0, ".intermediate.dense"): LayerPlan(ChannelPruning(0.5), quantization=Quantization(4))},
        heads={_block(0, ".attention.self"): HeadPruning(0.25)},
        depth=Depth(f"bert.{LAYER}", (0, 2)),
    )
    back = Plan.from_json(plan.to_json())
    assert back == plan and back.depth.keep == (0, 2)
    assert json.loads(plan.to_json())["depth"] == {"_type": "Depth", "container": f"bert.{LAYER}", "keep": [0, 2]}


@pytest.mark.parametrize("keep", [(), (2, 1), (1, 1), (-1,)])
def test_bad_depths_are_refused(keep):
    with pytest.raises(ValueError, match="increasing indices"):
        Depth("x", keep)


@pytest.mark.parametrize("ratio", [-0.1, 1.0])
def test_bad_head_ratios_are_refused(ratio):
    with pytest.raises(ValueError, match="head pruning ratio"):
        HeadPruning(ratio)


# ---- search space -------------------------------------------------------------------------------


def test_kept_blocks_are_spread_from_first_to_last():
    assert kept_blocks(6, 6) == (0, 1, 2, 3, 4, 5)
    assert kept_blocks(6, 3) == (0, 2, 5)
    assert kept_blocks(6, 1) == (0,)
    assert kept_blocks(4, 2) == (0, 3)


def test_given_what_removing_each_costs_the_costliest_blocks_are_kept():
    """MiniLM's measured drops at 32 tokens: 3 of 6 blocks so keep 0.77 cosine, evenly spread 0.67."""
    drops = (0.1913, 0.0624, 0.0594, 0.0757, 0.1499, 0.5444)
    assert kept_blocks(6, 3, drops) == (0, 4, 5)
    assert kept_blocks(6, 4, drops) == (0, 3, 4, 5)
    assert kept_blocks(6, 1, drops) == (5,)
    assert kept_blocks(4, 2, (0.1, 0.1, 0.1, 0.0)) == (0, 1)  # of two that cost the same, the earlier


def test_a_sampled_student_keeps_the_blocks_the_drops_rank_costliest(teacher):
    layers, blocks = describe_layers(teacher, text_inputs()), describe_blocks(teacher)
    space = SearchSpace(depth=(0.5,), heads=(0.0,), pruning=(0.0,), sparsity=(0.0,), bits=(32,), two_four=False)
    plan = suggest_plan(optuna.create_study().ask(), space, layers, blocks, drops=(0.3, 0.1, 0.2, 0.05))
    assert plan.depth == Depth(f"bert.{LAYER}", (0, 2))
    assert set(plan.layers) == {layer.name for layer in layers if not layer.name.startswith((_block(1), _block(3)))}


def test_transformer_space_samples_depth_heads_ffn_and_linear_bits(teacher):
    layers = describe_layers(teacher, text_inputs())
    blocks = describe_blocks(teacher)
    trial = optuna.create_study().ask()
    plan = suggest_plan(trial, SearchSpace(), layers, blocks)
    assert "width" not in trial.params and trial.params["depth"] in (4, 3, 2)
    kept = plan.depth.keep if plan.depth else range(4)
    assert set(plan.heads) == {_block(i, ".attention.self") for i in kept}
    assert {name.rsplit(".pruning")[0] for name in trial.params if name.endswith(".pruning")} == {
        _block(i, ".intermediate.dense") for i in kept
    }
    assert set(plan.layers) == {layer.name for layer in layers if plan.student() is plan or plan.depth.rename(layer.name)}


def test_transformer_space_offers_no_one_bit_and_prunes_only_ffn_channels(teacher):
    layers = describe_layers(teacher, text_inputs())
    blocks = describe_blocks(teacher)
    params, study = {}, optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(30):
        trial = study.ask()
        suggest_plan(trial, SearchSpace(), layers, blocks)
        params.update({k: params.get(k, set()) | {v} for k, v in trial.params.items()})
    assert all(1 not in values for name, values in params.items() if name.endswith(".bits"))
    assert params["depth"] == {4, 3, 2}
    assert all(".intermediate.dense" in name for name in params if name.endswith(".pruning"))


def test_a_fixed_transformer_trial_builds_the_expected_plan(teacher):
    layers = describe_layers(teacher, text_inputs())
    values = {"depth": 2, _block(0, ".attention.self.heads"): 0.5, _block(3, ".attention.self.heads"): 0.0}
    for layer in layers:
        if layer.name.startswith((_block(0), _block(3), "bert.pooler")):
            values[f"{layer.name}.bits"] = 8
            values[f"{layer.name}.sparsity"] = 0.0
            if layer.name.endswith("intermediate.dense"):
                values[f"{layer.name}.pruning"] = 0.25
    plan = suggest_plan(FixedTrial(values), SearchSpace(), layers, describe_blocks(teacher))
    assert plan.depth == Depth(f"bert.{LAYER}", (0, 3))
    assert plan.heads == {_block(0, ".attention.self"): HeadPruning(0.5), _block(3, ".attention.self"): HeadPruning(0.0)}
    assert plan.layer(_block(3, ".intermediate.dense")) == LayerPlan(ChannelPruning(0.25), quantization=Quantization(8))
    assert plan.width == 1.0


# ---- transforms ---------------------------------------------------------------------------------


def test_apply_plan_prunes_heads_ffn_and_drops_blocks(teacher):
    plan = Plan(
        layers={_block(2, ".intermediate.dense"): LayerPlan(ChannelPruning(0.5))},
        heads={_block(2, ".attention.self"): HeadPruning(0.5), _block(0, ".attention.self"): HeadPruning(0.25)},
        depth=Depth(f"bert.{LAYER}", (0, 2)),
    )
    student = apply_plan(teacher, plan, text_inputs())
    blocks = student.bert.encoder.layer
    assert len(blocks) == 2 and student.bert.config.num_hidden_layers == 2
    assert blocks[0].attention.self.num_attention_heads == 3 and blocks[0].attention.self.query.out_features == 48
    assert blocks[1].attention.self.num_attention_heads == 2 and blocks[1].attention.self.key.out_features == 32
    assert blocks[1].intermediate.dense.out_features == 64 and blocks[1].output.dense.in_features == 64
    assert blocks[0].intermediate.dense.out_features == 128
    assert student(**text_inputs(2)).shape == (2, 16, 64)
    assert len(teacher.bert.encoder.layer) == 4  # the teacher is untouched


def test_sparsity_and_bits_follow_their_block_when_blocks_are_dropped(teacher):
    plan = Plan(
        layers={
            _block(3, ".output.dense"): LayerPlan(sparsity=WeightSparsity(0.5), quantization=Quantization(8)),
            _block(1, ".output.dense"): LayerPlan(quantization=Quantization(8)),  # block 1 is dropped
        },
        depth=Depth(f"bert.{LAYER}", (0, 3)),
    )
    student = apply_plan(teacher, plan, text_inputs())
    kept = student.bert.encoder.layer[1].output.dense  # the teacher's block 3
    assert float((kept.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    assert hasattr(kept, "input_quant")
    assert not hasattr(student.bert.encoder.layer[0].output.dense, "input_quant")
    size = packed_size_bytes(student, plan)
    assert size < packed_size_bytes(apply_plan(teacher, Plan(depth=plan.depth), text_inputs()), Plan(depth=plan.depth))


def test_channel_pruning_of_attention_projections_is_refused(teacher):
    plan = Plan(layers={_block(0, ".attention.self.query"): LayerPlan(ChannelPruning(0.5))})
    with pytest.raises(UsageError, match="FFN intermediate layers only.*query: attention shrinks by whole heads"):
        apply_plan(teacher, plan, text_inputs())


def test_embedding_distillation_loss_decreases(teacher):
    torch.manual_seed(0)
    plan = Plan(
        layers={_block(i, ".intermediate.dense"): LayerPlan(ChannelPruning(0.5)) for i in range(4)},
        heads={_block(i, ".attention.self"): HeadPruning(0.5) for i in range(4)},
    )
    student = apply_plan(teacher, plan, text_inputs())
    batches = [(text_inputs(16, seed=s), None) for s in range(4)]
    losses = distill(student, teacher, batches, Finetune(steps=40, lr=1e-3), loss="cosine")
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])


# ---- export: what ONNX Runtime runs -------------------------------------------------------------


def test_pruned_heads_ffn_and_dropped_blocks_show_in_the_onnx(tmp_path, teacher):
    plan = Plan(
        layers={_block(3, ".intermediate.dense"): LayerPlan(ChannelPruning(0.5))},
        heads={_block(3, ".attention.self"): HeadPruning(0.5)},
        depth=Depth(f"bert.{LAYER}", (0, 3)),
    )
    student = apply_plan(teacher, plan, text_inputs())
    exported = _export(tmp_path, student, plan)
    weights = initializer_shapes(exported.path)
    q1, q0 = weight_name(weights, _block(1, ".attention.self.query")), weight_name(weights, _block(0, ".attention.self.query"))
    assert weights[q1] == (64, 32) and weights[q0] == (64, 64)  # MatMul by W^T: (in, out)
    assert weights[weight_name(weights, _block(1, ".intermediate.dense"))] == (64, 64)
    assert weights[weight_name(weights, _block(0, ".intermediate.dense"))] == (64, 128)
    assert not any(name.startswith((_block(2), _block(3))) for name in weights)  # only 2 blocks
    x = text_inputs(4, seed=3)
    with torch.no_grad():
        np.testing.assert_allclose(OnnxModule(exported.path)(**x).numpy(), student(**x).numpy(), atol=1e-4)


def test_int8_linears_run_as_integer_matmuls_and_int4_as_matmulnbits(tmp_path, teacher):
    int8 = [_block(0, ".attention.self.query"), _block(0, ".intermediate.dense"), _block(1, ".output.dense")]
    int4 = [_block(2, ".intermediate.dense"), _block(3, ".output.dense")]
    plan = Plan(
        layers={
            **{name: LayerPlan(quantization=Quantization(8)) for name in int8},
            **{name: LayerPlan(quantization=Quantization(4)) for name in int4},
        }
    )
    student = apply_plan(teacher, plan, text_inputs())
    student.train()
    with torch.no_grad():
        student(**text_inputs(8))  # the input quantizers see data
    exported = _export(tmp_path, student, plan)
    precision = exported.layer_precision
    assert {name for name, p in precision.items() if p == "int8"} == set(int8)
    assert {name for name, p in precision.items() if p == "int4"} == set(int4)
    assert set(precision.values()) == {"fp32", "int8", "int4"}
    ops = optimized_ops(exported.path, tmp_path)
    assert ops["MatMulNBits"] == len(int4)
    assert ops["DynamicQuantizeMatMul"] + ops["MatMulIntegerToFloat"] == len(int8)
    fused = "SkipLayerNormFusion" not in disabled_optimizers()  # unless its kernel is slower on this CPU
    assert (ops["SkipLayerNormalization"] > 0) is fused  # residual add + LayerNorm fused
    nbits = [n for n in onnx.load(str(exported.path)).graph.node if n.op_type == "MatMulNBits"]
    assert all({a.name: a.i for a in n.attribute}["accuracy_level"] == 4 for n in nbits)
    x = text_inputs(4, seed=5)
    with torch.no_grad():
        reference = bake(student)(**x)
    cosine = torch.nn.functional.cosine_similarity(OnnxModule(exported.path)(**x), reference, dim=-1)
    assert cosine.min() > 0.98


def test_a_pruned_and_shortened_checkpoint_reloads_into_the_rebuilt_structure(tmp_path, teacher):
    """The way back to a deployed candidate: re-apply the plan's structure to the teacher and load
    the saved state dict with weights_only=True (from_pretrained cannot load a head-pruned model)."""
    plan = Plan(
        layers={
            _block(3, ".intermediate.dense"): LayerPlan(ChannelPruning(0.25), quantization=Quantization(8)),
            _block(0, ".attention.self.value"): LayerPlan(quantization=Quantization(4)),
        },
        heads={_block(0, ".attention.self"): HeadPruning(0.5)},
        depth=Depth(f"bert.{LAYER}", (0, 1, 3)),
    )
    candidate = bake(apply_plan(teacher, Plan.from_json(plan.to_json()), text_inputs()))
    torch.save({"plan": plan.to_json(), "state_dict": candidate.state_dict()}, tmp_path / "checkpoint.pt")
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    rebuilt = build_structure(teacher, Plan.from_json(saved["plan"]), text_inputs())
    rebuilt.load_state_dict(saved["state_dict"])
    x = text_inputs(3, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(**x), candidate.eval()(**x))
