"""Drawing primitives of the mini world: object sprites and context backgrounds.

Everything here works on the supersampled canvas (``S`` = 4 x the output side) and
is written in fractions of the canvas, so a scene drawn at 64 px is the same picture
as at 32 px, only sharper. Nothing here knows about captions or splits; `world.py`
holds the attribute tables and the public API.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

RGB = tuple[int, int, int]

SUPERSAMPLE = 4
OUTLINE: RGB = (28, 24, 34)
DOOR: RGB = (70, 45, 30)

# Outline width and smallest pattern period, as fractions of the canvas side
# (1 px and 4.5 px at 32 px output): bold enough to survive the downscale.
_LINE = 1.0 / 32
_MIN_PERIOD = 4.5 / 32


def line_width(canvas: int) -> int:
    return max(1, round(canvas * _LINE))


# --- colour helpers ---------------------------------------------------------------------


def shade(colour: RGB | np.ndarray, factor: float) -> np.ndarray:
    """Darken (factor < 1) towards black or lighten (factor > 1) towards white."""
    c = np.asarray(colour, dtype=np.float32)
    if factor <= 1.0:
        return c * factor
    return c + (255.0 - c) * min(1.0, factor - 1.0)


def _gradient(height: int, width: int, top: RGB, bottom: RGB) -> np.ndarray:
    t = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    column = (1 - t) * np.asarray(top, np.float32) + t * np.asarray(bottom, np.float32)
    return np.broadcast_to(column, (height, width, 3)).copy()


def _image(array: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(array, 0, 255).round().astype(np.uint8), "RGB")


def _jitter(rng: np.random.Generator, colour: RGB, amount: float = 6.0) -> RGB:
    tint = rng.uniform(-amount, amount, size=3)
    return tuple(int(np.clip(c + t, 0, 255)) for c, t in zip(colour, tint))  # type: ignore[return-value]


# --- patterns ---------------------------------------------------------------------------


def pattern_mask(pattern: str, k: int, period: float) -> np.ndarray:
    """Boolean k x k mask of the pattern's ink, centred on the sprite."""
    if pattern == "plain":
        return np.zeros((k, k), dtype=bool)
    coords = np.arange(k, dtype=np.float32) + 0.5 - k / 2
    y, x = np.meshgrid(coords, coords, indexing="ij")
    if pattern == "striped":
        return ((y / period + 0.21) % 1.0) < 0.42  # white stripes a little narrower than the body's
    if pattern == "dotted":
        row = np.floor(y / period + 0.5)
        shift = np.where(row % 2 == 0, 0.0, 0.5)  # staggered rows
        dy = y / period - row
        dx = (x / period + shift) - np.floor(x / period + shift + 0.5)
        return dx * dx + dy * dy < 0.29**2
    if pattern == "checkered":
        cell = period * 0.65
        return ((np.floor(x / cell) + np.floor(y / cell)) % 2) == 0
    raise ValueError(f"unknown pattern {pattern!r}")


# --- sprites ----------------------------------------------------------------------------


class _Sprite:
    """A k x k RGBA sprite built from parts (mask, colour, shading, pattern, outline)."""

    def __init__(self, k: int, body: RGB, ink: RGB, pattern: str, line: int, period: float) -> None:
        self.k = k
        self.body = np.asarray(body, np.float32)
        self.ink = np.asarray(ink, np.float32)
        self.pattern = pattern_mask(pattern, k, period)
        self.line = line
        self.rgb = np.zeros((k, k, 3), np.float32)
        self.alpha = np.zeros((k, k), np.float32)
        self.outlines: list[tuple[np.ndarray, int]] = []
        self.union = np.zeros((k, k), np.float32)

    # Masks ---------------------------------------------------------------------------
    def mask(self, draw_fn: Callable[[ImageDraw.ImageDraw], None]) -> np.ndarray:
        image = Image.new("L", (self.k, self.k), 0)
        draw_fn(ImageDraw.Draw(image))
        return np.asarray(image, np.float32) / 255.0

    def poly(self, points: list[tuple[float, float]]) -> np.ndarray:
        k = self.k
        return self.mask(lambda d: d.polygon([(x * k, y * k) for x, y in points], fill=255))

    def ellipse(self, box: tuple[float, float, float, float]) -> np.ndarray:
        k = self.k
        return self.mask(lambda d: d.ellipse(tuple(v * k for v in box), fill=255))

    def rect(self, box: tuple[float, float, float, float]) -> np.ndarray:
        k = self.k
        return self.mask(lambda d: d.rectangle(tuple(v * k for v in box), fill=255))

    # Painting ------------------------------------------------------------------------
    def part(
        self,
        m: np.ndarray,
        *,
        factor: float = 1.0,
        patterned: bool = True,
        colour: RGB | None = None,
        outline: bool = True,
    ) -> None:
        if colour is not None:
            layer = np.broadcast_to(np.asarray(colour, np.float32), (self.k, self.k, 3))
        else:
            body = shade(self.body, factor)
            layer = np.broadcast_to(body, (self.k, self.k, 3))
            if patterned:
                layer = np.where(self.pattern[..., None], shade(self.ink, factor), layer)
        w = m[..., None]
        self.rgb = self.rgb * (1 - w) + layer * w
        self.alpha = np.maximum(self.alpha, m)
        self.union = np.maximum(self.union, m)
        if outline:
            self.outlines.append((m, max(1, round(self.line * 0.6))))

    def overlay(self, m: np.ndarray, colour: RGB, opacity: float) -> None:
        """Tint already painted pixels (shading, highlights); does not widen the sprite."""
        w = (m * opacity)[..., None]
        self.rgb = self.rgb * (1 - w) + np.asarray(colour, np.float32) * w

    def dot(self, cx: float, cy: float, r: float, colour: RGB) -> None:
        m = self.ellipse((cx - r, cy - r, cx + r, cy + r))
        self.part(m, colour=colour, outline=False)

    def _edge(self, m: np.ndarray, width: int) -> np.ndarray:
        image = Image.fromarray((m * 255).astype(np.uint8), "L")
        blurred = np.asarray(image.filter(ImageFilter.BoxBlur(width)), np.float32) / 255.0
        return np.where(blurred < 0.98, m, 0.0)

    def finish(self) -> Image.Image:
        for m, width in self.outlines:
            self.overlay(self._edge(m, width), OUTLINE, 1.0)
        self.overlay(self._edge(self.union, self.line), OUTLINE, 1.0)
        rgba = np.dstack([self.rgb, self.alpha * 255.0])
        return Image.fromarray(np.clip(rgba, 0, 255).round().astype(np.uint8), "RGBA")


def _ball(s: _Sprite) -> None:
    ball = s.ellipse((0.04, 0.04, 0.96, 0.96))
    s.part(ball, outline=False)
    lit = s.ellipse((-0.06, -0.06, 0.86, 0.86))
    s.overlay(ball * (1 - lit), (0, 0, 0), 0.22)  # shaded lower-right crescent
    s.overlay(s.ellipse((0.2, 0.16, 0.4, 0.32)), (255, 255, 255), 0.75)  # highlight


def _cube(s: _Sprite) -> None:
    front = s.rect((0.04, 0.32, 0.68, 0.96))
    top = s.poly([(0.04, 0.32), (0.36, 0.04), (0.96, 0.04), (0.68, 0.32)])
    side = s.poly([(0.68, 0.32), (0.96, 0.04), (0.96, 0.68), (0.68, 0.96)])
    s.part(front)
    s.part(top, factor=1.15)
    s.part(side, factor=0.76)


def _cone(s: _Sprite) -> None:
    cone = np.maximum(s.poly([(0.5, 0.03), (0.92, 0.86), (0.08, 0.86)]), s.ellipse((0.08, 0.74, 0.92, 0.97)))
    s.part(cone, outline=False)
    dark = s.poly([(0.5, 0.03), (1.0, 0.9), (1.0, 1.0), (0.66, 1.0)])
    s.overlay(cone * dark, (0, 0, 0), 0.24)


def _ring(s: _Sprite) -> None:
    ring = np.clip(s.ellipse((0.04, 0.04, 0.96, 0.96)) - s.ellipse((0.29, 0.29, 0.71, 0.71)), 0, 1)
    s.part(ring)
    s.outlines.append((s.ellipse((0.27, 0.27, 0.73, 0.73)), s.line))  # inner rim as bold as the outer


def _star(s: _Sprite) -> None:
    radius, cy = 0.505, 0.545
    angles = -np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, radius, radius * 0.5)
    s.part(s.poly([(0.5 + r * np.cos(a), cy + r * np.sin(a)) for r, a in zip(radii, angles)]))


def _vase_half_width(t: float) -> float:
    """Half-width at height t in [0, 1] (0 = rim): lip, neck, shoulder, belly, foot."""
    if t < 0.08:
        return 0.2
    if t < 0.22:
        return 0.13
    if t < 0.4:
        return 0.13 + (t - 0.22) / 0.18 * 0.27
    if t < 0.75:
        return 0.4
    return 0.4 - (t - 0.75) / 0.25 * 0.14


def _vase(s: _Sprite) -> None:
    top, bottom = 0.03, 0.97
    ts = np.linspace(0.0, 1.0, 96)
    right = [(0.5 + _vase_half_width(t), top + t * (bottom - top)) for t in ts]
    left = [(0.5 - _vase_half_width(t), top + t * (bottom - top)) for t in ts[::-1]]
    body = s.poly(right + left)
    s.part(body, outline=False)
    s.overlay(body * s.rect((0.62, 0.0, 1.0, 1.0)), (0, 0, 0), 0.2)


def _house(s: _Sprite) -> None:
    walls = s.rect((0.12, 0.46, 0.88, 0.96))
    roof = s.poly([(0.02, 0.52), (0.5, 0.04), (0.98, 0.52)])
    s.part(walls)
    s.part(roof, factor=0.86, patterned=False)
    s.part(s.rect((0.22, 0.64, 0.42, 0.96)), colour=DOOR)


def _fish(s: _Sprite) -> None:
    fin = s.poly([(0.26, 0.26), (0.42, 0.05), (0.56, 0.26)])
    tail = s.poly([(0.62, 0.5), (0.97, 0.16), (0.9, 0.5), (0.97, 0.84)])
    body = s.ellipse((0.03, 0.2, 0.76, 0.8))
    s.part(fin, factor=0.7, patterned=False)
    s.part(tail, factor=0.7, patterned=False)
    s.part(body)
    s.dot(0.2, 0.43, 0.085, (250, 250, 250))
    s.dot(0.19, 0.43, 0.045, OUTLINE)


SHAPE_DRAWERS: dict[str, Callable[[_Sprite], None]] = {
    "ball": _ball,
    "cube": _cube,
    "cone": _cone,
    "ring": _ring,
    "star": _star,
    "vase": _vase,
    "house": _house,
    "fish": _fish,
}


@lru_cache(maxsize=512)
def sprite(shape: str, body: RGB, ink: RGB, pattern: str, k: int, canvas: int) -> Image.Image:
    """The object in its canonical pose on a transparent k x k canvas (k = its size on `canvas`)."""
    period = max(k * 0.26, canvas * _MIN_PERIOD)
    s = _Sprite(k, body, ink, pattern, line_width(canvas), period)
    SHAPE_DRAWERS[shape](s)
    return s.finish()


# --- backgrounds ------------------------------------------------------------------------


def _wave(rng: np.random.Generator, amp: float, width: int, y0: float, y_bottom: float) -> list[tuple[float, float]]:
    """Polygon under a random smooth curve: y0 +- amp, closed along y_bottom."""
    xs = np.linspace(0, width, 48)
    phase, freq = rng.uniform(0, 2 * np.pi), rng.uniform(1.0, 2.2)
    ys = y0 + amp * np.sin(phase + freq * 2 * np.pi * xs / width)
    ys = ys + 0.4 * amp * np.sin(phase * 1.7 + 2.9 * np.pi * xs / width)
    return [(float(x), float(y)) for x, y in zip(xs, ys)] + [(width, y_bottom), (0, y_bottom)]


def _plain(S: int, rng: np.random.Generator) -> Image.Image:
    tone = rng.uniform(230, 240)
    tint = rng.uniform(-3, 3, size=3)
    top = tuple(tone + 4 + t for t in tint)
    bottom = tuple(tone - 8 + t for t in tint)
    return _image(_gradient(S, S, top, bottom))  # type: ignore[arg-type]


def _beach(S: int, rng: np.random.Generator) -> Image.Image:
    horizon = round(S * rng.uniform(0.3, 0.38))
    shore = horizon + round(S * rng.uniform(0.15, 0.2))
    a = _gradient(S, S, _jitter(rng, (238, 214, 160)), _jitter(rng, (226, 196, 138)))
    a[:horizon] = _gradient(horizon, S, _jitter(rng, (100, 178, 238)), (175, 218, 245))
    a[horizon:shore] = _gradient(shore - horizon, S, _jitter(rng, (22, 96, 172)), (40, 132, 198))
    image = _image(a)
    d = ImageDraw.Draw(image)
    foam = _wave(rng, S * 0.015, S, shore, shore + S * 0.035)
    d.polygon(foam, fill=(246, 248, 244))
    for _ in range(2):  # wave crests on the sea
        y = rng.uniform(horizon + S * 0.04, shore - S * 0.03)
        x = rng.uniform(0, S * 0.7)
        d.line([(x, y), (x + S * rng.uniform(0.15, 0.3), y)], fill=(150, 200, 230), width=max(1, round(S * 0.015)))
    return image


def _snow(S: int, rng: np.random.Generator) -> Image.Image:
    horizon = round(S * rng.uniform(0.36, 0.44))
    a = _gradient(S, S, (238, 242, 250), (222, 230, 246))
    a[:horizon] = _gradient(horizon, S, _jitter(rng, (104, 126, 170)), (160, 178, 208))
    image = _image(a)
    d = ImageDraw.Draw(image)
    x = -S * 0.1
    while x < S:  # snowy mountains on the horizon
        w = S * rng.uniform(0.3, 0.5)
        peak = horizon - S * rng.uniform(0.08, 0.18)
        d.polygon([(x, horizon), (x + w / 2, peak), (x + w, horizon)], fill=(206, 214, 230))
        cap_w, cap_y = w / 2 * 0.35, peak + (horizon - peak) * 0.35  # snow cap
        d.polygon([(x + w / 2 - cap_w, cap_y), (x + w / 2, peak), (x + w / 2 + cap_w, cap_y)], fill=(245, 248, 252))
        x += w * rng.uniform(0.55, 0.8)
    d.rectangle((0, horizon, S, S), fill=(228, 236, 250))
    for _ in range(3):  # soft blue drifts
        y = rng.uniform(horizon + S * 0.08, S * 0.95)
        d.line(_wave(rng, S * 0.02, S, y, S)[:-2], fill=(196, 210, 236), width=max(1, round(S * 0.03)))
    for _ in range(int(rng.integers(18, 28))):  # falling flakes
        fx, fy, r = rng.uniform(0, S), rng.uniform(0, S), S * rng.uniform(0.012, 0.02)
        d.ellipse((fx - r, fy - r, fx + r, fy + r), fill=(252, 253, 255))
    return image


def _grass(S: int, rng: np.random.Generator) -> Image.Image:
    horizon = round(S * rng.uniform(0.28, 0.36))
    a = _gradient(S, S, _jitter(rng, (120, 186, 64)), (78, 148, 44))
    a[:horizon] = _gradient(horizon, S, _jitter(rng, (112, 184, 240)), (180, 222, 246))
    image = _image(a)
    d = ImageDraw.Draw(image)
    d.polygon(_wave(rng, S * 0.03, S, horizon, S), fill=(104, 170, 60))
    width = max(1, round(S * 0.012))
    for _ in range(int(rng.integers(70, 90))):  # blades
        x, y = rng.uniform(0, S), rng.uniform(horizon + S * 0.04, S)
        h = S * rng.uniform(0.03, 0.06) * (0.6 + 0.8 * (y - horizon) / (S - horizon))
        colour = (56, 118, 34) if rng.random() < 0.6 else (150, 205, 90)
        d.line([(x, y), (x + rng.uniform(-0.4, 0.4) * h, y - h)], fill=colour, width=width)
    return image


def _city(S: int, rng: np.random.Generator) -> Image.Image:
    street = round(S * 0.9)
    a = _gradient(S, S, _jitter(rng, (168, 188, 210)), (214, 216, 220))
    image = _image(a)
    d = ImageDraw.Draw(image)
    for layer, (lo, hi, base) in enumerate(((0.45, 0.8, 150), (0.3, 0.65, 104))):
        x = -S * rng.uniform(0, 0.1)
        while x < S:
            w = S * rng.uniform(0.12, 0.22)
            top = street - S * rng.uniform(lo, hi)
            grey = base + rng.uniform(-12, 12)
            d.rectangle((x, top, x + w - S * 0.015, street), fill=(round(grey), round(grey + 2), round(grey + 12)))
            if layer == 1:  # windows on the front row
                step, win = S * 0.07, S * 0.032
                for wy in np.arange(top + S * 0.04, street - S * 0.06, step):
                    for wx in np.arange(x + S * 0.03, x + w - S * 0.05, step):
                        lit = rng.random() < 0.6
                        d.rectangle((wx, wy, wx + win, wy + win), fill=(240, 212, 110) if lit else (70, 76, 94))
            x += w
    d.rectangle((0, street, S, S), fill=(62, 62, 68))
    return image


def _night(S: int, rng: np.random.Generator) -> Image.Image:
    image = _image(_gradient(S, S, _jitter(rng, (8, 12, 38), 4), (30, 36, 82)))
    d = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(20, 32))):
        x, y, r = rng.uniform(0, S), rng.uniform(0, S * 0.85), S * rng.uniform(0.005, 0.011)
        d.ellipse((x - r, y - r, x + r, y + r), fill=(255, 250, 220))
    mx, my, mr = S * rng.choice([0.16, 0.84]), S * rng.uniform(0.12, 0.2), S * 0.08
    d.ellipse((mx - mr, my - mr, mx + mr, my + mr), fill=(246, 240, 200))
    off = mr * 0.5
    d.ellipse((mx - mr + off, my - mr - off * 0.4, mx + mr + off, my + mr - off * 0.4), fill=(10, 14, 42))
    d.polygon(_wave(rng, S * 0.025, S, S * 0.88, S), fill=(4, 6, 18))
    return image


def _desert(S: int, rng: np.random.Generator) -> Image.Image:
    horizon = round(S * rng.uniform(0.32, 0.42))
    a = _gradient(S, S, (232, 184, 108), (214, 160, 86))
    a[:horizon] = _gradient(horizon, S, _jitter(rng, (250, 208, 130)), (252, 232, 190))
    image = _image(a)
    d = ImageDraw.Draw(image)
    sx, sy, sr = S * rng.uniform(0.15, 0.85), horizon * rng.uniform(0.3, 0.55), S * 0.07
    d.ellipse((sx - sr, sy - sr, sx + sr, sy + sr), fill=(255, 246, 214))
    d.polygon(_wave(rng, S * 0.04, S, horizon, S), fill=(236, 192, 118))
    d.polygon(_wave(rng, S * 0.05, S, horizon + S * 0.18, S), fill=(222, 170, 94))
    d.polygon(_wave(rng, S * 0.05, S, horizon + S * 0.38, S), fill=(232, 184, 108))
    return image


def _forest(S: int, rng: np.random.Generator) -> Image.Image:
    a = _gradient(S, S, _jitter(rng, (170, 206, 196)), (120, 160, 130))
    image = _image(a)
    d = ImageDraw.Draw(image)
    ground = S * 0.86
    for colour, lo, hi, wlo, whi in (((48, 104, 66), 0.55, 0.8, 0.16, 0.26), ((26, 72, 40), 0.5, 0.72, 0.2, 0.32)):
        x = -S * rng.uniform(0.05, 0.15)
        while x < S * 1.05:
            w, h = S * rng.uniform(wlo, whi), S * rng.uniform(lo, hi)
            d.rectangle((x - S * 0.02, ground - h * 0.25, x + S * 0.02, ground), fill=(88, 58, 32))
            for tier in range(3):  # three stacked triangles per conifer
                ty = ground - h * 0.2 - tier * h * 0.26
                tw = w * (1 - tier * 0.22)
                d.polygon([(x - tw / 2, ty), (x, ty - h * 0.45), (x + tw / 2, ty)], fill=_jitter(rng, colour, 4))
            x += w * rng.uniform(0.45, 0.7)
    d.rectangle((0, ground, S, S), fill=(62, 82, 38))
    return image


BACKGROUND_DRAWERS: dict[str, Callable[[int, np.random.Generator], Image.Image]] = {
    "plain": _plain,
    "beach": _beach,
    "snow": _snow,
    "grass": _grass,
    "city": _city,
    "night": _night,
    "desert": _desert,
    "forest": _forest,
}


def shadow(canvas: Image.Image, box: tuple[int, int, int, int], strength: int = 60) -> None:
    """A soft contact shadow under `box` (left, top, right, bottom) on an RGB canvas."""
    S = canvas.width
    left, top, right, bottom = box
    w, h = right - left, bottom - top
    layer = Image.new("L", canvas.size, 0)
    ImageDraw.Draw(layer).ellipse(
        (left + w * 0.12, bottom - h * 0.06, right - w * 0.12, bottom + h * 0.06), fill=strength
    )
    layer = layer.filter(ImageFilter.GaussianBlur(S * 0.012))
    canvas.paste((0, 0, 0), (0, 0), layer)
