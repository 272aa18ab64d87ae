"""MiniBench's world: captioned procedural scenes small enough to pretrain on a CPU.

A scene is one object with independent attributes (shape = the class noun, colour,
pattern, size, pose) drawn in a context (a background such as a beach or a city at
night). Captions are generated from the attributes::

    >>> Scene("ball", "red", "striped", "beach").caption()
    'a red striped ball on the beach'
    >>> Scene("ball", "red", "striped", "beach").caption("sks")
    'a sks ball on the beach'

`WorldSplit` holds some (shape, colour, pattern) combinations out of pretraining, so
a subject made by `make_subject` is a combination the base model has never seen,
shown DreamBooth-style in 4-5 reference images in the plain studio context, and
`subject_prompts` lists DreamBench-like evaluation prompts with machine-readable
expectations ("the subject's shape, colour and pattern kept, the beach drawn").

Everything is Pillow + numpy and deterministic: a scene and a seed give the same
pixels on every machine.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image

from rewardbooth.errors import OutputExistsError
from rewardbooth.mini import draw

RGB = tuple[int, int, int]
Combo = tuple[str, str, str]  # (shape, colour, pattern)

# --- attributes ---------------------------------------------------------------------------

SHAPES: tuple[str, ...] = ("ball", "cube", "cone", "ring", "star", "vase", "house", "fish")

# Body colours; patterns are drawn in one white ink on every colour, so an object stays
# a bright silhouette on dark backgrounds (night, forest) as well as on light ones.
COLOUR_RGB: dict[str, RGB] = {
    "red": (214, 34, 40),
    "orange": (242, 122, 18),
    "yellow": (244, 202, 16),
    "green": (30, 156, 70),
    "blue": (36, 84, 216),
    "purple": (132, 52, 184),
    "pink": (248, 134, 196),
}
COLOURS: tuple[str, ...] = tuple(COLOUR_RGB)
PATTERN_INK: dict[str, RGB] = {name: (252, 252, 248) for name in COLOUR_RGB}

PATTERNS: tuple[str, ...] = ("plain", "striped", "dotted", "checkered")

# "plain" is the light neutral studio of the reference images; captions leave it unsaid.
CONTEXT_PHRASES: dict[str, str] = {
    "plain": "",
    "beach": "on the beach",
    "snow": "in the snow",
    "grass": "on the grass",
    "city": "in the city",
    "night": "at night",
    "desert": "in the desert",
    "forest": "in the forest",
}
CONTEXTS: tuple[str, ...] = tuple(CONTEXT_PHRASES)
SCENE_CONTEXTS: tuple[str, ...] = tuple(c for c in CONTEXTS if c != "plain")

# Sizes are bands of the object's side as a fraction of the image side; `zoom` moves a
# scene inside its band. The bands do not overlap, so "small"/"big" is always visible.
SIZE_SCALES: dict[str, float] = {"small": 0.42, "medium": 0.6, "big": 0.82}
SIZES: tuple[str, ...] = tuple(SIZE_SCALES)
ZOOM_RANGE: tuple[float, float] = (0.88, 1.12)
MAX_TILT = 20.0  # degrees either way for an ordinary pose

# A ring looks the same upside down and a ball only moves its highlight; the others
# visibly change, so only they are ever drawn or prompted upside down.
UPSIDE_DOWN_SHAPES: tuple[str, ...] = tuple(s for s in SHAPES if s not in ("ring", "ball"))

# Prompt modifiers, analogues of DreamBench's property prompts ("a red {0} {1}" ...):
# a new colour or pattern, a size, or the subject turned upside down.
MODIFIERS: tuple[str, ...] = ("recolour", "repattern", "big", "small", "upside down")

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": COLOURS,
    "pattern": PATTERNS,
    "context": CONTEXTS,
    "size": SIZES,
}

if set(draw.SHAPE_DRAWERS) != set(SHAPES) or set(draw.BACKGROUND_DRAWERS) != set(CONTEXTS):
    raise RuntimeError("mini world tables and drawers disagree")


def _check(kind: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {kind} {value!r}; expected one of {', '.join(allowed)}")


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def compose_caption(
    shape: str,
    *,
    colour: str | None = None,
    pattern: str | None = None,
    context: str | None = None,
    size: str | None = None,
    upside_down: bool = False,
    identifier: str | None = None,
) -> str:
    """'a [size] [colour] [pattern] [identifier] shape [upside down] [context phrase]'.

    None leaves an attribute unsaid; "plain" pattern, "medium" size and the "plain"
    context are never said either (they are the defaults a reader assumes).
    """
    _check("shape", shape, SHAPES)
    for kind, value in (("colour", colour), ("pattern", pattern), ("context", context), ("size", size)):
        if value is not None:
            _check(kind, value, ATTRIBUTES[kind])
    words = []
    if size is not None and size != "medium":
        words.append(size)
    if colour is not None:
        words.append(colour)
    if pattern is not None and pattern != "plain":
        words.append(pattern)
    if identifier:
        words.append(identifier)
    words.append(shape)
    if upside_down:
        words.append("upside down")
    if context is not None and CONTEXT_PHRASES[context]:
        words.append(CONTEXT_PHRASES[context])
    return f"{_article(words[0])} {' '.join(words)}"


# --- scenes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scene:
    """One object in one context. Pose fields are fractions/degrees, see the field notes."""

    shape: str
    colour: str
    pattern: str = "plain"
    context: str = "plain"
    size: str = "medium"
    x: float = 0.5  # horizontal place within the free room: 0 = touching the left edge, 1 = right
    y: float = 0.5  # vertical place within the free room: 0 = top, 1 = bottom
    angle: float = 0.0  # tilt in degrees, counter-clockwise
    flip: bool = False  # mirrored left-right (the fish faces right, the cube shows its left side)
    upside_down: bool = False  # turned by 180 degrees on top of the tilt
    zoom: float = 1.0  # scale within the size band, ZOOM_RANGE

    def __post_init__(self) -> None:
        _check("shape", self.shape, SHAPES)
        _check("colour", self.colour, COLOURS)
        _check("pattern", self.pattern, PATTERNS)
        _check("context", self.context, CONTEXTS)
        _check("size", self.size, SIZES)
        if not (0.0 <= self.x <= 1.0 and 0.0 <= self.y <= 1.0):
            raise ValueError(f"x and y must lie in [0, 1], got {self.x} and {self.y}")
        lo, hi = ZOOM_RANGE
        if not lo - 1e-9 <= self.zoom <= hi + 1e-9:
            raise ValueError(f"zoom must lie in [{lo}, {hi}], got {self.zoom}")
        if not math.isfinite(self.angle):
            raise ValueError(f"angle must be finite, got {self.angle}")

    @property
    def combo(self) -> Combo:
        return (self.shape, self.colour, self.pattern)

    @property
    def class_noun(self) -> str:
        return self.shape

    @property
    def scale(self) -> float:
        """The object's side as a fraction of the image side."""
        return SIZE_SCALES[self.size] * self.zoom

    @property
    def labels(self) -> dict[str, int]:
        """Attribute -> index into ATTRIBUTES[attribute], for classifiers."""
        return {name: values.index(getattr(self, name)) for name, values in ATTRIBUTES.items()}

    def caption(self, identifier: str | None = None, *, omit: Iterable[str] = ()) -> str:
        """The scene in words, e.g. 'a red striped ball on the beach'.

        With an identifier, a DreamBooth subject prompt that names the identifier and
        the class noun but not the subject's colour or pattern: 'a sks ball on the beach'.
        `omit` leaves out any of "colour", "pattern", "size", "context", "upside down"
        (the caption stays true, only less specific).
        """
        omit = set(omit)
        unknown = omit - {"colour", "pattern", "size", "context", "upside down"}
        if unknown:
            raise ValueError(f"cannot omit {sorted(unknown)}")
        if identifier is not None and not identifier.strip():
            raise ValueError("identifier must be a non-empty word (or None)")
        subject = identifier is not None
        return compose_caption(
            self.shape,
            colour=None if subject or "colour" in omit else self.colour,
            pattern=None if subject or "pattern" in omit else self.pattern,
            context=None if "context" in omit else self.context,
            size=None if "size" in omit else self.size,
            upside_down=self.upside_down and "upside down" not in omit,
            identifier=identifier,
        )


def _generator(rng: int | np.random.Generator | None) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(0 if rng is None else rng)


_MAX_EXTENT = 0.96  # a tilted big object is shrunk until it fits in this share of the frame


def _posed_sprite(scene: Scene, canvas: int) -> Image.Image:
    k = max(4, round(canvas * scene.scale))
    angle = scene.angle + (180.0 if scene.upside_down else 0.0)
    for _ in range(3):
        obj = draw.sprite(scene.shape, COLOUR_RGB[scene.colour], PATTERN_INK[scene.colour], scene.pattern, k, canvas)
        if scene.flip:
            obj = obj.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if angle % 360:
            obj = obj.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
        left, top, right, bottom = obj.getchannel("A").getbbox() or (0, 0, 1, 1)
        extent = max(right - left, bottom - top)
        if extent <= canvas * _MAX_EXTENT:
            break
        k = max(4, math.floor(k * canvas * _MAX_EXTENT / extent))
    return obj


def _placement(scene: Scene, obj: Image.Image, canvas: int) -> tuple[int, int, tuple[int, int, int, int]]:
    """Paste offset and visible box (on the canvas) that keep the whole object in frame."""
    left, top, right, bottom = obj.getchannel("A").getbbox() or (0, 0, obj.width, obj.height)
    w, h = right - left, bottom - top
    ox = round(scene.x * max(0, canvas - w)) - left
    oy = round(scene.y * max(0, canvas - h)) - top
    return ox, oy, (ox + left, oy + top, ox + right, oy + bottom)


def render_background(context: str, size: int = 32, rng: int | np.random.Generator | None = 0) -> Image.Image:
    """The context alone, size x size RGB."""
    _check("context", context, CONTEXTS)
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    canvas = size * draw.SUPERSAMPLE
    image = draw.BACKGROUND_DRAWERS[context](canvas, _generator(rng))
    return image.resize((size, size), Image.Resampling.LANCZOS)


def render(scene: Scene, size: int = 32, rng: int | np.random.Generator | None = 0) -> Image.Image:
    """The scene as a size x size RGB image, drawn at 4x and downscaled (LANCZOS).

    The object depends only on the scene; `rng` (a seed, a Generator, or None for
    seed 0) draws the background's details (horizon, waves, buildings, stars, flakes
    ...), so the same scene and seed always give the same pixels.
    """
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    canvas = size * draw.SUPERSAMPLE
    image = draw.BACKGROUND_DRAWERS[scene.context](canvas, _generator(rng))
    obj = _posed_sprite(scene, canvas)
    ox, oy, box = _placement(scene, obj, canvas)
    draw.shadow(image, box, strength=40 if scene.context == "night" else 60)
    image.paste(obj, (ox, oy), obj)
    return image.resize((size, size), Image.Resampling.LANCZOS)


def object_mask(scene: Scene, size: int = 32) -> np.ndarray:
    """Float mask in [0, 1] of where `render(scene, size)` shows the object (any seed)."""
    canvas = size * draw.SUPERSAMPLE
    obj = _posed_sprite(scene, canvas)
    ox, oy, _ = _placement(scene, obj, canvas)
    alpha = Image.new("L", (canvas, canvas), 0)
    alpha.paste(obj.getchannel("A"), (ox, oy))
    small = alpha.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, np.float32) / 255.0


# --- the split ----------------------------------------------------------------------------

ALL_COMBOS: tuple[Combo, ...] = tuple(itertools.product(SHAPES, COLOURS, PATTERNS))


@dataclass(frozen=True)
class WorldSplit:
    """(shape, colour, pattern) combinations for pretraining and held out for subjects.

    Held-out combinations are novel as triples only: every shape, colour and pattern,
    and every pair of them, is still seen `min_pair_count` or more times in pretraining.
    """

    seed: int
    pretrain: tuple[Combo, ...]
    heldout: tuple[Combo, ...]

    @classmethod
    def make(cls, seed: int = 0, holdout_fraction: float = 0.18, min_pair_count: int = 2) -> WorldSplit:
        if not 0.0 < holdout_fraction < 0.5:
            raise ValueError(f"holdout_fraction must lie in (0, 0.5), got {holdout_fraction}")
        target = round(holdout_fraction * len(ALL_COMBOS))
        caps = {
            0: math.ceil(target / len(SHAPES)),
            1: math.ceil(target / len(COLOURS)),
            2: math.ceil(target / len(PATTERNS)),
        }
        pair_counts: Counter = Counter()
        for combo in ALL_COMBOS:
            for pair in _pairs(combo):
                pair_counts[pair] += 1
        held: list[Combo] = []
        per_value: Counter = Counter()
        order = np.random.default_rng(seed).permutation(len(ALL_COMBOS))
        for i in order:
            combo = ALL_COMBOS[int(i)]
            if len(held) == target:
                break
            if any(per_value[(axis, value)] >= caps[axis] for axis, value in enumerate(combo)):
                continue
            if any(pair_counts[pair] <= min_pair_count for pair in _pairs(combo)):
                continue
            held.append(combo)
            for axis, value in enumerate(combo):
                per_value[(axis, value)] += 1
            for pair in _pairs(combo):
                pair_counts[pair] -= 1
        if len(held) < target:
            raise ValueError(f"could only hold out {len(held)} of {target} combinations under the constraints")
        held_set = set(held)
        heldout = tuple(c for c in ALL_COMBOS if c in held_set)  # canonical order
        pretrain = tuple(c for c in ALL_COMBOS if c not in held_set)
        return cls(seed=seed, pretrain=pretrain, heldout=heldout)

    @cached_property
    def heldout_set(self) -> frozenset[Combo]:
        return frozenset(self.heldout)

    def is_heldout(self, combo: Combo) -> bool:
        return tuple(combo) in self.heldout_set


def _pairs(combo: Combo) -> tuple[tuple, ...]:
    shape, colour, pattern = combo
    return (("sc", shape, colour), ("sp", shape, pattern), ("cp", colour, pattern))


DEFAULT_SPLIT = WorldSplit.make()


# --- sampling -----------------------------------------------------------------------------

_SIZE_WEIGHTS = (0.25, 0.5, 0.25)
_UPSIDE_DOWN_P = 0.08


def sample_pose(
    rng: np.random.Generator,
    shape: str,
    context: str,
    *,
    size: str | None = None,
    upside_down: bool | None = None,
) -> dict:
    """Random size, place, tilt and flip; objects in a scene context stay low in the frame."""
    if size is None:
        size = SIZES[int(rng.choice(len(SIZES), p=_SIZE_WEIGHTS))]
    if upside_down is None:
        upside_down = shape in UPSIDE_DOWN_SHAPES and bool(rng.random() < _UPSIDE_DOWN_P)
    y_low = 0.0 if context == "plain" else 0.35  # on the ground rather than in the sky
    return {
        "size": size,
        "x": float(rng.uniform(0.0, 1.0)),
        "y": float(rng.uniform(y_low, 1.0)),
        "angle": float(rng.uniform(-MAX_TILT, MAX_TILT)),
        "flip": bool(rng.random() < 0.5),
        "upside_down": upside_down,
        "zoom": float(rng.uniform(*ZOOM_RANGE)),
    }


def sample_scene(
    rng: int | np.random.Generator | None,
    exclude: Iterable[Combo] | None = None,
    *,
    context: str | None = None,
    combos: Sequence[Combo] | None = None,
) -> Scene:
    """A random scene whose (shape, colour, pattern) is not in `exclude`.

    `exclude` defaults to DEFAULT_SPLIT's held-out combinations, so plain calls only
    ever give pretraining scenes; pass `exclude=()` to sample the whole world.
    `combos` restricts the choice to a list; `context` fixes the background.
    """
    rng = _generator(rng)
    excluded = DEFAULT_SPLIT.heldout_set if exclude is None else frozenset(tuple(c) for c in exclude)
    pool = [c for c in (ALL_COMBOS if combos is None else combos) if tuple(c) not in excluded]
    if not pool:
        raise ValueError("no combination left to sample from")
    shape, colour, pattern = pool[int(rng.integers(len(pool)))]
    if context is None:
        context = CONTEXTS[int(rng.integers(len(CONTEXTS)))]
    _check("context", context, CONTEXTS)
    return Scene(shape, colour, pattern, context, **sample_pose(rng, shape, context))


_OMITTABLE = ("colour", "pattern", "size", "context")


def pretraining_batch(
    rng: int | np.random.Generator | None,
    n: int,
    size: int = 32,
    *,
    split: WorldSplit = DEFAULT_SPLIT,
    drop_prob: float = 0.15,
) -> tuple[list[Image.Image], list[str], list[Scene]]:
    """n rendered pretraining scenes (never a held-out combination) with their captions.

    Each of colour, pattern, size and context is left out of a caption with
    probability `drop_prob` (the caption stays true, only vaguer), so short prompts
    such as "a ball" -- DreamBooth's class prompts -- are in the text distribution.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = _generator(rng)
    images, captions, scenes = [], [], []
    for _ in range(n):
        scene = sample_scene(rng, split.heldout)
        omit = [name for name in _OMITTABLE if drop_prob > 0 and rng.random() < drop_prob]
        images.append(render(scene, size, int(rng.integers(2**63))))
        captions.append(scene.caption(omit=omit))
        scenes.append(scene)
    return images, captions, scenes


# --- subjects -----------------------------------------------------------------------------


@dataclass
class MiniSubject:
    """A held-out combination shown in `len(images)` plain-context reference images."""

    name: str
    shape: str
    colour: str
    pattern: str
    images: list[Image.Image]
    class_noun: str
    seed: int = 0
    scenes: list[Scene] = field(default_factory=list, repr=False)

    @property
    def combo(self) -> Combo:
        return (self.shape, self.colour, self.pattern)

    def prompt(self, identifier: str = "sks") -> str:
        """The DreamBooth instance prompt of the references, 'a sks ball'."""
        return compose_caption(self.class_noun, identifier=identifier)

    def save(self, folder: str | Path, *, overwrite: bool = False) -> list[Path]:
        """Write the references as 00.png, 01.png ... into `folder` (created) and return their
        paths; a folder that is not empty is refused unless `overwrite`."""
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise OutputExistsError(f"{folder} exists and is not a folder")
        if folder.is_dir() and any(folder.iterdir()) and not overwrite:
            raise OutputExistsError(f"{folder} is not empty; choose another folder or pass overwrite=True")
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, image in enumerate(self.images):
            path = folder / f"{i:02d}.png"
            image.save(path, format="PNG")
            paths.append(path)
        return paths

    def resized(self, size: int) -> MiniSubject:
        """The same subject with its references scaled to size x size px (PIL, bicubic): for
        callers that need large images, which `make_subject(size=...)` draws slowly (~4 s an
        image at 1024 px) and no more usefully."""
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        return replace(self, images=[im.resize((size, size), Image.Resampling.BICUBIC) for im in self.images])


def _draw_subject_combo(rng: np.random.Generator, split: WorldSplit) -> Combo:
    return split.heldout[int(rng.integers(len(split.heldout)))]


def make_subject(
    seed: int = 0,
    num_images: int = 5,
    size: int = 32,
    *,
    split: WorldSplit = DEFAULT_SPLIT,
) -> MiniSubject:
    """A held-out combination chosen by `seed`, in varied medium-size poses on the plain studio."""
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    rng = np.random.default_rng(seed)
    shape, colour, pattern = _draw_subject_combo(rng, split)
    # Spread the tilts and alternate the flip so no two references share a pose.
    tilts = rng.permutation(np.linspace(-MAX_TILT * 0.8, MAX_TILT * 0.8, num_images)) if num_images > 1 else [0.0]
    first_flip = bool(rng.random() < 0.5)
    xs = rng.permutation(np.linspace(0.1, 0.9, num_images)) if num_images > 1 else [0.5]
    scenes, images = [], []
    for i in range(num_images):
        scene = Scene(
            shape,
            colour,
            pattern,
            "plain",
            "medium",
            x=float(xs[i]),
            y=float(rng.uniform(0.15, 0.85)),
            angle=float(tilts[i] + rng.uniform(-2.0, 2.0)),
            flip=first_flip ^ (i % 2 == 1),
            zoom=float(rng.uniform(*ZOOM_RANGE)),
        )
        scenes.append(scene)
        images.append(render(scene, size, int(rng.integers(2**63))))
    return MiniSubject(
        name=f"mini-{seed}-{colour}-{pattern}-{shape}",
        shape=shape,
        colour=colour,
        pattern=pattern,
        images=images,
        class_noun=shape,
        seed=seed,
        scenes=scenes,
    )


def make_subjects(
    n: int,
    seed: int = 0,
    num_images: int = 5,
    size: int = 32,
    *,
    split: WorldSplit = DEFAULT_SPLIT,
) -> list[MiniSubject]:
    """n subjects with distinct combinations: make_subject(s) for s = seed, seed + 1, ...

    skipping seeds whose combination is already taken, so each subject can be
    remade alone from the seed in its name.
    """
    if not 0 <= n <= len(split.heldout):
        raise ValueError(f"n must lie in [0, {len(split.heldout)}] (the held-out combinations), got {n}")
    subjects: list[MiniSubject] = []
    taken: set[Combo] = set()
    s = seed
    while len(subjects) < n:
        combo = _draw_subject_combo(np.random.default_rng(s), split)  # make_subject's first draw
        if combo not in taken:
            taken.add(combo)
            subjects.append(make_subject(s, num_images, size, split=split))
        s += 1
    return subjects


# --- evaluation prompts -------------------------------------------------------------------


@dataclass(frozen=True)
class PromptSpec:
    """An evaluation prompt and what a faithful image of it shows.

    expected_* give the attribute the image should show; it is the subject's own value
    unless the modifier changes it (a "recolour" prompt expects the new colour). None
    means the prompt does not constrain that attribute (context None: no context named,
    like DreamBench's "a red sks backpack"; size None: any size).
    """

    prompt: str
    context: str | None
    expected_shape: str
    expected_colour: str
    expected_pattern: str
    modifier: str | None = None
    expected_size: str | None = None
    upside_down: bool = False

    @property
    def kept(self) -> tuple[str, ...]:
        """Subject attributes the image must keep (identity checks)."""
        changed = {"recolour": "colour", "repattern": "pattern"}.get(self.modifier or "")
        return tuple(a for a in ("shape", "colour", "pattern") if a != changed)

    @property
    def prompted(self) -> dict[str, str]:
        """Attributes the prompt asks for beyond the subject (text-alignment checks)."""
        asked = {}
        if self.context is not None:
            asked["context"] = self.context
        if self.modifier == "recolour":
            asked["colour"] = self.expected_colour
        if self.modifier == "repattern":
            asked["pattern"] = self.expected_pattern
        if self.expected_size is not None:
            asked["size"] = self.expected_size
        return asked

    def oracle_scene(self, rng: int | np.random.Generator | None = 0) -> Scene:
        """A scene a perfect model could draw for this prompt (random pose): calibration."""
        rng = _generator(rng)
        context = self.context or "plain"
        size = self.expected_size or "medium"
        pose = sample_pose(rng, self.expected_shape, context, size=size, upside_down=self.upside_down)
        return Scene(self.expected_shape, self.expected_colour, self.expected_pattern, context, **pose)


def subject_prompts(subject: MiniSubject, identifier: str = "sks") -> list[PromptSpec]:
    """The subject in every non-plain context, then DreamBench-like modifier prompts."""
    noun, colour, pattern = subject.class_noun, subject.colour, subject.pattern
    specs = [
        PromptSpec(compose_caption(noun, context=c, identifier=identifier), c, noun, colour, pattern)
        for c in SCENE_CONTEXTS
    ]
    # Two new colours far along the colour wheel and one new (non-plain) pattern.
    ci = COLOURS.index(colour)
    for step in (2, 4):
        new = COLOURS[(ci + step) % len(COLOURS)]
        prompt = compose_caption(noun, colour=new, identifier=identifier)
        specs.append(PromptSpec(prompt, None, noun, new, pattern, "recolour"))
    marked = [p for p in PATTERNS if p != "plain"]
    new_pattern = marked[(marked.index(pattern) + 1) % len(marked)] if pattern in marked else marked[0]
    prompt = compose_caption(noun, pattern=new_pattern, identifier=identifier)
    specs.append(PromptSpec(prompt, None, noun, colour, new_pattern, "repattern"))
    for size in ("big", "small"):
        prompt = compose_caption(noun, size=size, identifier=identifier)
        specs.append(PromptSpec(prompt, None, noun, colour, pattern, size, expected_size=size))
    if noun in UPSIDE_DOWN_SHAPES:
        specs.append(
            PromptSpec(
                compose_caption(noun, upside_down=True, identifier=identifier),
                None, noun, colour, pattern, "upside down", upside_down=True,
            )
        )
    return specs

