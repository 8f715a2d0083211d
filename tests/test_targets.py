from pathlib import Path

import pytest

from targets import Target, TargetFileError, UnknownTargetError, list_targets, load_target

USER_TARGET = """
description = "A board on my desk"
runtime = "onnxruntime-cpu"
precisions = ["fp32", "int8"]
threads = 4
power_sensor = "none"
power_w = 6.5
source = "my own measurement"

[peak]
fp32_gflops = 50
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "board.toml"
    path.write_text(text)
    return path


def test_cpu_target_loads():
    target = load_target("cpu")
    assert isinstance(target, Target)
    assert target.name == "cpu"
    assert target.runtime == "onnxruntime-cpu"
    assert target.precisions == ("fp32", "int8", "int4-weight-only")
    assert target.threads == 1
    assert target.power_sensor == "rapl"
    assert target.power_w > 0
    assert target.service is None
    assert target.disabled_optimizers is None  # the fusions measured slower here are left out
    assert Path(target.path).name == "cpu.toml"


def test_alias_resolves_to_the_target_it_names():
    jetson = load_target("jetson")
    assert jetson == load_target("jetson-orin-nano")
    assert jetson.name == "jetson-orin-nano"
    assert jetson.runtime == "tensorrt"
    assert jetson.power_sensor == "ina3221"
    assert jetson.peak["int8_sparse_tops"] == 40
    assert jetson.peak["int8_tops"] == 20
    assert jetson.peak["memory_gbs"] == 68
    assert "Jetson Orin Nano" in jetson.source


def test_list_targets_shows_each_target_once():
    names = [target.name for target in list_targets()]
    assert names == ["cpu", "gpu", "jetson-agx-orin", "jetson-orin-nano", "jetson-orin-nx"]


@pytest.mark.parametrize(
    "name, sparse_tops, memory_gbs",
    [("jetson-orin-nano", 40.0, 68.0), ("jetson-orin-nx", 100.0, 102.4), ("jetson-agx-orin", 275.0, 204.8)],
)
def test_jetson_datasheet_figures(name, sparse_tops, memory_gbs):
    target = load_target(name)
    assert target.runtime == "tensorrt" and target.power_sensor == "ina3221"
    assert target.peak["int8_sparse_tops"] == sparse_tops and target.peak["memory_gbs"] == memory_gbs
    assert "Data Sheet" in target.source


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(UnknownTargetError) as info:
        load_target("jetsn")
    assert str(info.value) == (
        "unknown target 'jetsn'; known: cpu, gpu, jetson, jetson-agx-orin, jetson-orin-nano, "
        "jetson-orin-nx (or a path to a .toml file)"
    )


def test_missing_file_is_an_unknown_target(tmp_path):
    with pytest.raises(UnknownTargetError, match="does not exist"):
        load_target(tmp_path / "nowhere.toml")


@pytest.mark.parametrize("as_type", [str, Path])
def test_user_file_loads(tmp_path, as_type):
    path = write(tmp_path, USER_TARGET)
    target = load_target(as_type(path))
    assert target.name == "board"
    assert target.threads == 4
    assert target.power_w == 6.5
    assert target.peak == {"fp32_gflops": 50.0}
    assert target.path == str(path)
    pinned = write(tmp_path, USER_TARGET.replace("threads = 4", "disabled_optimizers = []"))
    assert load_target(pinned).disabled_optimizers == ()


def test_target_is_frozen():
    target = load_target("cpu")
    with pytest.raises(AttributeError):
        target.threads = 2
    with pytest.raises(TypeError):
        target.peak["fp32_gflops"] = 1.0


@pytest.mark.parametrize(
    ("edit", "field", "accepted"),
    [
        (('runtime = "onnxruntime-cpu"\n', ""), "'runtime'", "a target file needs"),
        (('["fp32", "int8"]', '["fp32", "int3"]'), "'precisions'", "int4-weight-only"),
        (("threads = 4", 'threads = "4"'), "'threads'", "an integer >= 1"),
        (("power_w = 6.5", "power_w = true"), "'power_w'", "a number of watts"),
        (('power_sensor = "none"', 'power_sensor = "ina"'), "'power_sensor'", "rapl, ina3221"),
        (("threads = 4", "thread = 4"), "'thread'", "accepted:"),
        (("threads = 4", 'service = "no-port"'), "'service'", "host:port"),
        (("fp32_gflops = 50", 'fp32_gflops = "fast"'), "'peak'", "figures >= 0"),
        (("threads = 4", 'disabled_optimizers = "SkipLayerNormFusion"'), "'disabled_optimizers'", "a list of ONNX"),
        (('runtime = "onnxruntime-cpu"', 'runtime = "tensorrt"\ndisabled_optimizers = []'), "'disabled_optimizers'",
         'runtime is not "onnxruntime-cpu"'),
    ],
)
def test_bad_field_names_the_file_and_the_field(tmp_path, edit, field, accepted):
    path = write(tmp_path, USER_TARGET.replace(*edit))
    with pytest.raises(TargetFileError) as info:
        load_target(path)
    message = str(info.value)
    assert str(path) in message
    assert field in message
    assert accepted in message


def test_malformed_toml_names_the_file(tmp_path):
    path = write(tmp_path, USER_TARGET + "\nthreads = = 2\n")
    with pytest.raises(TargetFileError, match="not a valid TOML file") as info:
        load_target(path)
    assert str(path) in str(info.value)


def test_unreadable_file_is_a_target_file_error(tmp_path):
    with pytest.raises(TargetFileError, match="cannot read target file"):
        load_target(tmp_path)


def test_alias_must_name_a_builtin_target(tmp_path):
    path = write(tmp_path, 'alias = "jetson-nano-classic"\n')
    with pytest.raises(TargetFileError, match="jetson-orin-nano") as info:
        load_target(path)
    assert str(path) in str(info.value)
