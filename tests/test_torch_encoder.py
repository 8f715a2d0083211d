"""PyTorch's own ``nn.TransformerEncoder`` is searched as a Transformer: its blocks are found, the
FFN (``linear1``) is pruned and blocks are dropped, and a study's recipes are the Transformer's
(uniform FFN pruning, fewer blocks), not a CNN's widths. (torchvision's ViT: test_decoders_and_vit.py.)"""

from __future__ import annotations

import warnings
from collections import OrderedDict

import optuna
import pytest
import torch
from graphs import int8_slower
from models import SignalEncoder, example_input, sign_classes
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import search
from search import Finetune, Task
from search._errors import UsageError
from search.compress import apply_plan, drop_blocks
from search.model import EncoderBlocks, describe_layers, find_blocks
from search.plan import ChannelPruning, Depth, LayerPlan, Plan, SearchSpace, suggest_plan
from search.study._recipes import users_know

FFN = [f"encoder.layers.{i}.linear1" for i in range(3)]


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return SignalEncoder().eval()


def test_its_blocks_and_ffn_are_found_and_no_heads_are_offered(encoder):
    assert find_blocks(encoder) == EncoderBlocks("encoder.layers", 3, {}, dict.fromkeys(FFN, 32))


def test_an_encoder_decoder_and_blocks_not_named_by_index_are_searched_layer_by_layer():
    assert find_blocks(nn.Transformer(16, 2, 2, 2, 32, batch_first=True)) is None  # two block lists
    named = SignalEncoder()
    named.encoder.layers = nn.Sequential(OrderedDict(zip("abc", named.encoder.layers)))  # a plan could not rename them
    assert find_blocks(named) is None
    with pytest.raises(UsageError, match="'encoder.layers' is not an nn.ModuleList of blocks"):
        drop_blocks(named, "encoder.layers", [0, 2])


def test_a_plan_prunes_its_ffn_and_drops_blocks(encoder):
    x = example_input(encoder, batch=2)
    plan = Plan(layers={FFN[2]: LayerPlan(ChannelPruning(0.5))}, depth=Depth("encoder.layers", (0, 2)))
    student = apply_plan(encoder, plan, example_input(encoder))
    blocks = student.encoder.layers
    assert len(blocks) == 2 and student.encoder.num_layers == 2
    assert blocks[1].linear1.out_features == 16 and blocks[1].linear2.in_features == 16
    assert blocks[0].linear1.out_features == 32 and blocks[0].self_attn.embed_dim == 16
    assert student(x).shape == (2, 4)
    assert len(encoder.encoder.layers) == 3 and encoder.encoder.num_layers == 3  # the teacher is untouched


@pytest.mark.parametrize("plan", [Plan(layers={FFN[0]: LayerPlan(ChannelPruning(0.5))}), Plan(width=0.5)])
def test_a_position_table_prints_no_warning_each_trial(plan):
    """Torch-Pruning warns of a parameter outside a layer on every trace; it prunes the table along
    the hidden size, as it should (a width's student), so the search prints nothing of it."""
    model = SignalEncoder().eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layers = describe_layers(model, example_input(model))
        student = apply_plan(model, plan, example_input(model))
    assert layers and not [w for w in caught if "Unwrapped parameters" in str(w.message)]
    assert student.position.shape[-1] == student.embed.out_channels == 16 * plan.width


def test_the_space_samples_depth_and_ffn_pruning_not_a_width(encoder):
    layers = describe_layers(encoder, example_input(encoder))
    study = optuna.create_study()
    plan = suggest_plan(study.ask(), SearchSpace(), layers, find_blocks(encoder))
    names = study.trials[0].params
    assert "depth" in names and "width" not in names and plan.width == 1.0
    assert {n.rpartition(".")[0] for n in names if n.endswith(".pruning")} == set(FFN) & set(plan.layers)


def _task(model: nn.Module) -> Task:
    generator = torch.Generator().manual_seed(0)
    signals = torch.randn(256, *SignalEncoder.input_shape[1:], generator=generator)
    labels = sign_classes(signals)
    data = TensorDataset(signals, labels)
    return Task(model, DataLoader(data, batch_size=32), DataLoader(data, batch_size=128), signals[:1], name="encoder")


def test_a_study_runs_the_transformer_recipes(encoder, fast_profiler, tmp_path):
    quick = dict(finetune=Finetune(steps=2), pruner="none", cost_model=False, sensitivity=False)
    study = search.run(_task(encoder), trials=6, profiler=fast_profiler, results_dir=tmp_path, **quick)
    frame = search.load_trials(study)
    assert list(frame["recipe"]) == ["int8 everywhere", "prune 0.25", "prune 0.5", "2 of 3 blocks",
                                     "int8 on prune 0.25", "int8 on prune 0.5"]  # fmt: skip
    assert (frame["state"] == "COMPLETE").all()
    plans = {t.user_attrs["recipe"]: Plan.from_dict(t.user_attrs["plan"]) for t in study.trials}
    assert len(plans["2 of 3 blocks"].depth.keep) == 2
    pruned = {name for name, entry in plans["prune 0.5"].layers.items() if entry.pruning.ratio}
    assert pruned == set(FFN)  # the FFN only: a CNN's uniform pruning would shrink the hidden size too


def test_after_a_slower_int8_recipe_each_ffn_pruning_runs_on_the_smaller_student(
    encoder, fast_profiler, tmp_path, monkeypatch
):
    """In place of the structural recipes at int8, which then build their float recipes again."""
    int8_slower(fast_profiler, monkeypatch)
    quick = dict(finetune=Finetune(steps=2), pruner="none", cost_model=False, sensitivity=False)
    study = search.run(_task(encoder), trials=10, profiler=fast_profiler, results_dir=tmp_path, **quick)
    names = [t.user_attrs.get("recipe") for t in study.trials]
    assert names[4:9] == ["int8 on prune 0.25", "int8 on prune 0.5", "int8 on 2 of 3 blocks",
                          "prune 0.25 on 2 of 3 blocks", "prune 0.5 on 2 of 3 blocks"]  # fmt: skip
    assert names[9] is None and all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    for trial in study.trials[7:9]:
        plan = Plan.from_dict(trial.user_attrs["plan"])
        ratio = float(trial.user_attrs["recipe"].split()[1])
        assert len(plan.depth.keep) == 2 and {e.quantization.bits for e in plan.layers.values()} == {32}
        kept = {name for name in FFN if plan.depth.rename(name) is not None}
        assert {n for n, e in plan.layers.items() if e.pruning.ratio} == kept
        assert {e.pruning.ratio for n, e in plan.layers.items() if n in kept} == {ratio}
        assert not users_know(trial) and "duplicate_of" not in trial.user_attrs  # the study's own, each run


def test_search_show_has_a_row_for_each_packed_projection_at_its_out_proj_bits(encoder, fast_profiler, tmp_path):
    quick = dict(finetune=Finetune(steps=2), pruner="none", cost_model=False, sensitivity=False)
    study = search.run(_task(encoder), trials=1, profiler=fast_profiler, results_dir=tmp_path, **quick)
    baseline = study.user_attrs["baseline"]
    in_proj = [f"encoder.layers.{i}.self_attn.in_proj" for i in range(3)]
    assert baseline["packed_projections"] == {name: name.replace("in_proj", "out_proj") for name in in_proj}
    channels = list(baseline["channels"])
    assert channels.index(in_proj[0]) + 1 == channels.index("encoder.layers.0.self_attn.out_proj")  # in its block
    rows = search.load_layers(study, 0).set_index("layer")  # int8 everywhere
    assert study.trials[0].user_attrs["recipe"] == "int8 everywhere"
    assert list(rows.loc[in_proj, "bits"]) == [8] * 3 and list(rows.loc[in_proj, "precision"]) == ["int8"] * 3
    assert set(rows.loc[in_proj, "part"]) == {"attention"} and list(rows.loc[in_proj, "channels_before"]) == [48] * 3
