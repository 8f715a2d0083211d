"""``nn.MultiheadAttention``'s packed Q/K/V projection (``in_proj_weight``, no Linear) is quantized
at its ``out_proj``'s bits, in the fine-tune and in the file; and a Transformer's static int8
layers get Q/DQ around themselves only, so its attention products, softmax and norms stay float."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
import torch
from models import SignalEncoder, example_input
from onnx import numpy_helper
from torch.nn.utils import parametrize

from search.artifacts import export_candidate, prepare
from search.compress import FakeQuantWeight, add_compression, bake, baked_state_dict, build_structure, packed_size_bytes
from search.model import compressible_layers, packed_projections
from search.plan import LayerPlan, Plan, Quantization

OUT_PROJ = [f"encoder.layers.{i}.self_attn.out_proj" for i in range(3)]
IN_PROJ = [f"encoder.layers.{i}.self_attn.in_proj" for i in range(3)]


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return SignalEncoder().eval()


def _int8(names) -> Plan:
    return Plan(layers={name: LayerPlan(quantization=Quantization(8)) for name in names})


def _candidate(encoder, plan: Plan):
    x = example_input(encoder)
    return add_compression(build_structure(encoder, plan, x), plan, x, dynamic_matmuls=True)


def test_each_attention_packed_projection_is_found_by_name(encoder):
    assert list(packed_projections(encoder)) == IN_PROJ
    assert not set(IN_PROJ) & set(compressible_layers(encoder))  # no layer of a plan


def test_the_projection_is_fine_tuned_at_its_out_proj_bits_on_a_per_call_input(encoder):
    candidate = _candidate(encoder, _int8(OUT_PROJ[:1]))
    attention = candidate.encoder.layers[0].self_attn
    assert isinstance(attention.parametrizations.in_proj_weight[0], FakeQuantWeight)
    assert attention.input_quant.per_call  # ONNX Runtime quantizes its MatMul's input per call
    assert not parametrize.is_parametrized(candidate.encoder.layers[1].self_attn)  # its out_proj is float
    x = example_input(encoder, batch=4)
    with torch.no_grad():  # the input quantizer keeps self-attention's one tensor: the packed path still runs
        assert torch.allclose(candidate(x), encoder(x), atol=0.05)


def test_baked_its_weight_lies_on_the_grid_and_loads_into_the_structure(encoder):
    plan = _int8(OUT_PROJ)
    candidate = _candidate(encoder, plan)
    state = baked_state_dict(candidate)
    build_structure(encoder, plan, example_input(encoder)).load_state_dict(state)  # strict: the same keys
    weight = state["encoder.layers.0.self_attn.in_proj_weight"]
    steps = weight / (weight.abs().amax(1, keepdim=True) / 127)
    assert torch.allclose(steps, steps.round(), atol=1e-3)
    assert torch.equal(bake(candidate).encoder.layers[0].self_attn.in_proj_weight, weight)
    assert not any(parametrize.is_parametrized(m) for m in candidate.modules())


def test_the_size_counts_the_projection_at_its_bits(encoder):
    plan = _int8(OUT_PROJ[:1])
    saved = packed_size_bytes(encoder, Plan()) - packed_size_bytes(_candidate(encoder, plan), plan)
    weights, channels = 48 * 16 + 16 * 16, 48 + 16  # in_proj and out_proj of one block, hidden 16
    assert saved * 8 == 24 * weights - 32 * channels


def test_the_file_runs_it_as_an_integer_matmul_of_the_candidate_weights(encoder, tmp_path):
    plan = _int8(compressible_layers(encoder))
    candidate = bake(_candidate(encoder, plan))
    calibration = [(example_input(encoder, batch=8), torch.zeros(8))]
    exported = export_candidate(
        candidate, example_input(encoder), tmp_path / "c.onnx", plan=plan, precisions=["fp32", "int8"],
        calibration=calibration,
    )  # fmt: skip
    assert {exported.layer_precision[name] for name in IN_PROJ} == {"int8"}
    graph = onnx.load(str(tmp_path / "c.onnx")).graph
    weights = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    name = f"{IN_PROJ[0]}.weight.T"
    assert any(node.op_type == "MatMulInteger" and f"{name}_quantized" in node.input for node in graph.node)
    dequantized = weights[f"{name}_quantized"] * weights[f"{name}_scale"]
    baked = candidate.encoder.layers[0].self_attn.in_proj_weight.detach().numpy()
    np.testing.assert_allclose(dequantized, baked.T, atol=1e-6)
    ops = collections.Counter(node.op_type for node in graph.node)
    # Q/DQ around the five static layers (the Conv stem, three out_proj Gemms, the head): not around
    # every op, which would quantize the attention products (127 QuantizeLinear before)
    assert ops["QuantizeLinear"] <= 2 * 5 and ops["MatMulInteger"] == 9


def test_a_float_out_proj_leaves_the_projection_float(encoder, tmp_path):
    plan = _int8([f"encoder.layers.{i}.linear1" for i in range(3)])
    exported = export_candidate(
        bake(_candidate(encoder, plan)), example_input(encoder), tmp_path / "c.onnx", plan=plan,
        precisions=["fp32", "int8"], calibration=[],
    )  # fmt: skip
    assert {exported.layer_precision[name] for name in IN_PROJ} == {"fp32"}


def test_the_pytorch_runtime_says_it_runs_the_projection_in_float(encoder):
    prepared = prepare(encoder, _int8(OUT_PROJ[:1]), ("fp32", "int8"), torch.device("cpu"))
    assert prepared.layer_precision[IN_PROJ[0]] == prepared.layer_precision[IN_PROJ[1]] == "fp32"
    assert [note for note in prepared.notes if "in_proj" in note] == [
        f"{IN_PROJ[0]}: 8-bit planned (its out_proj's), runs as fp32 (torchao quantizes Linear layers only)"
    ]
