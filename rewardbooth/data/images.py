"""Reading reference-image folders and turning images into model-ready tensors.

Every user-facing failure is an ``ImageFolderError`` whose message is one line and
names the offending file or folder, because the CLI prints ``str(error)`` verbatim.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFile, ImageFont, ImageOps, UnidentifiedImageError

from rewardbooth.errors import ConfigError, ImageFolderError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")

# Files that operating systems drop into folders on their own. Users did not put
# them there and cannot always see them, so failing on them would only confuse;
# we skip them silently. (Dot-files such as .DS_Store are skipped as hidden.)
# "Icon\r" is the macOS custom-folder-icon file; its name really ends in CR.
_OS_JUNK_NAMES = frozenset({"thumbs.db", "ehthumbs.db", "ehthumbs_vista.db", "desktop.ini", "icon\r"})

# High-bit-depth single-channel modes that Pillow's own convert() would clip to 0..255.
_WIDE_GRAY_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})

# Modes that carry an alpha channel; other modes may still have a tRNS-style
# "transparency" entry in ``Image.info``.
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


def _show(path: Path | str) -> str:
    """Path text for a one-line message (control characters would break the line)."""
    text = os.fspath(path)
    return text if text.isprintable() else ascii(text)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _wide_gray_to_uint8(image: Image.Image) -> np.ndarray:
    """Scale 16-bit / 32-bit / float grayscale to 0..255 by its nominal range."""
    values = np.asarray(image).astype(np.float64)
    if image.mode.startswith("I;16"):
        scale_max = 65535.0
    else:
        # "I" and "F" do not record the source bit depth: pick the smallest usual
        # range that holds the data (float 0..1, 8-bit, 16-bit), else stretch.
        lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if lo < 0 or hi > 65535:
            values = values - lo
            scale_max = max(hi - lo, 1e-12)
        elif image.mode == "F" and hi <= 1.0:
            scale_max = 1.0
        elif hi <= 255:
            scale_max = 255.0
        else:
            scale_max = 65535.0
    return np.clip(np.rint(values * (255.0 / scale_max)), 0, 255).astype(np.uint8)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; transparent areas become white."""
    if image.mode in _WIDE_GRAY_MODES:
        return Image.fromarray(_wide_gray_to_uint8(image), mode="L").convert("RGB")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        return background.convert("RGB")
    if image.mode != "RGB":
        return image.convert("RGB")
    return image


def load_image(path: Path | str, min_size: int = 0) -> Image.Image:
    """Open, fully decode, upright (EXIF) and convert one image to 8-bit RGB."""
    path = Path(path)
    if not path.exists():
        raise ImageFolderError(f"image file {_show(path)} does not exist")
    if path.is_dir():
        raise ImageFolderError(f"{_show(path)} is a folder, not an image file")
    # Pillow would otherwise silently pad a truncated file with grey; the flag is
    # process-global, so restore whatever the caller had.
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as opened:
            opened.load()
            # exif_transpose always returns a new image, so it outlives the file handle.
            image = _to_rgb(ImageOps.exif_transpose(opened))
    except UnidentifiedImageError:
        raise ImageFolderError(
            f"{_show(path)} is not a readable image (unknown format or not an image at all)"
        ) from None
    except Image.DecompressionBombError as exc:
        raise ImageFolderError(f"{_show(path)} is too large to load safely: {_one_line(exc)}") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as exc:
        # Pillow reports corrupt data through several exception types.
        raise ImageFolderError(f"{_show(path)} is corrupt or truncated: {_one_line(exc)}") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous

    width, height = image.size
    if min(width, height) < min_size:
        raise ImageFolderError(
            f"{_show(path)} is {width}x{height} px, smaller than the minimum {min_size} px"
        )
    return image


def list_image_files(folder: Path | str, role: str = "reference folder") -> list[Path]:
    """Image files directly inside ``folder``, sorted by name.

    Hidden files, OS junk files and sub-folders are skipped; any other file that is
    not a supported image is an error, so users learn that it was not used.
    """
    folder = Path(folder)
    if not folder.exists():
        raise ImageFolderError(f"{role} {_show(folder)} does not exist")
    if not folder.is_dir():
        raise ImageFolderError(f"{role} {_show(folder)} is a file, not a folder")
    try:
        entries = sorted(folder.iterdir(), key=lambda p: p.name)
    except OSError as exc:
        raise ImageFolderError(f"cannot list {role} {_show(folder)}: {_one_line(exc)}") from None

    images: list[Path] = []
    unsupported: list[Path] = []
    for entry in entries:
        if entry.name.startswith(".") or entry.name.lower() in _OS_JUNK_NAMES or entry.is_dir():
            continue
        if entry.suffix.lower() in IMAGE_EXTENSIONS:
            images.append(entry)
        else:
            unsupported.append(entry)

    if unsupported:
        names = ", ".join(_show(path.name) for path in unsupported[:3])
        if len(unsupported) > 3:
            names += f" and {len(unsupported) - 3} more"
        raise ImageFolderError(
            f"{role} {_show(folder)} contains files that are not supported images "
            f"(jpg, jpeg, png, webp): {names}; move them elsewhere"
        )
    if not images:
        raise ImageFolderError(f"{role} {_show(folder)} contains no images (jpg, png, webp)")
    return images


def load_image_folder(folder: Path | str, min_size: int = 0, role: str = "reference folder") -> list[Image.Image]:
    """All images of a folder as RGB, in file-name order; `role` names the folder in errors."""
    return [load_image(path, min_size=min_size) for path in list_image_files(folder, role)]


def preprocess(
    images: Sequence[Image.Image],
    resolution: int,
    center_crop: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Resize shorter side to ``resolution``, crop a square, return (N,3,R,R) in [-1, 1].

    With ``center_crop=False`` the crop position is drawn from ``generator``
    (the global torch RNG when it is None), as a light augmentation.
    """
    if resolution <= 0:
        raise ConfigError(f"resolution must be a positive number of pixels, got {resolution}")
    arrays: list[np.ndarray] = []
    for image in images:
        image = image if image.mode == "RGB" else _to_rgb(image)
        width, height = image.size
        scale = resolution / min(width, height)
        # max() keeps the shorter side exactly `resolution` despite rounding.
        size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
        if size != image.size:
            image = image.resize(size, Image.Resampling.LANCZOS)
        spare_x, spare_y = size[0] - resolution, size[1] - resolution
        if center_crop:
            left, top = spare_x // 2, spare_y // 2
        else:
            left = int(torch.randint(0, spare_x + 1, (1,), generator=generator))
            top = int(torch.randint(0, spare_y + 1, (1,), generator=generator))
        image = image.crop((left, top, left + resolution, top + resolution))
        arrays.append(np.asarray(image, dtype=np.float32))

    if not arrays:
        return torch.empty((0, 3, resolution, resolution))
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return batch / 127.5 - 1.0


# --- the image tiler: grids for reports, validation samples and generated images ----------


def tile_rows(
    rows: Sequence[Sequence[Image.Image]],
    cell: tuple[int, int] | None = None,
    pad: int = 2,
    background: tuple[int, int, int] | str = (255, 255, 255),
    resample: Image.Resampling = Image.Resampling.LANCZOS,
    left: int = 0,
    top: int = 0,
    group: int | None = None,
    gap: int = 12,
) -> tuple[Image.Image, list[int], list[int]]:
    """The one image tiler: rows of images as cells of one size (`cell`, default the first image's),
    `pad` pixels around and between cells, margins `left` and `top` (for labels), and a wider `gap`
    after every `group` columns (before | after | ...). Returns the canvas and the cells' column x and row y origins.

    Size: width = left + pad + cols * (w + pad) (+ gap per group boundary), height = top + pad + rows * (h + pad).
    """
    rows = [list(row) for row in rows if len(row)]
    if not rows:
        raise ValueError("nothing to tile: no images")
    w, h = cell or rows[0][0].size
    cols = max(len(row) for row in rows)
    xs = [left + pad + k * (w + pad) + (gap * (k // group) if group else 0) for k in range(cols)]
    ys = [top + pad + r * (h + pad) for r in range(len(rows))]
    canvas = Image.new("RGB", (xs[-1] + w + pad, ys[-1] + h + pad), background)
    for y, row in zip(ys, rows):
        for x, image in zip(xs, row):
            if image.size != (w, h):
                image = image.resize((w, h), resample)
            canvas.paste(image.convert("RGB"), (x, y))
    return canvas, xs, ys


def make_grid(
    images: list[Image.Image],
    cols: int | None = None,
    pad: int = 2,
    background: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Tile images into a grid of `cols` columns (default: about square); the first image sets the cell size."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    cols = max(1, min(cols or math.ceil(math.sqrt(len(images))), len(images)))
    return tile_rows([images[i : i + cols] for i in range(0, len(images), cols)], pad=pad, background=background)[0]


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


def save_labelled_rows(rows: list[tuple[str, list[Image.Image]]], path: Path, scale: int = 1, group: int | None = None,
                       header: list[str] | None = None) -> Path:
    """One row of images per label, the label written at the row's left; a wider gap after every
    `group` images (e.g. before | after), and optional column headers, one over each group."""

    font = ImageFont.load_default()
    w, h = rows[0][1][0].size
    label_width = 8 + max(int(font.getlength(label)) for label, _ in rows)
    canvas, xs, ys = tile_rows([images for _, images in rows], cell=(w * scale, h * scale), resample=Image.Resampling.NEAREST,
                               background="white", left=label_width - 2, top=16 if header else 0, group=group)
    starts = [xs[k * (group or 0)] for k in range(len(header or []))]
    if header:  # room for the last header's text
        width = max(canvas.width, starts[-1] + int(font.getlength(header[-1])) + 4)
        if width > canvas.width:
            wider = Image.new("RGB", (width, canvas.height), "white")
            wider.paste(canvas, (0, 0))
            canvas = wider
    draw = ImageDraw.Draw(canvas)
    for text, x in zip(header or [], starts):
        draw.text((x, 2), text, fill="black", font=font)
    for y, (label, _) in zip(ys, rows):
        draw.text((4, y + h * scale // 2 - 6), label, fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return path
