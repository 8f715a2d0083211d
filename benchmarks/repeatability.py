"""Measurement repeatability: the same ONNX files measured in separate processes.

    python benchmarks/repeatability.py [--target cpu] [--runs 3]

Exports the default task's teacher (fp32) and an all-int8 copy of it, then measures each file in
``--runs`` fresh processes with the target's profiler and prints the latencies and their spread
(max/min − 1, the median absolute difference between runs, how many are more than 10 % above the
lowest), beside the same figures for the fastest session's plain median: what the profiler reported
before it kept only each session's quiet stretches. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np


def _measure_in_this_process(target: str, path: str) -> None:
    from profilers import get_profiler
    from targets import load_target

    print(json.dumps(get_profiler(load_target(target)).measure(path).to_dict()))


def _export(folder: Path) -> dict[str, Path]:
    import torch

    from search import LayerPlan, Plan, Quantization
    from search.artifacts import export_candidate, export_float
    from search.compress import apply_plan, bake
    from search.model import compressible_layers
    from search.tasks import digits

    task = digits()
    files = {"teacher fp32": folder / "fp32.onnx", "teacher int8": folder / "int8.onnx"}
    export_float(task.model, task.example_input, files["teacher fp32"])
    plan = Plan(layers={name: LayerPlan(quantization=Quantization(8)) for name in compressible_layers(task.model)})
    candidate = apply_plan(task.model, plan, task.example_input)
    with torch.no_grad():  # one pass in training mode sets the input quantizers' ranges
        candidate.train()
        candidate(next(iter(task.train))[0])
    bake(candidate.eval())
    export_candidate(candidate, task.example_input, files["teacher int8"], plan=plan,
                     precisions=("fp32", "int8"), calibration=task.train)  # fmt: skip
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="cpu")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one measurement, as JSON
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.measure:
        _measure_in_this_process(args.target, args.measure)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for label, path in _export(Path(tmp)).items():
            runs = []
            for _ in range(args.runs):
                out = subprocess.run(
                    [sys.executable, __file__, "--target", args.target, "--measure", str(path)],
                    check=True, capture_output=True, text=True,
                )  # fmt: skip
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            device = runs[0]["device"]
            print(
                f"{label}: {args.runs} processes ({runs[0]['runs']}+ runs each); {runs[0]['runtime']} "
                f"{runs[0]['runtime_version']}, {device['cpu']} ({' '.join(device['isa']) or 'no listed ISA flags'}), "
                f"{device['threads']} thread(s)"
            )
            quiet_share = np.median([r["quiet_share"] for r in runs])
            for figure, medians in (
                (f"latency (quiet stretches, median share {quiet_share:.0%})", [r["latency_ms"] for r in runs]),
                ("fastest session's plain median", [min(r["session_medians_ms"]) for r in runs]),
            ):
                print(f"  {figure}: {_spread(np.array(medians))}")


def _spread(medians: np.ndarray) -> str:
    pairs = [abs(a - b) / min(a, b) for i, a in enumerate(medians) for b in medians[i + 1 :]]
    return (
        f"{', '.join(f'{m:.4f}' for m in medians)} ms; max/min − 1 = {medians.max() / medians.min() - 1:.1%}, "
        f"median pairwise difference {np.median(pairs):.1%}, {np.sum(medians > 1.1 * medians.min())} more than 10 % "
        "above the lowest"
    )


if __name__ == "__main__":
    main()
