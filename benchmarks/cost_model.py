"""Benchmark the learned cost model (prints figures; asserts nothing).

    python benchmarks/cost_model.py accuracy [--task digits|resnet18|signal-transformer] [--held-out 32] [--cache F]
    python benchmarks/cost_model.py search [--trials 40] [--budget 0.15x] [--seeds 0,1,2] [--equal-time]
        [--warm-start N]
    python benchmarks/cost_model.py replay [--trials 40] [--budget 0.15x] [--seeds 0,1,2,3] [--cache FILE]

``accuracy``: random plans are built (no fine-tuning: weights do not change latency), exported and
measured on the cpu target; the cost model and a FLOPs-only linear baseline are trained on the first
16, 32 and 64 and scored on the held-out rest; ``--cache`` keeps the plans and their latencies, and a
later run computes their features again from the plans: a new feature layout is compared on the
same measurements. ``signal-transformer``: the unseen Transformer's network (``nn.MultiheadAttention``),
untrained (weights do not change latency). ``search``: the default study with the cost model on
and off, same seed and number of trials: work skipped, wall-clock, and the hypervolume of each front
(metric × latency, reference point: metric 0 at the budget); then every plan the study did not
measure (vetoed, or stopped by the pruner) is built and measured (no fine-tune) to count the
vetoes that were wrong and every plan that was over the budget: what a perfect gate could have
skipped. ``replay``: the default study with the cost model off, then, trial by trial, what the
gate would have vetoed with each minimum number of measurements and rule (the gate's own, or a
confidence: the lower bound that many spreads below the prediction over the budget), fitted on the
measurements before that trial (right: measured over the budget; wrong: within it; unmeasured:
stopped early by the pruner); once on each trial's latency and once on its fastest session's plain
median (what the profiler reported before it kept only each session's quiet stretches); and how
often a measured trial fell below its prediction's lower bound at 0.5–2 spreads (the spread's
calibration: a veto is wrong only where that happens to a plan within the budget).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import optuna
import torch

import search
from profilers import cpu_info, get_profiler
from search.artifacts import export_candidate
from search.compress import apply_plan, bake
from search.costmodel import (
    FEATURE_VERSION,
    MAX_EXPECTED_HEADROOM,
    MIN_MEASUREMENTS,
    CostGate,
    FlopsBaseline,
    LatencyModel,
    accuracy,
    feature_matrix,
    latency_figures,
    plan_features,
)
from search.model import describe_layers, find_blocks
from search.plan import SearchSpace, parse_budget, suggest_plan
from search.tasks import digits
from targets import load_target

SIZES = (16, 32, 64)
GATE = "gate"  # in the replay: the search's own veto rule (CostGate.veto_reason)


def _resnet18_task() -> search.Task:
    from torchvision.models import resnet18

    model = resnet18(weights=None).eval()
    images = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    batches = [(images[i : i + 1], torch.zeros(1, dtype=torch.long)) for i in range(8)]
    return search.Task(model, batches, batches, images[:1], name="resnet18")


def _measure(task: search.Task, candidate: torch.nn.Module, plan: search.Plan, profiler, path: Path) -> float:
    """Export a built (not fine-tuned) candidate to ``path`` and measure it, in ms."""
    with torch.no_grad():  # one calibration pass for the input quantizers' ranges
        candidate.train()
        candidate(next(iter(task.train))[0])
    bake(candidate.eval())
    export_candidate(candidate, task.example_input, path, plan=plan, precisions=profiler.target.precisions,
                     calibration=task.train)  # fmt: skip
    return profiler.measure(path).latency_ms


def _latencies(task: search.Task, frame) -> tuple[np.ndarray, np.ndarray]:
    """Every trial's latency in ms, and which were measured afterwards: the study's measurement
    where it made one, else the plan built and measured now, without fine-tuning (weights do not
    change latency): the vetoed plans, to count wrong vetoes, and the plans the pruner stopped, to
    count every plan that was over the budget. NaN where the plan cannot be built."""
    profiler = get_profiler(load_target("cpu"))
    latency = frame["latency_ms"].to_numpy(dtype=float).copy()
    afterwards = np.zeros(len(latency), dtype=bool)
    with tempfile.TemporaryDirectory() as tmp:
        for i in np.flatnonzero(np.isnan(latency)):
            plan = search.Plan.from_json(frame["plan"].iloc[i])
            try:
                candidate = apply_plan(task.model, plan, task.example_input)
            except search.CandidateError:
                continue
            latency[i] = _measure(task, candidate, plan, profiler, Path(tmp, f"{i}.onnx"))
            afterwards[i] = True
    return latency, afterwards


def _accuracy_task(name: str) -> search.Task:
    if name == "digits":
        return digits()
    if name == "resnet18":
        return _resnet18_task()
    from benchmarks.unseen_transformer import SignalTransformer

    torch.manual_seed(0)
    signals = torch.randn(8, 4, 128, generator=torch.Generator().manual_seed(0))
    batches = [(signals[i : i + 1], torch.zeros(1, dtype=torch.long)) for i in range(8)]
    return search.Task(SignalTransformer().eval(), batches, batches, signals[:1], name="signal-transformer")


def _random_plans(task: search.Task, count: int, seed: int):
    """``count`` random plans of the default space (a Transformer's with its blocks) and each one's
    built candidate; a plan Torch-Pruning cannot build is left out."""
    layers = describe_layers(task.model, task.example_input)
    blocks = find_blocks(task.model)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    for _ in range(count):
        trial = study.ask()
        plan = suggest_plan(trial, SearchSpace(), layers, blocks)
        study.tell(trial, 0.0)
        try:
            yield plan, apply_plan(task.model, plan, task.example_input)
        except search.CandidateError:
            continue


def _measured_plans(task: search.Task, count: int, seed: int, cache: Path | None) -> tuple[list, list[float]]:
    """Random plans and their latencies measured on the cpu target (from ``cache`` if it holds them)."""
    if cache is not None and cache.exists():
        stored = json.loads(cache.read_text())
        if stored["task"] != task.name:
            raise SystemExit(f"{cache} holds plans of {stored['task']!r}, not of {task.name!r}")
        return [search.Plan.from_dict(plan) for plan in stored["plans"]], stored["latency_ms"]
    profiler = get_profiler(load_target("cpu"))
    plans, latency = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (plan, candidate) in enumerate(_random_plans(task, count, seed)):
            plans.append(plan)
            latency.append(_measure(task, candidate, plan, profiler, Path(tmp, f"{i}.onnx")))
            print(f"  plan {i + 1}/{count}: {latency[-1]:.4f} ms", flush=True)
    if cache is not None:
        cache.write_text(json.dumps({"task": task.name, "plans": [p.to_dict() for p in plans], "latency_ms": latency}))
    return plans, latency


def accuracy_benchmark(task_name: str, held_out: int, seed: int, cache: Path | None) -> None:
    start = time.perf_counter()
    task = _accuracy_task(task_name)
    plans, measured = _measured_plans(task, max(SIZES) + held_out, seed, cache)
    target = load_target("cpu")
    x = feature_matrix(
        [plan_features(apply_plan(task.model, plan, task.example_input), plan, task.example_input, target)
         for plan in plans]
    )  # fmt: skip
    y = np.array(measured)
    print(f"{task_name}: {len(y)} plans, measured (or read from --cache) in {time.perf_counter() - start:.0f} s; "
          f"latency {y.min():.4f}–{y.max():.4f} ms; held out: the last {held_out}; "
          f"features v{FEATURE_VERSION}")  # fmt: skip
    x_test, y_test = x[-held_out:], y[-held_out:]
    for size in SIZES:
        for name, model in (("cost model", LatencyModel()), ("FLOPs-only linear", FlopsBaseline())):
            scores = accuracy(y_test, model.fit(x[:size], y[:size]).predict(x_test))
            print(f"  after {size:>2} measurements, {name:<17}: within ±10% {scores['within_10pct']:.0%}, "
                  f"±20% {scores['within_20pct']:.0%}, MAPE {scores['mape']:.1%}, "
                  f"Spearman {scores['spearman']:.3f}")  # fmt: skip


def hypervolume(metric: np.ndarray, latency: np.ndarray, budget_ms: float) -> float:
    """Area dominated by the (metric up, latency down) points inside the budget, from (budget, 0)."""
    points = sorted((l, m) for m, l in zip(metric, latency) if l <= budget_ms)
    area, best = 0.0, 0.0
    for i, (l, m) in enumerate(points):
        best = max(best, m)
        right = points[i + 1][0] if i + 1 < len(points) else budget_ms
        area += (right - l) * best
    return area


def search_benchmark(trials: int, budget: str, seeds: list[int], equal_time: bool, warm_start: int) -> None:
    """The study with the cost model off and on for each seed, then the totals over the seeds.

    One seed says little: the two runs take the same plans until the first veto, or until a noisy
    measurement moves a plan across the budget, and part ways from there. With ``warm_start`` N,
    N earlier studies on the same task and target (seeds 1000, 1001, ...) run first, once, and
    every cost-model run starts from their measurements, as a user's later study would."""
    task = digits()
    runs = {False: [], True: []}
    with tempfile.TemporaryDirectory() as earlier:
        for k in range(warm_start):
            start = time.perf_counter()
            study = search.run(task, budget=budget, seed=1000 + k, trials=trials, results_dir=earlier,
                               study_name=f"earlier-{k}")  # fmt: skip
            print(f"earlier study {k} (seed {1000 + k}, warm start): {len(study.trials)} trials in "
                  f"{time.perf_counter() - start:.0f} s")  # fmt: skip
        for seed in seeds:
            pair = _search_pair(task, trials, budget, seed, equal_time, Path(earlier) if warm_start else None)
            for cost_model, figures in pair.items():
                runs[cost_model].append(figures)
    if len(seeds) > 1:
        for cost_model, figures in runs.items():
            keys = ("trials", "vetoed", "ceiling", "wall", "hypervolume")
            total = {key: sum(f[key] for f in figures) for key in keys}
            print(f"cost model {'on ' if cost_model else 'off'}, {len(seeds)} seeds: {total['trials']} trials in "
                  f"{total['wall']:.0f} s, {total['vetoed']} vetoed ({total['vetoed'] / total['trials']:.0%}; "
                  f"over the budget after the gate's first {MIN_MEASUREMENTS} measurements: {total['ceiling']}, "
                  f"{total['ceiling'] / total['trials']:.0%}), "
                  f"mean hypervolume {total['hypervolume'] / len(seeds):.6f}")  # fmt: skip
        wins = sum(on["hypervolume"] >= off["hypervolume"] for off, on in zip(runs[False], runs[True]))
        print(f"hypervolume with the cost model on >= off in {wins} of {len(seeds)} seeds")


def _search_pair(
    task: search.Task, trials: int, budget: str, seed: int, equal_time: bool, earlier: Path | None
) -> dict[bool, dict]:
    """One seed, off then on. The cost-model run gets the budget in ms of the run without it; with
    ``equal_time`` also its wall-clock, and as many trials as fit, instead of the same number of
    trials; with ``earlier`` (a results folder) it starts from the measurements of the studies there."""
    figures, wall_off, budget_off = {}, None, None
    for cost_model in (False, True):
        limits = {"trials": trials}
        if cost_model:
            budget = budget_off  # in ms: the teacher, measured again, would move it
            if equal_time:
                limits = {"trials": 10 * trials, "timeout": wall_off}
        with tempfile.TemporaryDirectory() as results:
            if cost_model and earlier is not None:
                shutil.copytree(earlier / "costmodel", Path(results) / "costmodel")
            start = time.perf_counter()
            study = search.run(task, budget=budget, seed=seed, cost_model=cost_model, results_dir=results,
                               **limits)  # fmt: skip
            wall = time.perf_counter() - start
            frame = search.load_trials(study)
        if not cost_model:
            wall_off, budget_off = wall, f"{study.user_attrs['budget_ms']}ms"
        if cost_model and earlier is not None:
            print(f"seed {seed}: the cost model started from {study.user_attrs['cost_model_warm_start']} "
                  "earlier measurements")  # fmt: skip
        figures[cost_model] = _print_search(task, seed, cost_model, frame, wall, study.user_attrs["budget_ms"])
    return figures


def _print_search(task: search.Task, seed: int, cost_model: bool, frame, wall: float, budget_ms: float) -> dict:
    """One run's figures, and what any gate could have vetoed in it: every trial's latency is known
    (see ``_latencies``), so a trial that reached the point where the gate acts (5 measurements,
    earlier studies' included) and is over the budget was a plan a perfect gate would have skipped."""
    trials_run = len(frame)
    vetoed = (frame["pruned_by"] == "cost-model").to_numpy()
    measured = int(frame["latency_ms"].notna().sum())
    done = frame[frame["state"] == "COMPLETE"]
    volume = hypervolume(done["metric"].to_numpy(), done["latency_ms"].to_numpy(), budget_ms)
    print(f"seed {seed}, cost model {'on ' if cost_model else 'off'}: {trials_run} trials in {wall:.0f} s; "
          f"{vetoed.sum()} vetoed before fine-tuning ({vetoed.sum() / trials_run:.0%}), {measured} measured, "
          f"{len(done[done['feasible']])} feasible; front {int(frame['pareto'].sum())} points, "
          f"hypervolume {volume:.6f} (budget {budget_ms:.4f} ms)")  # fmt: skip
    latency, afterwards = _latencies(task, frame)
    over = latency > budget_ms
    own = frame["duplicate_of"].isna()  # a duplicate reuses another trial's results: nothing to skip
    if cost_model:  # the gate acted where it predicted
        gated = (frame["predicted_latency_ms"].notna() & own).to_numpy()
    else:  # where it would have: after 5 trials that measured
        measured_own = frame["latency_ms"].notna() & own
        gated = ((measured_own.cumsum().shift(fill_value=0) >= MIN_MEASUREMENTS) & own).to_numpy()
    print(f"  over the budget: {over.sum()} of {trials_run} ({afterwards.sum()} measured afterwards, no fine-tune); "
          f"after the gate's first {MIN_MEASUREMENTS} measurements: {(over & gated).sum()} "
          f"({(over & gated).sum() / trials_run:.0%} of the trials: what a gate that knew every latency "
          f"would have vetoed)")  # fmt: skip
    lows = frame["predicted_latency_low_ms"].to_numpy(dtype=float)
    if vetoed.any():
        print(f"  vetoed: {(vetoed & over).sum()} of them, {(vetoed & ~over).sum()} wrongly (measured within the "
              "budget); lower bound / measured: "
              + ", ".join(f"{low:.4f}/{ms:.4f}" for low, ms in zip(lows[vetoed], latency[vetoed])))  # fmt: skip
    missed = ~vetoed & over & gated
    if cost_model and missed.any():
        print("  let through although over the budget, lower bound / measured: "
              + ", ".join(f"{low:.4f}/{ms:.4f}" for low, ms in zip(lows[missed], latency[missed])))  # fmt: skip
    return {"trials": trials_run, "vetoed": int(vetoed.sum()), "wall": wall, "hypervolume": volume,
            "ceiling": int((over & gated).sum())}  # fmt: skip


def replay_benchmark(trials: int, budget: str, seeds: list[int], cache: Path | None) -> None:
    """Which trials of studies run without the cost model it would have vetoed, by setting; and,
    warm-started from the other seeds' studies, what a later study on the same target would have.
    Replayed twice where the studies hold both: on each trial's latency (the median of the fastest
    session's quiet stretches), and on its fastest session's plain median, the figure the profiler
    reported before it kept only quiet stretches (the budget from the teacher's figure of the same kind)."""
    studies = _studies_without_cost_model(trials, budget, seeds, cache)
    total = sum(len(study["rows"]) for study in studies)
    print(f"{total} trials built")
    for latency, budget_key, label in (
        ("latency_ms", "budget_ms", "latency"),
        ("plain_latency_ms", "budget_plain_ms", "fastest session's plain median"),
    ):
        if all(latency in row for study in studies for row in study["rows"]):
            _replay(studies, latency, budget_key, label, total)


def _replay(studies: list[dict], latency: str, budget_key: str, label: str, total: int) -> None:
    """The replay's counts on the rows' ``latency`` against each study's ``budget_key``."""
    # (minimum, rule, warm-started): a rule is a confidence (vetoed when the lower bound that many
    # spreads below the prediction is over the budget), or GATE, the search's own rule
    rules = (0.0, 0.5, 1.0, 2.0, GATE)
    settings = [(minimum, rule, False) for minimum in (5, 10) for rule in rules]
    settings += [(MIN_MEASUREMENTS, rule, True) for rule in (1.0, 2.0, GATE)]
    counts = {setting: dict.fromkeys(("vetoed", "right", "wrong", "unmeasured"), 0) for setting in settings}
    # How many spreads each measurement lay below its prediction: a calibrated normal spread puts 16 %
    # of them beyond 1, 2.3 % beyond 2.
    below = {False: [], True: []}
    for i, study in enumerate(studies):
        budget_ms, rows = study[budget_key], study["rows"]
        others = [r for j, other in enumerate(studies) if j != i for r in other["rows"] if r[latency] is not None]
        for k, row in enumerate(rows):
            own = [r for r in rows[:k] if r[latency] is not None]
            measured = row[latency]
            verdict = "unmeasured" if measured is None else "right" if measured > budget_ms else "wrong"
            for warm in (False, True):
                earlier = others + own if warm else own
                if len(earlier) < min(minimum for minimum, _, w in settings if w == warm):
                    continue
                # One fit and prediction per trial: the minimum only gates it, the rule reads it.
                model = LatencyModel().fit(feature_matrix([r["cost_features"] for r in earlier]),
                                           [r[latency] for r in earlier])  # fmt: skip
                predicted, spread = (float(v[0]) for v in model.predict(feature_matrix([row["cost_features"]]), True))
                if measured is not None and len(earlier) >= MIN_MEASUREMENTS:
                    below[warm].append(math.log(predicted / measured) / spread)
                for minimum, rule in [(m, r) for m, r, w in settings if w == warm and len(earlier) >= m]:
                    if _vetoes(rule, model, predicted, spread, budget_ms):
                        counts[minimum, rule, warm]["vetoed"] += 1
                        counts[minimum, rule, warm][verdict] += 1
    over = sum(r[latency] is not None and r[latency] > study[budget_key] for study in studies for r in study["rows"])
    budgets = ", ".join(f"{study[budget_key]:.4f}" for study in studies)
    print(f"on the {label}: budgets {budgets} ms; {over} of {total} trials measured over the budget")
    for (minimum, rule, warm), c in counts.items():
        warmed = ", warm start from the other seeds' studies" if warm else ""
        described = f"the gate's rule (expected headroom < {MAX_EXPECTED_HEADROOM:.1%})" if rule == GATE else (
            f"confidence {rule}")  # fmt: skip
        print(f"  minimum {minimum:2d}, {described}{warmed}: "
              f"{c['vetoed']} of {total} vetoed ({c['vetoed'] / total:.0%}): {c['right']} right, {c['wrong']} wrong, "
              f"{c['unmeasured']} unmeasured")  # fmt: skip
    for warm, spreads in ((warm, np.array(spreads)) for warm, spreads in below.items() if spreads):
        print(f"  {'warm-started' if warm else 'cold'}, {len(spreads)} measured trials predicted from at least "
              f"{MIN_MEASUREMENTS}: measured below the prediction's lower bound at "
              + ", ".join(f"{k}σ {np.mean(spreads > k):.1%}" for k in (0.5, 1.0, 1.5, 2.0))
              + f"; at most {spreads.max():.2f} spreads below")  # fmt: skip


def _vetoes(rule: float | str, model: LatencyModel, predicted: float, spread: float, budget_ms: float) -> bool:
    """Whether ``rule`` (a confidence, or :data:`GATE`) vetoes a plan ``model`` predicted so."""
    if rule == GATE:
        return CostGate.veto_reason(latency_figures(model, predicted, spread, budget_ms), budget_ms) is not None
    return predicted * math.exp(-rule * spread) > budget_ms


def _studies_without_cost_model(trials: int, budget: str, seeds: list[int], cache: Path | None) -> list[dict]:
    """Per seed, the budget in ms (``budget_ms``; ``budget_plain_ms`` from the teacher's fastest plain
    session median) and each built trial's features and latencies (None: not measured); read from
    ``cache`` when it exists, else run and saved there."""
    if cache is not None and cache.exists():
        return json.loads(cache.read_text())
    task, studies = digits(), []
    for seed in seeds:
        with tempfile.TemporaryDirectory() as results:
            study = search.run(task, budget=budget, seed=seed, cost_model=False, results_dir=results, trials=trials)
        rows = [
            {"cost_features": t.user_attrs["cost_features"], "latency_ms": t.user_attrs.get("latency_ms"),
             "plain_latency_ms": min(t.user_attrs.get("latency_session_medians_ms") or [None])}
            for t in study.trials
            if t.user_attrs.get("cost_features") is not None and "duplicate_of" not in t.user_attrs
        ]  # fmt: skip
        teacher = study.user_attrs["baseline"]
        plain_teacher = min(teacher["measurement"]["session_medians_ms"])
        studies.append({"budget_ms": study.user_attrs["budget_ms"], "rows": rows,
                        "budget_plain_ms": parse_budget(budget).resolve(plain_teacher)})  # fmt: skip
        print(f"seed {seed}: budget {studies[-1]['budget_ms']:.4f} ms, teacher {teacher['latency_ms']:.4f} ms "
              f"(fastest plain session median {plain_teacher:.4f}), {len(rows)} trials built, "
              f"{sum(r['latency_ms'] is not None for r in rows)} measured")  # fmt: skip
    if cache is not None:
        cache.write_text(json.dumps(studies))
    return studies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    acc = sub.add_parser("accuracy")
    acc.add_argument("--task", choices=("digits", "resnet18", "signal-transformer"), default="digits")
    acc.add_argument("--held-out", type=int, default=32)
    acc.add_argument("--seed", type=int, default=0)
    acc.add_argument("--cache", type=Path, help="Save the measured plans here, or reuse them if present.")
    srch = sub.add_parser("search")
    srch.add_argument("--trials", type=int, default=40)
    srch.add_argument("--budget", default="0.15x")
    srch.add_argument("--seeds", default="0", help="Comma-separated seeds; each runs off and on, then the totals.")
    srch.add_argument("--equal-time", action="store_true",
                      help="Give the cost-model run the other run's wall-clock instead of its number of trials.")
    srch.add_argument("--warm-start", type=int, default=0, metavar="N",
                      help="Run N earlier studies (seeds 1000, ...) first; every cost-model run starts from "
                           "their measurements.")
    rep = sub.add_parser("replay")
    rep.add_argument("--trials", type=int, default=40)
    rep.add_argument("--budget", default="0.15x")
    rep.add_argument("--seeds", default="0,1,2,3")
    rep.add_argument("--cache", type=Path, help="Save the studies' trials here, or replay them from here if present.")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore")
    info = cpu_info()
    print(f"machine: {info['cpu']}, ISA {', '.join(info['isa'])}; ORT threads: {load_target('cpu').threads}")
    if args.command == "accuracy":
        accuracy_benchmark(args.task, args.held_out, args.seed, args.cache)
    elif args.command == "replay":
        replay_benchmark(args.trials, args.budget, [int(seed) for seed in args.seeds.split(",")], args.cache)
    else:
        seeds = [int(seed) for seed in args.seeds.split(",")]
        search_benchmark(args.trials, args.budget, seeds, args.equal_time, args.warm_start)


if __name__ == "__main__":
    main()
