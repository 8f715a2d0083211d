"""A compression plan: plain frozen data, keyed by module name, that round-trips through JSON.

A plan names, for each compressible layer of the teacher (by its dotted module name), a channel
pruning ratio, a weight sparsity and a bit width, plus one global student width multiplier. For a
Transformer it also names, per attention module, the share of heads removed, and the blocks kept
(the student's depth). Names are always the teacher's: :meth:`Plan.student` renames them for the
candidate, whose blocks are renumbered once some are dropped. Callers always pass a plan as it is;
a function that meets it with a built candidate (export, size, features, the PyTorch runtime)
calls :meth:`~Plan.student` itself.
It holds no module objects, so any trial can rebuild its candidate from the plan in its user attrs.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from search._block_names import split_index

PLAN_VERSION = 1
BITS = (32, 8, 4, 1)
SPARSITY_PATTERNS = ("unstructured", "2:4")


@dataclasses.dataclass(frozen=True)
class ChannelPruning:
    """Remove ``ratio`` of the layer's output channels (and what depends on them)."""

    ratio: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"channel pruning ratio must be in [0, 1), got {self.ratio!r}")


@dataclasses.dataclass(frozen=True)
class WeightSparsity:
    """Zero ``ratio`` of the weights by magnitude: anywhere ("unstructured") or 2 of every 4 ("2:4")."""

    ratio: float = 0.0
    pattern: str = "unstructured"

    def __post_init__(self) -> None:
        if self.pattern not in SPARSITY_PATTERNS:
            raise ValueError(
                f"sparsity pattern must be one of {', '.join(SPARSITY_PATTERNS)}, got {self.pattern!r}"
            )
        if self.pattern == "2:4" and self.ratio != 0.5:
            raise ValueError(f"2:4 sparsity has ratio 0.5, got {self.ratio!r}")
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"sparsity ratio must be in [0, 1), got {self.ratio!r}")


@dataclasses.dataclass(frozen=True)
class Quantization:
    """Weight bit width: 32 (float), 8, 4, or 1 (binarized, XNOR-Net per-channel scale)."""

    bits: int = 32

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of {', '.join(map(str, BITS))}, got {self.bits!r}")


@dataclasses.dataclass(frozen=True)
class HeadPruning:
    """Remove ``ratio`` of an attention module's heads: whole heads, rounded down, those that add
    least to the block's output."""

    ratio: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"head pruning ratio must be in [0, 1), got {self.ratio!r}")


@dataclasses.dataclass(frozen=True)
class Depth:
    """Keep only the blocks ``keep`` (increasing indices) of the ``nn.ModuleList`` named ``container`` (or
    an ``nn.Sequential`` of blocks named by index, as torchvision's ViT has them)."""

    container: str
    keep: tuple[int, ...]

    def __post_init__(self) -> None:
        keep = tuple(self.keep)
        if not keep or any(not isinstance(i, int) or i < 0 for i in keep) or list(keep) != sorted(set(keep)):
            raise ValueError(f"blocks to keep must be increasing indices >= 0, at least one; got {list(keep)}")
        object.__setattr__(self, "keep", keep)  # a JSON list comes back as a tuple: plans stay comparable

    def rename(self, name: str) -> str | None:
        """The candidate's name for the teacher's module ``name``; None if its block was dropped."""
        prefix = f"{self.container}."
        if not name.startswith(prefix):
            return name
        child, dot, rest = name[len(prefix) :].partition(".")
        stem, index = split_index(child)  # a kept block is named by its new index
        if index not in self.keep:
            return None
        return f"{prefix}{stem}{self.keep.index(index)}{dot}{rest}"


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    pruning: ChannelPruning = ChannelPruning()
    sparsity: WeightSparsity = WeightSparsity()
    quantization: Quantization = Quantization()

    def __post_init__(self) -> None:
        if self.quantization.bits == 1 and self.sparsity.ratio > 0:
            raise ValueError("a binarized layer is dense: its sparsity ratio must be 0")


@dataclasses.dataclass(frozen=True)
class Plan:
    """The whole plan: ``width`` shrinks every layer uniformly (the CNN student), ``depth`` keeps some
    of a Transformer's blocks (its student); ``layers`` and ``heads`` apply per module."""

    width: float = 1.0
    layers: Mapping[str, LayerPlan] = dataclasses.field(default_factory=dict)
    heads: Mapping[str, HeadPruning] = dataclasses.field(default_factory=dict)
    depth: Depth | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.width <= 1.0:
            raise ValueError(f"student width multiplier must be in (0, 1], got {self.width!r}")

    def layer(self, name: str) -> LayerPlan:
        return self.layers.get(name, LayerPlan())

    def student(self) -> Plan:
        """This plan in the candidate's own module names: blocks renumbered after ``depth``, the
        entries of dropped blocks gone. What export and size accounting look layers up in."""
        if self.depth is None:
            return self

        def renamed(entries: Mapping[str, Any]) -> dict[str, Any]:
            names = {name: self.depth.rename(name) for name in entries}
            return {names[name]: entry for name, entry in entries.items() if names[name] is not None}

        return Plan(width=self.width, layers=renamed(self.layers), heads=renamed(self.heads))

    def to_dict(self) -> dict[str, Any]:
        return _encode(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        if data.get("_version") != PLAN_VERSION:
            raise ValueError(f"plan version {data.get('_version')!r} is not {PLAN_VERSION}")
        plan = _decode(data)
        if not isinstance(plan, Plan):
            raise ValueError(f"expected a Plan, got {type(plan).__name__}")
        return plan

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(json.loads(text))


_TYPES = {
    t.__name__: t for t in (ChannelPruning, WeightSparsity, Quantization, LayerPlan, HeadPruning, Depth, Plan)
}


def _encode(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        out = {"_type": type(obj).__name__}
        if isinstance(obj, Plan):
            out["_version"] = PLAN_VERSION
        out.update({f.name: _encode(getattr(obj, f.name)) for f in dataclasses.fields(obj)})
        return out
    if isinstance(obj, Mapping):
        return {k: _encode(v) for k, v in obj.items()}
    return obj


def _decode(obj: Any) -> Any:
    if isinstance(obj, Mapping) and "_type" in obj:
        cls = _TYPES.get(obj["_type"])
        if cls is None:
            raise ValueError(f"unknown plan entry type {obj['_type']!r}; known: {', '.join(_TYPES)}")
        return cls(**{k: _decode(v) for k, v in obj.items() if not k.startswith("_")})
    if isinstance(obj, Mapping):
        return {k: _decode(v) for k, v in obj.items()}
    return obj
