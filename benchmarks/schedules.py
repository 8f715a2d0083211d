"""The fine-tune's learning-rate schedules, compared on the recipes: each recipe's metric at each
rung's end (what a screened, a promoted and a fully fine-tuned plan is scored at), per schedule
(prints figures; asserts nothing).

    python benchmarks/schedules.py [--task motifs] [--steps 2700] [--schedule stable-decay ...]
        [--recipe "prune 0.5" ...]

One fine-tune per schedule and recipe, seeded as the benchmark's standalone recipes are, scored in
PyTorch (no export) at every rung's end.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
import warnings

import optuna
import torch

from search.compress import SCHEDULES, Distillation, Finetune, apply_plan, calibrate_input_quant
from search.model import describe_layers, find_blocks
from search.plan import SearchSpace, suggest_plan
from search.study import recipe_params, recipe_rules
from search.tasks import load_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="motifs", help="A built-in task or module:function (default: motifs).")
    parser.add_argument("--steps", type=int, default=2700, help="The longest fine-tune (default: 2700).")
    parser.add_argument("--schedule", action="append", choices=SCHEDULES, help="Repeatable; default: all.")
    parser.add_argument("--recipe", action="append", help='Repeatable; default: "prune 0.5" and "prune 0.25".')
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    task = load_task(args.task if ":" in args.task else f"search.tasks:{args.task}")
    space = SearchSpace()
    layers, blocks = describe_layers(task.model, task.example_input), find_blocks(task.model)
    recipes = recipe_params(recipe_rules(space, blocks), space, layers, blocks)
    print(f"{task.name}: teacher metric {task.score(task.model):.4f}; torch threads {torch.get_num_threads()}")
    for schedule in args.schedule or SCHEDULES:
        finetune = dataclasses.replace(task.finetune or Finetune(), steps=args.steps, schedule=schedule)
        for recipe in args.recipe or ["prune 0.5", "prune 0.25"]:
            plan = suggest_plan(optuna.trial.FixedTrial(recipes[recipe]), space, layers, blocks)
            candidate = apply_plan(task.model, plan, task.example_input, task.activity())
            calibrate_input_quant(candidate, task.calibration_batches())
            run = Distillation(candidate, task.model, task.train, finetune, loss=task.distill_loss, output=task.output)
            start, scores = time.perf_counter(), []
            for end in finetune.rung_ends():
                run.run(end)
                scores.append(f"{end} steps {task.score(candidate):.4f}")
            print(f"{schedule:13s} {recipe:12s} " + ", ".join(scores) + f"  ({time.perf_counter() - start:.0f} s)",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
