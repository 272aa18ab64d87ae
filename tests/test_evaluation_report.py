"""The run report: grids, metric plots, the HTML page; fast, offline."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from rewardbooth.data.images import make_grid, save_image_grid
from rewardbooth.evaluation.figures import plot_metrics
from rewardbooth.evaluation.report import ReportSection, write_report
from rewardbooth.mini.world import make_subject
from rewardbooth.training.run_dir import read_metrics

# --- grids ------------------------------------------------------------------


def test_make_grid_size_formula() -> None:
    images = [Image.new("RGB", (32, 32), (i * 40, 0, 0)) for i in range(5)]
    grid = make_grid(images, cols=3, pad=2)
    # cols*w + (cols+1)*pad by rows*h + (rows+1)*pad
    assert grid.size == (3 * 32 + 4 * 2, 2 * 32 + 3 * 2)
    # Default cols = ceil(sqrt(5)) = 3 as well.
    assert make_grid(images, pad=2).size == grid.size
    # First cell starts after the padding; the empty sixth cell stays background.
    assert grid.getpixel((2, 2)) == (0, 0, 0)
    assert grid.getpixel((grid.width - 3, grid.height - 3)) == (255, 255, 255)


def test_make_grid_resizes_to_first_image() -> None:
    images = [Image.new("RGB", (16, 16)), Image.new("RGBA", (40, 24)), Image.new("L", (8, 8))]
    assert make_grid(images, cols=3, pad=0).size == (48, 16)
    with pytest.raises(ValueError):
        make_grid([])


def test_save_image_grid_creates_parents(tmp_path: Path) -> None:
    path = save_image_grid(make_subject(num_images=4, size=16).images, tmp_path / "a" / "grid.png")
    with Image.open(path) as im:
        assert im.size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)


# --- metrics ----------------------------------------------------------------


def test_plot_metrics_writes_png(tmp_path: Path) -> None:
    records = [{"step": s, "loss": 1.0 / (s + 1), "reward": s * 0.1} for s in range(30)]
    records.append({"step": 30, "note": "eval"})
    path = plot_metrics(records, ["loss", "reward", "missing"], tmp_path / "plots" / "m.png", title="t")
    assert path is not None and path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG"


def test_plot_metrics_returns_none_without_keys(tmp_path: Path) -> None:
    records = [{"step": 0, "loss": 1.0}]
    assert plot_metrics(records, ["reward"], tmp_path / "m.png") is None
    assert not (tmp_path / "m.png").exists()


def test_read_metrics_skips_truncated_last_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": 0, "loss": 0.5}), "", json.dumps({"step": 1, "loss": 0.4})]
    path.write_text("\n".join(lines) + '\n{"step": 2, "lo')
    assert read_metrics(path) == [{"step": 0, "loss": 0.5}, {"step": 1, "loss": 0.4}]


def test_read_metrics_rejects_corrupt_middle_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\nnot json\n{"step": 1}\n')
    with pytest.raises(ValueError, match=":2:"):
        read_metrics(path)


# --- HTML report --------------------------------------------------------------


def test_write_report(tmp_path: Path) -> None:
    save_image_grid(make_subject(num_images=4, size=16).images, tmp_path / "images" / "grid.png")
    title = "Run <1> & friends"
    notice = "Images come from a random-weight model"
    sections = [
        ReportSection("Samples", text="Para one.\n\nPara <two>.", images=[("images/grid.png", "a <grid>")]),
        ReportSection("Scores", table=[{"method": "dreambooth", "clip": 0.123456}, {"method": "rpo", "dino": 2.0}]),
    ]
    path = write_report(tmp_path, title, sections, notice=notice)
    assert path == tmp_path / "report.html"
    page = path.read_text(encoding="utf-8")

    assert html.escape(title) in page and title not in page
    assert notice in page and 'class="notice"' in page
    assert "Para &lt;two&gt;." in page and "a &lt;grid&gt;" in page
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert srcs == ["images/grid.png"]
    assert (tmp_path / srcs[0]).is_file()
    assert "<td>0.1235</td>" in page and "<td>rpo</td>" in page
    assert "<th>dino</th>" in page
    assert page.index("Samples") < page.index("Scores")


def test_write_report_rejects_absolute_image_path(tmp_path: Path) -> None:
    section = ReportSection("x", images=[(str(tmp_path / "a.png"), "abs")])
    with pytest.raises(ValueError):
        write_report(tmp_path, "t", [section])


def test_report_shows_big_photos_as_thumbnails(tmp_path):
    from PIL import Image

    from rewardbooth.data.images import save_image_grid

    photos = [Image.new("RGB", (4000, 3000), (40 * i, 90, 160)) for i in range(5)]
    path = save_image_grid(photos, tmp_path / "references.png", cols=5, max_side=256)
    with Image.open(path) as strip:
        assert strip.height <= 256 + 4 and strip.width <= 5 * 256 + 12
    assert path.stat().st_size < 2_000_000


def test_wide_tables_scroll_inside_their_card(tmp_path):
    from rewardbooth.evaluation.report import ReportSection, write_report

    row = {f"metric_{i}": f"{i / 7:.3f} ± 0.100" for i in range(16)}
    html = write_report(tmp_path, "rewardbooth MiniBench results", [ReportSection("Overall", table=[row])]).read_text()
    assert '<div class="table-wrap"><table>' in html and ".table-wrap { overflow-x: auto" in html
    assert "<title>rewardbooth MiniBench results</title>" in html
