"""Reference-image loading, preprocessing and the DreamBench loader (fast, offline)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rewardbooth.data.dreambench import DreamBench, load_dreambench
from rewardbooth.data.images import list_image_files, load_image, load_image_folder, preprocess
from rewardbooth.errors import ConfigError, ImageFolderError


def _photo(width: int = 80, height: int = 60) -> Image.Image:
    """A smooth RGB gradient: compresses well and survives JPEG closely."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    rgb = np.stack([np.broadcast_to(x, (height, width)), np.broadcast_to(y, (height, width)),
                    np.full((height, width), 128, np.float32)], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def _assert_rejected(excinfo: pytest.ExceptionInfo, culprit: Path | str) -> None:
    message = str(excinfo.value)
    assert str(culprit) in message
    assert "\n" not in message and "\r" not in message


# --- accepted inputs -------------------------------------------------------------------


@pytest.mark.parametrize("name, fmt", [("a.jpg", "JPEG"), ("b.PNG", "PNG"), ("c.webp", "WEBP")])
def test_common_formats_load_as_rgb(tmp_path: Path, name: str, fmt: str) -> None:
    _photo().save(tmp_path / name, fmt)
    image = load_image(tmp_path / name)
    assert image.mode == "RGB" and image.size == (80, 60)


def test_rgba_transparent_pixels_become_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 8, 16))  # left half fully transparent black
    rgba.save(tmp_path / "t.png")
    image = load_image(tmp_path / "t.png")
    assert image.mode == "RGB"
    assert image.getpixel((2, 2)) == (255, 255, 255)
    assert image.getpixel((12, 2)) == (255, 0, 0)


def test_palette_with_transparency_becomes_white(tmp_path: Path) -> None:
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    palette.paste(0, (0, 0, 4, 8))
    palette.save(tmp_path / "p.png", transparency=0)
    image = load_image(tmp_path / "p.png")
    assert image.getpixel((1, 1)) == (255, 255, 255)
    assert image.getpixel((6, 1)) == (0, 0, 255)


def test_grayscale_l(tmp_path: Path) -> None:
    Image.new("L", (20, 10), 77).save(tmp_path / "g.png")
    image = load_image(tmp_path / "g.png")
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (77, 77, 77)


def test_16bit_grayscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.zeros((10, 10), dtype=np.uint16)
    values[:, 5:] = 65535
    values[:, :5] = 32896  # 128 * 257
    wide = Image.fromarray(values)
    assert wide.mode == "I;16"
    wide.save(tmp_path / "w.png")
    image = load_image(tmp_path / "w.png")
    assert image.mode == "RGB"
    assert image.getpixel((8, 0)) == (255, 255, 255)
    assert image.getpixel((1, 0)) == (128, 128, 128)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    Image.new("CMYK", (24, 24), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    image = load_image(tmp_path / "c.jpg")
    assert image.mode == "RGB"
    red, green, blue = image.getpixel((12, 12))
    assert red > 200 and green < 60 and blue < 60


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    _photo(80, 60).save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").size == (60, 80)


def test_folder_skips_hidden_junk_and_subfolders(tmp_path: Path) -> None:
    _photo().save(tmp_path / "02.png")
    _photo().save(tmp_path / "01.jpg")
    (tmp_path / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tmp_path / "Thumbs.db").write_bytes(b"junk")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "notes.txt").write_text("not looked at")
    assert [p.name for p in list_image_files(tmp_path)] == ["01.jpg", "02.png"]
    images = load_image_folder(tmp_path)
    assert len(images) == 2 and all(image.mode == "RGB" for image in images)


# --- rejected inputs -------------------------------------------------------------------


def test_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ImageFolderError, match="does not exist") as excinfo:
        load_image_folder(missing)
    _assert_rejected(excinfo, missing)


def test_folder_path_is_a_file(tmp_path: Path) -> None:
    _photo().save(tmp_path / "a.png")
    with pytest.raises(ImageFolderError, match="not a folder") as excinfo:
        list_image_files(tmp_path / "a.png")
    _assert_rejected(excinfo, tmp_path / "a.png")


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / ".hidden.jpg").write_bytes(b"")
    with pytest.raises(ImageFolderError, match="contains no images") as excinfo:
        load_image_folder(tmp_path)
    _assert_rejected(excinfo, tmp_path)


def test_truncated_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "cut.jpg"
    _photo(200, 200).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageFolderError) as excinfo:
        load_image_folder(tmp_path)
    _assert_rejected(excinfo, path)


def test_text_file_in_folder(tmp_path: Path) -> None:
    _photo().save(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("my subject\nline two\n")
    with pytest.raises(ImageFolderError, match="not supported images") as excinfo:
        load_image_folder(tmp_path)
    _assert_rejected(excinfo, tmp_path)
    assert "notes.txt" in str(excinfo.value)


def test_text_named_png(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    path.write_text("this is not\na picture\n")
    with pytest.raises(ImageFolderError, match="not a readable image") as excinfo:
        load_image_folder(tmp_path)
    _assert_rejected(excinfo, path)


def test_image_below_min_size(tmp_path: Path) -> None:
    path = tmp_path / "small.png"
    _photo(40, 30).save(path)
    with pytest.raises(ImageFolderError, match="40x30 px, smaller than the minimum 64 px") as excinfo:
        load_image_folder(tmp_path, min_size=64)
    _assert_rejected(excinfo, path)
    assert load_image(path, min_size=30).size == (40, 30)


# --- preprocessing ---------------------------------------------------------------------


def test_preprocess_shape_range_and_center_crop() -> None:
    images = [_photo(80, 60), _photo(50, 120), _photo(16, 16)]
    batch = preprocess(images, 32)
    assert batch.shape == (3, 3, 32, 32) and batch.dtype == torch.float32
    assert batch.min() >= -1.0 and batch.max() <= 1.0
    assert torch.equal(batch, preprocess(images, 32))


def test_preprocess_random_crop_follows_generator() -> None:
    images = [_photo(200, 40)]
    first = preprocess(images, 32, center_crop=False, generator=torch.Generator().manual_seed(0))
    again = preprocess(images, 32, center_crop=False, generator=torch.Generator().manual_seed(0))
    assert first.shape == (1, 3, 32, 32) and torch.equal(first, again)


# --- DreamBench ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dreambench(dreambench_root: Path) -> DreamBench:
    return load_dreambench(dreambench_root)


def test_dreambench_subjects(dreambench: DreamBench) -> None:
    assert len(dreambench.subjects) == 30
    dog, backpack = dreambench.select(["dog", "backpack"])
    assert dog.class_noun == "dog" and dog.is_live
    assert backpack.class_noun == "backpack" and not backpack.is_live
    assert dreambench.subjects["bear_plushie"].class_noun == "stuffed animal"
    assert sum(subject.is_live for subject in dreambench.subjects.values()) == 9


def test_dreambench_prompts(dreambench: DreamBench) -> None:
    for subject in dreambench.subjects.values():
        prompts = subject.prompts()
        assert len(prompts) == 25 and all("sks" in prompt for prompt in prompts)
        assert subject.image_dir.is_dir()
    assert dreambench.subjects["dog"].prompts()[0] == "a sks dog in the jungle"
    assert "a sks dog wearing a red hat" in dreambench.subjects["dog"].prompts()
    assert "a sks backpack wearing a red hat" not in dreambench.subjects["backpack"].prompts()


def test_dreambench_unknown_subject(dreambench: DreamBench) -> None:
    with pytest.raises(ConfigError, match="dgo") as excinfo:
        dreambench.select(["dog", "dgo"])
    assert "\n" not in str(excinfo.value)


def test_dreambench_missing_and_malformed(tmp_path: Path) -> None:
    with pytest.raises(ImageFolderError) as excinfo:
        load_dreambench(tmp_path / "none")
    _assert_rejected(excinfo, tmp_path / "none")
    with pytest.raises(ImageFolderError, match="prompts_and_classes.txt") as excinfo:
        load_dreambench(tmp_path)
    _assert_rejected(excinfo, tmp_path)
    (tmp_path / "prompts_and_classes.txt").write_text("Classes\n\nsubject_name,class\ndog dog\n")
    with pytest.raises(ConfigError, match="line 4") as excinfo:
        load_dreambench(tmp_path)
    _assert_rejected(excinfo, tmp_path / "prompts_and_classes.txt")
