"""A block's name ends with its index: ``3`` in an ``nn.ModuleList``, ``encoder_layer_3`` in
torchvision's ``nn.Sequential``. Which containers hold blocks (``search.model``) and how a kept
block is renamed (``search.plan``, which imports no PyTorch) read it here, from one rule."""

from __future__ import annotations

import re

_NUMBERED = re.compile(r"(.*?)(\d+)")


def split_index(name: str) -> tuple[str, int] | None:
    """``name``'s stem and the index it ends with (``("encoder_layer_", 3)``), or None if it ends
    with no number."""
    match = _NUMBERED.fullmatch(name)
    return (match[1], int(match[2])) if match else None
