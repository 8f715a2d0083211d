"""The engine cache: a key from everything a build depends on, so a repeated plan never rebuilds."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx

from profilers._errors import MeasurementError
from profilers.tensorrt._build import BuildPlan

DEFAULT_ENGINE_DIR = Path("results/engines")
# Bumped whenever the way an engine is built changes, so older cached engines are not reused.
_CACHE_LAYOUT = 1



def engine_cache_key(
    onnx_path: str | Path,
    *,
    target: str,
    plan: BuildPlan,
    gpu: str,
    input_shapes: Mapping[str, Sequence[int]],
    workspace_bytes: int | None = None,
) -> str:
    """The sha256 naming the engine built from ``onnx_path`` (its bytes and those of its external
    data files) for ``target`` on ``gpu`` with ``plan`` (TensorRT version and flags), for
    inputs of ``input_shapes``: everything the engine depends on, so that an equal key can reuse
    the engine and any change builds a new one."""
    path = Path(onnx_path)
    digest = hashlib.sha256()
    try:
        _hash_file(digest, path)
        for location in _external_data_files(path):
            digest.update(location.encode())
            _hash_file(digest, path.parent / location)
    except OSError as exc:
        raise MeasurementError(f"{path}: cannot read the model: {exc.strerror or exc}") from exc
    settings = {
        "layout": _CACHE_LAYOUT,
        "target": target,
        "tensorrt": plan.tensorrt_version,
        "network_flags": sorted(plan.network_flags),
        "builder_flags": sorted(plan.builder_flags),
        "gpu": gpu,
        "input_shapes": {name: [int(d) for d in shape] for name, shape in input_shapes.items()},
        "workspace_bytes": workspace_bytes,
    }
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()


def _hash_file(digest: Any, path: Path) -> None:
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)


def _external_data_files(path: Path) -> list[str]:
    """The external data files the model at ``path`` names, relative to its folder, sorted."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise MeasurementError(f"{path}: not an ONNX model: {exc}") from exc
    locations = set()
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            entries = {entry.key: entry.value for entry in tensor.external_data}
            if "location" in entries:
                locations.add(entries["location"])
    return sorted(locations)


def engine_path(engine_dir: str | Path, target: str, key: str) -> Path:
    return Path(engine_dir) / f"{target}-{key}.engine"


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, so a reader (or a
    concurrent worker) never sees half an engine."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
