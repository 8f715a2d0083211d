"""TensorRT on an NVIDIA GPU or Jetson (``runtime = "tensorrt"``), written against the TensorRT
10+ Python API, with CUDA memory, streams and events from ``cuda-python``.

Neither ``tensorrt`` nor ``cuda-python`` is imported by this package: only building or running an
engine imports them (:func:`import_tensorrt`, :func:`import_cudart`), so ``import profilers``
works, and touches no GPU, on a machine without either. Everything that needs no GPU is a plain
function, tested without one:

- :func:`summarise_graph`: what the ONNX holds that TensorRT cares about (Q/DQ nodes, fp16
  tensors, 2:4 sparse weights, Q/DQ that TensorRT cannot take);
- :func:`build_plan`: the network and builder flags, from the target's precisions, the graph and
  the TensorRT version; :func:`build_serialized_engine`: the build itself, against a
  ``tensorrt`` module passed in;
- :func:`trtexec_command`: the ``trtexec`` line that builds the engine a measurement built;
- :func:`engine_cache_key`: the engine cache key, so a repeated plan never rebuilds;
- :func:`parse_engine_information` and :func:`layer_report`: the per-layer report from the engine
  inspector's JSON and the ``IProfiler`` callbacks;
- :func:`default_timing`: trtexec-like timing knobs for the target.
"""

from profilers.tensorrt._build import (
    BuildPlan,
    build_plan,
    build_serialized_engine,
    profile_shapes,
    tensorrt_major,
    trtexec_command,
)
from profilers.tensorrt._cache import DEFAULT_ENGINE_DIR, engine_cache_key, engine_path
from profilers.tensorrt._cuda import (
    CudaError,
    TensorRTBackend,
    cuda_call,
    cuda_device_count,
    import_cudart,
    import_tensorrt,
    tensorrt_unavailable_reason,
)
from profilers.tensorrt._graph import GraphSummary, is_two_four_sparse, qdq_hint, summarise_graph
from profilers.tensorrt._profiler import TensorRTProfiler, default_timing
from profilers.tensorrt._report import (
    EngineLayer,
    LayerTimes,
    engine_precision,
    layer_report,
    parse_engine_information,
)

__all__ = [
    "BuildPlan",
    "CudaError",
    "DEFAULT_ENGINE_DIR",
    "EngineLayer",
    "GraphSummary",
    "LayerTimes",
    "TensorRTBackend",
    "TensorRTProfiler",
    "build_plan",
    "build_serialized_engine",
    "cuda_call",
    "cuda_device_count",
    "default_timing",
    "engine_cache_key",
    "engine_path",
    "engine_precision",
    "import_cudart",
    "import_tensorrt",
    "is_two_four_sparse",
    "layer_report",
    "parse_engine_information",
    "profile_shapes",
    "qdq_hint",
    "summarise_graph",
    "tensorrt_major",
    "tensorrt_unavailable_reason",
    "trtexec_command",
]
