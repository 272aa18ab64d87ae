"""Procedural subjects for the CPU demo and the tests: no network, no datasets.

Each subject is one distinctive coloured object (a toy robot, a cube, a ball or a
vase) with a saturated body colour, a contrasting pattern and an accent colour,
shown in several poses on plain light backgrounds. Only the object is shared
between the images, which is what a personalization method should pick up.
Everything is drawn with Pillow from a seeded numpy generator, so one seed always
gives byte-identical images.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from rewardbooth.errors import OutputExistsError

RGB = tuple[int, int, int]

CLASS_NOUNS: tuple[str, ...] = ("toy", "cube", "ball", "vase")
_SUPERSAMPLE = 4
_OUTLINE: RGB = (34, 30, 38)


@dataclass
class ProceduralSubject:
    name: str
    class_noun: str
    images: list[Image.Image]


@dataclass(frozen=True)
class _Style:
    body: RGB
    pattern: RGB
    accent: RGB
    pattern_kind: str  # "stripes" | "dots" | "diagonal"
    pattern_count: int  # stripes or dot rows across the object


def _hsv(h: float, s: float, v: float) -> RGB:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return (round(r * 255), round(g * 255), round(b * 255))


def _shade(color: RGB, factor: float) -> RGB:
    return tuple(max(0, min(255, round(c * factor))) for c in color)  # type: ignore[return-value]


def _make_style(rng: np.random.Generator) -> _Style:
    hue = float(rng.random())
    body = _hsv(hue, float(rng.uniform(0.75, 0.95)), float(rng.uniform(0.78, 0.95)))
    # Pattern: either near-white or the complementary hue, both contrast with the body.
    if rng.random() < 0.5:
        pattern = _hsv(hue, 0.08, 0.98)
    else:
        pattern = _hsv(hue + 0.5, 0.85, 0.95)
    accent = _hsv(hue + float(rng.choice([1 / 3, 2 / 3])), 0.9, 0.9)
    kind = str(rng.choice(["stripes", "dots", "diagonal"]))
    return _Style(body, pattern, accent, kind, int(rng.integers(3, 6)))


def _pattern_mask(c: int, style: _Style) -> Image.Image:
    """Full-canvas pattern mask; callers clip it to the surface it decorates."""
    mask = Image.new("L", (c, c), 0)
    draw = ImageDraw.Draw(mask)
    period = c / (style.pattern_count * 2.2)
    if style.pattern_kind == "stripes":
        y = period * 0.5
        while y < c:
            draw.rectangle((0, y, c, y + period * 0.45), fill=255)
            y += period
    elif style.pattern_kind == "diagonal":
        x = -c
        while x < c:
            draw.polygon([(x, c), (x + period * 0.45, c), (x + c + period * 0.45, 0), (x + c, 0)], fill=255)
            x += period
    else:  # dots on a staggered grid
        r = period * 0.28
        for row, y in enumerate(np.arange(period / 2, c, period)):
            offset = period / 2 if row % 2 else 0.0
            for x in np.arange(offset, c, period):
                draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    return mask


class _Canvas:
    """RGBA object canvas with helpers for filled, patterned and outlined shapes."""

    def __init__(self, size: int, style: _Style) -> None:
        self.c = size
        self.style = style
        self.image = Image.new("RGBA", (size, size), (0, 0, 0, 0))
        self.pattern = _pattern_mask(size, style)
        self.line = max(1, round(size * 0.012))

    def shape(self, draw_fn: Callable[[ImageDraw.ImageDraw, int], None]) -> Image.Image:
        mask = Image.new("L", (self.c, self.c), 0)
        draw_fn(ImageDraw.Draw(mask), 255)
        return mask

    def fill(self, mask: Image.Image, color: RGB, patterned: bool = False, pattern_color: RGB | None = None) -> None:
        self.image.paste(color + (255,), (0, 0), mask)
        if patterned:
            clipped = Image.fromarray(np.minimum(np.asarray(mask), np.asarray(self.pattern)))
            self.image.paste((pattern_color or self.style.pattern) + (255,), (0, 0), clipped)

    def outline(self, mask: Image.Image) -> None:
        # Edge = mask minus a blur-threshold erosion; a blur costs the same at any radius,
        # unlike MinFilter, so large output sizes stay fast.
        blurred = np.asarray(mask.filter(ImageFilter.BoxBlur(self.line)))
        edge = np.where(blurred < 250, np.asarray(mask), 0).astype(np.uint8)
        edge = Image.fromarray(edge)
        self.image.paste(_OUTLINE + (255,), (0, 0), edge)


def _draw_ball(cv: _Canvas) -> None:
    c, s = cv.c, cv.style
    box = (0.12 * c, 0.12 * c, 0.88 * c, 0.88 * c)
    ball = cv.shape(lambda d, f: d.ellipse(box, fill=f))
    cv.fill(ball, s.body, patterned=True)
    band = cv.shape(lambda d, f: d.rectangle((0, 0.44 * c, c, 0.56 * c), fill=f))
    cv.fill(Image.fromarray(np.minimum(np.asarray(ball), np.asarray(band))), s.accent)
    angles = -np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, 0.13, 0.055) * c
    points = [(0.5 * c + r * np.cos(a), 0.5 * c + r * np.sin(a)) for r, a in zip(radii, angles)]
    star = cv.shape(lambda d, f: d.polygon(points, fill=f))
    cv.fill(star, (255, 255, 255))
    cv.outline(star)
    highlight = Image.new("RGBA", (c, c), (0, 0, 0, 0))
    ImageDraw.Draw(highlight).ellipse((0.26 * c, 0.2 * c, 0.42 * c, 0.32 * c), fill=(255, 255, 255, 150))
    cv.image.alpha_composite(highlight)
    cv.outline(ball)


def _draw_cube(cv: _Canvas) -> None:
    c, s = cv.c, cv.style
    p = lambda x, y: (x * c, y * c)  # noqa: E731 - tiny coordinate helper
    top = [p(0.5, 0.12), p(0.86, 0.3), p(0.5, 0.48), p(0.14, 0.3)]
    left = [p(0.14, 0.3), p(0.5, 0.48), p(0.5, 0.9), p(0.14, 0.72)]
    right = [p(0.5, 0.48), p(0.86, 0.3), p(0.86, 0.72), p(0.5, 0.9)]
    faces = []
    for poly, color in ((left, _shade(s.body, 0.78)), (right, s.body)):
        face = cv.shape(lambda d, f, poly=poly: d.polygon(poly, fill=f))
        cv.fill(face, color, patterned=True, pattern_color=_shade(s.pattern, 0.85 if poly is left else 1.0))
        faces.append(face)
    top_mask = cv.shape(lambda d, f: d.polygon(top, fill=f))
    cv.fill(top_mask, s.accent)  # the accent "lid" makes the cube recognizable from any side
    for face in (*faces, top_mask):
        cv.outline(face)


def _vase_profile(y: float) -> float:
    """Half-width of the vase at height y in [0, 1] (0 = rim): neck, shoulder, belly, foot."""
    if y < 0.12:
        return 0.13
    if y < 0.25:
        return 0.13 + (y - 0.12) / 0.13 * 0.05
    t = (y - 0.25) / 0.75
    return 0.18 + 0.2 * np.sin(np.pi * min(1.0, t * 1.15)) + 0.06 * t


def _draw_vase(cv: _Canvas) -> None:
    c, s = cv.c, cv.style
    top, bottom = 0.08, 0.92
    ys = np.linspace(0.0, 1.0, 64)
    right = [((0.5 + _vase_profile(y)) * c, (top + y * (bottom - top)) * c) for y in ys]
    left = [((0.5 - _vase_profile(y)) * c, (top + y * (bottom - top)) * c) for y in ys[::-1]]
    body = cv.shape(lambda d, f: d.polygon(right + left, fill=f))
    cv.fill(body, s.body, patterned=True)
    neck = cv.shape(lambda d, f: d.rectangle((0, 0, c, (top + 0.2 * (bottom - top)) * c), fill=f))
    neck = Image.fromarray(np.minimum(np.asarray(body), np.asarray(neck)))
    cv.fill(neck, s.accent)
    rim = cv.shape(lambda d, f: d.rounded_rectangle((0.33 * c, 0.05 * c, 0.67 * c, 0.12 * c), radius=0.03 * c, fill=f))
    cv.fill(rim, _shade(s.accent, 0.8))
    cv.outline(body)
    cv.outline(rim)


def _draw_toy(cv: _Canvas) -> None:
    """A little robot: patterned torso, head with eyes, accent antenna and belt."""
    c, s = cv.c, cv.style
    parts: list[Image.Image] = []
    for box in ((0.3, 0.78, 0.42, 0.93), (0.58, 0.78, 0.7, 0.93)):  # legs
        leg = cv.shape(lambda d, f, box=box: d.rectangle(tuple(v * c for v in box), fill=f))
        cv.fill(leg, _shade(s.body, 0.6))
        parts.append(leg)
    for box in ((0.12, 0.46, 0.24, 0.7), (0.76, 0.46, 0.88, 0.7)):  # arms
        arm = cv.shape(lambda d, f, box=box: d.rounded_rectangle(tuple(v * c for v in box), radius=0.05 * c, fill=f))
        cv.fill(arm, s.accent)
        parts.append(arm)
    torso = cv.shape(lambda d, f: d.rounded_rectangle((0.23 * c, 0.42 * c, 0.77 * c, 0.82 * c), radius=0.06 * c, fill=f))
    cv.fill(torso, s.body, patterned=True)
    belt = cv.shape(lambda d, f: d.rectangle((0.23 * c, 0.7 * c, 0.77 * c, 0.76 * c), fill=f))
    cv.fill(belt, s.accent)
    parts.append(torso)
    stalk = cv.shape(lambda d, f: d.rectangle((0.485 * c, 0.08 * c, 0.515 * c, 0.18 * c), fill=f))
    cv.fill(stalk, _OUTLINE)
    bulb = cv.shape(lambda d, f: d.ellipse((0.44 * c, 0.04 * c, 0.56 * c, 0.12 * c), fill=f))
    cv.fill(bulb, s.accent)
    parts.append(bulb)
    head = cv.shape(lambda d, f: d.rounded_rectangle((0.3 * c, 0.16 * c, 0.7 * c, 0.43 * c), radius=0.07 * c, fill=f))
    cv.fill(head, s.body)
    parts.append(head)
    for part in parts:
        cv.outline(part)
    draw = ImageDraw.Draw(cv.image)
    for ex in (0.41, 0.59):
        draw.ellipse(((ex - 0.055) * c, 0.24 * c, (ex + 0.055) * c, 0.35 * c), fill=(255, 255, 255, 255))
        draw.ellipse(((ex - 0.025) * c, 0.27 * c, (ex + 0.025) * c, 0.32 * c), fill=_OUTLINE + (255,))


_DRAWERS: dict[str, Callable[[_Canvas], None]] = {
    "toy": _draw_toy,
    "cube": _draw_cube,
    "ball": _draw_ball,
    "vase": _draw_vase,
}


def _draw_object(class_noun: str, style: _Style, canvas_size: int) -> Image.Image:
    cv = _Canvas(canvas_size, style)
    _DRAWERS[class_noun](cv)
    return cv.image


def _render_pose(obj: Image.Image, size: int, rng: np.random.Generator) -> Image.Image:
    big = size * _SUPERSAMPLE
    tone = rng.uniform(222, 248)
    tint = rng.uniform(-6, 6, size=3)
    background = tuple(int(np.clip(tone + t, 0, 255)) for t in tint)
    canvas = Image.new("RGBA", (big, big), background + (255,))

    pose = obj.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else obj
    pose = pose.rotate(float(rng.uniform(-15, 15)), resample=Image.Resampling.BICUBIC, expand=True)
    scale = float(rng.uniform(0.5, 0.78))
    side = max(1, round(big * scale))
    pose = pose.resize((side, round(side * pose.height / pose.width)), Image.Resampling.LANCZOS)

    # Keep the object fully in frame; random placement within the free margin.
    x = round(rng.uniform(0, max(0, big - pose.width)))
    y = round(rng.uniform(0, max(0, big - pose.height)))

    # Soft contact shadow grounds the object without adding a second "subject".
    shadow = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    sy = y + pose.height * 0.93
    ImageDraw.Draw(shadow).ellipse(
        (x + pose.width * 0.2, sy - pose.height * 0.04, x + pose.width * 0.8, sy + pose.height * 0.04),
        fill=(0, 0, 0, 50),
    )
    canvas.alpha_composite(shadow.filter(ImageFilter.GaussianBlur(big * 0.015)))
    canvas.alpha_composite(pose, (x, y))
    return canvas.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)


def make_subject(seed: int = 0, num_images: int = 5, size: int = 64) -> ProceduralSubject:
    """Draw one object (class and colours from `seed`) in `num_images` poses of size x size RGB."""
    if num_images < 1 or size < 8:
        raise ValueError(f"need num_images >= 1 and size >= 8, got {num_images} and {size}")
    rng = np.random.default_rng(seed)
    class_noun = str(rng.choice(CLASS_NOUNS))
    style = _make_style(rng)
    obj = _draw_object(class_noun, style, canvas_size=size * _SUPERSAMPLE)
    images = [_render_pose(obj, size, rng) for _ in range(num_images)]
    return ProceduralSubject(name=f"procedural-{class_noun}-{seed}", class_noun=class_noun, images=images)


def save_subject(subject: ProceduralSubject, folder: Path, *, overwrite: bool = False) -> list[Path]:
    """Write the images as 00.png, 01.png, ... into `folder` (created) and return their paths."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputExistsError(f"{folder} exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise OutputExistsError(f"{folder} is not empty; choose another folder or pass overwrite=True")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(subject.images):
        path = folder / f"{i:02d}.png"
        image.save(path, format="PNG")
        paths.append(path)
    return paths
