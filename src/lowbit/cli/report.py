"""Output helpers for the commands: text tables, the demo's trade-off plot, JSON files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

COSINE_FLOOR = 1e-5  # where the plot draws cosine 1.0
Column = tuple[str, Callable[[dict], object], str]  # (header, value(row), format spec)


def table(rows: Sequence[dict], columns: Sequence[Column]) -> str:
    """A plain-text table. A column aligns as its format spec says (``">"``, ``"<"``), else numbers
    to the right and text to the left."""
    cells = [[header for header, _, _ in columns]]
    right = [spec[:1] == ">" or (spec[:1] != "<" and bool(rows) and isinstance(value(rows[0]), (int, float)))
             for _, value, spec in columns]
    cells += [[format(value(row), spec) for _, value, spec in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(line, widths, right)).rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


def plot_tradeoff(rows: Sequence[dict], path: Path, title: str):
    """Accuracy vs speed-up, one labelled point per row, marker area proportional to ``size_mb``;
    returns the matplotlib ``Figure`` it saved to ``path``.

    Rows need ``name``, ``speedup``, ``cos_mean``, ``cos_min`` and ``size_mb``. Two panels: cosine mean
    and cosine min against the fp32 embeddings, on a ``-log10(1 - cos)`` scale so that 0.999 and 0.9999
    stay apart (1.0, the fp32 point, is drawn at 1 - 1e-5). Labels are placed inside the axes, clear of
    each other.
    """
    try:
        import numpy as np
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure  # no GUI backend, no pyplot state
    except ImportError as error:
        raise ImportError('the plot needs matplotlib: pip install "lowbit[models]"') from error

    def nines(y):
        return -np.log10(np.clip(1 - np.asarray(y, dtype=float), COSINE_FLOOR, None))

    def cosine(v):
        return 1 - 10.0 ** -np.asarray(v, dtype=float)

    figure = Figure(figsize=(12, 5.5), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    largest = max(row["size_mb"] for row in rows)
    x = [row["speedup"] for row in rows]
    panels = []
    for axes, key, label in zip(figure.subplots(1, 2), ("cos_mean", "cos_min"), ("cosine mean", "cosine min")):
        y = [min(row[key], 1 - COSINE_FLOOR) for row in rows]
        axes.set_yscale("function", functions=(nines, cosine))
        axes.scatter(x, y, s=[900 * row["size_mb"] / largest for row in rows], alpha=0.5,
                     c=[f"C{i % 10}" for i in range(len(rows))], edgecolors="black", linewidths=0.5)
        axes.set_yticks([0.9, 0.99, 0.999, 0.9999, 1 - COSINE_FLOOR], ["0.9", "0.99", "0.999", "0.9999", "1"])
        axes.set_ylim(min(min(y), 0.9), 1 - COSINE_FLOOR / 4)
        axes.margins(x=0.2)
        axes.axvline(1.0, color="grey", linestyle=":", linewidth=1)
        axes.set_xlabel("speed-up vs fp32 (batch 1, sequence 128)")
        axes.set_ylabel(f"{label} vs fp32 embeddings\n(log scale of 1 - cosine: each tick adds a nine)")
        axes.grid(alpha=0.3)
        panels.append((axes, y))
    figure.suptitle(f"{title}: accuracy vs speed-up; marker area proportional to model size")
    figure.draw_without_rendering()  # lay out the axes once, then keep them there while the labels are placed
    figure.set_layout_engine("none")
    renderer = figure.canvas.get_renderer()
    for axes, y in panels:
        _place_labels(axes, [f"{row['name']} ({row['size_mb']:.0f} MB)" for row in rows], list(zip(x, y)), renderer)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return figure


LABEL_STEP = 11  # points between the stacked positions a label may take above or below its point


def _place_labels(axes, texts: list[str], points: list[tuple[float, float]], renderer) -> None:
    """Annotate each point with its text at the first offset (right or left of the point, then stepping
    away from it vertically) that keeps the label inside the axes and off the labels placed before;
    a label moved away from its point gets a thin line to it."""
    inside = axes.get_window_extent(renderer)
    offsets = [(dx, sign * (5 + LABEL_STEP * step), "left" if dx > 0 else "right", "bottom" if sign > 0 else "top")
               for step in range(8) for dx in (7, -7) for sign in (1, -1)]
    placed = []
    for text, point in zip(texts, points):
        probe = axes.annotate(text, point, xytext=offsets[0][:2], textcoords="offset points", fontsize=8)
        best, best_box, best_cost = offsets[0], None, None
        for dx, dy, ha, va in offsets:
            probe.xyann = (dx, dy)
            probe.set_horizontalalignment(ha)
            probe.set_verticalalignment(va)
            box = probe.get_window_extent(renderer)
            cost = (not _contains(inside, box), sum(box.overlaps(other) for other in placed))
            if best_cost is None or cost < best_cost:
                best, best_box, best_cost = (dx, dy, ha, va), box, cost
            if cost == (False, 0):
                break
        probe.remove()
        dx, dy, ha, va = best
        axes.annotate(text, point, xytext=(dx, dy), textcoords="offset points", fontsize=8, ha=ha, va=va,
                      arrowprops=dict(arrowstyle="-", color="grey", linewidth=0.5) if abs(dy) > LABEL_STEP else None)
        placed.append(best_box)


def _contains(outer, inner) -> bool:
    return outer.x0 <= inner.x0 and inner.x1 <= outer.x1 and outer.y0 <= inner.y0 and inner.y1 <= outer.y1
