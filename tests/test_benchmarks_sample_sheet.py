"""benchmarks/sample_sheet.py: README's sample sheet takes the set's first subjects by rule, never by how they look."""

from __future__ import annotations

import pytest
from conftest import load_script
from PIL import Image


def fake_bench(root, subjects: dict[str, bool], folders=("dreambooth@400", "dpg@400"), prompts: int = 3):
    """subjects: name -> whether its images were kept (a restored subject has scores but no images)."""
    for k, (subject, kept) in enumerate(subjects.items()):
        refs = root / "references" / subject
        refs.mkdir(parents=True)
        for r in range(4):
            Image.new("RGB", (32, 32), (k * 40, r * 50, 0)).save(refs / f"{r:02d}.png")
        for folder in folders:
            images = root / folder / "subjects" / subject / "images"
            images.mkdir(parents=True)
            if kept:
                for p in range(prompts):
                    for s in (0, 1):
                        Image.new("RGB", (32, 32), (p * 60, s * 200, k * 40)).save(images / f"{2 * p + s:04d}_a_sks_cube_s{s}.png")
    return root


def test_the_sheet_takes_the_sets_first_subjects_with_images_in_their_seed_order(tmp_path, capsys):
    bench = fake_bench(tmp_path / "bench", {"mini-10-red-plain-cube": True, "mini-2-blue-dotted-ring": False,
                                            "mini-3-green-plain-star": True, "mini-1-pink-striped-vase": True})
    sheet = load_script("benchmarks/sample_sheet.py")
    out = tmp_path / "sheet.png"
    assert sheet.main([str(bench), "--folders", "dreambooth@400,dpg@400", "--subjects", "2", "--out", str(out), "--scale", "1"]) == 0
    printed = capsys.readouterr().out
    # set 0's order: 1, then 2 passed over (no images kept), then 3; 10 comes later by seed although it sorts first as text
    assert "subjects mini-1-pink-striped-vase, mini-3-green-plain-star" in printed
    assert "passed over, images not kept: mini-2-blue-dotted-ring" in printed
    image = Image.open(out)
    rows = 2 * (1 + 2)  # per subject: references, then one row per folder
    assert image.height == 2 + rows * (32 + 2)
    # the widest row holds 4 references (the 3 first-seed prompts are fewer), after the label margin
    label_margin = image.width - (2 + 4 * (32 + 2))
    assert label_margin > 20


def test_a_missing_folder_or_no_usable_subject_is_one_line(tmp_path):
    bench = fake_bench(tmp_path / "bench", {"mini-5-red-plain-cube": False})
    sheet = load_script("benchmarks/sample_sheet.py")
    with pytest.raises(SystemExit, match="no such bench folder: .*rpo@400"):
        sheet.main([str(bench), "--folders", "dreambooth@400,rpo@400", "--out", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit, match="no subject of .* has images in every folder"):
        sheet.main([str(bench), "--folders", "dreambooth@400", "--out", str(tmp_path / "x.png")])
    assert not (tmp_path / "x.png").exists()
