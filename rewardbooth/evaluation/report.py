"""Reports: one self-contained static HTML page of sections (text, images, tables).

Figures are drawn by evaluation/figures.py, image grids by data/images.py.

The page references its images by paths relative to the run folder, so the whole
folder can be moved or zipped and still open correctly.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from PIL import Image

__all__ = ["ReportSection", "write_report"]


@dataclass
class ReportSection:
    title: str
    text: str = ""
    images: list[tuple[str, str]] = field(default_factory=list)  # (relative path, caption)
    table: list[dict] | None = None


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
