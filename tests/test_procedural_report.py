"""Procedural subjects and the run report: fast, offline."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rewardbooth.data.procedural import CLASS_NOUNS, make_subject, save_subject
from rewardbooth.errors import OutputExistsError
from rewardbooth.evaluation.report import (
    ReportSection,
    make_grid,
    plot_metrics,
    read_metrics,
    save_image_grid,
    write_report,
)


def _bytes(images: list[Image.Image]) -> list[bytes]:
    return [im.tobytes() for im in images]


def _foreground_fraction(image: Image.Image) -> float:
    """Fraction of pixels clearly different from the (corner-sampled) background."""
    a = np.asarray(image).astype(np.int16)
    bg = a[0, 0]
    return float((np.abs(a - bg).max(axis=-1) > 24).mean())


# --- procedural subjects ----------------------------------------------------


def test_make_subject_shape_and_class() -> None:
    subject = make_subject(seed=3, num_images=4, size=48)
    assert subject.class_noun in CLASS_NOUNS
    assert subject.class_noun in subject.name
    assert len(subject.images) == 4
    for im in subject.images:
        assert im.mode == "RGB" and im.size == (48, 48)


def test_make_subject_is_deterministic_per_seed() -> None:
    assert _bytes(make_subject(seed=7).images) == _bytes(make_subject(seed=7).images)


def test_make_subject_differs_across_seeds() -> None:
    a, b = make_subject(seed=0), make_subject(seed=1)
    assert all(x != y for x, y in zip(_bytes(a.images), _bytes(b.images)))


@pytest.mark.parametrize("seed", range(8))
def test_subject_stands_out_from_background(seed: int) -> None:
    for im in make_subject(seed=seed, size=64).images:
        assert 0.03 < _foreground_fraction(im) < 0.80


def test_poses_differ_within_subject() -> None:
    images = make_subject(seed=0).images
    arrays = [np.asarray(im).astype(np.int16) for im in images]
    for i in range(len(arrays)):
        for j in range(i + 1, len(arrays)):
            assert np.abs(arrays[i] - arrays[j]).mean() > 2.0


def test_make_subject_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        make_subject(num_images=0)


def test_save_subject_writes_numbered_pngs(tmp_path: Path) -> None:
    subject = make_subject(seed=1, num_images=3, size=32)
    folder = tmp_path / "new" / "subject"
    paths = save_subject(subject, folder)
    assert [p.name for p in paths] == ["00.png", "01.png", "02.png"]
    with Image.open(paths[0]) as im:
        assert im.tobytes() == subject.images[0].tobytes()


def test_save_subject_refuses_non_empty_folder(tmp_path: Path) -> None:
    subject = make_subject(seed=1, num_images=2, size=32)
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError) as info:
        save_subject(subject, tmp_path)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path) in message
    assert (tmp_path / "keep.txt").read_text() == "mine"
    assert len(save_subject(subject, tmp_path, overwrite=True)) == 2


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

    from rewardbooth.evaluation.report import save_image_grid

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
