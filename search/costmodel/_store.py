"""The cost model's measurements on disk: plain JSON tagged with the feature layout, so a file
written under another layout is refused rather than misread."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from search._errors import UsageError
from search.costmodel._features import FEATURE_NAMES, FEATURE_VERSION

MEASUREMENTS_FORMAT = "compression-search/cost-measurements"


class FeatureLayoutError(UsageError):
    """A measurements file written under another feature layout than this version's."""


def save_measurements(
    path,
    rows: Sequence[Mapping[str, float]],
    latency_ms: Sequence[float],
    *,
    target: str,
    task: str,
    energy_mj: Sequence[float | None] | None = None,
    settings: Sequence[str | None] | None = None,
) -> None:
    """Write the measurements to ``path`` as plain JSON, atomically, replacing what was there.

    Each row must hold exactly the :data:`FEATURE_NAMES` keys; the caller merges old and new rows.
    ``energy_mj`` holds each row's energy per inference where a sensor measured it, else None
    (an estimate is not a measurement to learn from); ``settings`` each row's measurement setting
    (:func:`profilers.measurement_setting`), None where not known.
    """
    path = Path(path)
    energy_mj = [None] * len(rows) if energy_mj is None else list(energy_mj)
    settings = [None] * len(rows) if settings is None else list(settings)
    if not len(rows) == len(latency_ms) == len(energy_mj) == len(settings):
        raise ValueError(
            f"{len(rows)} feature rows but {len(latency_ms)} latencies, {len(energy_mj)} energies "
            f"and {len(settings)} settings"
        )
    matrix = []
    for i, row in enumerate(rows):
        if set(row) != set(FEATURE_NAMES):
            missing = sorted(set(FEATURE_NAMES) - set(row))
            extra = sorted(set(row) - set(FEATURE_NAMES))
            raise ValueError(f"row {i} does not have the feature layout: missing {missing}, extra {extra}")
        matrix.append([float(row[name]) for name in FEATURE_NAMES])
    latencies = [float(v) for v in latency_ms]
    if not all(math.isfinite(v) for r in matrix for v in r):
        raise ValueError("feature rows must hold finite numbers")
    if not all(math.isfinite(v) and v > 0 for v in latencies):
        raise ValueError(f"latencies must be finite and > 0 ms, got {latencies}")
    energies = [None if v is None else float(v) for v in energy_mj]
    if not all(v is None or (math.isfinite(v) and v > 0) for v in energies):
        raise ValueError(f"energies must be None or finite and > 0 mJ, got {energies}")
    if not all(v is None or isinstance(v, str) for v in settings):
        raise ValueError(f"settings must be None or text, got {settings}")
    document = {
        "format": MEASUREMENTS_FORMAT,
        "feature_version": FEATURE_VERSION,
        "features": list(FEATURE_NAMES),
        "target": target,
        "task": task,
        "rows": matrix,
        "latency_ms": latencies,
        "energy_mj": energies,
        "settings": settings,
    }
    text = json.dumps(document, allow_nan=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def load_measurements(
    path, *, target: str, task: str
) -> tuple[list[dict[str, float]], list[float], list[float | None], list[str | None]]:
    """The rows, latencies, measured energies (None where not measured) and measurement settings
    (None in a file written before they were recorded) in ``path``; empty lists when it does not
    exist.

    Raises :class:`~search.UsageError` when the file is not a measurement file or holds another
    target's or task's measurements, :class:`FeatureLayoutError` (a kind of it) when it was written
    with another feature layout.
    """
    path = Path(path)
    afresh = "delete it or move it away to start afresh"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return [], [], [], []
    except OSError as exc:
        raise UsageError(f"cannot read cost measurements {path}: {exc.strerror or exc}") from exc
    try:
        document = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path} is not valid JSON ({exc}): {afresh}") from exc
    if not isinstance(document, dict) or document.get("format") != MEASUREMENTS_FORMAT:
        raise UsageError(f"{path} is not a {MEASUREMENTS_FORMAT} file: {afresh}")

    version, names = document.get("feature_version"), document.get("features")
    if version != FEATURE_VERSION or names != list(FEATURE_NAMES):
        count = len(names) if isinstance(names, list) else "unknown number of"
        detail = ""
        if version == FEATURE_VERSION and isinstance(names, list):
            difference = next(
                (i for i, (a, b) in enumerate(zip(names, FEATURE_NAMES)) if a != b),
                min(len(names), len(FEATURE_NAMES)),
            )
            stored = names[difference] if difference < len(names) else "(end)"
            expected = FEATURE_NAMES[difference] if difference < len(FEATURE_NAMES) else "(end)"
            detail = f" (feature {difference} is {stored!r}, expected {expected!r})"
        raise FeatureLayoutError(
            f"{path} was written with feature layout v{version} ({count} features); this version "
            f"uses v{FEATURE_VERSION} ({len(FEATURE_NAMES)} features){detail}: {afresh}"
        )
    if document.get("target") != target or document.get("task") != task:
        raise UsageError(
            f"{path} holds measurements of task {document.get('task')!r} on target "
            f"{document.get('target')!r}, not of task {task!r} on target {target!r}: {afresh}"
        )

    rows, latencies = document.get("rows"), document.get("latency_ms")
    unknown = [None] * len(rows) if isinstance(rows, list) else None
    energies, settings = document.get("energy_mj", unknown), document.get("settings", unknown)
    if (
        not isinstance(rows, list)
        or not isinstance(latencies, list)
        or not isinstance(energies, list)
        or not isinstance(settings, list)
        or not len(rows) == len(latencies) == len(energies) == len(settings)
        or not all(isinstance(row, list) and len(row) == len(FEATURE_NAMES) for row in rows)
        or not all(v is None or isinstance(v, str) for v in settings)
    ):
        raise UsageError(
            f"{path} is damaged: expected as many rows of {len(FEATURE_NAMES)} numbers as latencies, "
            f"energies and settings: {afresh}"
        )
    try:
        return (
            [dict(zip(FEATURE_NAMES, map(float, row))) for row in rows],
            [float(v) for v in latencies],
            [None if v is None else float(v) for v in energies],
            settings,
        )
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{path} is damaged: {exc}: {afresh}") from exc
