"""Run report: image grids, metric plots and one self-contained static HTML page.

The page references its images by paths relative to the run folder, so the whole
folder can be moved or zipped and still open correctly.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from PIL import Image

__all__ = [
    "ReportSection",
    "make_grid",
    "plot_metrics",
    "read_metrics",
    "save_image_grid",
    "write_report",
]


@dataclass
class ReportSection:
    title: str
    text: str = ""
    images: list[tuple[str, str]] = field(default_factory=list)  # (relative path, caption)
    table: list[dict] | None = None


def make_grid(
    images: list[Image.Image],
    cols: int | None = None,
    pad: int = 2,
    background: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Tile images into a grid with `pad` pixels around and between every cell.

    Size: width = cols * w + (cols + 1) * pad, height = rows * h + (rows + 1) * pad,
    where (w, h) is the first image's size (the others are resized to it).
    """
    if not images:
        raise ValueError("make_grid needs at least one image")
    n = len(images)
    cols = max(1, min(cols or math.ceil(math.sqrt(n)), n))
    rows = math.ceil(n / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w + (cols + 1) * pad, rows * h + (rows + 1) * pad), background)
    for i, image in enumerate(images):
        if image.size != (w, h):
            image = image.resize((w, h), Image.Resampling.LANCZOS)
        if image.mode != "RGB":
            image = image.convert("RGB")
        row, col = divmod(i, cols)
        grid.paste(image, (pad + col * (w + pad), pad + row * (h + pad)))
    return grid


def save_image_grid(images: list[Image.Image], path: Path, cols: int | None = None, max_side: int | None = None) -> Path:
    """A grid PNG; `max_side` shrinks larger images first (phone photos make thumbnails, not 100 MB strips)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if max_side:
        images = [_thumbnail(im, max_side) for im in images]
    make_grid(images, cols=cols).save(path, format="PNG")
    return path


def _thumbnail(image: Image.Image, max_side: int) -> Image.Image:
    if max(image.size) <= max_side:
        return image
    scale = max_side / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.LANCZOS)


def save_labelled_rows(rows: list[tuple[str, list[Image.Image]]], path: Path, scale: int = 1, gap_after: int | None = None,
                       header: list[str] | None = None) -> Path:
    """One row of images per label, the label written at the row's left; a wider gap after
    `gap_after` images (e.g. before | after); optional column headers over the two halves."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default()
    w, h = rows[0][1][0].size
    w, h = w * scale, h * scale
    label_width = 8 + max(int(font.getlength(label)) for label, _ in rows)
    cols = max(len(images) for _, images in rows)
    gap = 12
    top = 16 if header else 0
    x0 = [label_width + k * (w + 2) + (gap if gap_after and k >= gap_after else 0) for k in range(cols)]
    width = x0[-1] + w + 4
    if header:  # room for the last header's text
        width = max(width, x0[gap_after or 0] + int(font.getlength(header[-1])) + 4)
    canvas = Image.new("RGB", (width, top + len(rows) * (h + 2) + 2), "white")
    draw = ImageDraw.Draw(canvas)
    if header:
        for text, column in zip(header, (0, gap_after or 0)):
            draw.text((x0[column], 2), text, fill="black", font=font)
    for r, (label, images) in enumerate(rows):
        y = top + 2 + r * (h + 2)
        draw.text((4, y + h // 2 - 6), label, fill="black", font=font)
        for k, image in enumerate(images):
            canvas.paste(image.convert("RGB").resize((w, h), Image.Resampling.NEAREST), (x0[k], y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return path


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
    ax.legend(fontsize=8)
    return _save_figure(fig, path)


def read_metrics(path: Path) -> list[dict]:
    """Read metrics.jsonl; a corrupt last line (run killed mid-write) is skipped."""
    path = Path(path)
    lines = [(i, line) for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    records: list[dict] = []
    for index, (lineno, line) in enumerate(lines):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:  # JSONDecodeError is a ValueError
            if index == len(lines) - 1:
                break
            raise ValueError(f"{path}:{lineno}: not a valid metrics record ({exc})") from exc
        records.append(record)
    return records


_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 0; color: #222; background: #fafafa; }
header { background: #24292f; color: #fff; padding: 18px 32px; }
header h1 { margin: 0; font-size: 1.5em; }
main { max-width: 1100px; margin: 0 auto; padding: 16px 32px 48px; }
.notice { border: 2px solid #d4a72c; background: #fff8c5; padding: 12px 16px; margin: 16px 0; border-radius: 6px; font-weight: 600; white-space: pre-wrap; }
section { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 12px 20px; margin: 16px 0; }
section h2 { margin-top: 4px; font-size: 1.2em; }
p { white-space: pre-wrap; line-height: 1.45; }
figure { display: inline-block; margin: 8px 12px 8px 0; vertical-align: top; max-width: 100%; }
figure img { max-width: 100%; border: 1px solid #ccc; image-rendering: auto; }
figure img.pixelated { image-rendering: pixelated; }
figcaption { font-size: 0.85em; color: #555; max-width: 520px; }
.table-wrap { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; font-size: 0.9em; margin: 8px 0; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
th { background: #f0f0f0; }
td:first-child, th:first-child { text-align: left; }
"""


def _format_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table_html(rows: list[dict]) -> str:
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_format_cell(row.get(c)))}</td>" for c in columns) + "</tr>"
        for row in rows
    )
    return f'<div class="table-wrap"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


SMALL_IMAGE_WIDTH = 320  # narrower grids (e.g. 32 px samples) are shown enlarged, pixel for pixel


def _display_width(path: Path) -> int | None:
    """An enlarged display width for small images, or None to show them at their own size."""
    try:
        with Image.open(path) as image:
            width = image.width
    except OSError:
        return None
    return width * min(4, SMALL_IMAGE_WIDTH // width) if 0 < width < SMALL_IMAGE_WIDTH // 2 else None


def _section_html(section: ReportSection, run_dir: Path) -> str:
    parts = [f"<section><h2>{html.escape(section.title)}</h2>"]
    for paragraph in (p.strip() for p in section.text.split("\n\n")):
        if paragraph:
            parts.append(f"<p>{html.escape(paragraph)}</p>")
    for rel_path, caption in section.images:
        if Path(rel_path).is_absolute():
            # Absolute paths would break once the run folder is moved or zipped.
            raise ValueError(f"report image path must be relative to the run folder: {rel_path}")
        src = html.escape(quote(Path(rel_path).as_posix()))
        width = _display_width(run_dir / rel_path)
        size = f' width="{width}" class="pixelated"' if width else ""
        parts.append(
            f'<figure><img src="{src}"{size} alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    if section.table:
        parts.append(_table_html(section.table))
    parts.append("</section>")
    return "\n".join(parts)


def write_report(run_dir: Path, title: str, sections: list[ReportSection], notice: str | None = None) -> Path:
    """Write run_dir/report.html: header, optional notice box, then the sections in order."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    notice_html = f'<div class="notice">{html.escape(notice)}</div>' if notice else ""
    body = "\n".join(_section_html(s, run_dir) for s in sections)
    page = (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n"
        f"<body><header><h1>{html.escape(title)}</h1></header>\n"
        f"<main>{notice_html}\n{body}\n</main></body></html>\n"
    )
    path = run_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
