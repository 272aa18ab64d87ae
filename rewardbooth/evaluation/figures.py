"""Figures for reports: training curves, bars, trade-off and frontier plots (matplotlib, Agg)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

# matplotlib is imported when a figure is drawn: reading results needs no plotting library loaded.


def _is_number(value: Any) -> bool:
    # bool is an int subclass but a flag, not a metric; NaN/inf would break the axes.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _ema(values: list[float], span: int) -> list[float]:
    alpha = 2.0 / (span + 1)
    out, current = [], values[0]
    for v in values:
        current = alpha * v + (1 - alpha) * current
        out.append(current)
    return out


def plot_metrics(records: list[dict], keys: list[str | tuple[str, ...]], path: Path, title: str = "") -> Path | None:
    """Plot keys against record["step"], one panel per entry; a tuple of keys shares a panel.

    Returns None if nothing to plot.
    """
    panels: list[tuple[str, dict[str, tuple[list[float], list[float]]]]] = []
    for entry in keys:
        group = (entry,) if isinstance(entry, str) else tuple(entry)
        series: dict[str, tuple[list[float], list[float]]] = {}
        for key in group:
            points = sorted(
                (float(r["step"]), float(r[key])) for r in records if _is_number(r.get("step")) and _is_number(r.get(key))
            )
            if points:
                series[key] = ([p[0] for p in points], [p[1] for p in points])
        if series:
            panels.append((" / ".join(series), series))
    if not panels:
        return None

    fig = _new_figure(7.0, 1.2 + 2.2 * len(panels))
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (label, series) in zip(axes, panels):
        for color, (key, (steps, values)) in zip(("tab:blue", "tab:orange", "tab:green", "tab:red"), series.items()):
            smooth = len(values) > 20
            ax.plot(steps, values, color=color, alpha=0.35 if smooth else 1.0, linewidth=1.0, marker="" if smooth else ".",
                    label=None if smooth else (key if len(series) > 1 else None))
            if smooth:
                ax.plot(steps, _ema(values, span=max(5, len(values) // 10)), color=color, linewidth=2.0,
                        label=f"{key} (EMA)" if len(series) > 1 else "EMA")
        if len(series) > 1 or len(next(iter(series.values()))[1]) > 20:
            ax.legend(loc="best", fontsize=8)
        ax.set_ylabel(label if len(series) == 1 else "value")
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("step")
    if title:
        fig.suptitle(title)
    return _save_figure(fig, path)


def _new_figure(width: float, height: float):
    # Figure + FigureCanvasAgg (not pyplot) so a user's global backend stays untouched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save_figure(fig, path: Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def plot_bars(labels: list[str], series: dict[str, list[float]], path: Path, title: str = "") -> Path:
    """Grouped bar chart: one group per label, one bar per series (e.g. per method)."""
    fig = _new_figure(max(6.0, 0.45 * len(labels) * max(len(series), 1) + 2), 3.6)
    ax = fig.subplots()
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        ax.bar([x + (i - (len(series) - 1) / 2) * width for x in range(len(labels))], values, width, label=name)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return _save_figure(fig, path)


def plot_tradeoff(points: dict[str, list[tuple[float, float]]], path: Path, xlabel: str, ylabel: str, title: str = "") -> Path:
    """Fidelity vs alignment: small dots per subject, one large marker for each series' mean."""
    fig = _new_figure(4.6, 4.0)
    ax = fig.subplots()
    for i, (name, xy) in enumerate(points.items()):
        color = f"C{i}"
        xy = [(x, y) for x, y in xy if not (math.isnan(x) or math.isnan(y))]
        if not xy:
            continue
        ax.scatter([x for x, _ in xy], [y for _, y in xy], s=14, alpha=0.45, color=color)
        ax.scatter([sum(x for x, _ in xy) / len(xy)], [sum(y for _, y in xy) / len(xy)], s=120, marker="*",
                   color=color, edgecolor="black", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return _save_figure(fig, path)


def plot_frontier(curves: dict[str, list[tuple[int, float, float]]], path: Path, xlabel: str, ylabel: str) -> Path:
    """One line per method through its (x, y) means at each budget, each point labelled with its budget."""
    fig = _new_figure(5.2, 4.2)
    ax = fig.subplots()
    for i, (name, points) in enumerate(curves.items()):
        points = sorted(points)
        ax.plot([x for _, x, _ in points], [y for _, _, y in points], marker="o", color=f"C{i}", label=name)
        for budget, x, y in points:
            ax.annotate(str(budget), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=f"C{i}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, framealpha=0.6)  # many lines: the points behind the legend stay visible
    return _save_figure(fig, path)
