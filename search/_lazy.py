"""Package namespaces whose names import their module on first use (PEP 562).

Most of this project's modules import PyTorch, scikit-learn or ONNX, several seconds together; a
package that imported them all up front would make ``search --help`` and ``search results`` wait
for libraries they never use.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping, Sequence


def lazy_names(package: str, homes: Mapping[str, Sequence[str]]) -> tuple[Callable, Callable, list[str]]:
    """``__getattr__`` and ``__dir__`` for ``package``, which offers each name of ``homes[module]``
    from that module, imported when the name is first asked for; and those names, for the
    package's ``__all__`` (what its ``__dir__`` lists)."""
    home = {name: module for module, names in homes.items() for name in names}
    names = sorted(home)

    def __getattr__(name: str):
        if name not in home:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(home[name]), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return list(sys.modules[package].__all__)

    return __getattr__, __dir__, names
