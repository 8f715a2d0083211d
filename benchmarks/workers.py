"""Trials per minute for 1, 2 and 4 workers on one PostgreSQL study (prints figures; asserts nothing).

    python benchmarks/workers.py [--trials 16] [--workers 1,2,4] [--steps 80]

Starts a throwaway PostgreSQL server on loopback (Debian's package: ``tests/install-postgres.sh``),
then for each worker count runs the default task's study from scratch on it with
``search.run(..., workers=N)``: this process and N-1 ``search worker`` processes. The cost model is
off and the pruner on, as in the default run. Measurements take turns (one at a time per machine),
fine-tuning does not: on a machine with fewer cores than workers the extra workers only contend,
and the figures show that.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import search  # noqa: E402
from postgres import postgres_server  # noqa: E402
from profilers import cpu_info  # noqa: E402
from search.study import finished_count  # noqa: E402


def _one(url: str, workers: int, trials: int, steps: int, results: Path) -> dict:
    task = search.load_task("search.tasks:digits")
    start = time.perf_counter()
    study = search.run(
        task, budget="0.5x", trials=trials, workers=workers, storage=url, study_name=f"workers-{workers}",
        results_dir=results, cost_model=False, finetune=search.Finetune(steps=steps),
    )  # fmt: skip
    wall = time.perf_counter() - start
    trials_done = [t for t in study.trials if t.state.is_finished() and not t.user_attrs.get("surplus")]
    first = min(t.datetime_start for t in trials_done)
    last = max(t.datetime_complete for t in trials_done)
    span = (last - first).total_seconds()
    return {
        "workers": workers,
        "finished": finished_count(study),
        "states": {s: sum(t.state.name == s for t in trials_done) for s in ("COMPLETE", "PRUNED", "FAIL")},
        "pids": len({t.user_attrs.get("worker", {}).get("pid") for t in trials_done}),
        "wall_s": wall,
        "span_s": span,
        "per_minute": 60 * len(trials_done) / span,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--steps", type=int, default=80)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore")
    cpu = cpu_info()
    print(
        f"{cpu['cpu']}, {cpu['logical_cpus']} logical CPUs, ISA {', '.join(cpu['isa']) or 'none of note'}; "
        f"PostgreSQL on loopback; {args.trials} trials, {args.steps} steps"
    )
    with postgres_server() as url, tempfile.TemporaryDirectory() as results:
        for workers in (int(w) for w in args.workers.split(",")):
            row = _one(url, workers, args.trials, args.steps, Path(results))
            print(
                f"{row['workers']} worker(s): {row['finished']} trials {row['states']} by {row['pids']} processes; "
                f"{row['per_minute']:.1f} trials/min (first start to last finish {row['span_s']:.1f} s; "
                f"wall {row['wall_s']:.1f} s with baseline and worker start-up)",
                flush=True,
            )


if __name__ == "__main__":
    main()
