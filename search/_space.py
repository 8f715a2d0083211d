"""The search space as data (a TOML file or flags), and the one function that samples a plan from it."""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Sequence
from pathlib import Path

import optuna

from search._errors import UsageError
from search._layers import LayerInfo
from search._plan import BITS, ChannelPruning, LayerPlan, Plan, Quantization, WeightSparsity

TWO_FOUR = "2:4"


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """Choices offered to every layer. Narrow any of them with ``--space file.toml`` or flags.

    ``edge_min_bits``: the first and last layers keep at least this many bits (1 lifts the rule).
    ``layers``: only these layers are compressed (all when empty); the others stay as in the teacher.
    """

    width: tuple[float, ...] = (1.0, 0.75, 0.5)
    pruning: tuple[float, ...] = (0.0, 0.25, 0.5)
    sparsity: tuple[float, ...] = (0.0, 0.5, 0.75)
    two_four: bool = True
    bits: tuple[int, ...] = (32, 8, 4, 1)
    edge_min_bits: int = 8
    layers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        def check(field: str, values: Sequence, ok, accepted: str) -> None:
            if not values:
                raise UsageError(f"search space: {field!r} needs at least one value ({accepted})")
            bad = [v for v in values if not ok(v)]
            if bad:
                raise UsageError(f"search space: {field!r} has {bad}; accepted: {accepted}")

        check("width", self.width, lambda v: 0 < v <= 1, "numbers in (0, 1]")
        check("pruning", self.pruning, lambda v: 0 <= v < 1, "numbers in [0, 1)")
        check("sparsity", self.sparsity, lambda v: 0 <= v < 1, "numbers in [0, 1)")
        check("bits", self.bits, lambda v: v in BITS, ", ".join(map(str, BITS)))
        if self.edge_min_bits not in BITS:
            raise UsageError(f"search space: 'edge_min_bits' is {self.edge_min_bits}; accepted: {BITS}")

    @classmethod
    def from_toml(cls, path: str | Path) -> SearchSpace:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise UsageError(f"search space file {path}: {exc}") from exc
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict, source: str = "search space") -> SearchSpace:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise UsageError(f"{source}: unknown key(s) {', '.join(unknown)}; accepted: {', '.join(fields)}")
        values = {}
        for key, value in data.items():
            default = fields[key].default
            if isinstance(default, tuple):
                if not isinstance(value, (list, tuple)):
                    raise UsageError(f"{source}: {key!r} must be a list, got {value!r}")
                value = tuple(value)
            values[key] = value
        return cls(**values)

    def replace(self, **changes) -> SearchSpace:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _bits_for(layer: LayerInfo, space: SearchSpace) -> list[int]:
    allowed = [b for b in space.bits if not layer.edge or b >= space.edge_min_bits]
    return allowed or [max(BITS)]  # no offered width is wide enough for an edge layer: it stays float


def suggest_plan(trial: optuna.Trial, space: SearchSpace, layers: Sequence[LayerInfo]) -> Plan:
    """Sample one plan: width, then per layer bit width, sparsity (dense when binarized) and pruning.

    Parameter names are ``width`` and ``<layer>.bits`` / ``.sparsity`` / ``.pruning``, so the study's
    DataFrame has one column per layer and technique.
    """
    width = trial.suggest_categorical("width", list(space.width))
    plans = {}
    for layer in layers:
        if space.layers and layer.name not in space.layers:
            continue
        bits = trial.suggest_categorical(f"{layer.name}.bits", _bits_for(layer, space))
        sparsity = WeightSparsity()
        if bits != 1:
            choices = list(space.sparsity) + ([TWO_FOUR] if space.two_four and layer.two_four else [])
            chosen = trial.suggest_categorical(f"{layer.name}.sparsity", choices)
            sparsity = WeightSparsity(0.5, "2:4") if chosen == TWO_FOUR else WeightSparsity(float(chosen))
        pruning = ChannelPruning()
        if layer.prunable:
            pruning = ChannelPruning(trial.suggest_categorical(f"{layer.name}.pruning", list(space.pruning)))
        plans[layer.name] = LayerPlan(pruning, sparsity, Quantization(bits))
    return Plan(width=width, layers=plans)
