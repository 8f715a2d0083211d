"""The TensorRT profiler: everything that needs no GPU, with ONNX graphs built here, a fake
``tensorrt`` module for the build and a fake backend for the measurement; the real engine build
and CUDA timing run only in the tests marked ``gpu``, skipped without TensorRT and a GPU."""

from __future__ import annotations

import dataclasses
import enum
import importlib.util
import itertools
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import profilers
import profilers.tensorrt._cuda as tensorrt_profiler
from profilers import Measurement, MeasurementError, RemoteProfiler, TargetUnavailableError, TensorRTProfiler, get_profiler
from profilers.energy import CounterWindow, EnergyReader
from profilers.tensorrt import (
    BuildPlan,
    CudaError,
    EngineLayer,
    GraphSummary,
    LayerTimes,
    build_plan,
    build_serialized_engine,
    cuda_call,
    cuda_device_count,
    default_timing,
    engine_cache_key,
    engine_precision,
    is_two_four_sparse,
    layer_report,
    parse_engine_information,
    profile_shapes,
    qdq_hint,
    summarise_graph,
    tensorrt_unavailable_reason,
    trtexec_command,
)
from targets import load_target

from loopback import TOKEN, serving

REPO = Path(__file__).resolve().parents[1]
SHORT = {"warmup_runs": 2, "warmup_s": 0.0, "min_runs": 20, "min_time_s": 0.0, "max_time_s": 1.0}
GPU_PRECISIONS = ("fp32", "fp16", "int8", "sparse-2:4")
TWO_FOUR_ROW = np.array([1.0, 0.0, -2.0, 0.0, 0.0, 3.0, 0.0, 4.0], np.float32)  # 2 of every 4 zero


# --- ONNX graphs --------------------------------------------------------------------------------


def two_four(out_channels: int, in_channels: int, *kernel: int) -> np.ndarray:
    """A weight [out, in, *kernel] that is 2:4 sparse along its input channels."""
    ones = (1,) * len(kernel)
    row = np.resize(TWO_FOUR_ROW, in_channels).reshape(1, in_channels, *ones)
    scale = np.arange(1, out_channels + 1, dtype=np.float32).reshape(out_channels, 1, *ones)
    return np.ascontiguousarray(np.broadcast_to(row * scale, (out_channels, in_channels, *kernel)))


def dense(*shape: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) + 3.0).astype(np.float32)  # no zeros


def model_of(nodes, inputs, outputs, initializers, opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def float_conv(weight: np.ndarray | None = None) -> onnx.ModelProto:
    """x[batch, 16, 8, 8] -> Conv 3x3 -> y, all fp32."""
    weight = dense(16, 16, 3, 3) if weight is None else weight
    return model_of(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1] * 4)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16, 8, 8])],
        [numpy_helper.from_array(weight, "w")],
    )


def qdq_net(*, zero_point_type=TensorProto.INT8, zero_point=0) -> onnx.ModelProto:
    """The graph the fake engine below was "built" from: input Q/DQ; Conv+Relu with int8 weights
    (dense); Q/DQ; a second Conv with int8 2:4 weights; pooling; a float Gemm head (transB)."""
    w1 = np.clip(np.round(dense(16, 16, 3, 3)), -127, 127).astype(np.int8)
    w3 = two_four(16, 16, 3, 3).astype(np.int8)
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "s_x"),
        helper.make_tensor("zp_x", zero_point_type, [], [zero_point]),
        numpy_helper.from_array(w1, "w1_q"),
        numpy_helper.from_array(np.full(16, 0.01, np.float32), "w1_s"),
        numpy_helper.from_array(np.zeros(16, np.int8), "w1_zp"),
        numpy_helper.from_array(np.array(0.1, np.float32), "s_2"),
        helper.make_tensor("zp_2", zero_point_type, [], [zero_point]),
        numpy_helper.from_array(w3, "w3_q"),
        numpy_helper.from_array(np.full(16, 0.01, np.float32), "w3_s"),
        numpy_helper.from_array(np.zeros(16, np.int8), "w3_zp"),
        numpy_helper.from_array(dense(10, 16), "fc_w"),
    ]
    nodes = [
        helper.make_node(
            "QuantizeLinear", ["x", "s_x", "zp_x"], ["xq"], name="node_QuantizeLinear_0"
        ),
        helper.make_node("DequantizeLinear", ["xq", "s_x", "zp_x"], ["xd"], name="dq_x"),
        helper.make_node(
            "DequantizeLinear", ["w1_q", "w1_s", "w1_zp"], ["w1"], name="dq_w1", axis=0
        ),
        helper.make_node("Conv", ["xd", "w1"], ["c1"], name="node_Conv_1", pads=[1] * 4),
        helper.make_node("Relu", ["c1"], ["r1"], name="node_Relu_2"),
        helper.make_node("QuantizeLinear", ["r1", "s_2", "zp_2"], ["r1q"], name="q_2"),
        helper.make_node("DequantizeLinear", ["r1q", "s_2", "zp_2"], ["r1d"], name="dq_2"),
        helper.make_node(
            "DequantizeLinear", ["w3_q", "w3_s", "w3_zp"], ["w3"], name="dq_w3", axis=0
        ),
        helper.make_node("Conv", ["r1d", "w3"], ["c3"], name="node_Conv_3", pads=[1] * 4),
        helper.make_node("GlobalAveragePool", ["c3"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc_w"], ["y"], name="node_Gemm_5", transB=1),
    ]
    return model_of(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )


def saved(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


# What TensorRT 10's engine inspector says about an engine built from qdq_net (DETAILED
# verbosity): the input quantization, the first conv fused with its Relu and run int8 on a sparse
# kernel, a reformat to fp16, the second conv left in fp16 on a dense kernel, and the head.
ENGINE_JSON = json.dumps({
    "Layers": [
        {
            "Name": "node_QuantizeLinear_0", "LayerType": "Scale", "ParameterType": "Scale",
            "Inputs": [{"Name": "x", "Location": "Device", "Dimensions": [1, 16, 8, 8],
                        "Format/Datatype": "Row major linear FP32"}],
            "Outputs": [{"Name": "xq", "Location": "Device", "Dimensions": [1, 16, 8, 8],
                         "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}],
            "TacticValue": "0x0000000000000000", "StreamId": 0,
            "Metadata": "[ONNX Layer: node_QuantizeLinear_0]",
        },
        {
            "Name": "node_Conv_1 + node_Relu_2", "LayerType": "CaskConvolution",
            "ParameterType": "Convolution", "Kernel": [3, 3], "PaddingMode": "kEXPLICIT_ROUND_DOWN",
            "Inputs": [{"Name": "xq", "Location": "Device", "Dimensions": [1, 16, 8, 8],
                        "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}],
            "Outputs": [{"Name": "r1q", "Location": "Device", "Dimensions": [1, 16, 8, 8],
                         "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}],
            "Weights": {"Type": "Int8", "Count": 2304}, "Bias": {"Type": "Float", "Count": 16},
            "TacticName": "sm80_xmma_fprop_implicit_gemm_interleaved_i8i8_i8i32_f32_nchw_vect_c_32kcrs_vect_c_32_nchw_vect_c_32_tilesize128x128x64_stage4_warpsize2x2x1_g1_tensor16x8x32_t1r3s3",
            "TacticValue": "0x7a3f5d1c2e4b6a88", "StreamId": 0,
            "Metadata": "[ONNX Layer: node_Conv_1]\u001f[ONNX Layer: node_Relu_2]",
        },
        {
            "Name": "Reformatting CopyNode for Input Tensor 0 to node_Conv_3", "LayerType": "Reformat",
            "ParameterType": "Reformat", "Origin": "REFORMAT",
            "Inputs": [{"Name": "r1q", "Location": "Device", "Dimensions": [1, 16, 8, 8],
                        "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}],
            "Outputs": [{"Name": "Reformatted Input Tensor 0 to node_Conv_3", "Location": "Device",
                         "Dimensions": [1, 16, 8, 8],
                         "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}],
            "TacticValue": "0x00000000000003e8", "StreamId": 0, "Metadata": "",
        },
        {
            "Name": "node_Conv_3", "LayerType": "CaskConvolution", "ParameterType": "Convolution",
            "Inputs": [{"Name": "Reformatted Input Tensor 0 to node_Conv_3", "Location": "Device",
                        "Dimensions": [1, 16, 8, 8],
                        "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}],
            "Outputs": [{"Name": "c3", "Location": "Device", "Dimensions": [1, 16, 8, 8],
                         "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}],
            "Weights": {"Type": "Half", "Count": 2304},
            "TacticName": "sm80_xmma_fprop_implicit_gemm_f16f16_f16f16_f16_nhwckrsc_nhwc_tilesize64x64x64_stage4_warpsize2x2x1_g1_tensor16x8x16",
            "TacticValue": "0x1c2d3e4f5a6b7c8d", "StreamId": 0,
            "Metadata": "[ONNX Layer: node_Conv_3 | /layer2/conv]",
        },
        {
            "Name": "pool + flatten + node_Gemm_5", "LayerType": "CaskGemmConvolution",
            "ParameterType": "FullyConnected",
            "Inputs": [{"Name": "c3", "Location": "Device", "Dimensions": [1, 16, 8, 8],
                        "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}],
            "Outputs": [{"Name": "y", "Location": "Device", "Dimensions": [1, 10],
                         "Format/Datatype": "Row major linear FP32"}],
            "Weights": {"Type": "Half", "Count": 160},
            "TacticName": "sm80_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize32x32x64_stage3_warpsize1x2x1_tensor16x8x16",
            "TacticValue": "0x0a0b0c0d0e0f1011", "StreamId": 0,
            "Metadata": "[ONNX Layer: pool]\u001f[ONNX Layer: flatten]\u001f[ONNX Layer: node_Gemm_5]",
        },
    ],
    "Bindings": ["x", "y"],
})  # fmt: skip
# What the IProfiler reports for that engine, per inference (ms).
LAYER_MS = {
    "node_QuantizeLinear_0": 0.002,
    "node_Conv_1 + node_Relu_2": 0.010,
    "Reformatting CopyNode for Input Tensor 0 to node_Conv_3": 0.004,
    "node_Conv_3": 0.020,
    "pool + flatten + node_Gemm_5": 0.004,
}


# --- The graph --------------------------------------------------------------------------------


def test_a_float_graph_has_nothing_to_quantize():
    summary = summarise_graph(float_conv())
    assert summary == GraphSummary(has_qdq=False, has_fp16=False)


def test_qdq_graph_marks_the_quantized_layers_and_the_2_4_one():
    summary = summarise_graph(qdq_net())
    assert summary.has_qdq and not summary.has_fp16
    assert summary.int8_nodes == {"node_Conv_1", "node_Conv_3"}  # weights behind DequantizeLinear
    assert summary.sparse_nodes == {"node_Conv_3"}  # int8 weight, 2:4 along input channels
    assert summary.asymmetric_qdq == ()


def test_uint8_or_nonzero_zero_points_are_named():
    summary = summarise_graph(qdq_net(zero_point_type=TensorProto.UINT8, zero_point=128))
    assert set(summary.asymmetric_qdq) == {"node_QuantizeLinear_0", "dq_x", "q_2", "dq_2"}
    hint = qdq_hint(summary)
    assert "4 Q/DQ node(s)" in hint and "symmetric int8" in hint
    assert qdq_hint(summarise_graph(qdq_net())) == ""


def test_fp16_tensors_are_seen():
    model = float_conv(dense(16, 16, 3, 3).astype(np.float16))
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    assert summarise_graph(model).has_fp16


class TestTwoFour:
    def test_pattern_along_the_input_channels(self):
        weight = two_four(8, 16, 3, 3)
        assert is_two_four_sparse(weight, axis=1)
        assert not is_two_four_sparse(weight, axis=0)  # along output channels: dense groups

    def test_three_nonzeros_in_a_group_is_not_2_4(self):
        weight = two_four(8, 16, 3, 3)
        weight[0, 1, 0, 0] = 7.0  # group (1, 7, -2, 0)·k has 3 nonzeros now
        assert not is_two_four_sparse(weight, axis=1)

    def test_channel_count_not_a_multiple_of_4(self):
        assert not is_two_four_sparse(np.zeros((4, 6), np.float32), axis=1)
        assert not is_two_four_sparse(np.zeros(8, np.float32), axis=0)  # a bias

    def test_dense_weight(self):
        assert not is_two_four_sparse(dense(16, 16), axis=1)

    @pytest.mark.parametrize("trans_b", [0, 1])
    def test_gemm_weight_either_way_round(self, trans_b):
        weight = two_four(10, 16)  # [out, in], 2:4 along in
        stored = weight if trans_b else weight.T.copy()
        model = model_of(
            [helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=trans_b)],
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
            [numpy_helper.from_array(stored, "w")],
        )
        assert summarise_graph(model).sparse_nodes == {"fc"}

    def test_matmul_weight_in_by_out(self):
        model = model_of(
            [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
            [numpy_helper.from_array(two_four(8, 16).T.copy(), "w")],  # [in, out]
        )
        assert summarise_graph(model).sparse_nodes == {"mm"}

    def test_float_conv_graph(self):
        assert summarise_graph(float_conv(two_four(16, 16, 3, 3))).sparse_nodes == {"conv"}
        assert summarise_graph(float_conv()).sparse_nodes == frozenset()


# --- Builder flags ------------------------------------------------------------------------------


FLOAT = GraphSummary(has_qdq=False, has_fp16=False)
QDQ = GraphSummary(has_qdq=True, has_fp16=False, int8_nodes=frozenset({"c"}))
SPARSE_QDQ = dataclasses.replace(QDQ, sparse_nodes=frozenset({"c"}))


class TestBuildPlan:
    def test_tensorrt_10_float_graph_may_use_fp16(self):
        plan = build_plan(GPU_PRECISIONS, FLOAT, "10.3.0")
        assert plan.builder_flags == ("FP16",) and plan.network_flags == ()
        assert not plan.strongly_typed

    def test_tensorrt_10_qdq_graph_is_explicitly_quantized(self):
        plan = build_plan(GPU_PRECISIONS, QDQ, "10.8.0")
        assert plan.builder_flags == ("FP16", "INT8")
        assert not any("calib" in flag.lower() for flag in plan.builder_flags)

    def test_2_4_weights_get_sparse_weights_where_the_target_accelerates_them(self):
        assert "SPARSE_WEIGHTS" in build_plan(GPU_PRECISIONS, SPARSE_QDQ, "10.8.0").builder_flags
        plan = build_plan(("fp32", "fp16", "int8"), SPARSE_QDQ, "10.8.0")
        assert "SPARSE_WEIGHTS" not in plan.builder_flags
        assert any("sparse-2:4" in note for note in plan.notes)
        assert "SPARSE_WEIGHTS" not in build_plan(GPU_PRECISIONS, QDQ, "10.8.0").builder_flags

    def test_qdq_on_a_target_without_int8_still_builds_int8_and_says_so(self):
        plan = build_plan(("fp32",), QDQ, "10.8.0")
        assert plan.builder_flags == ("INT8",)
        assert any("does not list int8" in note for note in plan.notes)

    def test_tensorrt_10_strongly_typed_on_request(self):
        plan = build_plan(GPU_PRECISIONS, SPARSE_QDQ, "10.8.0", strongly_typed=True)
        assert plan.network_flags == ("STRONGLY_TYPED",)
        assert plan.builder_flags == ("SPARSE_WEIGHTS",) and plan.strongly_typed

    @pytest.mark.parametrize("version", ["11.0.0", "11.4.0.106"])
    def test_tensorrt_11_has_no_precision_flags(self, version):
        plan = build_plan(GPU_PRECISIONS, SPARSE_QDQ, version)
        assert plan.strongly_typed and plan.network_flags == ()  # strong typing is the default
        assert plan.builder_flags == ("SPARSE_WEIGHTS",)
        assert any("fp32" in note and "AutoCast" in note for note in plan.notes)
        asked_weak = build_plan(GPU_PRECISIONS, FLOAT, version, strongly_typed=False)
        assert asked_weak.builder_flags == () and any(
            "only strongly typed" in n for n in asked_weak.notes
        )

    def test_tensorrt_11_fp16_graph_needs_no_note(self):
        plan = build_plan(GPU_PRECISIONS, dataclasses.replace(FLOAT, has_fp16=True), "11.4.0")
        assert plan.notes == ()

    @pytest.mark.parametrize("version", ["8.6.1", "nightly"])
    def test_too_old_or_unreadable_version(self, version):
        with pytest.raises(ValueError, match=version):
            build_plan(GPU_PRECISIONS, FLOAT, version)


# --- Engine cache key ---------------------------------------------------------------------------


@pytest.fixture
def external_model(tmp_path):
    """float_conv saved with its weight in model.onnx.data, next to model.onnx."""
    folder = tmp_path / "external"
    folder.mkdir()
    onnx.save(
        float_conv(), str(folder / "model.onnx"), save_as_external_data=True,
        all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=0,
    )  # fmt: skip
    assert (folder / "model.onnx.data").stat().st_size > 0
    return folder / "model.onnx"


KEY_ARGS = {
    "target": "gpu",
    "plan": BuildPlan("10.8.0", builder_flags=("FP16",)),
    "gpu": "NVIDIA H200",
    "input_shapes": {"x": (1, 16, 8, 8)},
    "workspace_bytes": None,
}


class TestEngineCacheKey:
    def test_stable_and_independent_of_the_file_name(self, tmp_path, external_model):
        key = engine_cache_key(external_model, **KEY_ARGS)
        assert engine_cache_key(external_model, **KEY_ARGS) == key and len(key) == 64
        copy = tmp_path / "copy"
        shutil.copytree(external_model.parent, copy)
        (copy / "model.onnx").rename(copy / "renamed.onnx")
        assert engine_cache_key(copy / "renamed.onnx", **KEY_ARGS) == key

    @pytest.mark.parametrize(
        "change",
        [
            {"target": "jetson-orin-nano"},
            {"plan": BuildPlan("10.9.0", builder_flags=("FP16",))},
            {"plan": BuildPlan("10.8.0", builder_flags=("FP16", "INT8"))},
            {"plan": BuildPlan("10.8.0", network_flags=("STRONGLY_TYPED",))},
            {"gpu": "NVIDIA H100 80GB HBM3"},
            {"input_shapes": {"x": (4, 16, 8, 8)}},
            {"workspace_bytes": 1 << 30},
        ],
        ids=lambda change: next(iter(change)),
    )
    def test_changes_with_each_setting(self, external_model, change):
        assert engine_cache_key(external_model, **{**KEY_ARGS, **change}) != engine_cache_key(
            external_model, **KEY_ARGS
        )

    def test_changes_with_the_onnx_bytes(self, tmp_path, external_model):
        key = engine_cache_key(external_model, **KEY_ARGS)
        model = onnx.load(str(external_model), load_external_data=False)
        model.graph.node[0].name = "renamed"
        onnx.save(model, str(external_model))  # same external data, other graph
        assert engine_cache_key(external_model, **KEY_ARGS) != key

    def test_changes_with_the_external_data(self, external_model):
        key = engine_cache_key(external_model, **KEY_ARGS)
        data = bytearray((external_model.parent / "model.onnx.data").read_bytes())
        data[0] ^= 0xFF  # one weight changes; the .onnx file does not
        (external_model.parent / "model.onnx.data").write_bytes(bytes(data))
        assert engine_cache_key(external_model, **KEY_ARGS) != key

    def test_missing_external_data_fails_the_candidate(self, external_model):
        (external_model.parent / "model.onnx.data").unlink()
        with pytest.raises(MeasurementError, match="cannot read the model"):
            engine_cache_key(external_model, **KEY_ARGS)


# --- The build, against a fake tensorrt module --------------------------------------------------


class ParserError:
    def __init__(self, desc, node_name="", operator="", code="UNSUPPORTED_NODE"):
        self._desc, self._node, self._op, self._code = desc, node_name, operator, code

    def code(self):
        return self._code

    def desc(self):
        return self._desc

    def node_name(self):
        return self._node

    def node_operator(self):
        return self._op


def fake_tensorrt(version="10.8.0", *, errors=(), build=b"serialized-engine", build_log=()):
    """A ``tensorrt`` module with the API calls the build makes, recording what they were given.
    TensorRT 11 has no FP16/INT8 builder flags. ``errors`` make the parser fail; ``build=None``
    makes the build fail after logging ``build_log`` as errors."""
    calls = types.SimpleNamespace(
        network_flags=None, flags=[], verbosity=None, pool=None, profiles=[]
    )

    class Severity(enum.IntEnum):
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    class ILogger:
        def __init__(self):
            pass

    ILogger.Severity = Severity
    flags = ["SPARSE_WEIGHTS", "TF32"] + (["FP16", "INT8"] if version.startswith("10.") else [])
    builder_flag = enum.IntEnum("BuilderFlag", flags)

    class Network:
        num_inputs = 1

        def get_input(self, i):
            return types.SimpleNamespace(name="x", shape=(-1, 16, 8, 8))

    class Parser:
        def __init__(self, network, logger):
            self.num_errors = len(errors)

        def parse_from_file(self, path):
            calls.parsed = path
            return not errors

        def get_error(self, i):
            return errors[i]

    class Config:
        def set_flag(self, flag):
            calls.flags.append(flag.name)

        def __setattr__(self, name, value):
            if name == "profiling_verbosity":
                calls.verbosity = value

        def set_memory_pool_limit(self, pool, size):
            calls.pool = (pool, size)

        def add_optimization_profile(self, profile):
            calls.profiles.append(profile.shapes)

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, low, opt, high):
            self.shapes[name] = (low, opt, high)

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags):
            calls.network_flags = flags
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            for message in build_log:
                self.logger.log(Severity.ERROR, message)
            return build

    module = types.SimpleNamespace(
        __version__=version,
        ILogger=ILogger,
        Builder=Builder,
        OnnxParser=Parser,
        BuilderFlag=builder_flag,
        NetworkDefinitionCreationFlag=enum.IntEnum(
            "NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 1}
        ),
        ProfilingVerbosity=enum.Enum("ProfilingVerbosity", "LAYER_NAMES_ONLY DETAILED NONE"),
        MemoryPoolType=enum.Enum("MemoryPoolType", "WORKSPACE"),
    )
    return module, calls


class TestBuild:
    def test_tensorrt_10_flags_profile_and_verbosity(self, tmp_path):
        trt, calls = fake_tensorrt("10.8.0")
        plan = build_plan(GPU_PRECISIONS, SPARSE_QDQ, trt.__version__)
        engine = build_serialized_engine(
            trt, tmp_path / "m.onnx", plan, {"x": (1, 16, 8, 8)}, workspace_bytes=1 << 30
        )
        assert engine == b"serialized-engine"
        assert calls.parsed == str(tmp_path / "m.onnx")
        assert calls.network_flags == 0  # weakly typed
        assert calls.flags == ["FP16", "INT8", "SPARSE_WEIGHTS"]
        assert calls.verbosity == trt.ProfilingVerbosity.DETAILED
        assert calls.pool == (trt.MemoryPoolType.WORKSPACE, 1 << 30)
        # the dynamic batch is fixed to the measured shape: min = opt = max
        assert calls.profiles == [{"x": ((1, 16, 8, 8),) * 3}]

    def test_tensorrt_10_strongly_typed_sets_the_creation_flag(self, tmp_path):
        trt, calls = fake_tensorrt("10.8.0")
        plan = build_plan(GPU_PRECISIONS, QDQ, "10.8.0", strongly_typed=True)
        build_serialized_engine(trt, tmp_path / "m.onnx", plan, {"x": (1, 16, 8, 8)})
        assert calls.network_flags == 1 << 1 and calls.flags == []

    def test_tensorrt_11_plan_uses_no_removed_flag(self, tmp_path):
        trt, calls = fake_tensorrt("11.4.0")
        assert not hasattr(trt.BuilderFlag, "FP16")
        plan = build_plan(GPU_PRECISIONS, SPARSE_QDQ, trt.__version__)
        assert build_serialized_engine(trt, tmp_path / "m.onnx", plan, {"x": (1, 16, 8, 8)})
        assert calls.flags == ["SPARSE_WEIGHTS"] and calls.network_flags == 0

    def test_a_tensorrt_10_plan_on_tensorrt_11_names_the_missing_flag(self, tmp_path):
        trt, _ = fake_tensorrt("11.4.0")
        plan = build_plan(GPU_PRECISIONS, QDQ, "10.8.0")
        with pytest.raises(
            MeasurementError, match=r"TensorRT 11.4.0 has no BuilderFlag.FP16 .*10.8.0"
        ):
            build_serialized_engine(trt, tmp_path / "m.onnx", plan, {"x": (1, 16, 8, 8)})

    def test_parser_errors_fail_the_candidate_with_their_text(self, tmp_path):
        error = ParserError("Assertion failed: zero point must be 0", "dq_x", "DequantizeLinear")
        trt, _ = fake_tensorrt(errors=[error])
        plan = build_plan(GPU_PRECISIONS, QDQ, "10.8.0")
        summary = summarise_graph(qdq_net(zero_point_type=TensorProto.UINT8, zero_point=128))
        with pytest.raises(MeasurementError) as info:
            build_serialized_engine(
                trt, tmp_path / "m.onnx", plan, {"x": (1, 16, 8, 8)},
                hint=qdq_hint(summary),
            )  # fmt: skip
        message = str(info.value)
        assert "m.onnx: TensorRT 10.8.0 cannot parse the model" in message
        assert "UNSUPPORTED_NODE: Assertion failed: zero point must be 0" in message
        assert "(node dq_x, DequantizeLinear)" in message
        assert "symmetric int8" in message  # the hint names the likely cause

    def test_a_build_returning_none_fails_with_what_tensorrt_logged(self, tmp_path):
        trt, _ = fake_tensorrt(
            build=None, build_log=["Requested amount of GPU memory could not be allocated"]
        )
        plan = build_plan(GPU_PRECISIONS, FLOAT, "10.8.0")
        with pytest.raises(
            MeasurementError, match="could not build an engine: Requested amount of GPU memory"
        ):
            build_serialized_engine(trt, tmp_path / "m.onnx", plan, {"x": (1, 16, 8, 8)})

    def test_a_build_returning_none_without_a_log(self, tmp_path):
        trt, _ = fake_tensorrt(build=None)
        plan = build_plan(GPU_PRECISIONS, FLOAT, "10.8.0")
        with pytest.raises(MeasurementError, match="TensorRT gave no reason"):
            build_serialized_engine(trt, tmp_path / "m.onnx", plan, {"x": (1, 16, 8, 8)})


class TestProfileShapes:
    def test_static_inputs_need_no_profile(self):
        assert profile_shapes({"x": (1, 16, 8, 8)}, {"x": (1, 16, 8, 8)}) == {}

    def test_dynamic_inputs_take_the_given_shape(self):
        assert profile_shapes({"x": (-1, 16, -1)}, {"x": [2, 16, 5]}) == {"x": (2, 16, 5)}

    def test_a_shape_that_does_not_fit(self):
        with pytest.raises(
            MeasurementError, match=r"'x' of dimensions \[-1, 16\] cannot take shape \[1, 8\]"
        ):
            profile_shapes({"x": (-1, 16)}, {"x": (1, 8)})
        with pytest.raises(MeasurementError, match="no shape to build for"):
            profile_shapes({"x": (-1, 16)}, {"y": (1, 16)})


# --- The per-layer report -----------------------------------------------------------------------


def reported(runs: int) -> dict[str, float]:
    """LAYER_MS as the IProfiler callbacks deliver it: every layer after each of ``runs``
    inferences, with some jitter that averages out."""
    times = LayerTimes()
    for run in range(runs):
        jitter = 0.001 if run % 2 else -0.001
        for name, ms in LAYER_MS.items():
            times.report_layer_time(name, ms + jitter * ms)
        times.runs += 1
    return times.per_inference()


class TestEngineInformation:
    def test_tensorrt_10_layers(self):
        layers = {layer.name: layer for layer in parse_engine_information(ENGINE_JSON)}
        assert list(layers) == list(LAYER_MS)
        conv1 = layers["node_Conv_1 + node_Relu_2"]
        assert conv1.precision == "int8" and conv1.kind == "Convolution"
        assert conv1.onnx_nodes == ("node_Conv_1", "node_Relu_2")
        assert conv1.tactic.startswith("sm80_xmma_fprop_implicit_gemm_interleaved_i8i8")
        assert layers["node_Conv_3"].precision == "fp16"
        assert layers["node_Conv_3"].onnx_nodes == ("node_Conv_3",)  # "| /layer2/conv" dropped
        assert layers["node_QuantizeLinear_0"].precision == "fp32"  # from its fp32 input
        assert layers["Reformatting CopyNode for Input Tensor 0 to node_Conv_3"].precision == "int8"
        assert layers["pool + flatten + node_Gemm_5"].onnx_nodes == (
            "pool",
            "flatten",
            "node_Gemm_5",
        )

    def test_tensorrt_11_tensors_carry_the_data_type_apart(self):
        information = {
            "Layers": [{
                "Name": "conv", "LayerType": "CaskConvolution", "ParameterType": "Convolution",
                "Inputs": [{"Name": "x", "DataType": "Half", "Format": "Channel major format"}],
                "Outputs": [{"Name": "y", "DataType": "Half", "Format": "Channel major format"}],
            }],
            "I/O Tensors": [{"Name": "x", "IOMode": "Input", "DataType": "Float"}],
        }  # fmt: skip
        assert parse_engine_information(information)[0].precision == "fp16"

    def test_names_only_verbosity(self):
        layers = parse_engine_information(json.dumps({"Layers": ["a + b", "c"], "Bindings": []}))
        assert [layer.name for layer in layers] == ["a + b", "c"]
        assert engine_precision(layers) == "unknown"

    def test_engine_precision_from_the_compute_layers(self):
        layers = parse_engine_information(ENGINE_JSON)
        assert engine_precision(layers) == "int8+fp16"  # not fp32: the Q layer is no compute layer


class TestLayerReport:
    def test_times_shares_and_order(self):
        report = layer_report(parse_engine_information(ENGINE_JSON), reported(runs=10))
        assert [entry["name"] for entry in report] == sorted(
            LAYER_MS, key=LAYER_MS.get, reverse=True
        )
        for entry in report:
            assert entry["ms"] == pytest.approx(LAYER_MS[entry["name"]])
        assert sum(entry["share"] for entry in report) == pytest.approx(1.0)
        assert report[0]["share"] == pytest.approx(0.020 / 0.040)

    def test_says_why_the_plan_is_not_faster(self):
        summary = summarise_graph(qdq_net())
        report = layer_report(
            parse_engine_information(ENGINE_JSON), reported(runs=2),
            int8_nodes=summary.int8_nodes, sparse_nodes=summary.sparse_nodes, sparse_enabled=True,
        )  # fmt: skip
        notes = {entry["name"]: entry["note"] for entry in report}
        slowest = report[0]
        assert slowest["name"] == "node_Conv_3" and slowest["precision"] == "fp16"
        assert "quantized node_Conv_3 to int8, but this layer ran in fp16" in slowest["note"]
        assert "2:4 sparse weights, but TensorRT chose a dense kernel" in slowest["note"]
        assert "conversion" in notes["Reformatting CopyNode for Input Tensor 0 to node_Conv_3"]
        assert notes["node_Conv_1 + node_Relu_2"] is None  # ran int8, as planned
        assert notes["pool + flatten + node_Gemm_5"] is None  # float, as planned

    def test_no_sparse_note_when_sparse_weights_was_not_set(self):
        summary = summarise_graph(qdq_net())
        report = layer_report(
            parse_engine_information(ENGINE_JSON), reported(runs=2),
            sparse_nodes=summary.sparse_nodes, sparse_enabled=False,
        )  # fmt: skip
        assert all("2:4" not in (entry["note"] or "") for entry in report)

    def test_without_profiler_times_every_layer_is_listed(self):
        report = layer_report(parse_engine_information(ENGINE_JSON), {})
        assert len(report) == len(LAYER_MS)
        assert all(entry["ms"] is None and entry["share"] is None for entry in report)

    def test_layer_times_with_no_runs(self):
        times = LayerTimes()
        times.report_layer_time("a", 1.0)
        assert times.per_inference() == {}


# --- Timing knobs, availability, CUDA calls ---------------------------------------------------


class TestDefaultTiming:
    def test_gpu_and_jetson(self):
        assert default_timing(load_target("gpu")) == {
            "warmup_s": 0.2,
            "min_time_s": 1.0,
            "max_time_s": 2.0,
        }
        assert default_timing(load_target("jetson")) == {
            "warmup_s": 0.2,
            "min_time_s": 3.0,
            "max_time_s": 6.0,
        }

    def test_given_knobs_win(self):
        assert default_timing(load_target("jetson"), max_time_s=0.5)["min_time_s"] == 0.5
        timing = default_timing(load_target("gpu"), min_time_s=0.1, min_runs=5)
        assert (
            timing["min_time_s"] == 0.1 and timing["min_runs"] == 5 and timing["max_time_s"] == 2.0
        )

    def test_remote_tensorrt_targets_get_them_too(self):
        remote = get_profiler(load_target("jetson"), service="10.0.0.2:8765", token="t")
        assert isinstance(remote, RemoteProfiler)
        assert (remote.warmup_s, remote.min_time_s, remote.max_time_s) == (0.2, 3.0, 6.0)


@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here"
)
def test_this_machine_has_no_tensorrt():
    assert tensorrt_unavailable_reason() == "the tensorrt package is not installed"
    with pytest.raises(TargetUnavailableError, match=r"\(the tensorrt package is not installed\)\."):
        get_profiler(load_target("jetson"))  # no fallback runtime: the gpu target's is tested with it


@pytest.fixture
def fake_runtime(monkeypatch):
    """A fake ``tensorrt`` importable, and a fake CUDA seeing ``devices`` GPUs."""
    state = types.SimpleNamespace(version="10.3.0", devices=1)
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.3.0"))

    error = enum.IntEnum("cudaError_t", {"cudaSuccess": 0, "cudaErrorNoDevice": 100})

    def count():
        return (error.cudaSuccess, state.devices) if state.devices else (error.cudaErrorNoDevice, 0)

    def cudart():
        return types.SimpleNamespace(cudaGetDeviceCount=count)

    monkeypatch.setattr(tensorrt_profiler, "import_cudart", cudart)

    def set_version(version):
        sys.modules["tensorrt"].__version__ = version

    state.set_version = set_version
    return state


class TestGetProfilerWithTensorRT:
    def test_tensorrt_and_a_gpu_give_the_tensorrt_profiler(self, fake_runtime):
        profiler = get_profiler(load_target("jetson"))
        assert isinstance(profiler, TensorRTProfiler)
        assert (profiler.min_time_s, profiler.max_time_s) == (3.0, 6.0)
        given = get_profiler(load_target("gpu"), min_time_s=0.1)
        assert given.min_time_s == 0.1 and given.max_time_s == 2.0

    def test_no_gpu(self, fake_runtime):
        fake_runtime.devices = 0
        with pytest.raises(
            TargetUnavailableError, match=r"CUDA sees no GPU \(cudaErrorNoDevice\)"
        ) as info:
            get_profiler(load_target("gpu"))
        assert "search serve --target gpu" in str(info.value)

    def test_tensorrt_too_old(self, fake_runtime):
        fake_runtime.set_version("8.6.1")
        with pytest.raises(
            TargetUnavailableError, match="tensorrt 8.6.1 is installed; this profiler needs 10"
        ):
            get_profiler(load_target("gpu"))


class TestCudaCalls:
    """``cuda_call`` against the real ``cuda-python`` error enum, where it is installed."""

    @pytest.fixture
    def runtime(self):
        try:
            return tensorrt_profiler.import_cudart()
        except ImportError as exc:
            pytest.skip(str(exc))

    def test_success_gives_the_value(self, runtime):
        assert cuda_call((runtime.cudaError_t.cudaSuccess, 42), "cudaMalloc") == 42
        assert cuda_call((runtime.cudaError_t.cudaSuccess,), "cudaFree") is None

    def test_an_error_names_the_call(self, runtime):
        with pytest.raises(CudaError, match="cudaMalloc failed: cudaErrorMemoryAllocation"):
            cuda_call((runtime.cudaError_t.cudaErrorMemoryAllocation, None), "cudaMalloc")

    def test_device_count_without_a_driver(self, runtime):
        count, error = cuda_device_count(runtime)
        if count == 0:  # these machines: no GPU, no driver
            assert error and error.startswith("cudaError")
        else:
            assert error is None


def test_import_touches_neither_tensorrt_nor_cuda():
    """Importing loads no GPU module. Asking for the gpu target's profiler without TensorRT tries
    its PyTorch CUDA fallback: that imports torch (torch 2.14 loads cuda-python's bindings itself)
    but neither TensorRT nor NVML, and initialises no CUDA context."""
    code = (
        "import sys, search, profilers\n"
        "gpu_modules = {'tensorrt', 'pycuda', 'cuda', 'pynvml', 'torch'}\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & gpu_modules))\n"
        "from profilers import get_profiler\n"
        "from targets import load_target\n"
        "try:\n"
        "    get_profiler(load_target('gpu'))\n"
        "except Exception as exc:\n"
        "    assert type(exc).__name__ == 'TargetUnavailableError', exc\n"
        "loaded = {m.split('.')[0] for m in sys.modules} & {'tensorrt', 'pycuda', 'pynvml'}\n"
        "import torch\n"
        "print(sorted(loaded), torch.cuda.is_initialized())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert out.stdout.split("\n")[:2] == ["[]", "[] False"]


def test_self_timed_runs_use_the_time_they_report():
    profiler = TensorRTProfiler(
        load_target("gpu"), backend=FakeBackend(), energy=FakeEnergy(), **SHORT
    )
    samples, stable = profiler._time(lambda: 2.5, self_timed=True)
    assert stable and len(samples) >= SHORT["min_runs"] and set(samples) == {2.5}


# --- The profiler, with a fake backend ----------------------------------------------------------


class FakeSession:
    def __init__(self, backend):
        self.backend = backend
        self.closed = False

    def run(self):
        self.backend.runs += 1
        return 0.04  # ms, as CUDA events would say

    def layer_times(self, runs):
        return reported(runs)

    def engine_information(self):
        return ENGINE_JSON

    def close(self):
        self.closed = True


class FakeBackend:
    """Builds "engines" that are their build arguments; loads only what it built."""

    version = "10.8.0"

    def __init__(self, fail=None):
        self.builds = []
        self.sessions = []
        self.runs = 0
        self.fail = fail

    def device(self):
        return {"gpu": "NVIDIA H200", "compute_capability": "9.0"}

    def build(self, onnx_path, plan, input_shapes, *, workspace_bytes, hint):
        if self.fail:
            raise MeasurementError(f"{onnx_path}: {self.fail}{hint}")
        self.builds.append({"path": Path(onnx_path), "plan": plan, "shapes": dict(input_shapes)})
        return b"fake-engine " + json.dumps(plan.builder_flags).encode()

    def session(self, engine, feeds, name):
        if not engine.startswith(b"fake-engine"):
            raise MeasurementError(f"{name}: TensorRT cannot load the engine")
        self.sessions.append(FakeSession(self))
        return self.sessions[-1]


class FakeEnergy(EnergyReader):
    """A counter that goes up 100 mJ over each window; and NVML-like device state."""

    source = "measured:fake"

    def __init__(self):
        self._counter = itertools.count(step=100)

    def window(self):
        return CounterWindow(
            lambda: next(self._counter), lambda before, after: after - before, source=self.source
        )

    def device_state(self):
        return {"sm_clock_mhz": 1980, "temperature_c": 41}


@pytest.fixture
def qdq_file(tmp_path):
    return saved(qdq_net(), tmp_path / "qdq.onnx")


def fake_profiler(tmp_path, backend=None, **options):
    return TensorRTProfiler(
        load_target("gpu"), engine_dir=tmp_path / "engines", backend=backend or FakeBackend(),
        energy=FakeEnergy(), **{**SHORT, **options},
    )  # fmt: skip


class TestProfiler:
    def test_measures_with_the_engine_it_built(self, tmp_path, qdq_file):
        profiler = fake_profiler(tmp_path)
        result = profiler.measure(qdq_file)
        backend = profiler.backend
        assert len(backend.builds) == 1 and profiler.builds == 1
        assert backend.builds[0]["plan"].builder_flags == ("FP16", "INT8", "SPARSE_WEIGHTS")
        assert backend.builds[0]["shapes"] == {"x": (1, 16, 8, 8)}  # random inputs, batch 1
        assert result.latency_ms == pytest.approx(0.04) and result.runs >= SHORT["min_runs"]
        assert result.stable and len(result.samples_ms) == result.runs
        assert result.energy_source == "measured:fake"
        # three fresh execution contexts of equal run counts; the energy of one session's runs
        assert len(backend.sessions) == profiler.sessions == len(result.session_medians_ms) == 3
        assert result.energy_mj == pytest.approx(100 / (result.runs / 3))
        assert result.runtime == "tensorrt" and result.runtime_version == "10.8.0"
        assert result.precision == "int8+fp16"
        assert result.device["gpu"] == "NVIDIA H200" and result.device["sm_clock_mhz"] == 1980
        assert result.device["engine"] == "built" and result.device["engine_build_s"] >= 0
        assert result.device["builder_flags"] == ["FP16", "INT8", "SPARSE_WEIGHTS"]
        assert Path(result.device["engine_file"]).read_bytes().startswith(b"fake-engine")
        assert [layer["name"] for layer in result.layers][0] == "node_Conv_3"
        assert "ran in fp16" in result.layers[0]["note"]
        assert all(session.closed for session in backend.sessions)

    def test_a_repeated_measure_does_not_build_again(self, tmp_path, qdq_file):
        profiler = fake_profiler(tmp_path)
        first = profiler.measure(qdq_file)
        second = profiler.measure(qdq_file)
        assert profiler.builds == 1 and len(profiler.backend.builds) == 1
        assert len(profiler.backend.sessions) == 2 * profiler.sessions
        assert second.device["engine"] == "cache" and second.device["engine_build_s"] is None
        assert second.device["engine_file"] == first.device["engine_file"]
        # another profiler (another process) finds the same engine on disk
        other = fake_profiler(tmp_path)
        assert other.measure(qdq_file).device["engine"] == "cache" and other.builds == 0

    def test_a_different_model_or_shape_builds_again(self, tmp_path, qdq_file):
        profiler = fake_profiler(tmp_path)
        profiler.measure(qdq_file)
        profiler.measure(saved(float_conv(), tmp_path / "float.onnx"))
        profiler.measure(qdq_file, {"x": np.zeros((2, 16, 8, 8), np.float32)})
        builds = profiler.backend.builds
        assert profiler.builds == 3 and [b["shapes"]["x"] for b in builds] == [
            (1, 16, 8, 8),
            (1, 16, 8, 8),
            (2, 16, 8, 8),
        ]
        assert builds[1]["plan"].builder_flags == ("FP16",)  # no Q/DQ, no 2:4 there
        assert len(list((tmp_path / "engines").glob("gpu-*.engine"))) == 3

    def test_a_damaged_cached_engine_is_rebuilt(self, tmp_path, qdq_file):
        profiler = fake_profiler(tmp_path)
        path = Path(profiler.measure(qdq_file).device["engine_file"])
        path.write_bytes(b"garbage")
        result = profiler.measure(qdq_file)
        assert result.device["engine"] == "built" and profiler.builds == 2
        assert path.read_bytes().startswith(b"fake-engine")

    def test_a_failed_build_fails_the_candidate_and_caches_nothing(self, tmp_path):
        path = saved(
            qdq_net(zero_point_type=TensorProto.UINT8, zero_point=128), tmp_path / "u8.onnx"
        )
        profiler = fake_profiler(
            tmp_path, FakeBackend(fail="TensorRT 10.8.0 cannot parse the model")
        )
        with pytest.raises(
            MeasurementError, match="u8.onnx: TensorRT 10.8.0 cannot parse.*symmetric int8"
        ):
            profiler.measure(path)
        assert not list(tmp_path.glob("engines/*"))

    def test_a_file_that_is_not_onnx(self, tmp_path):
        path = tmp_path / "broken.onnx"
        path.write_bytes(b"not a protobuf")
        with pytest.raises(MeasurementError, match="broken.onnx"):
            fake_profiler(tmp_path).measure(path)

    def test_strongly_typed_is_passed_to_the_plan(self, tmp_path, qdq_file):
        profiler = fake_profiler(tmp_path, strongly_typed=True)
        result = profiler.measure(qdq_file)
        assert result.device["network_flags"] == ["STRONGLY_TYPED"]
        assert profiler.backend.builds[0]["plan"].builder_flags == ("SPARSE_WEIGHTS",)

    def test_without_tensorrt_the_backend_is_unavailable(self, tmp_path, qdq_file):
        profiler = TensorRTProfiler(
            load_target("gpu"), engine_dir=tmp_path, energy=FakeEnergy(), **SHORT
        )
        with pytest.raises(TargetUnavailableError, match="tensorrt package"):
            profiler.measure(qdq_file)


class TestMeasurementLayers:
    def test_defaults_leave_other_profilers_unchanged(self):
        measurement = Measurement(
            latency_ms=1.0, latency_p90_ms=1.0, runs=1, spread=0.0, stable=True, energy_mj=None,
            energy_source="estimated:spec-power", runtime="onnxruntime-cpu", runtime_version="1",
            precision="fp32", device={}, samples_ms=(1.0,),
        )  # fmt: skip
        assert measurement.layers == () and measurement.to_dict()["layers"] == []

    def test_round_trips_through_json(self, tmp_path, qdq_file):
        result = fake_profiler(tmp_path).measure(qdq_file)
        summary = json.loads(json.dumps(result.to_dict()))
        assert summary["layers"][0]["onnx_nodes"] == ["node_Conv_3"]
        again = Measurement(**summary, samples_ms=())
        assert again.layers == result.layers and again.device == result.device

    def test_reaches_a_remote_client(self, tmp_path, qdq_file):
        local = fake_profiler(tmp_path)
        expected = local.measure(qdq_file)
        with serving(local) as (_, address):
            remote = RemoteProfiler(load_target("gpu"), address, TOKEN, **SHORT).measure(qdq_file)
        assert remote.layers == expected.layers
        assert remote.precision == "int8+fp16" and remote.runtime == "tensorrt"
        assert remote.device["engine"] == "cache"  # the upload has the same bytes: no rebuild
        assert local.builds == 1


# --- On a real GPU ------------------------------------------------------------------------------


@pytest.fixture
def gpu():
    reason = tensorrt_unavailable_reason()
    if reason is not None:
        pytest.skip(f"needs TensorRT and an NVIDIA GPU: {reason}")


@pytest.mark.gpu
def test_real_engine_is_built_once_and_timed(gpu, tmp_path):
    path = saved(float_conv(), tmp_path / "float.onnx")
    profiler = TensorRTProfiler(load_target("gpu"), engine_dir=tmp_path / "engines", **SHORT)
    first = profiler.measure(path)
    second = profiler.measure(path)
    assert first.device["engine"] == "built" and second.device["engine"] == "cache"
    assert profiler.builds == 1
    assert 0 < first.latency_ms < 100 and first.runs >= SHORT["min_runs"]
    assert first.layers and all(layer["ms"] is not None for layer in first.layers)
    assert set(first.precision.split("+")) <= {"fp16", "fp32"}  # a float graph, FP16 allowed


@pytest.mark.gpu
def test_real_symmetric_qdq_runs_int8(gpu, tmp_path):
    profiler = TensorRTProfiler(load_target("gpu"), engine_dir=tmp_path / "engines", **SHORT)
    result = profiler.measure(saved(qdq_net(), tmp_path / "qdq.onnx"))
    assert "int8" in result.precision.split("+")
    assert any(layer["precision"] == "int8" for layer in result.layers)


def test_public_names():
    assert profilers.TensorRTProfiler is TensorRTProfiler
    assert "TensorRTProfiler" in profilers.__all__
    assert EngineLayer(name="a").onnx_nodes == ()


def test_the_trtexec_command_builds_the_engine_a_measurement_built():
    weak = {"network_flags": [], "builder_flags": ["FP16", "INT8", "SPARSE_WEIGHTS"], "workspace_bytes": 2**30}
    assert trtexec_command("model.onnx", weak) == (
        "trtexec --onnx=model.onnx --saveEngine=model.engine --fp16 --int8 --sparsity=enable "
        "--memPoolSize=workspace:1024M"
    )
    typed = {"network_flags": ["STRONGLY_TYPED"], "builder_flags": [], "workspace_bytes": None}
    assert trtexec_command("m.onnx", typed) == "trtexec --onnx=m.onnx --saveEngine=m.engine --stronglyTyped"
    assert trtexec_command("model.onnx", {"threads": 1, "disabled_optimizers": []}) is None  # ONNX Runtime's


def test_export_to_a_tensorrt_target_says_how_to_build_each_engine_as_measured(finished, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import search
    from search import cli

    study, results = finished
    profiler = fake_profiler(tmp_path, workspace_bytes=2**29)
    rows = search.export(study, tmp_path / "deploy", profiler=profiler, rounds=1)
    assert len(profiler.backend.builds) == 1 + len(rows)  # each exported file, and the teacher's
    builds = profiler.backend.builds
    flags = {b["path"].parent.name: [f"--{f.lower()}" for f in b["plan"].builder_flags] for b in builds}
    for _, row in rows.iterrows():  # the gpu target lists fp16; a file with Q/DQ builds with INT8 too
        built = flags["trial-%05d" % row["number"]]
        expected = ["trtexec", "--onnx=model.onnx", "--saveEngine=model.engine", *built, "--memPoolSize=workspace:512M"]
        assert row["trtexec"].split() == expected
    assert any("--int8" in command for command in rows["trtexec"])
    monkeypatch.setattr(profilers, "get_profiler", lambda *args, **kwargs: profiler)
    arguments = ["export", str(results / "done"), "--out", str(tmp_path / "cli"), "--rounds", "1"]
    result = CliRunner().invoke(cli.app, arguments)
    assert result.exit_code == 0, result.output
    number = rows["number"].iloc[0]
    folder = tmp_path / "cli" / f"trial-{number:05d}"
    assert f"trial {number}'s engine, as measured: cd {folder} && trtexec --onnx=model.onnx" in result.output
