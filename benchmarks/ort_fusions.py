"""ONNX Runtime's SkipLayerNormalization fusion on this CPU: the fused kernel against the Add and
LayerNormalization it replaces, and MiniLM's files run with and without the fusion (prints
figures; asserts nothing).

    python benchmarks/ort_fusions.py [--seq-len 32 --seq-len 128] [--rounds 5]

The CPU sessions leave out each fusion measured slower here (``profilers.disabled_optimizers``);
this script shows the figures behind that choice: the probe's own, the kernel at other shapes,
and MiniLM's teacher (fp32) and its int8-everywhere file, each session timed in rounds taken in
turn (one thread; the median of each round, the fastest round kept).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import optuna
from onnx import TensorProto, helper, numpy_helper

from profilers import cpu_info
from profilers import _onnxruntime_fusions as fusions

VARIANTS = {"fused (ORT's default)": [], "without SkipLayerNormFusion": ["SkipLayerNormFusion"]}
SHAPES = [(1, 8, 384), (1, 32, 384), (1, 128, 768), (8, 128, 768), (1, 512, 1024)]


def timed(sessions: dict, feeds: dict, rounds: int, runs: int) -> dict[str, float]:
    """Each session's fastest round median (ms), rounds taken in turn."""
    medians: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, session in sessions.items():
            for _ in range(max(3, runs // 10)):
                session.run(None, feeds)
            samples = []
            for _ in range(runs):
                started = time.perf_counter()
                session.run(None, feeds)
                samples.append(time.perf_counter() - started)
            medians[name].append(statistics.median(samples) * 1000)
    return {name: min(values) for name, values in medians.items()}


def sessions_of(model) -> dict:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = 1, 1, 3
    return {
        name: ort.InferenceSession(model, options, providers=["CPUExecutionProvider"],
                                   disabled_optimizers=[*fusions.ALWAYS_DISABLED, *off])  # fmt: skip
        for name, off in VARIANTS.items()
    }


def residual_layer_norm(shape: tuple[int, int, int]) -> bytes:
    values = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(shape)) for n in ("x", "skip", "y")]
    weights = [numpy_helper.from_array(np.ones(shape[-1], np.float32), n) for n in ("gamma", "beta")]
    nodes = [helper.make_node("Add", ["x", "skip"], ["sum"]),
             helper.make_node("LayerNormalization", ["sum", "gamma", "beta"], ["y"], axis=-1)]  # fmt: skip
    graph = helper.make_graph(nodes, "residual_layer_norm", values[:2], values[2:], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def minilm_files(seq_len: int, folder: Path) -> tuple[dict[str, Path], object]:
    """MiniLM's teacher and its int8-everywhere plan (PTQ) as the study writes them, and the task."""
    from search.artifacts import export_float
    from search.compress import add_compression, baked_state_dict, build_structure
    from search.model import describe_layers, find_blocks
    from search.plan import SearchSpace, suggest_plan
    from search.study import recipe_params, recipe_rules
    from search.study._scoring import write_file
    from search.tasks import load_task
    from targets import load_target

    task = load_task("search.tasks:minilm", seq_len=seq_len)
    space, layers, blocks = SearchSpace(), describe_layers(task.model, task.example_input), find_blocks(task.model)
    params = recipe_params(recipe_rules(space, blocks), space, layers, blocks)["int8 everywhere"]
    plan = suggest_plan(optuna.trial.FixedTrial(params), space, layers, blocks)
    export_float(task.model, task.example_input, folder / "teacher.onnx", task.output)
    structure = build_structure(task.model, plan, task.example_input, task.activity())
    candidate = add_compression(copy.deepcopy(structure), plan, task.example_input, dynamic_matmuls=True)
    structure.load_state_dict(baked_state_dict(candidate))
    write_file(task, load_target("cpu"), structure, plan, folder / "int8.onnx", folder / "teacher.onnx")
    return {"teacher (fp32)": folder / "teacher.onnx", "int8 everywhere": folder / "int8.onnx"}, task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, action="append", help="MiniLM's sequence length (default: 32, 128).")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    info = cpu_info()
    print(f"machine: {info['cpu']}, ISA {', '.join(info['isa']) or 'none listed'}, {info['logical_cpus']} logical "
          f"CPUs; ONNX Runtime {ort.__version__}, one thread")  # fmt: skip
    started = time.perf_counter()
    print(f"the sessions' choice: disabled_optimizers={list(fusions.disabled_optimizers())} "
          f"(the probe at {fusions._PROBE_SHAPE}: {time.perf_counter() - started:.2f} s)")  # fmt: skip
    print("\nthe kernel alone (Add + LayerNormalization, ms):")
    for shape in SHAPES:
        rng = np.random.default_rng(0)
        feeds = {name: rng.random(shape, dtype=np.float32) for name in ("x", "skip")}
        runs = max(20, int(4e6 // np.prod(shape)))
        times = timed(sessions_of(residual_layer_norm(shape)), feeds, args.rounds, min(runs, 400))
        fused, unfused = times.values()
        print(f"  {str(list(shape)):16s} fused {fused:.4f}  without the fusion {unfused:.4f}  ratio {fused / unfused:.2f}")
    from search.artifacts._onnx import _feeds

    for seq_len in args.seq_len or [32, 128]:
        with tempfile.TemporaryDirectory() as tmp:
            files, task = minilm_files(seq_len, Path(tmp))
            print(f"\nMiniLM at {seq_len} tokens (ms):")
            for name, path in files.items():
                sessions = sessions_of(str(path))
                feeds = _feeds(task.example_input, [i.name for i in next(iter(sessions.values())).get_inputs()])
                times = timed(sessions, feeds, args.rounds, 100)
                fused, unfused = times.values()
                print(f"  {name:18s} fused {fused:.3f}  without the fusion {unfused:.3f}  "
                      f"({1 - unfused / fused:.1%} less time)")  # fmt: skip


if __name__ == "__main__":
    main()
