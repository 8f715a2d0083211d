import json

import pytest

from search.plan import (
    PLAN_VERSION,
    ChannelPruning,
    LayerPlan,
    Plan,
    Quantization,
    WeightSparsity,
)

ENTRIES = [
    pytest.param(LayerPlan(pruning=ChannelPruning(0.5)), id="channel-pruning"),
    pytest.param(LayerPlan(sparsity=WeightSparsity(0.75)), id="sparsity-unstructured"),
    pytest.param(LayerPlan(sparsity=WeightSparsity(0.5, "2:4")), id="sparsity-2:4"),
    *(pytest.param(LayerPlan(quantization=Quantization(b)), id=f"bits-{b}") for b in (32, 8, 4, 1)),
    pytest.param(
        LayerPlan(ChannelPruning(0.25), WeightSparsity(0.5, "2:4"), Quantization(4)), id="combined"
    ),
]


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("width", [1.0, 0.5])
def test_every_entry_kind_round_trips_through_json(entry, width):
    plan = Plan(width=width, layers={"features.0": entry, "fc": LayerPlan()})
    text = plan.to_json()
    data = json.loads(text)
    assert data["_type"] == "Plan" and data["_version"] == PLAN_VERSION
    assert data["layers"]["features.0"]["_type"] == "LayerPlan"
    assert {data["layers"]["features.0"][k]["_type"] for k in ("pruning", "sparsity", "quantization")} == {
        "ChannelPruning",
        "WeightSparsity",
        "Quantization",
    }
    back = Plan.from_json(text)
    assert back == plan
    assert back.width == width
    assert back.layer("features.0") == entry
    assert isinstance(back.layer("features.0").quantization, Quantization)
    assert Plan.from_dict(plan.to_dict()) == plan


def test_unplanned_layer_is_left_alone():
    plan = Plan(layers={"a": LayerPlan(quantization=Quantization(8))})
    assert plan.layer("b") == LayerPlan()
    assert plan.layer("b").quantization.bits == 32


@pytest.mark.parametrize("version", [PLAN_VERSION + 1, None, "1"])
def test_other_plan_versions_are_rejected(version):
    data = Plan(width=0.5).to_dict()
    if version is None:
        del data["_version"]
    else:
        data["_version"] = version
    with pytest.raises(ValueError, match="plan version"):
        Plan.from_dict(data)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: ChannelPruning(1.0), "channel pruning ratio"),
        (lambda: ChannelPruning(-0.1), "channel pruning ratio"),
        (lambda: WeightSparsity(1.0), "sparsity ratio"),
        (lambda: WeightSparsity(-0.5), "sparsity ratio"),
        (lambda: WeightSparsity(0.5, "3:8"), "sparsity pattern"),
        (lambda: WeightSparsity(0.75, "2:4"), "2:4 sparsity has ratio 0.5"),
        (lambda: Quantization(3), "bits must be one of 32, 8, 4, 1"),
        (lambda: Quantization(16), "bits must be one of"),
        (lambda: LayerPlan(sparsity=WeightSparsity(0.5), quantization=Quantization(1)), "binarized"),
        (lambda: LayerPlan(sparsity=WeightSparsity(0.5, "2:4"), quantization=Quantization(1)), "binarized"),
        (lambda: Plan(width=0.0), "width"),
        (lambda: Plan(width=1.5), "width"),
    ],
)
def test_bad_values_raise_value_error(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_bad_values_in_json_raise_value_error():
    data = Plan(layers={"fc": LayerPlan(quantization=Quantization(8))}).to_dict()
    data["layers"]["fc"]["quantization"]["bits"] = 3
    with pytest.raises(ValueError, match="bits"):
        Plan.from_dict(data)


def test_unknown_type_tag_is_rejected_with_the_known_ones():
    data = Plan(layers={"fc": LayerPlan()}).to_dict()
    data["layers"]["fc"]["quantization"]["_type"] = "Int4WeightOnly"
    with pytest.raises(ValueError, match="unknown plan entry type 'Int4WeightOnly'; known: .*Quantization"):
        Plan.from_dict(data)


def test_a_json_that_is_not_a_plan_is_rejected():
    data = {"_type": "Quantization", "_version": PLAN_VERSION, "bits": 8}
    with pytest.raises(ValueError, match="expected a Plan, got Quantization"):
        Plan.from_dict(data)
