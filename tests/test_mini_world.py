"""The MiniBench world: rendering, captions, the held-out split, subjects, prompts (fast, offline)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import Image

from rewardbooth.errors import OutputExistsError
from rewardbooth.mini import (
    ALL_COMBOS,
    COLOUR_RGB,
    COLOURS,
    CONTEXT_PHRASES,
    CONTEXTS,
    DEFAULT_SPLIT,
    PATTERNS,
    SCENE_CONTEXTS,
    SHAPES,
    SIZES,
    UPSIDE_DOWN_SHAPES,
    MiniSubject,
    Scene,
    WorldSplit,
    compose_caption,
    make_subject,
    make_subjects,
    object_mask,
    pretraining_batch,
    render,
    render_background,
    sample_scene,
    subject_prompts,
)


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32)


# --- rendering ------------------------------------------------------------------------------


@pytest.mark.parametrize("context", ["plain", "beach", "night"])
def test_render_is_deterministic_per_seed_and_differs_across_seeds(context: str) -> None:
    scene = Scene("fish", "orange", "striped", context, "medium", x=0.3, y=0.7, angle=12.0, flip=True)
    first = render(scene, 32, 5)
    assert first.mode == "RGB" and first.size == (32, 32)
    assert first.tobytes() == render(scene, 32, 5).tobytes()
    assert first.tobytes() == render(scene, 32, np.random.default_rng(5)).tobytes()
    assert first.tobytes() != render(scene, 32, 6).tobytes()


def test_every_shape_colour_pattern_and_context_renders_at_32px() -> None:
    for shape, colour, pattern in ALL_COMBOS:
        image = render(Scene(shape, colour, pattern), 32, 0)
        assert image.size == (32, 32) and image.mode == "RGB"
    for i, context in enumerate(CONTEXTS):
        for size in SIZES:
            shape, colour, pattern = SHAPES[i % len(SHAPES)], COLOURS[i % len(COLOURS)], PATTERNS[i % len(PATTERNS)]
            scene = Scene(shape, colour, pattern, context, size)
            assert render(scene, 32, i).size == (32, 32)


@pytest.mark.parametrize("colour", COLOURS)
def test_plain_objects_show_their_colour(colour: str) -> None:
    # Much of the object's solid interior is close to the named colour in every shape
    # (faces, shading and outlines aside), and no other palette colour is closer there.
    palette = np.array([COLOUR_RGB[c] for c in COLOURS], np.float32)
    for shape in SHAPES:
        scene = Scene(shape, colour, "plain", "plain")
        image, mask = _pixels(render(scene, 32, 0)), object_mask(scene, 32)
        interior = image[mask > 0.999]
        assert len(interior) >= 40, shape
        distances = np.linalg.norm(interior - np.asarray(COLOUR_RGB[colour], np.float32), axis=1)
        assert (distances < 45).mean() > 0.3, (shape, colour)
        nearest = np.linalg.norm(interior[:, None] - palette[None], axis=-1).argmin(axis=1)
        assert np.bincount(nearest, minlength=len(COLOURS)).argmax() == COLOURS.index(colour), (shape, colour)


def test_patterns_are_visible_at_32px() -> None:
    # Striped, dotted and checkered objects differ from the plain one over a good part of
    # the object, with pixels near the pattern's ink.
    for shape, colour in itertools.product(("ball", "cube", "fish"), ("red", "yellow")):
        plain = Scene(shape, colour, "plain")
        inside = object_mask(plain, 32) > 0.999
        base = _pixels(render(plain, 32, 0))
        for pattern in PATTERNS[1:]:
            patterned = _pixels(render(Scene(shape, colour, pattern), 32, 0))
            changed = np.abs(patterned - base).sum(axis=-1)[inside] > 90
            assert changed.mean() > 0.15, (shape, colour, pattern)


def test_shapes_have_distinct_silhouettes() -> None:
    masks = {shape: object_mask(Scene(shape, "red"), 32) > 0.5 for shape in SHAPES}
    for a, b in itertools.combinations(SHAPES, 2):
        iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
        assert iou < 0.9, (a, b, iou)
    assert not masks["ring"][16, 16]  # the ring has a hole
    assert masks["ball"][16, 16]


def test_contexts_have_clearly_different_backgrounds() -> None:
    seeds = range(8)
    means = {
        context: np.array([_pixels(render_background(context, 32, seed)).mean(axis=(0, 1)) for seed in seeds])
        for context in CONTEXTS
    }
    centres = {context: m.mean(axis=0) for context, m in means.items()}
    for a, b in itertools.combinations(CONTEXTS, 2):
        assert np.linalg.norm(centres[a] - centres[b]) > 30, (a, b)
    # Every single background is nearest its own context's mean colour.
    for context, m in means.items():
        for mean in m:
            nearest = min(centres, key=lambda c: np.linalg.norm(mean - centres[c]))
            assert nearest == context


def test_contexts_stay_recognisable_behind_objects() -> None:
    # A nearest-centroid classifier on 4 x 4 thumbnails of whole scenes (random objects,
    # sizes and poses) recognises the context almost always.
    rng = np.random.default_rng(0)

    def thumbnails(context: str, n: int) -> np.ndarray:
        scenes = [sample_scene(rng, (), context=context) for _ in range(n)]
        images = [render(s, 32, int(rng.integers(2**31))) for s in scenes]
        return np.array([_pixels(image.resize((4, 4), Image.Resampling.BOX)).ravel() for image in images])

    centres = {context: thumbnails(context, 16).mean(axis=0) for context in CONTEXTS}
    correct = total = 0
    for context in CONTEXTS:
        for features in thumbnails(context, 12):
            correct += min(centres, key=lambda c: np.linalg.norm(features - centres[c])) == context
            total += 1
    assert correct / total >= 0.9


def test_poses_move_flip_turn_and_scale_the_object() -> None:
    base = Scene("fish", "blue", "plain", "plain", "medium")
    mask = object_mask(base, 32)
    assert not np.allclose(mask, object_mask(Scene("fish", "blue", x=0.0), 32))
    # (up to sub-pixel placement rounding)
    assert np.abs(object_mask(Scene("fish", "blue", flip=True), 32) - mask[:, ::-1]).mean() < 0.02
    assert np.abs(object_mask(Scene("fish", "blue", upside_down=True), 32) - mask[::-1, ::-1]).mean() < 0.02
    assert np.abs(object_mask(Scene("fish", "blue", angle=20.0), 32) - mask).mean() > 0.04
    areas = [object_mask(Scene("fish", "blue", size=size), 32).sum() for size in SIZES]
    assert areas[0] < areas[1] < areas[2]
    # The object stays inside the frame at the extremes.
    for x, y in itertools.product((0.0, 1.0), repeat=2):
        assert object_mask(Scene("house", "red", size="big", x=x, y=y, angle=20.0), 32).sum() == pytest.approx(
            object_mask(Scene("house", "red", size="big", angle=20.0), 32).sum(), rel=0.03
        )


def test_big_tilted_objects_are_never_cut_by_the_frame() -> None:
    for shape in SHAPES:
        for angle in (-20.0, 20.0):
            mask = object_mask(Scene(shape, "red", size="big", zoom=1.12, angle=angle), 32)
            assert max(mask[:, 0].max(), mask[:, -1].max(), mask[0].max(), mask[-1].max()) < 0.7, (shape, angle)


def test_larger_renders_are_the_same_picture() -> None:
    scene = Scene("star", "green", "dotted", "beach", "big", x=0.2, y=0.9, angle=-10.0)
    small = _pixels(render(scene, 32, 3))
    large = _pixels(render(scene, 64, 3).resize((32, 32), Image.Resampling.LANCZOS))
    assert np.abs(small - large).mean() < 12


def test_invalid_scenes_are_rejected() -> None:
    with pytest.raises(ValueError, match="shape"):
        Scene("dog", "red")
    with pytest.raises(ValueError, match="colour"):
        Scene("ball", "teal")
    with pytest.raises(ValueError, match="context"):
        Scene("ball", "red", "plain", "moon")
    with pytest.raises(ValueError):
        Scene("ball", "red", x=1.5)
    with pytest.raises(ValueError):
        render(Scene("ball", "red"), 4)


# --- captions -------------------------------------------------------------------------------


def test_captions_name_colour_pattern_shape_and_context() -> None:
    assert Scene("ball", "red", "striped", "beach").caption() == "a red striped ball on the beach"
    assert Scene("cube", "blue", "dotted", "snow").caption() == "a blue dotted cube in the snow"
    assert Scene("ring", "orange").caption() == "an orange ring"
    assert Scene("cone", "pink", "checkered", "night", "big", upside_down=True).caption() == (
        "a big pink checkered cone upside down at night"
    )
    for shape, colour, pattern in ALL_COMBOS[::7]:
        for context in CONTEXTS:
            caption = Scene(shape, colour, pattern, context).caption()
            assert colour in caption.split() and shape in caption.split()
            assert CONTEXT_PHRASES[context] in caption
            assert (pattern in caption.split()) == (pattern != "plain")


def test_subject_captions_name_identifier_and_noun_but_not_appearance() -> None:
    scene = Scene("ball", "red", "striped", "beach")
    assert scene.caption("sks") == "a sks ball on the beach"
    assert Scene("vase", "green", "dotted").caption("sks") == "a sks vase"
    assert scene.caption(omit=["colour", "context"]) == "a striped ball"
    with pytest.raises(ValueError):
        scene.caption(omit=["shape"])
    with pytest.raises(ValueError):
        scene.caption("  ")
    with pytest.raises(ValueError, match="context"):
        compose_caption("ball", context="moon")
    assert compose_caption("fish", colour="purple", identifier="sks", context="city") == "a purple sks fish in the city"


# --- the split ------------------------------------------------------------------------------


def test_split_holds_out_combinations_but_every_attribute_and_pair_is_pretrained() -> None:
    split = DEFAULT_SPLIT
    pretrain, heldout = set(split.pretrain), set(split.heldout)
    assert not pretrain & heldout and pretrain | heldout == set(ALL_COMBOS)
    assert 0.15 <= len(heldout) / len(ALL_COMBOS) <= 0.2
    for axis, values in enumerate((SHAPES, COLOURS, PATTERNS)):
        assert {combo[axis] for combo in pretrain} == set(values)
        assert {combo[axis] for combo in heldout} == set(values)  # subjects vary along every axis
    for i, j in itertools.combinations(range(3), 2):
        seen = {(combo[i], combo[j]) for combo in pretrain}
        assert all((combo[i], combo[j]) in seen for combo in heldout)
    assert WorldSplit.make(0) == split
    assert set(WorldSplit.make(1).heldout) != heldout
    assert split.is_heldout(split.heldout[0]) and not split.is_heldout(split.pretrain[0])


def test_sample_scene_avoids_held_out_combinations_by_default() -> None:
    rng = np.random.default_rng(0)
    assert not any(DEFAULT_SPLIT.is_heldout(sample_scene(rng).combo) for _ in range(400))
    assert any(DEFAULT_SPLIT.is_heldout(sample_scene(rng, ()).combo) for _ in range(400))
    only = [("star", "red", "plain")]
    assert sample_scene(rng, (), combos=only, context="city").combo == only[0]
    assert sample_scene(rng, context="desert").context == "desert"
    upside_down = [sample_scene(rng) for _ in range(600)]
    assert all(s.shape in UPSIDE_DOWN_SHAPES for s in upside_down if s.upside_down)
    assert any(s.upside_down for s in upside_down)


def test_pretraining_batch_never_yields_a_held_out_combination() -> None:
    images, captions, scenes = pretraining_batch(0, 300, drop_prob=0.0)
    assert len(images) == len(captions) == len(scenes) == 300
    assert not any(DEFAULT_SPLIT.is_heldout(scene.combo) for scene in scenes)
    assert captions == [scene.caption() for scene in scenes]
    assert {scene.context for scene in scenes} == set(CONTEXTS)
    assert {scene.shape for scene in scenes} == set(SHAPES)
    assert all(image.size == (32, 32) for image in images)
    again, _, _ = pretraining_batch(0, 3, drop_prob=0.0)
    assert [i.tobytes() for i in again] == [i.tobytes() for i in images[:3]]


def test_pretraining_captions_sometimes_leave_attributes_out() -> None:
    _, captions, scenes = pretraining_batch(1, 200, size=16)
    full = [scene.caption() for scene in scenes]
    shorter = [c for c, f in zip(captions, full) if c != f]
    assert 0.2 < len(shorter) / len(captions) < 0.8
    assert all(scene.shape in caption for caption, scene in zip(captions, scenes))
    assert any(not set(COLOURS) & set(caption.split()) for caption in captions)  # class-prompt-like


# --- subjects and prompts -------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_subjects_are_held_out_and_their_references_share_attributes_in_varied_poses(seed: int) -> None:
    subject = make_subject(seed)
    assert isinstance(subject, MiniSubject)
    assert DEFAULT_SPLIT.is_heldout(subject.combo) and subject.class_noun == subject.shape
    assert len(subject.images) == len(subject.scenes) == 5
    assert all(image.size == (32, 32) for image in subject.images)
    assert {s.combo for s in subject.scenes} == {subject.combo}
    assert {s.context for s in subject.scenes} == {"plain"}
    assert {s.size for s in subject.scenes} == {"medium"}  # so one instance prompt fits all
    poses = [(round(s.x, 2), round(s.y, 2), round(s.angle), s.flip, round(s.zoom, 2)) for s in subject.scenes]
    assert len(set(poses)) == 5
    assert len({s.flip for s in subject.scenes}) == 2
    assert len({round(s.angle) for s in subject.scenes}) == 5
    assert len({image.tobytes() for image in subject.images}) == 5
    assert subject.prompt("sks") == f"a sks {subject.shape}"
    again = make_subject(seed)
    assert [i.tobytes() for i in again.images] == [i.tobytes() for i in subject.images]


def test_subject_seeds_give_different_subjects() -> None:
    combos = {make_subject(seed, num_images=1).combo for seed in range(12)}
    assert len(combos) >= 6
    assert make_subject(0, num_images=4, size=48).images[0].size == (48, 48)


def test_make_subjects_gives_distinct_reproducible_subjects() -> None:
    subjects = make_subjects(6, seed=10, num_images=2, size=16)
    assert len({s.combo for s in subjects}) == 6
    for subject in subjects:
        again = make_subject(subject.seed, num_images=2, size=16)
        assert again.name == subject.name and again.images[1].tobytes() == subject.images[1].tobytes()
    with pytest.raises(ValueError):
        make_subjects(len(DEFAULT_SPLIT.heldout) + 1)


def test_subject_prompts_cover_every_context_and_say_what_to_expect() -> None:
    subject = make_subject(2)
    specs = subject_prompts(subject, "sks")
    for spec in specs:
        words = spec.prompt.split()
        assert "sks" in words and subject.class_noun in words
        assert spec.expected_shape == subject.shape
    context_specs = [s for s in specs if s.modifier is None]
    assert sorted(s.context for s in context_specs) == sorted(SCENE_CONTEXTS)
    for spec in context_specs:
        assert spec.prompt == f"a sks {subject.shape} {CONTEXT_PHRASES[spec.context]}"
        assert (spec.expected_colour, spec.expected_pattern) == (subject.colour, subject.pattern)
        assert spec.kept == ("shape", "colour", "pattern") and spec.prompted == {"context": spec.context}
    recolours = [s for s in specs if s.modifier == "recolour"]
    assert len(recolours) == 2
    for spec in recolours:
        assert spec.expected_colour != subject.colour and spec.expected_colour in spec.prompt.split()
        assert spec.kept == ("shape", "pattern") and spec.prompted == {"colour": spec.expected_colour}
    (repattern,) = [s for s in specs if s.modifier == "repattern"]
    assert repattern.expected_pattern not in (subject.pattern, "plain")
    assert repattern.expected_pattern in repattern.prompt.split()
    assert {s.expected_size for s in specs if s.modifier in ("big", "small")} == {"big", "small"}
    upside_down = [s.modifier for s in specs if s.upside_down]
    assert upside_down == (["upside down"] if subject.shape in UPSIDE_DOWN_SHAPES else [])
    # An oracle image of every prompt is a valid scene with the expected attributes.
    for spec in specs:
        scene = spec.oracle_scene(0)
        expected = (spec.expected_shape, spec.expected_colour, spec.expected_pattern)
        assert (scene.shape, scene.colour, scene.pattern) == expected
        assert scene.context == (spec.context or "plain")


def test_subject_prompts_use_the_given_identifier() -> None:
    specs = subject_prompts(make_subject(4), identifier="zwx")
    assert all("zwx" in s.prompt.split() and "sks" not in s.prompt for s in specs)


def test_subject_saves_numbered_pngs(tmp_path) -> None:
    subject = make_subject(1, num_images=4)
    paths = subject.save(tmp_path / "new" / "subject")
    assert [p.name for p in paths] == ["00.png", "01.png", "02.png", "03.png"]
    with Image.open(paths[0]) as im:
        assert im.size == (32, 32) and im.tobytes() == subject.images[0].tobytes()


def test_subject_save_refuses_a_non_empty_folder(tmp_path) -> None:
    subject = make_subject(1, num_images=2)
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError) as info:
        subject.save(tmp_path)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path) in message
    assert (tmp_path / "keep.txt").read_text() == "mine"
    assert len(subject.save(tmp_path, overwrite=True)) == 2


def test_resized_subject_keeps_everything_but_the_image_size() -> None:
    subject = make_subject(2, num_images=3)
    big = subject.resized(96)
    assert [im.size for im in big.images] == [(96, 96)] * 3 and all(im.mode == "RGB" for im in big.images)
    assert (big.name, big.combo, big.scenes) == (subject.name, subject.combo, subject.scenes)
    assert [im.size for im in subject.images] == [(32, 32)] * 3  # the original is untouched


def test_contact_sheet_command_writes_a_sheet(tmp_path, capsys) -> None:
    from rewardbooth.mini.sheet import main

    out = tmp_path / "sheet.png"
    assert main(["--out", str(out), "--subject-seed", "1", "--size", "16", "--scale", "1"]) == 0
    sheet = Image.open(out)
    assert sheet.width > 8 * 16 and sheet.height > 10 * 16
    assert "a sks" in capsys.readouterr().out
