"""The search space as data (a TOML file or flags), and the one function that samples a plan from it."""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import optuna

from search._errors import UsageError
from search.plan._plan import BITS, ChannelPruning, Depth, HeadPruning, LayerPlan, Plan, Quantization, WeightSparsity

if TYPE_CHECKING:  # annotations only: search.model imports PyTorch, which a plan does not need
    from search.model import EncoderBlocks, LayerInfo

TWO_FOUR = "2:4"


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """Choices offered to every layer. Narrow any of them with ``--space file.toml`` or flags.

    ``edge_min_bits``: the first and last layers keep at least this many bits (1 lifts the rule).
    ``layers``: only these layers are compressed (all when empty); the others stay as in the teacher.
    Transformers (a model with attention modules in one block list) are searched by ``depth`` (share
    of the blocks kept: the student) and ``heads`` (share of each attention module's heads removed)
    instead of ``width``; ``pruning`` narrows only their FFN layers, and their linear layers take
    the ``bits`` above 1.
    """

    width: tuple[float, ...] = (1.0, 0.75, 0.5)
    depth: tuple[float, ...] = (1.0, 0.67, 0.5)
    heads: tuple[float, ...] = (0.0, 0.25, 0.5)
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

        def number(v) -> bool:  # a TOML string or table, or a bool, is no share (NaN fails every bound)
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        def whole(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        check("width", self.width, lambda v: number(v) and 0 < v <= 1, "numbers in (0, 1]")
        check("depth", self.depth, lambda v: number(v) and 0 < v <= 1, "numbers in (0, 1]")
        check("heads", self.heads, lambda v: number(v) and 0 <= v < 1, "numbers in [0, 1)")
        check("pruning", self.pruning, lambda v: number(v) and 0 <= v < 1, "numbers in [0, 1)")
        check("sparsity", self.sparsity, lambda v: number(v) and 0 <= v < 1, "numbers in [0, 1)")
        check("bits", self.bits, lambda v: whole(v) and v in BITS, ", ".join(map(str, BITS)))
        check("layers", self.layers or ("",), lambda v: isinstance(v, str), "module names (text)")
        if not (whole(self.edge_min_bits) and self.edge_min_bits in BITS):
            raise UsageError(f"search space: 'edge_min_bits' is {self.edge_min_bits!r}; accepted: {BITS}")
        if not isinstance(self.two_four, bool):
            raise UsageError(f"search space: 'two_four' is {self.two_four!r}; accepted: true or false")

    @classmethod
    def from_toml(cls, path: str | Path) -> SearchSpace:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise UsageError(f"search space file {path}: cannot read it ({exc.strerror or exc})") from exc
        except UnicodeDecodeError as exc:
            raise UsageError(f"search space file {path}: not UTF-8 text (at byte {exc.start}); TOML is UTF-8") from exc
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"search space file {path}: not a valid TOML file ({exc})") from exc
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


def _bits_for(layer: LayerInfo, space: SearchSpace, transformer: bool) -> list[int]:
    allowed = [
        b for b in space.bits if (not layer.edge or b >= space.edge_min_bits) and not (transformer and b == 1)
    ]
    return allowed or [max(BITS)]  # no offered width is wide enough for an edge layer: it stays float


def kept_blocks(blocks: int, kept: int, drops: Sequence[float] | None = None) -> tuple[int, ...]:
    """``kept`` of ``blocks`` indices: given ``drops``, what removing each block alone costs the
    metric, the ``kept`` costliest to remove (the earlier of two that cost the same); else evenly
    spaced from the first block to the last."""
    if drops is not None:
        return tuple(sorted(sorted(range(blocks), key=lambda i: -drops[i])[:kept]))
    if kept == 1:
        return (0,)
    return tuple(sorted({round(i * (blocks - 1) / (kept - 1)) for i in range(kept)}))


def depth_choices(space: SearchSpace, blocks: EncoderBlocks) -> list[int]:
    """The numbers of ``blocks`` a student may keep (the ``depth`` parameter's choices), most first."""
    return sorted({max(1, round(share * blocks.blocks)) for share in space.depth}, reverse=True)


def _suggest_depth(
    trial: optuna.Trial, space: SearchSpace, blocks: EncoderBlocks, suggest, drops: Sequence[float] | None
) -> Depth | None:
    kept = suggest("depth", depth_choices(space, blocks))
    return None if kept == blocks.blocks else Depth(blocks.container, kept_blocks(blocks.blocks, kept, drops))


def suggest_plan(
    trial: optuna.Trial,
    space: SearchSpace,
    layers: Sequence[LayerInfo],
    blocks: EncoderBlocks | None = None,
    exclude: Mapping[str, Collection] | None = None,
    drops: Sequence[float] | None = None,
) -> Plan:
    """Sample one plan: width (or, for a Transformer with ``blocks``, depth and per attention module
    the heads removed), then per layer bit width, sparsity (dense when binarized) and pruning.

    Parameter names are ``width``/``depth``, ``<attention module>.heads`` and ``<layer>.bits`` /
    ``.sparsity`` / ``.pruning``, so the study's DataFrame has one column per module and technique.
    Modules of dropped blocks get no parameters. ``exclude`` names, per parameter, values the space
    offers that this study does not (options that layer sensitivity or the study's measurements
    ruled out); a parameter keeps its choices if all of them are excluded, and one left with a
    single choice takes it without being asked: Optuna's storages refuse a parameter whose choices
    change within a study, and a study may rule options out as it goes. ``drops``: what removing
    each block alone costs the metric (layer sensitivity); a student keeps the costliest blocks
    (:func:`kept_blocks`), so the ``depth`` parameter stays a number of blocks.
    """
    exclude = exclude or {}

    def suggest(name: str, choices: list):
        offered = [choice for choice in choices if choice not in exclude.get(name, ())] or choices
        return offered[0] if len(offered) == 1 < len(choices) else trial.suggest_categorical(name, offered)

    width, depth, heads = 1.0, None, {}
    if blocks is None:
        width = suggest("width", list(space.width))
    else:
        depth = _suggest_depth(trial, space, blocks, suggest, drops)
        for name in blocks.heads:
            if depth is None or depth.rename(name) is not None:
                heads[name] = HeadPruning(suggest(f"{name}.heads", list(space.heads)))
    plans = {}
    for layer in layers:
        if space.layers and layer.name not in space.layers:
            continue
        if depth is not None and depth.rename(layer.name) is None:
            continue
        bits = suggest(f"{layer.name}.bits", _bits_for(layer, space, blocks is not None))
        sparsity = WeightSparsity()
        if bits != 1:
            choices = list(space.sparsity) + ([TWO_FOUR] if space.two_four and layer.two_four else [])
            chosen = suggest(f"{layer.name}.sparsity", choices)
            sparsity = WeightSparsity(0.5, "2:4") if chosen == TWO_FOUR else WeightSparsity(float(chosen))
        pruning = ChannelPruning()
        if layer.prunable if blocks is None else layer.name in blocks.ffn:
            pruning = ChannelPruning(suggest(f"{layer.name}.pruning", list(space.pruning)))
        plans[layer.name] = LayerPlan(pruning, sparsity, Quantization(bits))
    return Plan(width=width, layers=plans, heads=heads, depth=depth)
