"""The cost model inside the search: it vetoes confidently over-budget plans, and only those."""

from __future__ import annotations

import dataclasses
import json
import math

import optuna
import pytest

import profilers
import search
from profilers import OnnxRuntimeCpuProfiler
from search import Finetune, UsageError, run
from search.costmodel import MAX_EXPECTED_HEADROOM, CostGate, cost_model_report, measured_rows
from search.costmodel._measured import measured_trials
from search.costmodel import FEATURE_NAMES, FEATURE_VERSION, expected_headroom
from targets import load_target

QUICK = dict(finetune=Finetune(steps=1), pruner=optuna.pruners.NopPruner(), recipes=False, sensitivity=False)


class MeteredProfiler(OnnxRuntimeCpuProfiler):
    """The cpu profiler as if a 15 W power sensor were read: energy labelled measured, to learn from."""

    def measure(self, path):
        measurement = super().measure(path)
        energy = 15.0 * measurement.latency_ms
        return dataclasses.replace(measurement, energy_mj=energy, energy_source="measured:test-meter")


@pytest.fixture(scope="module")
def metered():
    return MeteredProfiler(load_target("cpu"), warmup_runs=2, warmup_s=0.01, min_runs=20, min_time_s=0.02,
                           max_time_s=0.5)  # fmt: skip


@pytest.fixture(scope="module")
def earlier(tiny_task, metered, tmp_path_factory):
    """An earlier study on the same target and task: its measurements warm-start later ones."""
    results = tmp_path_factory.mktemp("results")
    study = run(tiny_task, trials=12, profiler=metered, results_dir=results, study_name="earlier", **QUICK)
    return results, study


def _trials(study):
    return search.load_trials(study)


def _measured(study) -> int:
    """Trials that measured their plan: one that reused an identical plan's results is not counted."""
    return sum("duplicate_of" not in trial.user_attrs for trial in study.trials)


def test_measurements_are_persisted_per_study_as_plain_json(earlier, tiny_task):
    results, study = earlier
    path = results / "costmodel" / "cpu" / tiny_task.name / "earlier.json"
    data = json.loads(path.read_text())
    assert data["features"] == list(FEATURE_NAMES)
    assert len(study.trials) == 12
    assert len(data["latency_ms"]) == _measured(study)


def test_a_plan_far_over_budget_is_vetoed_before_fine_tuning(earlier, tiny_task, fast_profiler):
    results, earlier_study = earlier
    # Every plan of this tiny model takes microseconds: a 1 µs budget (the least a budget may be) is far out of reach.
    study = run(tiny_task, budget="1us", trials=3, profiler=fast_profiler, results_dir=results,
                study_name="vetoed", **QUICK)  # fmt: skip
    frame = _trials(study)
    assert study.user_attrs["cost_model_warm_start"] == _measured(earlier_study)
    assert list(frame["state"]) == ["PRUNED"] * 3
    assert list(frame["pruned_by"]) == ["cost-model"] * 3
    assert (frame["predicted_latency_low_ms"] > 0.001).all()
    assert (frame["predicted_headroom"] < MAX_EXPECTED_HEADROOM).all()
    assert frame["pruned_reason"].str.contains("over the 0.001 ms budget").all()
    assert frame["artifacts"].isna().all() and frame["latency_ms"].isna().all()  # nothing exported or measured
    assert not (results / "vetoed" / "trials").exists()
    # Learned from the earlier study's measurements, taken under the setting this profiler measures under.
    assert frame["predicted_source"].str.startswith(f"predicted:cost-model(n={_measured(earlier_study)}),").all()
    # The sampler sees it as infeasible, as its measurement would have made it, not as a mere prune.
    assert (frame["system_attrs_constraints:predicted_latency_over_budget_ms"] > 0).all()


def test_measurements_under_another_setting_are_left_out(earlier, tiny_task, tmp_path):
    """Latencies from another machine, runtime version or runtime options (another results folder
    copied in, a runtime upgrade) describe another cost function: the gate does not learn from them."""
    results, study = earlier
    folder = tmp_path / "costmodel"
    folder.mkdir()
    own = json.loads((results / "costmodel" / "cpu" / tiny_task.name / "earlier.json").read_text())
    assert len(set(own["settings"])) == 1
    setting = json.loads(own["settings"][0])
    assert setting["runtime"].startswith("onnxruntime-cpu ") and setting["threads"] == 1 and "isa" in setting
    assert setting["disabled_optimizers"] == list(profilers.disabled_optimizers())
    elsewhere = {**own, "latency_ms": [ms * 100 for ms in own["latency_ms"]],
                 "settings": [json.dumps({**setting, "cpu": "another CPU"})] * len(own["settings"])}  # fmt: skip
    (folder / "elsewhere.json").write_text(json.dumps(elsewhere))
    (folder / "before.json").write_text(json.dumps({**own, "settings": [None] * len(own["settings"])}))
    features = study.trials[0].user_attrs["cost_features"]

    gate = CostGate(folder, "solo", "cpu", tiny_task.name)
    assert gate.warm_start == 2 * len(own["settings"])
    assert gate.predict(optuna.create_study(), features) is None  # nothing measured, no setting given: none to match
    prediction = gate.predict(study, features)
    left_out = 2 * len(own["settings"])
    assert prediction["predicted_source"].startswith(
        f"predicted:cost-model(n={_measured(study)}, {left_out} measured under another machine or runtime "
        "setting left out)"
    )
    assert prediction["predicted_latency_ms"] < 2 * max(own["latency_ms"])  # not pulled up by the ×100 ones

    (folder / "elsewhere.json").write_text(json.dumps({**elsewhere, "settings": own["settings"]}))
    same = CostGate(folder, "solo", "cpu", tiny_task.name).predict(study, features)
    assert f"n={_measured(study) + len(own['settings'])}," in same["predicted_source"]
    assert same["predicted_latency_ms"] > 2 * prediction["predicted_latency_ms"]  # the check above can fail
    # Before its first measurement, a study predicts under the setting its profiler says it measures under.
    warm = CostGate(folder, "solo", "cpu", tiny_task.name, setting=own["settings"][0])
    assert warm.predict(optuna.create_study(), features)["predicted_source"].startswith(
        f"predicted:cost-model(n={len(own['settings'])}, {len(own['settings'])} measured under another"
    )


def test_measurements_of_another_feature_layout_are_left_out_with_a_warning(earlier, tiny_task, tmp_path):
    """After an upgrade that changed the features, an earlier study's file is left out of a new study's
    warm start (a warning says so) rather than stopping the run; its resumed trials are not learned from."""
    results, study = earlier
    folder = tmp_path / "costmodel"
    folder.mkdir()
    own = json.loads((results / "costmodel" / "cpu" / tiny_task.name / "earlier.json").read_text())
    (folder / "current.json").write_text(json.dumps(own))
    (folder / "older.json").write_text(json.dumps({**own, "feature_version": FEATURE_VERSION - 1}))
    with pytest.warns(UserWarning, match=rf"older.json was written with feature layout v{FEATURE_VERSION - 1} .*"
                                         "the cost model starts without its measurements"):  # fmt: skip
        gate = CostGate(folder, "solo", "cpu", tiny_task.name)
    assert gate.warm_start == len(own["latency_ms"])

    storage = f"sqlite:///{tmp_path / 'resumed.db'}"
    resumed = optuna.create_study(storage=storage, study_name="resumed", directions=study.directions)
    for i, trial in enumerate(measured_trials(study)):
        attrs = dict(trial.user_attrs)
        if i % 2:  # recorded by an earlier version: its features of another layout
            del attrs["cost_feature_version"]
        resumed.add_trial(optuna.trial.create_trial(values=trial.values, user_attrs=attrs))
    rows, latency, _, _ = measured_rows(resumed)
    assert 0 < len(latency) == len(rows) == (len(measured_trials(study)) + 1) // 2
    assert all(trial.user_attrs["cost_feature_version"] == FEATURE_VERSION for trial in measured_trials(study))
    report = cost_model_report(resumed)
    assert (report["measured"], report["current_layout"]) == (len(measured_trials(study)), len(latency))
    from typer.testing import CliRunner

    from search import cli

    output = CliRunner().invoke(cli.app, ["costmodel", storage, "--study-name", "resumed"]).output
    older = len(measured_trials(study)) - len(latency)
    assert f"(10 needed, {len(latency)} with this version's features; {older} recorded with an older" in output


def test_a_measurement_setting_is_the_machine_and_runtime_not_the_run():
    device = {"cpu": "Xeon", "isa": ["avx2"], "threads": 1, "disabled_optimizers": [], "pinned_cpus": [0],
              "layer_profile_ms": 3.5, "sm_clock_mhz": 1400}  # fmt: skip
    setting = profilers.measurement_setting("onnxruntime 1.32.0", device)
    assert json.loads(setting) == {"runtime": "onnxruntime 1.32.0", "cpu": "Xeon", "isa": ["avx2"], "threads": 1,
                                   "disabled_optimizers": []}  # fmt: skip
    same_machine = {**device, "isa": ("avx2",), "pinned_cpus": [1], "layer_profile_ms": 2.0, "sm_clock_mhz": 900}
    assert profilers.measurement_setting("onnxruntime 1.32.0", same_machine) == setting
    for other in ({**device, "threads": 2}, {**device, "disabled_optimizers": ["SkipLayerNormFusion"]},
                  {**device, "cpu": "EPYC"}):  # fmt: skip
        assert profilers.measurement_setting("onnxruntime 1.32.0", other) != setting
    assert profilers.measurement_setting("onnxruntime 1.33.0", device) != setting
    # A module's kernel libraries beside PyTorch (torchao for an int8 plan) are the plan's: its
    # teacher, run without them, was measured under the same setting.
    gpu = {"gpu": "H100", "compile_mode": None}
    plain = profilers.measurement_setting("pytorch-cuda torch 2.11.0", gpu)
    assert profilers.measurement_setting("pytorch-cuda torch 2.11.0, torchao 0.10", {**gpu, "dtype": "bf16"}) == plain


def test_the_same_plans_run_with_the_cost_model_off(earlier, tiny_task, fast_profiler):
    results, _ = earlier
    study = run(tiny_task, budget="1us", trials=2, profiler=fast_profiler, results_dir=results,
                study_name="off", cost_model=False, **QUICK)  # fmt: skip
    frame = _trials(study)
    assert list(frame["state"]) == ["COMPLETE"] * 2
    assert frame["predicted_latency_ms"].isna().all()


def test_a_plan_within_budget_is_predicted_and_run(earlier, tiny_task, fast_profiler):
    results, _ = earlier
    study = run(tiny_task, budget="1s", trials=2, profiler=fast_profiler, results_dir=results,
                study_name="within", **QUICK)  # fmt: skip
    frame = _trials(study)
    assert list(frame["state"]) == ["COMPLETE"] * 2
    assert (frame["predicted_latency_ms"] > 0).all() and frame["pruned_by"].isna().all()
    assert (frame["predicted_headroom"] > 0.9).all()  # microseconds against a second
    report = cost_model_report(study)
    assert report["predicted_online"] == 2 and 0 <= report["online"]["within_20pct"] <= 1


def test_energy_is_predicted_from_sensor_measurements(earlier, tiny_task, metered):
    results, earlier_study = earlier
    data = json.loads((results / "costmodel" / "cpu" / tiny_task.name / "earlier.json").read_text())
    assert len(data["energy_mj"]) == _measured(earlier_study) and all(mj > 0 for mj in data["energy_mj"])
    study = run(tiny_task, budget="1s", trials=2, profiler=metered, results_dir=results,
                study_name="energy", **QUICK)  # fmt: skip
    frame = _trials(study)
    assert (frame["predicted_energy_mj"] > 0).all()
    assert frame["predicted_source"].str.contains(r"energy from \d+ sensor measurements").all()
    # Measured energy, so compared. How close depends on microsecond latencies on a loaded machine
    # (CI saw 0.73 once); far below a unit slip (×1000).
    error = frame["energy_prediction_error"]
    assert ((error - (frame["predicted_energy_mj"] / frame["energy_mj"] - 1)).abs() < 1e-9).all()
    assert (error.abs() < 3).all()
    assert cost_model_report(study)["online_energy"]["within_20pct"] >= 0


def test_with_too_few_measurements_nothing_is_vetoed(tiny_task, fast_profiler, tmp_path):
    study = run(tiny_task, budget="1us", trials=3, profiler=fast_profiler, results_dir=tmp_path, **QUICK)
    frame = _trials(study)
    assert list(frame["state"]) == ["COMPLETE"] * 3
    assert frame["predicted_latency_ms"].isna().all()


def test_a_stale_measurements_file_warns_and_a_damaged_one_is_refused_before_any_work(earlier, tiny_task, tmp_path):
    results, _ = earlier
    folder = tmp_path / "costmodel" / "cpu" / tiny_task.name
    folder.mkdir(parents=True)
    stale = json.loads((results / "costmodel" / "cpu" / tiny_task.name / "earlier.json").read_text())
    stale["feature_version"] = 0
    (folder / "old.json").write_text(json.dumps(stale))
    with pytest.warns(UserWarning, match="old.json was written with feature layout v0"):
        study = run(tiny_task, trials=1, results_dir=tmp_path, study_name="new", **QUICK)
    assert study.user_attrs["cost_model_warm_start"] == 0 and len(study.trials) == 1

    (folder / "old.json").write_text("{not json")
    with pytest.raises(UsageError, match="old.json is not valid JSON.*delete it or move it away"):
        run(tiny_task, trials=1, results_dir=tmp_path, study_name="newer")
    assert not (tmp_path / "newer").exists()


def test_the_held_out_report_compares_with_the_flops_baseline(earlier):
    _, study = earlier
    report = cost_model_report(study)
    assert report["measured"] == _measured(study)
    for key in ("held_out", "held_out_flops_baseline"):
        assert set(report[key]) == {"within_10pct", "within_20pct", "mape", "spearman"}


def test_the_gate_refits_only_when_measurements_grew(earlier, tiny_task):
    results, study = earlier
    gate = CostGate(results / "costmodel" / "cpu" / tiny_task.name, "solo", "cpu", tiny_task.name)
    first = gate.model(study)
    assert first is not None and gate.model(study) is first


def test_the_costmodel_command_prints_the_errors(earlier):
    from typer.testing import CliRunner

    from search import cli

    results, study = earlier
    result = CliRunner().invoke(cli.app, ["costmodel", str(results / "earlier")])
    assert result.exit_code == 0, result.output
    assert f"{_measured(study)} measured trials" in result.output
    assert "held out (5-fold)" in result.output and "FLOPs-only baseline" in result.output
    assert "energy prediction error" in result.output  # the earlier study's sensor measured energy


def test_a_trial_that_reused_another_is_not_a_second_measurement():
    study = optuna.create_study(directions=["maximize", "minimize"])
    features = dict.fromkeys(FEATURE_NAMES, 1.0)
    for number in range(3):
        attrs = {"cost_features": features, "cost_feature_version": FEATURE_VERSION, "latency_ms": 0.5,
                 "energy_mj": 1.0, "energy_source": "measured:x"}  # fmt: skip
        if number == 2:
            attrs["duplicate_of"] = 0  # _reuse copies the original's attributes, measurement included
        study.add_trial(optuna.trial.create_trial(values=[0.9, 0.5], user_attrs=attrs))
    rows, latency, energy, settings = measured_rows(study)
    assert len(rows) == len(latency) == len(energy) == len(settings) == 2
    assert cost_model_report(study)["measured"] == 2


@pytest.mark.parametrize(
    "predicted, spread, vetoed",
    [
        (1.06, 0.04, True),  # tightly predicted 6 % over, though its 2-spread lower bound (0.98) is within
        (1.06, 0.20, False),  # the same prediction, loosely: it may well leave a fair share unused
        (0.998, 0.001, False),  # predicted within the budget: never vetoed, however little it would leave
        (3.00, 0.30, True),
    ],
)
def test_a_veto_needs_a_prediction_over_the_budget_with_little_expected_headroom(predicted, spread, vetoed):
    prediction = {
        "predicted_latency_ms": predicted,
        "predicted_latency_low_ms": predicted * math.exp(-2 * spread),
        "predicted_headroom": float(expected_headroom(predicted, spread, 1.0)),
    }
    reason = CostGate.veto_reason(prediction, budget_ms=1.0)
    assert (reason is not None) == vetoed
    if vetoed:
        assert "over the 1 ms budget" in reason and f"below {MAX_EXPECTED_HEADROOM:.1%}" in reason
    assert CostGate.veto_reason(prediction, budget_ms=None) is None
