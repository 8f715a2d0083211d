"""Find and read target files: the built-in ones shipped in this package, or a user's own."""

from __future__ import annotations

import tomllib
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from targets._errors import TargetFileError, UnknownTargetError
from targets._spec import Target

_REQUIRED = ("description", "runtime", "precisions", "power_sensor", "power_w", "peak", "source")
_DEFAULTS = {"threads": 1, "service": None, "fallback_runtime": None, "disabled_optimizers": None}
_ACCEPTED = sorted((*_REQUIRED, *_DEFAULTS, "name", "alias"))


def load_target(name_or_path: str | Path) -> Target:
    """Load a built-in target by name or alias (``cpu``, ``jetson``, ...) or a TOML file by path."""
    builtin = _builtin_files()
    if isinstance(name_or_path, str) and name_or_path in builtin:
        return _load(builtin[name_or_path])
    path = Path(name_or_path)
    if path.exists():
        return _load(path)
    known = ", ".join(builtin)
    if path.suffix == ".toml":
        raise UnknownTargetError(
            f"target file '{path}' does not exist; "
            f"give an existing .toml file or a known target: {known}"
        )
    raise UnknownTargetError(
        f"unknown target '{name_or_path}'; known: {known} (or a path to a .toml file)"
    )


def list_targets() -> list[Target]:
    """The built-in targets, sorted by name; an alias is not listed apart from its target."""
    targets = {target.name: target for target in map(_load, _builtin_files().values())}
    return sorted(targets.values(), key=lambda target: target.name)


def _builtin_files() -> dict[str, Traversable]:
    files = {
        f.name.removesuffix(".toml"): f
        for f in resources.files("targets").iterdir()
        if f.name.endswith(".toml")
    }
    return dict(sorted(files.items()))


def _read(file: Traversable | Path) -> dict:
    try:
        return tomllib.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise TargetFileError(f"cannot read target file '{file}': {exc.strerror or exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise TargetFileError(f"{file}: not a valid TOML file: {exc}") from exc


def _load(file: Traversable | Path) -> Target:
    data = _read(file)
    if "alias" in data:
        return _resolve_alias(file, data)
    missing = [key for key in _REQUIRED if key not in data]
    if missing:
        raise TargetFileError(
            f"{file}: missing field(s) {', '.join(repr(k) for k in missing)}; a target file needs "
            f"{', '.join(_REQUIRED)} and may set name, threads, service, fallback_runtime, disabled_optimizers"
        )
    unknown = sorted(set(data) - set(_ACCEPTED))
    if unknown:
        raise TargetFileError(
            f"{file}: unknown field(s) {', '.join(repr(k) for k in unknown)}; "
            f"accepted: {', '.join(_ACCEPTED)}"
        )
    fields = {**_DEFAULTS, "name": Path(file.name).stem, **data}
    return Target(**fields, path=str(file))


def _resolve_alias(file: Traversable | Path, data: dict) -> Target:
    builtin = _builtin_files()
    alias = data["alias"]
    if (
        set(data) != {"alias"}
        or not isinstance(alias, str)
        or alias not in builtin
        or "alias" in _read(builtin[alias])
    ):
        targets = ", ".join(name for name, f in builtin.items() if "alias" not in _read(f))
        raise TargetFileError(
            f"{file}: an alias file holds only 'alias = \"<target>\"', naming one of: {targets}; "
            f"got {data!r}"
        )
    return _load(builtin[alias])
