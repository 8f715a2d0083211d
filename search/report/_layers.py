"""Why a plan is (not) faster, layer by layer: the plan's entry, the channels it kept, what the
runtime ran and how long it took, against the teacher's same layer (:func:`load_layers`).

The times are the runtime's own per-layer report, recorded with every measurement as
``layer_times`` (TensorRT's ``IProfiler``; ONNX Runtime's session profiler, see
``profilers/_onnxruntime_layers.py``), for each trial and for the teacher's baseline. Each entry
names the nodes of the measured ONNX file it ran; the file's weights say which plan layer those
nodes belong to (:func:`~search.report._graph.node_layers`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import optuna
import pandas as pd

from search._errors import UsageError
from search._record import Key, StudyKey
from search.plan import LayerPlan, Plan
from search.report._graph import entry_layer, node_layers
from search.study import locate_study

OTHER = "(other)"  # the row for time no plan layer accounts for: pooling, reshapes, graph inputs and outputs
COLUMNS = (
    "layer", "block", "part", "pruning", "sparsity", "bits", "channels_before", "channels_after", "kernel",
    "precision", "tactic", "ms", "share", "teacher_kernel", "teacher_ms", "speedup", "unaccelerated", "flag", "note",
)  # fmt: skip
_ATTENTION = re.compile(r"attention|attn|q_proj|k_proj|v_proj|o_proj")
_FFN = re.compile(r"intermediate|mlp|ffn|^output\.|fc\d*$|up_proj|down_proj|gate_proj|^linear[12]$")


def layer_times(
    entries: Sequence[Mapping[str, object]], onnx_path: str | Path | None, layers: Sequence[str]
) -> dict[str, dict[str, object]]:
    """A runtime's report entries summed per plan layer (``OTHER`` for the rest): ``ms``, the
    ``kernel`` and ``precision``/``tactic`` of its slowest entry, and the entries' ``note``\\s.
    Without the ONNX file (another machine's trial), every entry counts as ``OTHER``."""
    nodes = node_layers(onnx_path, layers) if onnx_path is not None and Path(onnx_path).exists() else {}
    found: dict[str, dict[str, object]] = {}
    for entry in entries:
        layer = entry_layer(entry, nodes) or OTHER
        ms = float(entry.get("ms") or 0.0)
        row = found.setdefault(layer, {"ms": 0.0, "slowest": -1.0, "notes": []})
        row["ms"] += ms
        if ms > row["slowest"]:
            row.update(slowest=ms, kernel=entry.get("type"), precision=entry.get("precision"))
            row["tactic"] = entry.get("tactic")
        if entry.get("note") and entry["note"] not in row["notes"]:
            row["notes"].append(entry["note"])
    return found


def unaccelerated(entry: LayerPlan, precision: str | None, tactic: str | None, runtime: str) -> str | None:
    """Why the plan's entry made the layer smaller but not faster on ``runtime``, or None."""
    bits, sparsity = entry.quantization.bits, entry.sparsity
    ran = precision or "a wider precision"
    flags = []
    if bits == 1:
        flags.append(f"binarized, but {runtime} has no 1-bit kernel: it ran at {ran}")
    elif bits == 4 and not (precision or "").startswith("int4"):
        flags.append(f"int4 asked, ran at {ran}: no int4 kernel for this layer")
    elif bits == 8 and precision in ("fp32", "fp16", "bf16"):
        flags.append(f"int8 asked, ran at {precision}: its Q/DQ did not fuse into an integer kernel")
    if sparsity.ratio > 0:
        sparse_kernel = sparsity.pattern == "2:4" and "sparse" in (tactic or "").lower()
        if not sparse_kernel:
            form = "2:4" if sparsity.pattern == "2:4" else f"{sparsity.ratio:.0%} unstructured"
            flags.append(f"{form} sparse weights ran on a dense kernel")
    return "; ".join(flags) or None


def _block_and_part(name: str) -> tuple[str | None, str | None]:
    """A Transformer layer's block (its name up to the block index: ``3``, or torchvision's
    ``encoder_layer_3``) and part of it."""
    parts = name.split(".")
    index = next((i for i, part in enumerate(parts) if part[-1:].isdigit()), None)
    if index is None:
        return None, None
    rest = ".".join(parts[index + 1 :])
    part = "attention" if _ATTENTION.search(rest) else "ffn" if _FFN.search(rest) else "projection"
    return ".".join(parts[: index + 1]), part


def _sparsity(entry: LayerPlan) -> object:
    return "2:4" if entry.sparsity.pattern == "2:4" else entry.sparsity.ratio


def layer_frame(
    plan: Plan,
    trial_times: Mapping[str, Mapping[str, object]],
    teacher_times: Mapping[str, Mapping[str, object]],
    *,
    layers: Sequence[str],
    runtime: str,
    channels_before: Mapping[str, int] | None = None,
    channels_after: Mapping[str, int] | None = None,
    layer_precision: Mapping[str, str] | None = None,
    latency_ms: float | None = None,
    packed: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """One row per teacher layer (``layers``), then ``OTHER``: see :func:`load_layers`.
    ``trial_times`` is keyed by the candidate's own layer names (``plan.student()``'s), the rest
    by the teacher's. ``packed``: each attention's packed Q/K/V projection among ``layers``, with
    the planned layer whose bits it takes (nothing else of that layer's entry)."""
    channels_before, channels_after, packed = channels_before or {}, channels_after or {}, packed or {}
    layer_precision = layer_precision or {}
    total = latency_ms or sum(float(row["ms"]) for row in trial_times.values()) or None
    transformer = any(_ATTENTION.search(name) for name in layers)
    rows = []
    for name in [*layers, OTHER]:
        student = name if plan.depth is None or name == OTHER else plan.depth.rename(name)
        times = trial_times.get(student or "", {})
        teacher = teacher_times.get(name, {})
        entry = LayerPlan(quantization=plan.layer(packed[name]).quantization) if name in packed else plan.layer(name)
        precision = times.get("precision") or layer_precision.get(student or "")
        ms = times.get("ms") if times else (None if name == OTHER else (0.0 if student is None else None))
        block, part = _block_and_part(name) if transformer and name != OTHER else (None, None)
        flag = None
        if name != OTHER and student is not None:
            flag = unaccelerated(entry, precision, times.get("tactic"), runtime)
        notes = list(times.get("notes", []))
        if student is None:
            notes.append("its block was removed (depth)")
        teacher_ms = teacher.get("ms")
        rows.append({
            "layer": name, "block": block, "part": part,
            "pruning": None if name == OTHER else entry.pruning.ratio,
            "sparsity": None if name == OTHER else _sparsity(entry),
            "bits": None if name == OTHER else entry.quantization.bits,
            "channels_before": channels_before.get(name),
            "channels_after": None if student is None else channels_after.get(student),
            "kernel": times.get("kernel") if student is not None else "removed",
            "precision": precision, "tactic": times.get("tactic"),
            "ms": ms, "share": ms / total if ms is not None and total else None,
            "teacher_kernel": teacher.get("kernel"), "teacher_ms": teacher_ms,
            "speedup": teacher_ms / ms if teacher_ms and ms else None,
            "unaccelerated": flag is not None, "flag": flag, "note": "; ".join(notes) or None,
        })  # fmt: skip
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    if not trial_times.get(OTHER) and not teacher_times.get(OTHER):
        frame = frame[frame["layer"] != OTHER].reset_index(drop=True)
    return frame


def _trial_file(attrs: Mapping, folder: Path | None, number: int) -> Path | None:
    """The trial's ONNX file: where it was written, else under the study's own folder."""
    candidates = [Path(attrs[Key.ARTIFACTS]) / "model.onnx"] if attrs.get(Key.ARTIFACTS) else []
    if folder is not None:
        candidates.append(folder / "trials" / f"{number:05d}" / "model.onnx")
    return next((path for path in candidates if path.exists()), None)


def _figures(attrs: Mapping, baseline: Mapping) -> list[dict[str, object]]:
    """The trial's metric, latency, energy and size, each with where it came from."""
    figures = []
    for figure, key, source, unit in (
        ("metric", Key.METRIC, Key.METRIC_SOURCE, ""),
        ("latency", Key.LATENCY_MS, Key.LATENCY_SOURCE, "ms"),
        ("energy", Key.ENERGY_MJ, Key.ENERGY_SOURCE, "mJ"),
        ("size", Key.SIZE_BYTES, Key.SIZE_SOURCE, "bytes"),
    ):
        value, origin = attrs.get(key), attrs.get(source)
        if value is None and figure == "latency" and attrs.get(Key.PREDICTED_LATENCY_MS) is not None:
            value, origin = attrs[Key.PREDICTED_LATENCY_MS], attrs.get(Key.PREDICTED_SOURCE, "predicted")
        if value is None and figure == "energy" and attrs.get(Key.PREDICTED_ENERGY_MJ) is not None:
            value, origin = attrs[Key.PREDICTED_ENERGY_MJ], attrs.get(Key.PREDICTED_SOURCE, "predicted")
        kind = str(origin).split(":")[0] if origin else None
        figures.append({
            "figure": figure, "value": value, "unit": unit, "source": origin, "kind": kind,
            "teacher": baseline.get(key),
        })  # fmt: skip
    return figures


def load_layers(study: str | Path | optuna.Study, trial: int, study_name: str | None = None) -> pd.DataFrame:
    """Why trial ``trial``'s plan is (not) faster, one row per layer of the teacher (an
    ``nn.MultiheadAttention``'s packed Q/K/V projection too, ``<attention>.in_proj``, at its
    ``out_proj``'s bits), then ``(other)`` for the time no plan layer accounts for:

    - the plan's entry: ``pruning`` ratio, ``sparsity`` (ratio or ``"2:4"``), ``bits``;
    - ``channels_before`` (the teacher's output channels) and ``channels_after`` (the candidate's);
    - what the runtime ran: its ``kernel`` (``QLinearConv``, ``Conv``, a TensorRT layer type),
      ``precision`` and ``tactic``; its ``ms`` per inference and ``share`` of the latency;
    - the teacher's same layer: ``teacher_kernel``, ``teacher_ms`` and the ``speedup``;
    - ``unaccelerated`` and ``flag``: the plan asked for something this runtime does not
      accelerate (int4 on a Conv runs at int8, sparsity runs dense, a binarized layer at int8):
      the layer shrank, its time did not; ``note``: what the runtime's report says about it.

    For a Transformer, ``block`` and ``part`` (attention, ffn, projection) group the rows. The
    frame's ``attrs`` hold the trial's ``figures`` (metric, latency, energy, size, each with its
    source: measured, estimated, counted or predicted), its ``state``, ``runtime`` and the study's
    ``folder``. ``study``: a results folder, a study name under ``results/``, a storage URL, or a Study.
    """
    if isinstance(study, optuna.Study):
        opened, folder = study, None
    else:
        storage, name = locate_study(study, study_name)
        opened = optuna.load_study(study_name=name, storage=storage)
        folder = Path(storage.removeprefix("sqlite:///")).parent if storage.startswith("sqlite:///") else None
    trials = opened.get_trials(deepcopy=False)
    if not 0 <= trial < len(trials):
        accepted = f"0 to {len(trials) - 1}" if trials else "none yet"
        raise UsageError(f"trial {trial}: study {opened.study_name!r} has trials {accepted}")
    frozen = trials[trial]
    attrs = frozen.user_attrs
    if Key.PLAN not in attrs:
        reason = attrs.get(Key.FAIL_REASON) or attrs.get(Key.PRUNED_REASON) or frozen.state.name.lower()
        raise UsageError(f"trial {trial} has no plan to show (it stopped before building one: {reason})")
    plan = Plan.from_dict(attrs[Key.PLAN])
    baseline = opened.user_attrs.get(StudyKey.BASELINE, {})
    channels_before = baseline.get(Key.CHANNELS) or {}
    layers = list(channels_before) or list(dict.fromkeys([*plan.layers, *attrs.get(Key.CHANNELS, {})]))
    students = [name for name in (plan.depth.rename(n) if plan.depth else n for n in layers) if name]
    trial_file = _trial_file(attrs, folder, trial)
    teacher_file = Path(baseline["onnx"]) if baseline.get("onnx") else None
    if teacher_file is not None and not teacher_file.exists() and folder is not None:
        teacher_file = folder / "baseline" / "model.onnx"
    runtime = attrs.get(Key.RUNTIME) or baseline.get("measurement", {}).get("runtime") or "the runtime"
    runtime = str(runtime).split(" ")[0]  # "onnxruntime-cpu 1.32.0": its name
    frame = layer_frame(
        plan,
        layer_times(attrs.get(Key.LAYER_TIMES) or [], trial_file, students),
        layer_times(baseline.get("measurement", {}).get("layers") or [], teacher_file, layers),
        layers=layers, runtime=runtime, channels_before=channels_before, channels_after=attrs.get(Key.CHANNELS),
        layer_precision=attrs.get(Key.LAYER_PRECISION), latency_ms=attrs.get(Key.LATENCY_MS),
        packed=baseline.get(Key.PACKED),
    )  # fmt: skip
    frame.attrs.update(
        trial=trial, state=frozen.state.name, runtime=attrs.get(Key.RUNTIME), study=opened.study_name,
        folder=str(folder) if folder is not None else None, figures=_figures(attrs, baseline),
        reason=attrs.get(Key.PRUNED_REASON) or attrs.get(Key.FAIL_REASON),
        layer_times=bool(attrs.get(Key.LAYER_TIMES)),
    )  # fmt: skip
    return frame
