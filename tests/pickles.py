"""A checkpoint that runs code when it is unpickled, for the tests that prove nothing unpickles one."""

from __future__ import annotations

from pathlib import Path

import torch


class WritesMarker:
    """Unpickling this calls ``Path.write_text(marker, ...)``: any code could run in its place."""

    def __init__(self, marker: Path) -> None:
        self.marker = Path(marker)

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled: code from the file ran"))


def code_running_checkpoint(path: Path, marker: Path) -> Path:
    """Write ``path`` as a ``torch.save`` checkpoint that looks like a state dict, with one entry
    that writes ``marker`` when the file is unpickled; returns ``path``."""
    torch.save({"fc.weight": torch.zeros(10, 32), "fc.bias": WritesMarker(marker)}, path)
    return path
