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


def plot_tradeoff(rows: Sequence[dict], path: Path, title: str) -> None:
    """Accuracy vs speed-up, one labelled point per row, marker area proportional to ``size_mb``.

    Rows need ``name``, ``speedup``, ``cos_mean``, ``cos_min`` and ``size_mb``. Two panels: cosine mean
    and cosine min against the fp32 embeddings, on a ``-log10(1 - cos)`` scale so that 0.999 and 0.9999
    stay apart (1.0, the fp32 point, is drawn at 1 - 1e-5).
    """
    try:
        import numpy as np
        from matplotlib.figure import Figure  # the Agg canvas: no GUI backend, no pyplot state
    except ImportError as error:
        raise ImportError('the plot needs matplotlib: pip install "lowbit[models]"') from error

    def nines(y):
        return -np.log10(np.clip(1 - np.asarray(y, dtype=float), COSINE_FLOOR, None))

    def cosine(v):
        return 1 - 10.0 ** -np.asarray(v, dtype=float)

    figure = Figure(figsize=(12, 5), layout="constrained")
    largest = max(row["size_mb"] for row in rows)
    x = [row["speedup"] for row in rows]
    for axes, key, label in zip(figure.subplots(1, 2), ("cos_mean", "cos_min"), ("cosine mean", "cosine min")):
        y = [min(row[key], 1 - COSINE_FLOOR) for row in rows]
        axes.set_yscale("function", functions=(nines, cosine))
        axes.scatter(x, y, s=[900 * row["size_mb"] / largest for row in rows], alpha=0.5,
                     c=[f"C{i % 10}" for i in range(len(rows))], edgecolors="black", linewidths=0.5)
        placed = []  # (x, nines(y)) of the points labelled so far: stack labels of points that nearly coincide
        x_span = (max(x) - min(x)) or 1.0
        for row, xi, yi in zip(rows, x, y):
            point = (xi, float(nines(yi)))
            near = sum(abs(point[0] - px) < 0.04 * x_span and abs(point[1] - py) < 0.1 for px, py in placed)
            placed.append(point)
            axes.annotate(f"{row['name']} ({row['size_mb']:.0f} MB)", (xi, yi), xytext=(8, 6 - 11 * near),
                          textcoords="offset points", fontsize=8)
        axes.set_yticks([0.9, 0.99, 0.999, 0.9999, 1 - COSINE_FLOOR], ["0.9", "0.99", "0.999", "0.9999", "1"])
        axes.set_ylim(min(min(y), 0.9), 1 - COSINE_FLOOR / 4)
        axes.axvline(1.0, color="grey", linestyle=":", linewidth=1)
        axes.set_xlabel("speed-up vs fp32 (batch 1, sequence 128)")
        axes.set_ylabel(f"{label} vs fp32 embeddings")
        axes.grid(alpha=0.3)
    figure.suptitle(f"{title}: accuracy vs speed-up; marker area proportional to model size")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
