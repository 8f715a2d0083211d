"""How long the command line takes before it does anything: ``search --help``, and ``search results``
on a study, each in a fresh interpreter, with the heavy libraries each one imported.

    python benchmarks/cli_startup.py [--study results/digits-cnn-cpu] [--repeat 5]

Prints the median wall-clock seconds of each command over ``--repeat`` runs (the first run is not
counted: it fills the file cache). Nothing else should run on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import ast
import statistics
import subprocess
import sys
import time
from pathlib import Path

HEAVY = ("torch", "sklearn", "scipy", "onnx", "onnxscript", "onnxruntime", "fastapi", "transformers", "matplotlib")
PROBE = (
    "import sys\n"
    "from search.cli import main\n"
    "sys.argv = ['search', *{args!r}]\n"
    "try:\n"
    "    main()\n"
    "except SystemExit:\n"
    "    pass\n"
    "sys.__stderr__.write(repr(sorted({{m.split('.')[0] for m in sys.modules}} & {heavy!r})))\n"
)


def _timed(args: list[str], repeat: int) -> tuple[float, list[str]]:
    code = PROBE.format(args=args, heavy=set(HEAVY))
    seconds, imported = [], []
    for run in range(repeat + 1):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        if run:
            seconds.append(time.perf_counter() - start)
        imported = ast.literal_eval(done.stderr.strip().splitlines()[-1])
    return statistics.median(seconds), imported


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", type=Path, help="A results folder for `search results` (default: none timed).")
    parser.add_argument("--repeat", type=int, default=5)
    options = parser.parse_args()
    commands = [["--help"], ["run", "--help"]]
    if options.study:
        commands.append(["results", str(options.study)])
    for args in commands:
        seconds, imported = _timed(args, options.repeat)
        print(f"search {' '.join(args):<40} {seconds:6.2f} s   heavy libraries imported: {', '.join(imported) or 'none'}")


if __name__ == "__main__":
    main()
