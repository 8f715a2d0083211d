"""The MiniLM example against uniform baselines, in one run (prints figures; asserts nothing).

    python benchmarks/minilm.py [--trials 20] [--steps 120] [--seq-len 64] [--budget 0.5x]

Every figure comes from the real pipeline (build, distil, export, score the ONNX file, measure on
the ``cpu`` target), each plan as one trial of a study under ``--results-dir``:

- the teacher (all-MiniLM-L6-v2, fp32);
- uniform baselines, without fine-tuning: dynamic int8 per-channel on every linear layer, int4
  weight-only (MatMulNBits) on every linear layer;
- the same two and 50 % FFN pruning in every block with the study's distillation budget;
- the study's front after ``--trials`` trials over depth, heads, FFN width and per-layer bits
  (sparsity is left out: ONNX Runtime runs it no faster, RUNTIME_FACTS; the first and last layers
  may go to 4 bits, as the uniform int4 baseline needs).

Prints cosine to the teacher on the held-out sentences, measured median latency, speedup, packed
size and wall-clock per trial, plus the CPU's ISA flags and threads.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
import warnings
from pathlib import Path

import optuna

import search
from profilers import cpu_info
from search.model import compressible_layers, describe_blocks

SPACE = search.SearchSpace(sparsity=(0.0,), two_four=False, bits=(32, 8, 4), edge_min_bits=4)


def _baseline_params(task: search.Task, bits: int, ffn: float) -> dict:
    """Optuna parameters of a uniform plan: every linear at ``bits``, every FFN pruned by ``ffn``."""
    blocks = describe_blocks(task.model)
    params = {"depth": blocks.blocks, **{f"{name}.heads": 0.0 for name in blocks.heads}}
    for name in compressible_layers(task.model):
        params[f"{name}.bits"] = bits
        params[f"{name}.sparsity"] = 0.0
        if name in blocks.ffn:
            params[f"{name}.pruning"] = ffn
    return params


def _study(task, name: str, args, finetune: search.Finetune, trials: int, enqueue=()) -> optuna.Study:
    storage = f"sqlite:///{(args.results_dir / name).resolve()}.db"
    if enqueue:
        study = optuna.create_study(
            storage=storage, study_name=name, directions=["maximize", "minimize"], load_if_exists=True
        )
        for params in enqueue:
            study.enqueue_trial(params, skip_if_exists=True)
    return search.run(
        task, budget=args.budget, trials=trials, space=SPACE, finetune=finetune, storage=storage,
        study_name=name, results_dir=args.results_dir, seed=args.seed, cost_model=True,
    )  # fmt: skip


def _rows(study: optuna.Study, teacher_ms: float, labels: list[str] | None = None) -> list[dict]:
    """One row per trial: trial ``i`` labelled ``labels[i]``, or the front's trials without labels.
    Speedups are against ``teacher_ms``, one measurement of the teacher for every row."""
    frame = search.load_trials(study)
    frame = frame[frame["state"] == "COMPLETE"]
    frame = frame[frame["number"] < len(labels)] if labels else frame[frame["pareto"]]
    return [
        {
            "plan": labels[int(row["number"])] if labels else f"front: trial {int(row['number'])}",
            "cosine": row["metric"],
            "latency_ms": row["latency_ms"],
            "speedup": teacher_ms / row["latency_ms"],
            "size_mib": row["size_bytes"] / 2**20,
            "trial_s": row["duration"].total_seconds(),
            "precision": row["precision"],
        }
        for _, row in frame.iterrows()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--steps", type=int, default=None, help="distillation steps (default: the task's)")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--budget", default="0.5x")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results-dir", type=Path, default=Path("results/benchmark-minilm"))
    args = parser.parse_args()
    args.results_dir.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore")
    info = cpu_info()
    print(f"CPU: {info['cpu']}, {info['logical_cpus']} logical CPUs; ISA: {', '.join(info['isa'])}; 1 ORT thread")

    started = time.perf_counter()
    task = search.load_task("search.tasks:minilm", seq_len=args.seq_len)
    finetune = task.finetune if args.steps is None else dataclasses.replace(task.finetune, steps=args.steps)
    uniform = {"dynamic int8": (8, 0.0), "int4 weight-only": (4, 0.0)}
    rows = []
    ptq = _study(task, "baselines-ptq", args, search.Finetune(steps=0), len(uniform),
                 [_baseline_params(task, *v) for v in uniform.values()])  # fmt: skip
    trained = {**uniform, "50 % FFN pruning": (32, 0.5)}
    distilled = _study(task, "baselines-distilled", args, finetune, len(trained),
                       [_baseline_params(task, *v) for v in trained.values()])  # fmt: skip
    teacher = ptq.user_attrs["baseline"]
    rows.append({"plan": "teacher (fp32)", "cosine": teacher["metric"], "latency_ms": teacher["latency_ms"],
                 "speedup": 1.0, "size_mib": teacher["size_bytes"] / 2**20, "trial_s": 0.0, "precision": "fp32"})  # fmt: skip
    rows += _rows(ptq, teacher["latency_ms"], [f"{label}, no fine-tune" for label in uniform])
    rows += _rows(distilled, teacher["latency_ms"], [f"{label} + {finetune.steps} steps" for label in trained])
    search_start = time.perf_counter()
    found = _study(task, "search", args, finetune, args.trials)
    search_s = time.perf_counter() - search_start
    rows += _rows(found, teacher["latency_ms"])

    print(f"\nall-MiniLM-L6-v2, seq {args.seq_len}, cpu target, budget {args.budget} "
          f"({found.user_attrs['budget_ms']:.2f} ms); distillation {finetune.steps} steps at lr "
          f"{finetune.lr}, {finetune.schedule} schedule")  # fmt: skip
    teachers = ", ".join(f"{study.user_attrs['baseline']['latency_ms']:.2f}" for study in (ptq, distilled, found))
    print(f"the teacher measured {teachers} ms by the three studies; speedups against the first")
    print(f"{'plan':44s} {'cosine':>7s} {'ms':>7s} {'speedup':>8s} {'MiB':>6s} {'trial s':>8s}  precision")
    for r in rows:
        print(f"{r['plan']:44s} {r['cosine']:7.4f} {r['latency_ms']:7.2f} {r['speedup']:7.2f}x "
              f"{r['size_mib']:6.1f} {r['trial_s']:8.0f}  {r['precision']}")  # fmt: skip
    print(f"\nsearch: {args.trials} trials in {search_s / 60:.1f} min; whole benchmark {(time.perf_counter() - started) / 60:.1f} min")
    goal = [r for r in rows if r["plan"].startswith("front") and r["cosine"] >= 0.99 and r["speedup"] >= 3.0]
    print(f"goal (>= 3x at cosine >= 0.99): {'met by ' + ', '.join(r['plan'] for r in goal) if goal else 'not met'}")


if __name__ == "__main__":
    main()
