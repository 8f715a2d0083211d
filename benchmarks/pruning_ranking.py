"""Which heads and FFN channels a Transformer loses: ranked by weight magnitude, or by the teacher's
activity (what each adds to its block's output on the calibration batches) with the layers that
read them refitted to what is left, on MiniLM.

    python benchmarks/pruning_ranking.py [--seq-len 32] [--ratios 0.25,0.5] [--steps 100]

For each ratio, a plan removing that share of every block's FFN width, and one removing that share
of every block's heads, is built both ways and scored with no fine-tune (cosine to the teacher on
the held-out sentences); with ``--steps N`` the FFN plans are also distilled for N steps (the
task's own fine-tune settings) and scored again. Prints the figures, the seconds the activity pass
took, and the CPU's ISA flags and threads. Nothing else should run on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from profilers import cpu_info
from search.compress import ACTIVITY_BATCHES, Distillation, build_structure
from search.model import describe_blocks
from search.plan import ChannelPruning, HeadPruning, LayerPlan, Plan
from search.tasks import load_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--ratios", default="0.25,0.5")
    parser.add_argument("--steps", type=int, default=0, help="also distil the FFN plans for this many steps")
    args = parser.parse_args()

    print(cpu_info(), f"torch threads {torch.get_num_threads()}")
    task = load_task("search.tasks:minilm", seq_len=args.seq_len)
    start = time.perf_counter()
    activity = task.activity()
    print(f"activity pass: {time.perf_counter() - start:.2f} s over {ACTIVITY_BATCHES} batches")
    blocks = describe_blocks(task.model)
    print("plan             ranking     cosine, no fine-tune" + (f"   after {args.steps} steps" if args.steps else ""))
    for ratio in (float(r) for r in args.ratios.split(",")):
        plans = {
            f"FFN {ratio:g}": Plan(layers={name: LayerPlan(pruning=ChannelPruning(ratio)) for name in blocks.ffn}),
            f"heads {ratio:g}": Plan(heads={name: HeadPruning(ratio) for name in blocks.heads}),
        }
        for label, plan in plans.items():
            for ranking, given in (("magnitude", None), ("activity", activity)):
                model = build_structure(task.model, plan, task.example_input, given)
                line = f"{label:<16} {ranking:<11} {task.score(model):.4f}"
                if args.steps and label.startswith("FFN"):
                    finetune = dataclasses.replace(task.finetune, steps=args.steps)
                    Distillation(model, task.model, task.train, finetune, loss=task.distill_loss).run(args.steps)
                    line += f"                 {task.score(model):.4f}"
                print(line, flush=True)


if __name__ == "__main__":
    main()
