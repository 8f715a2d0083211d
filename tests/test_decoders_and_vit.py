"""A decoder-only causal LM (Llama-style, from a transformers config) and a ViT (torchvision's
``VisionTransformer``, the class of ``vit_b_16(image_size=...)``, at a tiny size) compress, export and
are measured. Each test fails if a technique is silently skipped.

The causal LM is measured as one forward at a fixed context length (16 tokens, no KV cache): the
graph's output is the logits (``Task.output = lambda out: out.logits``). Its blocks are found from
its ``q_proj``/``k_proj``/``v_proj`` attention; only its gated FFN width and depth are structural
knobs (no head pruning). The ViT's blocks are found from its ``nn.MultiheadAttention`` in the
``nn.Sequential`` that names them by index: its knobs are the same (its FFN is ``mlp.0``).
"""

from __future__ import annotations

import copy
import math
import os

import numpy as np
import onnx
import optuna
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

os.environ["HF_HUB_OFFLINE"] = "1"
pytest.importorskip("transformers", reason="the causal LM needs transformers")

from graphs import initializer_shapes, optimized_ops  # noqa: E402
from models import sign_classes, tiny_llama, tiny_vit  # noqa: E402

import search  # noqa: E402
from search import Finetune, Task  # noqa: E402
from search._errors import CandidateError, UsageError  # noqa: E402
from search.model import call  # noqa: E402
from search.artifacts import OnnxModule, export_candidate, export_float, weight_name  # noqa: E402
from search.model import describe_layers  # noqa: E402
from search.plan import ChannelPruning, Depth, HeadPruning, LayerPlan, Plan, Quantization  # noqa: E402
from search.compress import bake  # noqa: E402
from search.plan import SearchSpace, suggest_plan  # noqa: E402
from search.compress import channel_activity, drop_blocks, prune_heads_and_ffn  # noqa: E402
from search.model import EncoderBlocks, find_blocks  # noqa: E402
from search.compress import apply_plan  # noqa: E402

CPU = ("fp32", "int8", "int4-weight-only")
CONTEXT = 16
BLOCKS = "model.layers"
VIT = "encoder.layers.encoder_layer_"
INT8_KERNELS = ("DynamicQuantizeMatMul", "MatMulIntegerToFloat")


def _logits(out) -> torch.Tensor:
    return out.logits


def tokens(batch: int = 1, seed: int = 0, vocab: int = 100) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, vocab, (batch, CONTEXT), generator=generator)}


def images(batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return tiny_llama(4)


@pytest.fixture(scope="module")
def vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return tiny_vit()


def _block(i: int, rest: str = "") -> str:
    return f"{BLOCKS}.{i}{rest}"


def _plan(int8=(), int4=(), pruning=None, depth=None) -> Plan:
    layers = {name: LayerPlan(quantization=Quantization(8)) for name in int8}
    layers |= {name: LayerPlan(quantization=Quantization(4)) for name in int4}
    for name, ratio in (pruning or {}).items():
        layers[name] = LayerPlan(ChannelPruning(ratio), quantization=layers.get(name, LayerPlan()).quantization)
    return Plan(layers=layers, depth=depth)


def _calibrate_and_bake(model, inputs) -> torch.nn.Module:
    model.train()
    with torch.no_grad():  # the input quantizers see data
        call(model, inputs)
    return bake(model).eval()


def _measured(profiler, path) -> float:
    latency = profiler.measure(path).latency_ms
    assert latency > 0 and math.isfinite(latency)
    return latency


# ---- causal LM: blocks, FFN, depth ---------------------------------------------------------------


def test_llama_blocks_are_found_with_their_ffn_and_no_prunable_heads(llama):
    blocks = find_blocks(llama)
    assert blocks.container == BLOCKS and blocks.blocks == 4
    assert blocks.heads == {}  # q_proj/k_proj/v_proj attention locates the blocks, its heads stay whole
    assert blocks.ffn == {_block(i, ".mlp.up_proj"): 128 for i in range(4)}


def test_up_proj_pruning_removes_the_same_channels_of_gate_and_down_proj(llama):
    model = copy.deepcopy(llama)
    mlp = model.model.layers[1].mlp
    with torch.no_grad():  # channels 0..63 are the weakest of the coupled group
        for weight in (mlp.up_proj.weight, mlp.gate_proj.weight, mlp.down_proj.weight.T):
            weight[:64] *= 1e-3
    up, gate, down = (w.detach().clone() for w in (mlp.up_proj.weight, mlp.gate_proj.weight, mlp.down_proj.weight))
    prune_heads_and_ffn(model, tokens(), heads={}, ffn={_block(1, ".mlp.up_proj"): 0.5})
    assert torch.equal(mlp.up_proj.weight, up[64:]) and torch.equal(mlp.gate_proj.weight, gate[64:])
    assert torch.equal(mlp.down_proj.weight, down[:, 64:])
    assert model.model.layers[0].mlp.up_proj.out_features == 128
    assert model.model.layers[1].self_attn.o_proj.weight.shape == (64, 64)  # hidden size untouched
    with torch.no_grad():
        assert model(**tokens(2)).logits.shape == (2, CONTEXT, 100)


def _barely_read(llama):
    """A copy of ``llama`` whose block 1's gated MLP has its largest channels 0..63 (magnitude would
    keep them) read by near-zero down_proj columns; the copy, that MLP, and its up_proj and
    down_proj weights as they were."""
    model = copy.deepcopy(llama)
    mlp = model.model.layers[1].mlp
    with torch.no_grad():
        mlp.up_proj.weight[:64] *= 10
        mlp.gate_proj.weight[:64] *= 10
        mlp.down_proj.weight[:, :64] *= 1e-4
    return model, mlp, mlp.up_proj.weight.detach().clone(), mlp.down_proj.weight.detach().clone()


def test_ranked_by_activity_a_llama_loses_the_channels_its_down_proj_barely_reads(llama):
    """Channels 0..63 of block 1's gated MLP are its largest (magnitude would keep them), but
    down_proj's columns that read them are near zero: ranked by the teacher's activity, they go."""
    model, mlp, up, down = _barely_read(llama)
    activity = channel_activity(model, [(tokens(4), None)])
    # its heads stay whole: only the layers that read the FFN's channels are recorded
    assert set(activity) == {_block(i, ".mlp.down_proj") for i in range(len(model.model.layers))}
    by_magnitude = copy.deepcopy(model)
    prune_heads_and_ffn(model, tokens(), heads={}, ffn={_block(1, ".mlp.up_proj"): 0.5}, activity=activity)
    assert torch.equal(mlp.up_proj.weight, up[64:]) and mlp.down_proj.weight.shape == down[:, 64:].shape
    assert not torch.equal(mlp.down_proj.weight, down[:, 64:])  # refitted to what is left
    prune_heads_and_ffn(by_magnitude, tokens(), heads={}, ffn={_block(1, ".mlp.up_proj"): 0.5})
    assert torch.equal(by_magnitude.model.layers[1].mlp.up_proj.weight, up[:64])


def test_a_reader_too_wide_for_its_moments_is_ranked_by_its_mean_squares_and_not_refitted(llama, monkeypatch):
    """A down_proj wider than the bound (a large decoder's) keeps its inputs' mean squares alone: its
    channels are ranked as before, and it is not refitted (no moments to solve with)."""
    model, mlp, up, down = _barely_read(llama)
    full = channel_activity(model, [(tokens(4), None)])[_block(1, ".mlp.down_proj")]
    monkeypatch.setattr("search.compress._refit.MAX_BLOCK_REFIT_INPUTS", mlp.down_proj.in_features - 1)
    activity = channel_activity(model, [(tokens(4), None)])
    diagonal = activity[_block(1, ".mlp.down_proj")]
    assert diagonal.shape == (mlp.down_proj.in_features + 1,)
    torch.testing.assert_close(diagonal, full.diagonal())
    prune_heads_and_ffn(model, tokens(), heads={}, ffn={_block(1, ".mlp.up_proj"): 0.5}, activity=activity)
    assert torch.equal(mlp.up_proj.weight, up[64:])  # ranked by activity, as with the moments
    assert torch.equal(mlp.down_proj.weight, down[:, 64:])  # its columns for what is left, as they were


def test_drop_blocks_keeps_a_llama_working_and_its_config_in_step(llama):
    model = copy.deepcopy(llama)
    model.config.layer_types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    drop_blocks(model, BLOCKS, [0, 3])
    assert len(model.model.layers) == 2
    assert model.config.num_hidden_layers == model.model.config.num_hidden_layers == 2
    assert model.model.config.layer_types == ["full_attention", "sliding_attention"]
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    kept = model.model.layers[1].state_dict()
    assert all(torch.equal(t, llama.model.layers[3].state_dict()[k]) for k, t in kept.items())
    with torch.no_grad():
        assert model(**tokens(2)).logits.shape == (2, CONTEXT, 100)


def test_llama_head_pruning_and_attention_channel_pruning_are_refused(llama):
    with pytest.raises(UsageError, match="unknown attention module 'model.layers.0.self_attn'; the model's are: none"):
        apply_plan(llama, Plan(heads={_block(0, ".self_attn"): HeadPruning(0.5)}), tokens())
    for layer in (".self_attn.q_proj", ".mlp.gate_proj", ".mlp.down_proj"):
        with pytest.raises(UsageError, match=f"FFN intermediate layers only.*plan prunes model.layers.0{layer}"):
            apply_plan(llama, _plan(pruning={_block(0, layer): 0.5}), tokens())


def test_llama_space_samples_depth_and_up_proj_pruning_only(llama):
    layers, blocks = describe_layers(llama, tokens()), find_blocks(llama)
    params, study = {}, optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(30):
        trial = study.ask()
        suggest_plan(trial, SearchSpace(), layers, blocks)
        params.update({k: params.get(k, set()) | {v} for k, v in trial.params.items()})
    assert "width" not in params and params["depth"] == {4, 3, 2}
    assert not [name for name in params if name.endswith(".heads")]
    assert {name.removesuffix(".pruning") for name in params if name.endswith(".pruning")} == set(blocks.ffn)
    assert all(1 not in values for name, values in params.items() if name.endswith(".bits"))


# ---- causal LM: export and measurement ---------------------------------------------------------


def test_causal_lm_plan_compresses_exports_and_is_measured(tmp_path, llama, fast_profiler):
    int8 = [_block(0, ".self_attn.q_proj"), _block(0, ".mlp.up_proj"), _block(3, ".self_attn.o_proj")]
    int4 = [_block(0, ".mlp.down_proj"), _block(3, ".mlp.gate_proj")]
    plan = _plan(int8, int4, pruning={_block(3, ".mlp.up_proj"): 0.25}, depth=Depth(BLOCKS, (0, 3)))
    student = apply_plan(llama, plan, tokens())
    layers = student.model.layers
    assert len(layers) == 2 and student.config.num_hidden_layers == 2
    assert (layers[1].mlp.up_proj.out_features, layers[1].mlp.gate_proj.out_features) == (96, 96)
    assert layers[1].mlp.down_proj.in_features == 96 and layers[0].mlp.up_proj.out_features == 128
    _calibrate_and_bake(student, tokens(8, seed=1))
    exported = export_candidate(
        student, tokens(), tmp_path / "llama.onnx", plan=plan, precisions=CPU,
        calibration=[(tokens(1, seed=2), None)], output=_logits,
    )  # fmt: skip
    precision = exported.layer_precision
    assert {n for n, p in precision.items() if p == "int8"} == set(map(_renamed(plan), int8))
    assert {n for n, p in precision.items() if p == "int4"} == set(map(_renamed(plan), int4))
    weights = initializer_shapes(exported.path)
    assert not [name for name in weights if name.startswith((_block(2), _block(3)))]  # 2 blocks left
    assert weights[weight_name(weights, _block(1, ".mlp.up_proj"))] == (64, 96)  # MatMul by W^T: (in, out)
    assert weights[weight_name(weights, _block(1, ".mlp.down_proj"))] == (96, 64)
    assert weights[_block(1, ".mlp.gate_proj.weight.T_Q4")][0] == 96  # int4 packed: (out, blocks, bytes)
    assert weights[_block(0, ".mlp.up_proj.weight.T_quantized")] == (64, 128)
    assert weights[weight_name(weights, _block(0, ".mlp.gate_proj"))] == (64, 128)
    ops = optimized_ops(exported.path, tmp_path)
    assert ops["MatMulNBits"] == len(int4)
    assert sum(ops[op] for op in INT8_KERNELS) == len(int8)
    x = tokens(1, seed=5)
    with torch.no_grad():
        reference = student(**x).logits
    cosine = torch.nn.functional.cosine_similarity(OnnxModule(exported.path)(**x), reference, dim=-1)
    assert cosine.min() > 0.98
    _measured(fast_profiler, exported.path)


def _renamed(plan: Plan):
    return lambda name: plan.depth.rename(name)


def _counting(batch: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """Sequences that count up modulo ``vocab`` from a random start: next token = (token + 1) % vocab."""
    start = torch.randint(0, vocab, (batch, 1), generator=generator)
    return (start + torch.arange(CONTEXT)) % vocab


def test_trained_causal_lm_keeps_its_predictions_through_the_int8_export(tmp_path):
    torch.manual_seed(0)
    vocab, generator = 32, torch.Generator().manual_seed(0)
    model = tiny_llama(2, vocab=vocab).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        ids = _counting(16, vocab, generator)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    held_out = [_counting(1, vocab, generator) for _ in range(8)]

    def accuracy(predictions) -> float:
        hits = [(p[0, :-1] == (ids[0, :-1] + 1) % vocab).float().mean() for p, ids in zip(predictions, held_out)]
        return float(torch.stack(hits).mean())

    with torch.no_grad():
        torch_predictions = [model(input_ids=ids).logits.argmax(-1) for ids in held_out]
    assert accuracy(torch_predictions) > 0.95, "the tiny LM did not learn to count"

    linears = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    plan = _plan(int8=linears)
    student = apply_plan(model, plan, {"input_ids": held_out[0]})
    _calibrate_and_bake(student, {"input_ids": _counting(16, vocab, generator)})
    exported = export_candidate(
        student, {"input_ids": held_out[0]}, tmp_path / "lm.onnx", plan=plan, precisions=CPU,
        calibration=[({"input_ids": held_out[0]}, None)], output=_logits,
    )  # fmt: skip
    assert set(exported.layer_precision.values()) == {"int8"}
    onnx_model = OnnxModule(exported.path)
    onnx_predictions = [onnx_model(input_ids=ids).argmax(-1) for ids in held_out]
    agreement = float(torch.stack([(a == b).float().mean() for a, b in zip(onnx_predictions, torch_predictions)]).mean())
    assert agreement > 0.95 and accuracy(onnx_predictions) > 0.9


# ---- ViT ---------------------------------------------------------------------------------------


def test_vit_is_searched_as_a_transformer_its_blocks_in_a_sequential_named_by_index(vit):
    assert find_blocks(vit) == EncoderBlocks("encoder.layers", 2, {}, {f"{VIT}0.mlp.0": 128, f"{VIT}1.mlp.0": 128})
    space_asks = optuna.create_study().ask()
    suggest_plan(space_asks, SearchSpace(), describe_layers(vit, images()), find_blocks(vit))
    assert "depth" in space_asks.params and "width" not in space_asks.params  # its hidden size is fixed
    assert {name.removesuffix(".pruning") for name in space_asks.params if name.endswith(".pruning")} <= {
        f"{VIT}0.mlp.0", f"{VIT}1.mlp.0"
    }


def test_vit_drops_a_block_and_prunes_an_ffn_the_kept_blocks_renamed_as_the_plan_renames_them(vit):
    ffn = f"{VIT}1.mlp.0"
    plan = _plan(pruning={ffn: 0.5}, depth=Depth("encoder.layers", (1,)))
    student = apply_plan(vit, plan, images())
    assert [name for name, _ in student.encoder.layers.named_children()] == ["encoder_layer_0"]
    kept = student.get_submodule(plan.depth.rename(ffn))  # the teacher's block 1, now the first
    assert kept.out_features == 64 and student.encoder.layers.encoder_layer_0.mlp[3].in_features == 64
    assert student(images(2)).shape == (2, 10) and len(vit.encoder.layers) == 2  # the teacher is untouched


def test_a_study_of_a_vit_runs_the_transformer_recipes(vit, fast_profiler, tmp_path):
    """As a CNN, its recipes pruned every layer (and its hidden size: a candidate that fails)."""
    x = images(128, seed=3)
    labels = sign_classes(x)
    data = TensorDataset(x, labels)
    task = Task(vit, DataLoader(data, batch_size=32), DataLoader(data, batch_size=64), x[:1], name="vit")
    quick = dict(finetune=Finetune(steps=2), pruner="none", cost_model=False)
    study = search.run(task, trials=4, profiler=fast_profiler, results_dir=tmp_path, **quick)
    frame = search.load_trials(study)
    assert list(frame["recipe"]) == ["int8 everywhere", "prune 0.25", "prune 0.5", "1 of 2 blocks"]
    rows = study.user_attrs["sensitivity"]
    assert [row["layer"] for row in rows if row["kind"] == "block"] == [f"{VIT}0", f"{VIT}1"]  # its modules' names
    assert (frame["state"] == "COMPLETE").all()
    pruned = Plan.from_dict(study.trials[2].user_attrs["plan"])
    assert {name for name, entry in pruned.layers.items() if entry.pruning.ratio} == {f"{VIT}0.mlp.0", f"{VIT}1.mlp.0"}


def test_vit_plan_compresses_exports_and_is_measured(tmp_path, vit, fast_profiler):
    int8 = [f"{VIT}0.mlp.0", f"{VIT}0.mlp.3"]  # heads.head too: see test_vit_static_and_dynamic_int8_mix
    int4 = [f"{VIT}1.mlp.0"]
    plan = _plan(int8, int4, pruning={f"{VIT}0.mlp.0": 0.25})
    student = apply_plan(vit, plan, images())
    assert student.encoder.layers.encoder_layer_0.mlp[3].in_features == 96
    _calibrate_and_bake(student, images(8, seed=1))
    exported = export_candidate(
        student, images(), tmp_path / "vit.onnx", plan=plan, precisions=CPU,
        calibration=[(images(1, seed=s), None) for s in range(4)],
    )  # fmt: skip
    precision = exported.layer_precision
    assert {n for n, p in precision.items() if p == "int8"} == set(int8)
    assert {n for n, p in precision.items() if p == "int4"} == set(int4)
    weights = initializer_shapes(exported.path)
    assert weights[f"{VIT}0.mlp.0.weight.T_quantized"] == (64, 96)  # MatMul by W^T: (in, out)
    assert weights[f"{VIT}0.mlp.3.weight.T_quantized"] == (96, 64)
    assert weights[f"{VIT}1.mlp.0.weight.T_Q4"][0] == 128
    ops = optimized_ops(exported.path, tmp_path)
    assert ops["MatMulNBits"] == len(int4)
    assert sum(ops[op] for op in INT8_KERNELS) == len(int8)
    x = images(1, seed=5)
    with torch.no_grad():
        reference = student(x)
    np.testing.assert_allclose(OnnxModule(exported.path)(x).numpy(), reference.numpy(), atol=0.1)
    _measured(fast_profiler, exported.path)


@pytest.mark.parametrize("layer", [f"{VIT}0.self_attention.out_proj", "conv_proj", f"{VIT}1.mlp.3"])
def test_vit_pruning_outside_its_ffn_is_a_clear_error(vit, layer):
    with pytest.raises(UsageError, match=f"applies to FFN intermediate layers only.*the plan prunes {layer}: "):
        apply_plan(vit, _plan(pruning={layer: 0.5}), images())


def test_vit_hidden_size_pruning_fails_the_candidate_at_build(vit):
    """torchvision's ViT reshapes to a fixed hidden_dim: a plan that shrinks it (a width, which a
    Transformer's space does not ask) fails as a candidate (the trial records why, the study goes
    on), not later with a RuntimeError inside a fine-tune."""
    with pytest.raises(CandidateError, match="the pruned model no longer runs.*RuntimeError"):
        apply_plan(vit, Plan(width=0.75), images())



@pytest.mark.parametrize("which", ["causal-lm", "vit"])
def test_export_keeps_a_dynamic_batch(tmp_path, llama, vit, which):
    """Traced from a batch-1 example, the graph still takes any batch (the calibration and the
    metric feed whole batches)."""
    path = tmp_path / "model.onnx"
    model, batch, output = (vit, images(3, seed=2), None) if which == "vit" else (llama, tokens(3, seed=2), _logits)
    export_float(model, images() if which == "vit" else tokens(), path, output)
    assert onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0].dim_param
    with torch.no_grad():
        expected = call(model, batch) if which == "vit" else _logits(call(model, batch))
    np.testing.assert_allclose(call(OnnxModule(path), batch).numpy(), expected.numpy(), atol=1e-4)


def test_vit_static_and_dynamic_int8_mix(tmp_path, vit):
    """heads.head runs on the class token and an attention's out_proj on the flattened tokens (Gemms:
    static Q/DQ, around those two only), mlp.0 and the attention's packed Q/K/V projection on the
    sequence (MatMuls: dynamic): one file holds both, each layer int8 as planned."""
    int8 = [f"{VIT}0.mlp.0", f"{VIT}1.self_attention.out_proj", "heads.head"]
    plan = _plan(int8)
    student = _calibrate_and_bake(apply_plan(vit, plan, images()), images(8, seed=1))
    exported = export_candidate(
        student, images(), tmp_path / "vit.onnx", plan=plan, precisions=CPU,
        calibration=[(images(4, seed=s), None) for s in range(4)],
    )  # fmt: skip
    assert {n for n, p in exported.layer_precision.items() if p == "int8"} == {*int8, f"{VIT}1.self_attention.in_proj"}
    ops = [node.op_type for node in onnx.load(str(exported.path)).graph.node]
    assert ops.count("QuantizeLinear") <= 2 * 2 and ops.count("MatMulInteger") == 2  # attention products stay float
