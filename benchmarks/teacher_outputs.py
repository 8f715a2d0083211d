"""What remembering the teacher's outputs saves a fine-tune step, per recipe (prints figures;
asserts nothing).

    python benchmarks/teacher_outputs.py [--task motifs] [--seq-len 32] [--steps 40]
        [--recipe "prune 0.5" ...]

Per recipe: the teacher's forward pass alone on the first ``--steps`` training batches, then the
recipe's fine-tune of ``--steps`` steps three times, as a study's trials run it: the teacher run on
every batch; reading a TeacherOutputs it fills (the first trial of a study); reading it filled (every
later trial). Milliseconds a step, and the share of a step the teacher's forward pass was.
"""

from __future__ import annotations

import argparse
import time
import warnings

import optuna
import torch

from profilers import cpu_info
from search.compress import Distillation, Finetune, TeacherOutputs, apply_plan, calibrate_input_quant
from search.model import describe_layers, find_blocks, split_batch
from search.plan import SearchSpace, suggest_plan
from search.study import recipe_params, recipe_rules
from search.tasks import load_task


def _ms_a_step(task, plan, steps: int, outputs: TeacherOutputs | None) -> float:
    student = apply_plan(task.model, plan, task.example_input, task.activity())
    calibrate_input_quant(student, task.calibration_batches())
    run = Distillation(
        student, task.model, task.train, Finetune(steps=steps, lr=1e-4), loss=task.distill_loss,
        output=task.output, teacher_outputs=outputs,
    )  # fmt: skip
    start = time.perf_counter()
    run.run(steps)
    return (time.perf_counter() - start) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="motifs", help="A built-in task or module:function (default: motifs).")
    parser.add_argument("--seq-len", type=int, help="MiniLM's sequence length.")
    parser.add_argument("--steps", type=int, default=40, help="Steps of each fine-tune (default: 40).")
    parser.add_argument("--recipe", action="append", help="Repeatable; default: every recipe of the task.")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    task = load_task(args.task if ":" in args.task else f"search.tasks:{args.task}",
                     **({"seq_len": args.seq_len} if args.seq_len else {}))  # fmt: skip
    info = cpu_info()
    print(f"machine: {info['cpu']}, ISA {', '.join(info['isa']) or 'none listed'}, {info['logical_cpus']} logical "
          f"CPUs; torch threads: {torch.get_num_threads()}", flush=True)  # fmt: skip
    space = SearchSpace()
    layers, blocks = describe_layers(task.model, task.example_input), find_blocks(task.model)
    recipes = recipe_params(recipe_rules(space, blocks), space, layers, blocks)
    unknown = [name for name in args.recipe or () if name not in recipes]
    if unknown:
        parser.error(f"recipe {', '.join(map(repr, unknown))}: this task's are {', '.join(map(repr, recipes))}")
    batches = [split_batch(batch)[0] for batch, _ in zip(task.train, range(args.steps))]
    teacher = TeacherOutputs(task.model, task.output, max_bytes=0)  # the teacher run on each batch
    start = time.perf_counter()
    for inputs in batches:
        teacher(inputs)
    teacher_ms = (time.perf_counter() - start) / len(batches) * 1000
    print(f"{task.name}: the teacher's forward pass {teacher_ms:.1f} ms a batch", flush=True)
    for name in args.recipe or recipes:
        plan = suggest_plan(optuna.trial.FixedTrial(recipes[name]), space, layers, blocks)
        plain = _ms_a_step(task, plan, args.steps, None)
        outputs = TeacherOutputs(task.model, task.output)
        filling = _ms_a_step(task, plan, args.steps, outputs)
        filled = _ms_a_step(task, plan, args.steps, outputs)
        print(f"  {name:24s} {plain:7.1f} ms a step with the teacher ({teacher_ms / plain:.0%} of it), "
              f"{filling:7.1f} filling, {filled:7.1f} filled: {plain / filled:.2f}x", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
