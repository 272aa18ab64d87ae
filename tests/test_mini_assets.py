"""The shipped MiniBench assets: the base model draws what it is asked for, the judges judge."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rewardbooth.mini.assets import ASSETS_DIR
from rewardbooth.mini.preset import FLOW_SAMPLER_STEPS
from rewardbooth.mini.world import DEFAULT_SPLIT, Scene, render, sample_scene

pytestmark = pytest.mark.skipif(not (ASSETS_DIR / "base" / "model_index.json").is_file(), reason="mini assets not built")


@pytest.fixture(scope="module")
def judge():
    from rewardbooth.mini.scoring import AttributeJudge

    return AttributeJudge("mini")


def test_assets_stay_small():
    total = sum(f.stat().st_size for f in ASSETS_DIR.rglob("*") if f.is_file())
    assert total < 40 * 2**20, f"mini assets are {total / 2**20:.1f} MB"


@pytest.mark.slow
@pytest.mark.parametrize("model, steps", [("mini", 15), ("mini-flow", FLOW_SAMPLER_STEPS)])
def test_base_model_draws_prompted_attributes_well_above_chance(judge, model, steps):
    from rewardbooth.mini.measure import measure_base_model

    result = measure_base_model(model, scenes=48, steps=steps, seed=1, judge=judge)
    generated, chance = result["generated"], result["chance"]
    # Context is drawn almost always, shape and colour most of the time (chance: 1/8, 1/7, 1/8).
    assert generated["context"] >= 0.8, generated
    assert generated["colour"] >= 0.6, generated
    assert generated["shape"] >= 0.5, generated
    assert all(generated[a] > 2 * chance[a] for a in ("shape", "colour", "context")), generated


def test_attribute_judge_reads_heldout_renders(judge):
    rng = np.random.default_rng(3)
    scenes = [sample_scene(rng, exclude=(), combos=DEFAULT_SPLIT.heldout) for _ in range(120)]
    predictions = judge.predict([render(s, 32, i) for i, s in enumerate(scenes)])
    accuracy = {a: np.mean([p[a] == getattr(s, a) for p, s in zip(predictions, scenes)]) for a in ("shape", "colour", "pattern", "context")}
    assert accuracy["colour"] > 0.9 and accuracy["context"] > 0.9, accuracy
    assert accuracy["shape"] > 0.7 and accuracy["pattern"] > 0.7, accuracy


def test_mini_dino_prefers_the_same_subject():
    from rewardbooth.rewards.encoders import load_encoder

    encoder = load_encoder("dino", "mini")
    rng = np.random.default_rng(4)
    same, different = [], []
    for i in range(12):
        a = sample_scene(rng, exclude=(), combos=DEFAULT_SPLIT.heldout)
        b = Scene(a.shape, a.colour, a.pattern, "beach")
        other = sample_scene(rng, exclude=(), combos=[c for c in DEFAULT_SPLIT.heldout if c != a.combo])
        c = Scene(other.shape, other.colour, other.pattern, "beach")
        feats = encoder.encode_images([render(a, 32, i), render(b, 32, i), render(c, 32, i)])
        same.append(float(feats[0] @ feats[1]))
        different.append(float(feats[0] @ feats[2]))
    assert np.mean(same) > np.mean(different) + 0.1, (np.mean(same), np.mean(different))


def test_mini_clip_matches_the_right_caption():
    from rewardbooth.rewards.encoders import load_encoder

    encoder = load_encoder("clip", "mini")
    scenes = [Scene("ball", "red", context="beach"), Scene("house", "blue", context="snow"), Scene("star", "yellow", context="night")]
    images = encoder.encode_images([render(s, 32, 0) for s in scenes])
    texts = encoder.encode_texts([s.caption() for s in scenes])
    assert torch.equal((images @ texts.T).argmax(1), torch.arange(3))
