"""A structure's graph is traced once per form; another structure of the form is given its shapes."""

import onnx
import torch
from torch import nn

from models import BertSentences, SmallCNN, example_input, text_inputs
from search.artifacts import OnnxModule, StructureGraphs, export_raw, with_weights
from search.artifacts._graphs import FORMS, form_digest, structure_digest
from search.compress import build_structure
from search.plan import ChannelPruning, Depth, HeadPruning, LayerPlan, Plan


class Depthwise(nn.Module):
    """A MobileNet-like stack: its depthwise convolution's groups follow the channels pruned."""

    input_shape = (1, 3, 8, 8)

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pointwise = nn.Conv2d(16, 24, 1)
        self.head = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.pointwise(torch.relu(self.depthwise(torch.relu(self.stem(x))))))
        return self.head(torch.flatten(x.mean((2, 3), keepdim=True), 1))


class ChannelsBaked(SmallCNN):
    """A forward that reshapes by a channel count it holds as a number: a graph of another width
    runs, and computes something else."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(x.reshape(x.shape[0], self.fc.in_features, -1).mean(-1))


def _pruned(model, ratio, layers):
    plan = Plan(layers={name: LayerPlan(pruning=ChannelPruning(ratio)) for name in layers})
    return build_structure(model, plan, example_input(model))


def _ops(path):
    return [node.op_type for node in onnx.load(str(path)).graph.node]


def test_a_pruned_structure_takes_the_graph_traced_for_its_form_and_writes_the_file_a_trace_gives(tmp_path):
    model = SmallCNN().eval()
    x = example_input(model, batch=3, seed=1)
    graphs = StructureGraphs(tmp_path / "graphs", example_input(model))
    structures = [_pruned(model, ratio, ["conv1", "conv2", "conv3"]) for ratio in (0.25, 0.5)]
    assert form_digest(structures[0]) == form_digest(structures[1])
    assert structure_digest(structures[0]) != structure_digest(structures[1])
    paths = [graphs(structure) for structure in structures]
    assert graphs.traced == 1 and paths[0] != paths[1]
    assert len(list((tmp_path / "graphs" / FORMS).iterdir())) == 1
    assert graphs(structures[1]) == paths[1] and graphs.traced == 1  # kept: neither traced nor reshaped again

    export_raw(structures[1], example_input(model), tmp_path / "traced.onnx", weights=False)
    for name, raw in (("reshaped", paths[1]), ("traced", tmp_path / "traced.onnx")):
        with_weights(raw, structures[1], tmp_path / f"{name}-file.onnx")
    assert _ops(tmp_path / "reshaped-file.onnx") == _ops(tmp_path / "traced-file.onnx")
    with torch.no_grad():
        torch.testing.assert_close(OnnxModule(tmp_path / "reshaped-file.onnx")(x), structures[1](x), rtol=1e-4, atol=1e-4)
    weights = [i for i in onnx.load(str(paths[1]), load_external_data=False).graph.initializer if i.name == "conv2.weight"]
    assert weights[0].data_location == onnx.TensorProto.EXTERNAL and list(weights[0].dims) == [16, 8, 3, 3]


def _second_file(tmp_path, model, layers, ratios):
    """Two pruned structures of ``model`` given graphs in turn; the second's file computes as it does."""
    graphs = StructureGraphs(tmp_path, example_input(model))
    structures = [_pruned(model, ratio, layers) for ratio in ratios]
    path = [graphs(structure) for structure in structures][1]
    with_weights(path, structures[1], tmp_path / "file.onnx")
    x = example_input(model, batch=2, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(OnnxModule(tmp_path / "file.onnx")(x), structures[1](x), rtol=1e-4, atol=1e-4)
    return graphs, structures


def test_a_depthwise_convolution_takes_the_groups_of_its_pruned_channels(tmp_path):
    graphs, structures = _second_file(tmp_path, Depthwise().eval(), ["stem", "pointwise"], (0.25, 0.5))
    assert structures[0].depthwise.groups != structures[1].depthwise.groups
    assert graphs.traced == 1


def test_a_graph_that_computes_otherwise_for_the_structure_is_traced_anew(tmp_path):
    """The other width's graph runs on this structure (its reshape divides evenly) but averages other
    channels: the check on the example finds it, and the structure is traced."""
    graphs, _ = _second_file(tmp_path, ChannelsBaked().eval(), ["conv1", "conv2", "conv3"], (0.5, 0.75))
    assert graphs.traced == 2


def test_a_transformer_with_fewer_ffn_channels_takes_its_forms_graph_fewer_heads_or_blocks_do_not(tmp_path):
    """FFN channels size weights only; a head count is in the graph of the SDPA attention the tiny
    BERT runs (MiniLM's eager attention reshapes by ``-1`` heads: its head pruning is reshaped)."""
    model = BertSentences(layers=3).eval()
    inputs = text_inputs(batch=1)
    graphs = StructureGraphs(tmp_path, inputs)
    ffn = [f"bert.encoder.layer.{i}.intermediate.dense" for i in range(2)]
    fewer_heads = {"bert.encoder.layer.1.attention.self": HeadPruning(0.5)}
    plans = [
        Plan(layers={name: LayerPlan(pruning=ChannelPruning(0.5)) for name in ffn}),
        Plan(layers={ffn[0]: LayerPlan(pruning=ChannelPruning(0.25))}),
        Plan(layers={ffn[0]: LayerPlan(pruning=ChannelPruning(0.25))}, heads=fewer_heads),
        Plan(depth=Depth("bert.encoder.layer", (0, 2))),
    ]
    structures = [build_structure(model, plan, inputs) for plan in plans]
    for structure, traced in zip(structures, (1, 1, 2, 3)):
        graphs(structure)
        assert graphs.traced == traced
    inputs = text_inputs(batch=3, seed=4)
    for index in (1, 2):
        with_weights(graphs(structures[index]), structures[index], tmp_path / "file.onnx")
        with torch.no_grad():
            expected = structures[index](**inputs)
        torch.testing.assert_close(OnnxModule(tmp_path / "file.onnx")(**inputs), expected, rtol=1e-4, atol=1e-4)
