"""What a CPU measurement depends on: the model and the ISA extensions int8/bf16 kernels use."""

from __future__ import annotations

import os
import platform
from pathlib import Path

# x86: VNNI/AMX run int8 and bf16 dot products; ARM: dot product, i8mm and bf16 do the same.
RELEVANT_FLAGS = (
    "avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16",
    "asimddp", "i8mm", "bf16", "sve",
)  # fmt: skip


def cpu_info(path: str | Path = "/proc/cpuinfo") -> dict[str, object]:
    """``{"cpu": model, "isa": relevant flags present, "logical_cpus": n}`` read from ``path``."""
    fields: dict[str, str] = {}
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    return {
        "cpu": fields.get("model name") or platform.processor() or platform.machine() or "unknown",
        "isa": tuple(flag for flag in RELEVANT_FLAGS if flag in flags),
        "logical_cpus": os.cpu_count() or 1,
    }
