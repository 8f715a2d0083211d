import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper
from torch import nn

from models import example_input, settle
from search._errors import CandidateError
from search.artifacts import OnnxModule, export_candidate, export_float, export_raw, runtime_precision, with_weights
from search.plan import ChannelPruning, LayerPlan, Plan, Quantization, WeightSparsity
from search.compress import bake
from search.compress import apply_plan, build_structure

CPU = ("fp32", "int8")


def _calibration(model, batches=4):
    return [(example_input(model, batch=8, seed=50 + i), torch.zeros(8, dtype=torch.long)) for i in range(batches)]


def _export(tmp_path, teacher, plan, precisions=CPU, symmetric=False):
    """apply_plan → one QAT-like step → bake → export_candidate, as a trial does."""
    x = example_input(teacher)
    candidate = apply_plan(teacher, plan, x)
    candidate.train()
    with torch.no_grad():  # input quantizers see data, BatchNorm keeps learning
        candidate(example_input(teacher, batch=16, seed=1))
    bake(candidate).eval()
    exported = export_candidate(
        candidate, x, tmp_path / "model.onnx", plan=plan, precisions=precisions, calibration=_calibration(teacher),
        symmetric=symmetric,
    )
    return candidate, exported, onnx.load(str(exported.path))


def _bits(**bits) -> Plan:
    return Plan(layers={name: LayerPlan(quantization=Quantization(b)) for name, b in bits.items()})


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {i.name: i for i in model.graph.initializer}


def _dequantized_inputs(model: onnx.ModelProto) -> set[str]:
    return {node.input[0] for node in model.graph.node if node.op_type == "DequantizeLinear"}


def _weight_of(model: onnx.ModelProto, layer: str) -> np.ndarray:
    """A layer's exported weight as float: read the initializer, dequantize it if it is int8."""
    inits = _initializers(model)
    if f"{layer}.weight_quantized" in inits:
        q = numpy_helper.to_array(inits[f"{layer}.weight_quantized"]).astype(np.float32)
        scale = numpy_helper.to_array(inits[f"{layer}.weight_scale"])
        return q * scale.reshape(-1, *[1] * (q.ndim - 1))
    return numpy_helper.to_array(inits[f"{layer}.weight"])


def test_int8_plan_exports_qdq_with_uint8_activations_and_per_channel_int8_weights(tmp_path, cnn):
    plan = _bits(conv1=8, conv2=8, conv3=8, fc=8)
    _, exported, model = _export(tmp_path, cnn, plan)
    ops = [node.op_type for node in model.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert dict(exported.layer_precision) == {"conv1": "int8", "conv2": "int8", "conv3": "int8", "fc": "int8"}
    assert exported.onnx_bytes == exported.path.stat().st_size

    inits = _initializers(model)
    activation_quantizers = [
        node for node in model.graph.node if node.op_type == "QuantizeLinear" and node.input[0] not in inits
    ]
    assert len(activation_quantizers) >= 4  # the input and every conv's input, at least
    for node in activation_quantizers:
        assert inits[node.input[2]].data_type == TensorProto.UINT8, node.name

    for name, out_channels in (("conv1", 16), ("conv2", 32), ("conv3", 32), ("fc", 10)):
        weight = inits[f"{name}.weight_quantized"]
        assert weight.data_type == TensorProto.INT8
        assert f"{name}.weight_quantized" in _dequantized_inputs(model)
        assert list(inits[f"{name}.weight_scale"].dims) == [out_channels]  # one scale per output channel
        assert not numpy_helper.to_array(inits[f"{name}.weight_zero_point"]).any()  # symmetric
        assert f"{name}.weight" not in inits  # no float copy left behind


def test_a_symmetric_export_has_int8_activations_and_zero_points_for_tensorrt(tmp_path, cnn):
    _, exported, model = _export(tmp_path, cnn, _bits(conv1=8, conv2=8, conv3=8, fc=8), symmetric=True)
    assert set(exported.layer_precision.values()) == {"int8"}
    inits = _initializers(model)
    zero_points = [inits[n.input[2]] for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(zero_points) >= 8
    assert {z.data_type for z in zero_points} <= {TensorProto.INT8, TensorProto.INT32}  # int32: biases
    assert any(z.data_type == TensorProto.INT8 for z in zero_points)
    assert not any(numpy_helper.to_array(z).any() for z in zero_points)


def test_mixed_plan_keeps_fp32_layers_float(tmp_path, cnn):
    _, exported, model = _export(tmp_path, cnn, _bits(conv2=8))
    assert dict(exported.layer_precision) == {"conv1": "fp32", "conv2": "int8", "conv3": "fp32", "fc": "fp32"}
    inits, dequantized = _initializers(model), _dequantized_inputs(model)
    assert "conv2.weight_quantized" in dequantized
    consumers = {name for node in model.graph.node for name in node.input}
    for name in ("conv1", "conv3", "fc"):
        assert inits[f"{name}.weight"].data_type == TensorProto.FLOAT
        assert f"{name}.weight" in consumers
        assert f"{name}.weight_quantized" not in inits
        assert not any(i.startswith(f"{name}.weight") for i in dequantized)
    weight_users = {n.op_type for n in model.graph.node for i in n.input if i in ("conv1.weight", "conv3.weight")}
    assert weight_users == {"Conv"}


def test_int4_and_binarized_layers_run_as_int8_on_the_cpu_target(tmp_path, cnn):
    plan = _bits(conv2=4, conv3=1)
    candidate, exported, model = _export(tmp_path, cnn, plan)
    assert dict(exported.layer_precision) == {"conv1": "fp32", "conv2": "int8", "conv3": "int8", "fc": "fp32"}
    expected = {}
    for name, bn, levels in (("conv2", candidate.bn2, 15), ("conv3", candidate.bn3, 2)):
        fold = (bn.weight / (bn.running_var + bn.eps).sqrt()).detach()  # the exporter folds BatchNorm in
        expected[name] = (getattr(candidate, name).weight.detach() * fold.view(-1, 1, 1, 1)).numpy()
        exported_weight = _weight_of(model, name)
        # int4 levels k·max/7 are not all int8 levels j·max/127: each moves by at most half an int8 step
        half_step = np.abs(expected[name]).reshape(len(exported_weight), -1).max(1) / 127 / 2
        error = np.abs(exported_weight - expected[name]).reshape(len(exported_weight), -1).max(1)
        assert (error <= half_step * 1.001).all(), name
        assert all(len(np.unique(row)) <= levels for row in exported_weight)
    np.testing.assert_allclose(_weight_of(model, "conv3"), expected["conv3"], rtol=1e-5)  # ±alpha: exact


@pytest.mark.parametrize(
    "bits, precisions, expected",
    [(8, CPU, "int8"), (4, CPU, "int8"), (1, CPU, "int8"), (32, CPU, "fp32"), (8, ("fp32",), "fp32")],
)
def test_runtime_precision(bits, precisions, expected):
    assert runtime_precision(bits, precisions) == expected


def test_a_target_without_int8_gets_a_float_file(tmp_path, cnn):
    _, exported, model = _export(tmp_path, cnn, _bits(conv2=8), precisions=("fp32",))
    assert set(exported.layer_precision.values()) == {"fp32"}
    assert not any(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in model.graph.node)


def test_sparse_layers_export_at_least_their_planned_zeros(tmp_path, cnn):
    plan = Plan(
        layers={
            "conv2": LayerPlan(sparsity=WeightSparsity(0.75), quantization=Quantization(8)),
            "conv3": LayerPlan(sparsity=WeightSparsity(0.5, "2:4")),
            "fc": LayerPlan(sparsity=WeightSparsity(0.5)),
        }
    )
    _, exported, model = _export(tmp_path, cnn, plan)
    assert exported.layer_precision["conv2"] == "int8" and exported.layer_precision["conv3"] == "fp32"
    assert (_weight_of(model, "conv2") == 0).mean() >= 0.75
    assert (_weight_of(model, "fc") == 0).mean() >= 0.5
    conv3 = _weight_of(model, "conv3")
    assert (conv3 == 0).mean() >= 0.5
    assert ((np.moveaxis(conv3, 1, -1).reshape(-1, 4) == 0).sum(1) >= 2).all()  # 2 of every 4 inputs


@pytest.mark.parametrize(
    "plan",
    [Plan(width=0.5, layers={"conv2": LayerPlan(ChannelPruning(0.5))}), _bits(conv2=8, conv3=8)],
    ids=["pruned-fp32", "int8"],
)
def test_onnx_module_agrees_with_the_torch_model(tmp_path, cnn, plan):
    candidate, exported, _ = _export(tmp_path, cnn, plan)
    x = example_input(cnn, batch=128, seed=9)
    with torch.no_grad():
        expected = candidate(x)
    got = OnnxModule(exported.path, threads=1)(x)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert (got.argmax(1) == expected.argmax(1)).float().mean() >= 0.9
    if not any(layer.quantization.bits < 32 for layer in plan.layers.values()):
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)


class _DataDependentBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        if x.sum() > 0:  # Python control flow on a tensor's value: torch.export cannot capture it
            return self.fc(x)
        return -self.fc(x)


class _NumpyRoundTrip(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.from_numpy(np.sort(x.detach().numpy(), axis=1)))


@pytest.mark.parametrize("model", [_DataDependentBranch(), _NumpyRoundTrip()], ids=["branch", "numpy"])
def test_an_unexportable_model_is_a_candidate_error(tmp_path, model):
    x = torch.ones(1, 4)
    with pytest.raises(CandidateError, match="ONNX export failed"):
        export_float(model, x, tmp_path / "float.onnx")
    with pytest.raises(CandidateError, match="ONNX export failed"):
        export_candidate(model, x, tmp_path / "model.onnx", plan=_bits(fc=8), precisions=CPU, calibration=[(x, None)])


def test_onnx_module_on_a_broken_file_is_a_candidate_error(tmp_path):
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"not an onnx file")
    with pytest.raises(CandidateError, match="cannot load broken.onnx"):
        OnnxModule(path)


def _graph_inputs(model: onnx.ModelProto) -> dict[str, tuple[int, list]]:
    """name -> (element type, dims: a symbol's name or a size)."""
    return {
        value.name: (
            value.type.tensor_type.elem_type,
            [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim],
        )
        for value in model.graph.input
    }


def test_a_dict_input_model_exports_its_reduced_output_with_named_int64_inputs(tmp_path):
    from models import TinyTextWithOutput, text_inputs

    model, output = TinyTextWithOutput().eval(), (lambda out: out.sentence_embedding)
    export_float(model, text_inputs(1), tmp_path / "text.onnx", output)
    exported = onnx.load(str(tmp_path / "text.onnx"))
    inputs = _graph_inputs(exported)
    batch = inputs["input_ids"][1][0]
    assert isinstance(batch, str)  # symbolic: any batch size runs
    assert inputs == {"input_ids": (TensorProto.INT64, [batch, 16]), "attention_mask": (TensorProto.INT64, [batch, 16])}
    assert len(exported.graph.output) == 1
    assert not model._forward_hooks  # the reduction was part of the export only

    x = text_inputs(5, seed=3)
    got = OnnxModule(tmp_path / "text.onnx", threads=1)(**x)
    with torch.no_grad():
        expected = model(**x).sentence_embedding
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_a_tuple_input_model_exports_positional_inputs_named_input_0_input_1(tmp_path):
    from models import TwoInputNet, two_inputs

    model = TwoInputNet().eval()
    export_float(model, two_inputs(1), tmp_path / "two.onnx")
    inputs = _graph_inputs(onnx.load(str(tmp_path / "two.onnx")))
    batch = inputs["input_0"][1][0]
    assert isinstance(batch, str)
    assert inputs == {"input_0": (TensorProto.FLOAT, [batch, 8]), "input_1": (TensorProto.FLOAT, [batch, 4])}
    x = two_inputs(7, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(OnnxModule(tmp_path / "two.onnx")(*x), model(*x), rtol=1e-4, atol=1e-5)


def test_a_static_int8_export_of_a_dict_input_model_calibrates_on_dict_batches(tmp_path):
    """Static Q/DQ (TensorRT's form, every layer, MatMuls too) reads (inputs, None) dict batches."""
    from models import TinyText, text_inputs

    teacher = TinyText().eval()
    plan = _bits(fc1=8, fc2=8)
    candidate = apply_plan(teacher, plan, text_inputs(1))
    candidate.train()
    with torch.no_grad():
        candidate(**text_inputs(16, seed=1))
    bake(candidate).eval()
    seen = []

    class Batches:  # the calibration reads (inputs, None) batches, every input by name
        def __iter__(self):
            for i in range(3):
                seen.append(i)
                yield text_inputs(8, seed=20 + i), None

    exported = export_candidate(
        candidate, text_inputs(1), tmp_path / "int8.onnx", plan=plan, precisions=CPU, calibration=Batches(),
        symmetric=True,
    )  # fmt: skip
    model = onnx.load(str(exported.path))
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("DequantizeLinear") >= 4 and "QuantizeLinear" in ops
    assert seen == [0, 1, 2]
    assert set(_graph_inputs(model)) == {"input_ids", "attention_mask"}
    x = text_inputs(32, seed=4)
    with torch.no_grad():
        expected = candidate(**x)
    cosine = nn.functional.cosine_similarity(OnnxModule(exported.path)(**x), expected, dim=1)
    assert cosine.min() > 0.9  # symmetric int8 activations spend half their levels on the negative side


def test_weights_written_into_the_raw_graph_give_the_file_a_fresh_export_gives(tmp_path, cnn):
    """A trial exports its plan's graph once, before the fine-tune, and writes the fine-tuned weights
    into it: the file must be the one a second export of the fine-tuned model would have written."""
    plan = Plan(layers={"conv1": LayerPlan(pruning=ChannelPruning(0.5)), "conv2": LayerPlan(quantization=Quantization(8))})
    x = example_input(cnn, batch=8, seed=3)
    structure = build_structure(cnn, plan, x)
    export_raw(structure, x, tmp_path / "raw.onnx")
    before = OnnxModule(tmp_path / "raw.onnx")(x)

    settle(structure.train(), steps=2, seed=7)  # new BatchNorm statistics, as a fine-tune leaves
    with torch.no_grad():
        for parameter in structure.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    structure.eval()
    with_weights(tmp_path / "raw.onnx", structure, tmp_path / "rewritten.onnx")
    export_float(structure, x, tmp_path / "fresh.onnx")

    rewritten, fresh = OnnxModule(tmp_path / "rewritten.onnx")(x), OnnxModule(tmp_path / "fresh.onnx")(x)
    torch.testing.assert_close(rewritten, fresh, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rewritten, structure(x), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(rewritten, before, atol=1e-3)  # the new weights, not the exported ones
    ops = lambda p: sorted(n.op_type for n in onnx.load(str(p)).graph.node)  # noqa: E731
    assert ops(tmp_path / "rewritten.onnx") == ops(tmp_path / "fresh.onnx")  # BatchNorm folded alike

    quantized = {}
    for name, raw in (("from-raw", tmp_path / "raw.onnx"), ("exported", None)):
        quantized[name] = export_candidate(
            structure, x, tmp_path / f"{name}.onnx", plan=plan, precisions=CPU, calibration=_calibration(cnn), raw=raw
        )
    assert quantized["from-raw"].layer_precision == quantized["exported"].layer_precision
    torch.testing.assert_close(
        OnnxModule(quantized["from-raw"].path)(x), OnnxModule(quantized["exported"].path)(x), rtol=1e-3, atol=1e-3
    )


def test_a_graph_exported_without_its_weights_takes_the_weights_of_any_model_of_its_structure(tmp_path, cnn):
    """What a study keeps of a structure's export: the graph, its weights' data left out; written
    with weights, it is the file the graph exported with them gives."""
    plan = Plan(layers={"conv1": LayerPlan(pruning=ChannelPruning(0.5))})
    x = example_input(cnn, batch=4, seed=5)
    structure = build_structure(cnn, plan, x)
    export_raw(structure, x, tmp_path / "raw.onnx")
    export_raw(structure, x, tmp_path / "graph.onnx", weights=False)
    weight_bytes = sum(tensor.numel() * tensor.element_size() for tensor in structure.state_dict().values())
    left_out = (tmp_path / "raw.onnx").stat().st_size - (tmp_path / "graph.onnx").stat().st_size
    assert left_out >= 0.9 * weight_bytes
    with torch.no_grad():
        for parameter in structure.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    for name in ("raw", "graph"):
        with_weights(tmp_path / f"{name}.onnx", structure, tmp_path / f"{name}-written.onnx")
    written = [onnx.load(str(tmp_path / f"{name}-written.onnx")) for name in ("raw", "graph")]
    assert written[0].graph == written[1].graph
    torch.testing.assert_close(OnnxModule(tmp_path / "graph-written.onnx")(x), structure(x), rtol=1e-4, atol=1e-4)


def test_the_exporters_function_table_is_built_once_and_the_files_are_those_of_a_plain_export(
    tmp_path, cnn, monkeypatch
):
    """torch.onnx.export builds its ATen-to-ONNX table anew per export (most of a small model's export
    time); export_raw builds it once per process, and leaves torch's builder as it found it."""
    from torch.onnx._internal.exporter import _registration

    from search.artifacts import _onnx

    builder = _registration.ONNXRegistry.__dict__["from_torchlib"]
    built = []

    def counting(cls, *args, **kwargs):
        built.append(kwargs)
        return builder.__func__(cls, *args, **kwargs)

    monkeypatch.setattr(_registration.ONNXRegistry, "from_torchlib", classmethod(counting))
    monkeypatch.setattr(_onnx, "_REGISTRIES", {})
    x = example_input(cnn, batch=2, seed=3)
    cnn.eval()
    export_raw(cnn, x, tmp_path / "first.onnx")
    export_raw(cnn, x, tmp_path / "second.onnx")
    assert len(built) == 1
    assert _registration.ONNXRegistry.__dict__["from_torchlib"].__func__ is counting  # restored

    with torch.no_grad():
        plain = torch.onnx.export(cnn, f=None, dynamo=True, external_data=False, optimize=False,
                                  **_onnx._export_arguments(x))  # fmt: skip
    assert len(built) == 2  # outside export_raw, torch builds its table as it always does
    plain.save(str(tmp_path / "plain.onnx"))
    graphs = [onnx.load(str(tmp_path / f"{name}.onnx")).graph for name in ("first", "second", "plain")]
    assert graphs[0] == graphs[1] == graphs[2]
