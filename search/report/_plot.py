"""The per-layer picture of :func:`~search.report.load_layers`: teacher against trial, per layer."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def plot_layers(frame: pd.DataFrame, path: str | Path) -> Path:
    """A PNG at ``path``: per layer, the teacher's time and the trial's side by side (ms per
    inference), the layers whose plan the runtime did not accelerate hatched in red and labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = frame.iloc[::-1]  # the first layer at the top
    labels = []
    for row in rows.itertuples():
        ran = " ".join(str(v) for v in (row.kernel, row.precision) if isinstance(v, str))
        label = f"{row.layer}\n{ran}" if ran else str(row.layer)
        labels.append(f"{label}\nnot accelerated" if row.unaccelerated else label)
    positions = range(len(rows))
    height = 0.38
    figure, axes = plt.subplots(figsize=(9, 1.2 + 0.6 * len(rows)))
    teacher = rows["teacher_ms"].astype(float).fillna(0.0)
    trial = rows["ms"].astype(float).fillna(0.0)
    axes.barh([p + height / 2 for p in positions], teacher, height, color="0.7", label="teacher")
    bars = axes.barh([p - height / 2 for p in positions], trial, height, color="C0", label="trial")
    for bar, flagged in zip(bars, rows["unaccelerated"]):
        if flagged:
            bar.set_facecolor("C3")
            bar.set_hatch("//")
            bar.set_edgecolor("white")
    axes.set_yticks(list(positions), labels)
    for tick, flagged in zip(axes.get_yticklabels(), rows["unaccelerated"]):
        if flagged:
            tick.set_color("C3")
    for y, (ms, speedup) in enumerate(zip(rows["ms"], rows["speedup"])):
        if pd.notna(ms) and pd.notna(speedup):
            axes.text(float(ms), y - height / 2, f" {speedup:.2f}×", va="center", fontsize="small")
    handles, names = axes.get_legend_handles_labels()
    if rows["unaccelerated"].any():
        handles.append(Patch(facecolor="C3", hatch="//", edgecolor="white"))
        names.append("trial, plan not accelerated by the runtime")
    axes.legend(handles, names, loc="lower right", fontsize="small")
    runtime = frame.attrs.get("runtime") or "the runtime"
    axes.set_xlabel(f"ms per inference ({runtime}'s per-layer report)")
    title = f"trial {frame.attrs.get('trial', '?')}: time per layer, teacher against trial"
    if frame.attrs.get("study"):
        title = f"{frame.attrs['study']}, {title}"
    axes.set_title(title)
    axes.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
