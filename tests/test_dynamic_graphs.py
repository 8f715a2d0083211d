"""A dynamically quantized graph is kept for other files of its graph: they are ONNX Runtime's files."""

import onnx
import pytest
import torch

import search.artifacts._dynamic as dynamic
from models import BertSentences, text_inputs
from search.artifacts import QUANTIZED, StructureGraphs, export_candidate
from search.compress import build_structure
from search.model import compressible_layers
from search.plan import ChannelPruning, LayerPlan, Plan, Quantization

CPU = ("fp32", "int8")


def _teacher():
    """The tiny BERT with biases apart: the exporter's optimiser makes equal initializers one (its
    zero biases), so equal biases of a pruned FFN would give it another graph."""
    model = BertSentences(layers=2).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return model


def _int8_plan(model, ratio):
    """int8 everywhere, the FFN's first layers pruned by ``ratio``: structures of one form."""
    return Plan(layers={
        name: LayerPlan(pruning=ChannelPruning(ratio if "intermediate" in name else 0.0), quantization=Quantization(8))
        for name in compressible_layers(model)
    })  # fmt: skip


@pytest.fixture
def ort_calls(monkeypatch):
    """The files ONNX Runtime's ``quantize_dynamic`` wrote, in order."""
    calls = []
    quantize = dynamic._ort_quantize_dynamic

    def counted(source, target, nodes):
        quantize(source, target, nodes)
        calls.append(target)

    monkeypatch.setattr(dynamic, "_ort_quantize_dynamic", counted)
    return calls


def _export(model, plan, path, graphs, kept):
    structure = build_structure(model, plan, text_inputs())
    return export_candidate(
        structure, text_inputs(), path, plan=plan, precisions=CPU, calibration=[(text_inputs(batch=2), None)],
        raw=graphs(structure), quantized_graphs=kept,
    )  # fmt: skip


def test_a_structure_of_the_form_gets_the_kept_graph_and_the_file_onnx_runtime_writes(tmp_path, ort_calls):
    model = _teacher()
    graphs = StructureGraphs(tmp_path / "graphs", text_inputs())
    kept = tmp_path / "graphs" / QUANTIZED
    first = _export(model, _int8_plan(model, 0.25), tmp_path / "first.onnx", graphs, kept)
    assert len(ort_calls) == 1 and len(list(kept.iterdir())) == 1
    assert {name for name, p in first.layer_precision.items() if p != "int8"} == {"bert.pooler.dense"}  # not run
    plan = _int8_plan(model, 0.5)
    second = _export(model, plan, tmp_path / "second.onnx", graphs, kept)
    assert len(ort_calls) == 1  # the kept graph, ONNX Runtime not called
    ort_written = _export(model, plan, tmp_path / "ort.onnx", graphs, None)
    assert len(ort_calls) == 2
    assert onnx.load(str(second.path)).SerializeToString() == onnx.load(str(ort_written.path)).SerializeToString()
    assert second.layer_precision == first.layer_precision


def test_a_graph_whose_tensors_this_module_computes_otherwise_is_not_kept(tmp_path, ort_calls, monkeypatch):
    quantized = dynamic._per_channel_int8

    def off_by_one_step(weight):
        tensors = quantized(weight)
        scale = tensors["_scale"]
        scale.float_data[0] *= 1.0001
        return tensors

    monkeypatch.setattr(dynamic, "_per_channel_int8", off_by_one_step)
    model = _teacher()
    graphs = StructureGraphs(tmp_path / "graphs", text_inputs())
    kept = tmp_path / "graphs" / QUANTIZED
    for index, ratio in enumerate((0.25, 0.5)):
        _export(model, _int8_plan(model, ratio), tmp_path / f"{index}.onnx", graphs, kept)
    assert len(ort_calls) == 2 and not kept.exists()
