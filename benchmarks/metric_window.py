"""What a metric on another scale does to a study without its own window (prints figures; asserts
nothing): the layer-sensitivity pass of a task, then the bit widths it would rule out with the
metric as it is and the default window, and with the metric in percent (the same drops, 100 times
larger) and the same default window, as a task that returns percent and sets no ``metric_window``
would have it.

    python benchmarks/metric_window.py [--task motifs|digits|module:function]
"""

from __future__ import annotations

import argparse
import time
import warnings

from search.model import describe_layers, find_blocks
from search.plan import SearchSpace
from search.study._sensitivity import BLOCK, excluded_bits, layer_sensitivity
from search.tasks import METRIC_WINDOW, load_task
from targets import load_target

TASKS = {"digits": "search.tasks:digits", "motifs": "search.tasks:motifs"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="motifs", help="motifs, digits or module:function (default: motifs)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    task = load_task(TASKS.get(args.task, args.task))
    layers = describe_layers(task.model, task.example_input)
    start = time.perf_counter()
    teacher = task.score(task.model)
    rows = layer_sensitivity(task, layers, SearchSpace(), find_blocks(task.model), load_target("cpu"), teacher, None)
    print(f"{task.name}: teacher metric {teacher:.4f}; sensitivity pass {time.perf_counter() - start:.0f} s")
    for row in rows:
        if row["kind"] != BLOCK and row["pruning"] == 0 and row["error"] is None:
            print(f"  layer {row['layer']:>24s} at {row['bits']:>2d} bits: drop {row['drop']:+.4f}")
    for label, scale in (("as it is", 1.0), ("in percent", 100.0)):
        scaled = [{**row, "drop": row["drop"] * scale} for row in rows]
        excluded = excluded_bits(scaled, METRIC_WINDOW)
        offered_int8 = sum(1 for layer in layers if 8 not in excluded.get(f"{layer.name}.bits", ()))
        print(f"metric {label}, window {METRIC_WINDOW:g}: {sum(map(len, excluded.values()))} bit widths ruled out "
              f"({', '.join(f'{k} {v}' for k, v in excluded.items()) or 'none'}); int8 offered to {offered_int8} "
              f"of {len(layers)} layers")  # fmt: skip


if __name__ == "__main__":
    main()
