"""Benchmark the default search: teacher vs best front point, trials per minute, where time goes.

    python benchmarks/default_task.py [--trials 30] [--budget 0.5x] [--steps 80]

Prints figures only; nothing here is asserted. Compare figures within one run: the CPU (and its
int8 ISA) differs between machines, so the ISA flags and thread count are printed with them.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings

import optuna

import search
from search.tasks import digits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--budget", default="0.5x")
    parser.add_argument("--steps", type=int, default=search.Finetune.steps)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore")

    with tempfile.TemporaryDirectory() as results:
        start = time.perf_counter()
        task = digits(cache_dir=f"{results}/teachers")  # trains the teacher: part of a fresh run
        loaded = time.perf_counter()
        study = search.run(
            task, target="cpu", budget=args.budget, trials=args.trials, seed=args.seed,
            finetune=search.Finetune(steps=args.steps), results_dir=results,
        )  # fmt: skip
        end = time.perf_counter()
        frame = search.load_trials(study)

    baseline = study.user_attrs["baseline"]
    finished = frame[frame["state"].isin(["COMPLETE", "PRUNED", "FAIL"])]
    stage_seconds = frame["user_attrs_seconds"].dropna().apply(lambda s: s).tolist()
    finetune_s = sum(s.get("fine-tune", 0.0) for s in stage_seconds)
    measure_s = sum(s.get("measure", 0.0) for s in stage_seconds)
    # Pruned trials stop inside fine-tuning: their time since the trial started was fine-tuning too.
    pruned = frame[frame["state"] == "PRUNED"]
    finetune_s += float(pruned["duration"].dt.total_seconds().sum())
    search_s = end - loaded
    device = frame["user_attrs_device"].dropna().iloc[0]

    print(f"machine: {device['cpu']}, ISA {', '.join(device['isa'])}, {device['threads']} ORT thread(s)")
    print(f"budget {args.budget} = {study.user_attrs['budget_ms']:.4f} ms; {len(finished)} trials "
          f"({(frame['state'] == 'COMPLETE').sum()} complete, {len(pruned)} pruned, "
          f"{(frame['state'] == 'FAIL').sum()} failed), {args.steps} fine-tune steps each")
    print(f"teacher: metric {baseline['metric']:.4f}, latency {baseline['latency_ms']:.4f} ms "
          f"(p90 {baseline['latency_p90_ms']:.4f}), size {baseline['size_bytes'] / 1024:.0f} KiB")
    front = frame[frame["pareto"]].sort_values("latency_ms")
    if front.empty:
        print("no feasible front point")
    for label, row in (("most accurate", front.loc[front["metric"].idxmax()] if not front.empty else None),
                       ("fastest", front.iloc[0] if not front.empty else None)):  # fmt: skip
        if row is not None:
            print(
                f"front, {label}: trial {row['number']}, metric {row['metric']:.4f}, latency "
                f"{row['latency_ms']:.4f} ms, speedup {baseline['latency_ms'] / row['latency_ms']:.2f}x, "
                f"size {row['size_bytes'] / 1024:.0f} KiB, {row['precision']}"
            )
    print(f"front size: {len(front)} feasible Pareto points")
    print(f"wall: {end - start:.1f} s total, {loaded - start:.1f} s loading the task (teacher training), "
          f"{search_s:.1f} s search (baseline and trials)")
    print(f"trials per minute: {len(finished) / (search_s / 60):.1f}")
    outside = search_s - finetune_s - measure_s
    print(f"time in fine-tuning {finetune_s:.1f} s ({finetune_s / search_s:.0%}), measuring {measure_s:.1f} s "
          f"({measure_s / search_s:.0%}), everything else {outside:.1f} s ({outside / search_s:.0%}: "
          f"build, export, int8 calibration, scoring, baseline, Optuna)")


if __name__ == "__main__":
    main()
