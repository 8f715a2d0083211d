"""ONNX Runtime's SkipLayerNormalization fusion on this CPU: the fused kernel against the Add and
LayerNormalization it replaces, and MiniLM's files run with and without the fusion (prints
figures; asserts nothing).

    python benchmarks/ort_fusions.py [--seq-len 32 --seq-len 128] [--rounds 5]

The CPU sessions leave out each fusion measured slower here (``profilers.disabled_optimizers``);
this script shows the figures behind that choice: the probe's own, the kernel at other shapes,
and MiniLM's teacher (fp32) and its int8-everywhere file, each session timed as the probe times
(rounds taken in turn, one thread; the median of each round, the fastest round kept).
"""

from __future__ import annotations

import argparse
import copy
import functools
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import optuna

from profilers import cpu_info
from profilers import _onnxruntime_fusions as fusions

VARIANTS = {"fused (ORT's default)": [], "without SkipLayerNormFusion": ["SkipLayerNormFusion"]}
SHAPES = [(1, 8, 384), (1, 32, 384), (1, 128, 768), (8, 128, 768), (1, 512, 1024)]


def in_turn(sessions: dict, feeds: dict, rounds: int, runs: int) -> list[float]:
    """Each session's run of ``feeds`` timed in turn (:func:`profilers._onnxruntime_fusions.timed_in_turn`), in ms."""
    calls = [functools.partial(session.run, None, feeds) for session in sessions.values()]
    return [seconds * 1000 for seconds in fusions.timed_in_turn(calls, rounds, runs)]


def sessions_of(model) -> dict:
    return {name: fusions.one_thread_session(model, off) for name, off in VARIANTS.items()}


def minilm_files(seq_len: int, folder: Path) -> tuple[dict[str, Path], object]:
    """MiniLM's teacher and its int8-everywhere plan (PTQ) as the study writes them, and the task."""
    from search.artifacts import export_float, export_raw
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
    export_raw(structure, task.example_input, folder / "graph.onnx", task.output, weights=False)
    write_file(task, load_target("cpu"), structure, plan, folder / "int8.onnx", folder / "graph.onnx")
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
        runs = min(400, max(20, int(4e6 // np.prod(shape))))
        fused, unfused = in_turn(sessions_of(fusions.residual_layer_norm(shape)), feeds, args.rounds, runs)
        print(f"  {str(list(shape)):16s} fused {fused:.4f}  without the fusion {unfused:.4f}  ratio {fused / unfused:.2f}")
    from search.artifacts._onnx import _feeds

    for seq_len in args.seq_len or [32, 128]:
        with tempfile.TemporaryDirectory() as tmp:
            files, task = minilm_files(seq_len, Path(tmp))
            print(f"\nMiniLM at {seq_len} tokens (ms):")
            for name, path in files.items():
                sessions = sessions_of(str(path))
                feeds = _feeds(task.example_input, [i.name for i in next(iter(sessions.values())).get_inputs()])
                fused, unfused = in_turn(sessions, feeds, args.rounds, 100)
                print(f"  {name:18s} fused {fused:.3f}  without the fusion {unfused:.3f}  "
                      f"({1 - unfused / fused:.1%} less time)")  # fmt: skip


if __name__ == "__main__":
    main()
