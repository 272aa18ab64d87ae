"""Rewards and judges on the tiny encoders: offline, seeded, a few seconds on one CPU thread."""

from __future__ import annotations

import math
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rewardbooth.errors import ConfigError
from rewardbooth.mini.world import make_subject
from rewardbooth.rewards import (
    BUILTIN_REWARDS,
    Subject,
    build_reward,
    harmonic_reward,
    load_encoder,
    register_reward,
    strip_identifier,
    tiny_encoder_path,
    unregister_reward,
)

TINY = {"dino": "tiny", "clip": "tiny", "align": "tiny"}
PROMPTS = ["a sks toy in the snow", "a sks toy on the beach", "a red sks toy", "sks toy with a city in the background"]


@pytest.fixture(scope="module")
def toy():
    return make_subject(seed=3, num_images=4, size=64)


@pytest.fixture(scope="module")
def other():
    return make_subject(seed=11, num_images=4, size=64)


@pytest.fixture(scope="module")
def subject(toy) -> Subject:
    return Subject("toy", toy.images[:3], identifier="sks", class_noun="toy")


def as_tensor(images) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images])).permute(0, 3, 1, 2).contiguous()


def test_strip_identifier():
    assert strip_identifier("a sks dog in the snow", "sks") == "a dog in the snow"
    assert strip_identifier("sks dog", "sks") == "dog"
    assert strip_identifier("a photo of sks, a dog", "sks") == "a photo of , a dog"
    assert strip_identifier("a sksa dog", "sks") == "a sksa dog"
    assert strip_identifier("a [V] dog", "[V]") == "a dog"  # RPO's identifier is not a word character
    assert strip_identifier("a  dog ", "") == "a dog"


def test_identical_images_score_one(toy):
    one = Subject("single", [toy.images[0]])
    for name in ("dino", "clip_i", "align_i"):
        scores = build_reward(name, models=TINY)([toy.images[0]] * 3, ["a sks toy"] * 3, one)
        assert scores.shape == (3,)
        assert torch.allclose(scores, torch.ones(3), atol=1e-5), (name, scores)


def test_different_images_score_below_one(toy, other, subject):
    scores = build_reward("dino", models=TINY)(other.images, PROMPTS, subject)
    assert bool((scores < 1 - 1e-4).all()), scores


def test_clip_t_matches_hand_computation(toy, subject):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    folder = tiny_encoder_path("clip")
    model = CLIPModel.from_pretrained(folder).eval()
    processor, tokenizer = AutoImageProcessor.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    texts = [p.replace("sks ", "") for p in PROMPTS]
    with torch.no_grad():
        image = model.get_image_features(pixel_values=processor(images=toy.images, return_tensors="pt")["pixel_values"])
        tokens = tokenizer(texts, padding=True, return_tensors="pt")
        text = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    image = image if isinstance(image, torch.Tensor) else image.pooler_output
    text = text if isinstance(text, torch.Tensor) else text.pooler_output
    expected = F.cosine_similarity(image, text, dim=-1)

    scores = build_reward("clip_t", models=TINY)(toy.images, PROMPTS, subject)
    assert torch.allclose(scores, expected, atol=1e-5), (scores, expected)


def test_lambda_harmonic_closed_form(toy, subject):
    s_i = (build_reward("align_i", models=TINY)(toy.images, PROMPTS, subject) + 1) / 2
    s_t = (build_reward("align_t", models=TINY)(toy.images, PROMPTS, subject) + 1) / 2
    for lam in (0.0, 0.3, 0.5, 1.0):
        reward = build_reward({"name": "lambda_harmonic", "lam": lam}, models=TINY)
        assert reward.lam == lam and reward.encoder.kind == "align"
        scores = reward(toy.images, PROMPTS, subject)
        if lam == 0:
            expected = s_t
        elif lam == 1:
            expected = s_i
        else:
            expected = 1 / (lam / s_i + (1 - lam) / s_t)
        assert torch.allclose(scores, expected, atol=1e-5), (lam, scores, expected)
    # Continuous at both ends.
    near_one = build_reward({"name": "lambda_harmonic", "lam": 1 - 1e-6}, models=TINY)(toy.images, PROMPTS, subject)
    near_zero = build_reward({"name": "lambda_harmonic", "lam": 1e-6}, models=TINY)(toy.images, PROMPTS, subject)
    assert torch.allclose(near_one, s_i, atol=1e-4) and torch.allclose(near_zero, s_t, atol=1e-4)


def test_lambda_harmonic_clip_encoder(toy, subject):
    reward = build_reward({"name": "lambda_harmonic", "lam": 0.5, "encoder": "clip"}, models=TINY)
    s_i, s_t = reward.components(toy.images, PROMPTS, subject)
    clip_i = build_reward("clip_i", models=TINY)(toy.images, PROMPTS, subject)
    clip_t = build_reward("clip_t", models=TINY)(toy.images, PROMPTS, subject)
    assert torch.allclose(s_i, (clip_i + 1) / 2, atol=1e-6) and torch.allclose(s_t, (clip_t + 1) / 2, atol=1e-6)
    assert torch.allclose(reward(toy.images, PROMPTS, subject), 2 * s_i * s_t / (s_i + s_t), atol=1e-6)


def test_harmonic_reward_properties():
    gen = torch.Generator().manual_seed(0)
    s_i, s_t = torch.rand(64, generator=gen), torch.rand(64, generator=gen)
    for lam in (0.0, 0.1, 0.3, 0.5, 0.7, 1.0):
        assert torch.allclose(harmonic_reward(s_i, s_t, lam), harmonic_reward(s_t, s_i, 1 - lam), atol=1e-6)
        r = harmonic_reward(s_i, s_t, lam)
        assert bool((r >= torch.minimum(s_i, s_t) - 1e-6).all() and (r <= torch.maximum(s_i, s_t) + 1e-6).all())
    assert torch.equal(harmonic_reward(s_i, s_t, 1.0), s_i) and torch.equal(harmonic_reward(s_i, s_t, 0.0), s_t)
    zero = harmonic_reward(torch.zeros(2), torch.tensor([0.5, 1.0]), 0.5)
    assert torch.isfinite(zero).all() and zero.max() < 1e-30  # a zero score gives ~0, not nan


@pytest.mark.parametrize("spec", ["dino", "clip_i", "clip_t", {"name": "lambda_harmonic", "lam": 0.5}])
def test_tensor_inputs_are_differentiable(toy, subject, spec):
    reward = build_reward(spec, models=TINY)
    assert reward.differentiable
    images = as_tensor(toy.images).requires_grad_(True)
    scores = reward(images, PROMPTS, subject)
    assert scores.requires_grad and scores.shape == (4,)
    scores.sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in reward.encoder.model.parameters())  # the judge stays frozen


def test_tensor_path_matches_processor(toy):
    """At the model's own size the torch preprocessing equals the checkpoint's processor."""
    for kind in ("dino", "clip", "align"):
        encoder = load_encoder(kind, "tiny")
        small = [im.resize((32, 32)) for im in toy.images]
        pil, tensor = encoder.encode_images(small), encoder.encode_images(as_tensor(small))
        assert torch.allclose(pil, tensor, atol=1e-5), kind
        # With resizing, only the resampling filter differs.
        pil, tensor = encoder.encode_images(toy.images), encoder.encode_images(as_tensor(toy.images))
        assert F.cosine_similarity(pil, tensor).min() > 0.98, kind


@pytest.mark.parametrize("name", BUILTIN_REWARDS)
def test_batched_equals_one_at_a_time(toy, other, subject, name):
    reward = build_reward(name, models=TINY)
    images = [*toy.images, *other.images]
    prompts = [*PROMPTS, *PROMPTS]
    batched = reward(images, prompts, subject)
    single = torch.cat([reward(images[i : i + 1], prompts[i : i + 1], subject) for i in range(len(images))])
    assert torch.allclose(batched, single, atol=1e-5), (batched, single)
    tensors = as_tensor(images)
    batched_t = reward(tensors, prompts, subject)
    single_t = torch.cat([reward(tensors[i : i + 1], prompts[i : i + 1], subject) for i in range(len(images))])
    assert torch.allclose(batched_t, single_t, atol=1e-5)
    encoder = reward.encoder
    old, encoder.batch_size = encoder.batch_size, 3  # internal chunking gives the same numbers
    try:
        assert torch.allclose(reward(images, prompts, subject), batched, atol=1e-5)
    finally:
        encoder.batch_size = old


def test_reference_features_computed_once(toy, other, subject, monkeypatch):
    reward = build_reward({"name": "lambda_harmonic", "lam": 0.5}, models=TINY)
    calls: list[int] = []
    original = reward.encoder.encode_images

    def spy(images):
        calls.append(len(images))
        return original(images)

    monkeypatch.setattr(reward.encoder, "encode_images", spy)
    first = reward(other.images, PROMPTS, subject)
    assert calls == [4, 3]  # generated images, then the three references
    second = reward(other.images, PROMPTS, subject)
    assert calls == [4, 3, 4] and torch.allclose(first, second)
    # Same name and pixels in a new object: still cached. New pixels: recomputed.
    reward(other.images, PROMPTS, Subject("toy", [im.copy() for im in subject.references]))
    assert calls == [4, 3, 4, 4]
    reward(other.images, PROMPTS, Subject("toy", toy.images[1:]))
    assert calls == [4, 3, 4, 4, 4, 3]


def test_encoders_are_shared_and_cached():
    assert load_encoder("clip", "tiny") is load_encoder("clip", "tiny")
    assert build_reward("clip_i", models=TINY).encoder is build_reward("clip_t", models=TINY).encoder
    dino = load_encoder("dino", "tiny")
    assert dino.name == "tiny" and not dino.has_text
    with pytest.raises(TypeError, match="images only"):
        dino.encode_texts(["a dog"])
    feats = load_encoder("align", "tiny").encode_texts(["a dog", "a cat on the roof"])
    assert feats.shape == (2, 32) and torch.allclose(feats.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_tiny_build_is_seeded_and_keeps_global_rng(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    reference = load_file(tiny_encoder_path("dino") / "model.safetensors")
    monkeypatch.setenv("REWARDBOOTH_CACHE", str(tmp_path))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    folder = tiny_encoder_path("dino")
    assert torch.equal(torch.rand(3), expected)
    assert folder.parent == tmp_path / "encoders" and not list(tmp_path.glob("encoders/*.tmp*"))
    rebuilt = load_file(folder / "model.safetensors")
    assert rebuilt.keys() == reference.keys() and all(torch.equal(rebuilt[k], reference[k]) for k in reference)


def test_wrong_checkpoint_class_is_refused():
    with pytest.raises(ConfigError, match="'clip' checkpoint"):
        load_encoder("dino", str(tiny_encoder_path("clip")))


def test_real_hub_id_fails_clearly_offline(monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    if huggingface_hub.try_to_load_from_cache("facebook/dino-vits16", "config.json") is not None:
        pytest.skip("facebook/dino-vits16 is in the local hub cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(ConfigError) as info:
        build_reward("dino", models={"dino": "facebook/dino-vits16"})
    assert time.monotonic() - start < 30
    message = str(info.value)
    assert message.startswith("could not load dino model 'facebook/dino-vits16'") and "\n" not in message


CUSTOM_MODULE = """
import numpy as np
import torch

def brightness(images, prompts, subject, scale=1.0):
    return [scale * float(np.asarray(im).mean()) / 255 for im in images]

def as_array(images, prompts, subject):
    return np.arange(len(images), dtype=np.int64)

def grad_mean(images, prompts, subject):
    return images.mean(dim=(1, 2, 3))
grad_mean.differentiable = True

def too_few(images, prompts, subject):
    return [0.0]

def words(images, prompts, subject):
    return ["high"] * len(images)

class Constant:
    name = "constant"
    differentiable = False
    def __init__(self, value=0.25):
        self.value = value
    def __call__(self, images, prompts, subject):
        return torch.full((len(images),), self.value)
"""


@pytest.fixture
def custom_module(tmp_path, monkeypatch):
    (tmp_path / "rb_custom_rewards.py").write_text(CUSTOM_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "rb_custom_rewards"
    sys.modules.pop("rb_custom_rewards", None)


def test_custom_function_reward(toy, subject, custom_module):
    reward = build_reward(f"{custom_module}:brightness")
    assert reward.name == "brightness" and reward.differentiable is False
    scores = reward(toy.images, PROMPTS, subject)
    expected = torch.tensor([np.asarray(im).mean() / 255 for im in toy.images], dtype=torch.float32)
    assert scores.dtype == torch.float32 and torch.allclose(scores, expected)
    scaled = build_reward({"name": f"{custom_module}:brightness", "scale": 2.0, "label": "bright2"})
    assert scaled.name == "bright2" and torch.allclose(scaled(toy.images, PROMPTS, subject), 2 * expected)
    ints = build_reward(f"{custom_module}:as_array")(toy.images, PROMPTS, subject)
    assert ints.dtype == torch.float32 and ints.tolist() == [0.0, 1.0, 2.0, 3.0]
    # Non-differentiable rewards never hand gradients back, even for tensors that need them.
    images = as_tensor(toy.images).requires_grad_(True)
    grad = build_reward(f"{custom_module}:grad_mean")
    assert grad.differentiable and grad(images, PROMPTS, subject).requires_grad
    with pytest.raises(ConfigError, match=r"returned shape \(1,\) for 4 images"):
        build_reward(f"{custom_module}:too_few")(toy.images, PROMPTS, subject)
    with pytest.raises(ConfigError, match="not numbers"):
        build_reward(f"{custom_module}:words")(toy.images, PROMPTS, subject)
    constant = build_reward({"name": f"{custom_module}:Constant", "value": 0.5})
    assert constant.name == "constant" and constant(toy.images, PROMPTS, subject).tolist() == [0.5] * 4


def test_register_reward(toy, subject):
    def contrast(images, prompts, subject):
        return torch.tensor([float(np.asarray(im).std()) for im in images])

    register_reward("contrast_test", contrast)
    try:
        reward = build_reward("contrast_test")
        assert reward.name == "contrast_test" and not reward.differentiable
        assert reward(toy.images, PROMPTS, subject).shape == (4,)
        with pytest.raises(ConfigError, match="already registered"):
            register_reward("contrast_test", lambda images, prompts, subject: [0.0] * len(images))
    finally:
        unregister_reward("contrast_test")
    with pytest.raises(ConfigError, match="unknown reward 'contrast_test'"):
        build_reward("contrast_test")


def test_entry_point_reward(toy, subject, tmp_path, monkeypatch):
    (tmp_path / "rb_plugin_mod.py").write_text("def score(images, prompts, subject):\n    return [1.0] * len(images)\n")
    dist = tmp_path / "rb_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: rb-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[rewardbooth.rewards]\nplugin_ones = rb_plugin_mod:score\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        reward = build_reward("plugin_ones")
        assert reward.name == "plugin_ones" and reward(toy.images, PROMPTS, subject).tolist() == [1.0] * 4
    finally:
        sys.modules.pop("rb_plugin_mod", None)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("no_such_reward", "unknown reward 'no_such_reward'"),
        ("", "empty"),
        (42, "must be a name or a mapping"),
        ({"lam": 0.5}, "needs a 'name'"),
        ("rb_no_such_module_xyz:score", "cannot import 'rb_no_such_module_xyz'"),
        ("math:no_such_function", "has no attribute 'no_such_function'"),
        (":score", "module.path:function"),
        ({"name": "lambda_harmonic", "lam": 1.5}, "lam must be a number in \\[0, 1\\]"),
        ({"name": "lambda_harmonic", "lam": "half"}, "lam must be a number"),
        ({"name": "lambda_harmonic", "encoder": "dino"}, "encoder must be 'align' or 'clip'"),
        ({"name": "dino", "resolution": 224}, "unknown setting\\(s\\) resolution"),
        ({"name": "math:sqrt", "bogus": 1}, "math:sqrt"),
        ({"name": "dino", "label": ""}, "label must be a non-empty string"),
    ],
)
def test_bad_specs_give_one_line_config_errors(spec, match):
    with pytest.raises(ConfigError, match=match) as info:
        build_reward(spec, models=TINY)
    assert "\n" not in str(info.value)


def test_custom_reward_with_wrong_settings(custom_module):
    with pytest.raises(ConfigError, match="cannot take") as info:
        build_reward({"name": f"{custom_module}:too_few", "scale": 2})
    assert "\n" not in str(info.value) and f"{custom_module}:too_few" in str(info.value)


def test_prompt_count_must_match(toy, subject):
    with pytest.raises(ValueError, match="4 images but 1 prompts"):
        build_reward("clip_t", models=TINY)(toy.images, PROMPTS[:1], subject)


def test_scores_are_cosines(toy, other, subject):
    for name in ("dino", "clip_i", "clip_t", "align_i", "align_t"):
        scores = build_reward(name, models=TINY)(other.images, PROMPTS, subject)
        assert bool(((scores >= -1 - 1e-6) & (scores <= 1 + 1e-6)).all()) and not any(math.isnan(v) for v in scores.tolist())
    scores = build_reward("lambda_harmonic", models=TINY)(other.images, PROMPTS, subject)
    assert bool(((scores >= 0) & (scores <= 1)).all())


def test_empty_batch(subject):
    scores = build_reward("clip_t", models=TINY)([], [], subject)
    assert scores.shape == (0,)


def test_encoder_dtype_setting(toy):
    full = load_encoder("clip", "tiny")
    half = load_encoder("clip", "tiny", dtype="bfloat16")
    assert half is not full and half.dtype == torch.bfloat16 and half is load_encoder("clip", "tiny", dtype=torch.bfloat16)
    assert F.cosine_similarity(half.encode_images(toy.images), full.encode_images(toy.images)).min() > 0.99
    images = as_tensor(toy.images).requires_grad_(True)
    half.encode_images(images).sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.dtype == torch.float32
    with pytest.raises(ConfigError, match="not a torch dtype"):
        load_encoder("clip", "tiny", dtype="float13")
    with pytest.raises(ConfigError, match="encoder kind 'siglip' is unknown"):
        load_encoder("siglip", "tiny")


def test_scoring_encodes_each_image_once_per_encoder(toy, other, subject, monkeypatch):
    """CLIP-I and CLIP-T share CLIP's image features: one image-tower pass per image, not two."""
    from rewardbooth.evaluation.metrics import Scorer

    scorer = Scorer(dict(TINY), batch_size=3)
    clip = scorer.rewards["clip_i"].encoder
    assert clip is scorer.rewards["clip_t"].encoder
    passes: list[int] = []
    original = type(clip)._image_features
    monkeypatch.setattr(type(clip), "_image_features", lambda self, pixels: passes.append((self.kind, len(pixels))) or original(self, pixels))
    images = list(other.images) + list(toy.images)
    scores = scorer.score(images, ["a photo of a sks toy"] * len(images), [str(i) for i in range(len(images))], subject)
    clip_passes = sum(n for kind, n in passes if kind == clip.kind)
    assert clip_passes == len(images) + len(subject.references)  # each generated image once, each reference once
    # And the numbers are those of the rewards called on their own.
    alone = build_reward("clip_t", models=TINY)(images, ["a photo of a sks toy"] * len(images), subject)
    assert [s.clip_t for s in scores] == pytest.approx(alone.tolist(), abs=1e-6)


def test_patch_reward_matches_each_patch_and_passes_gradients(toy, other, subject):
    """dino_patch: a reference scores 1 against itself (every patch finds itself), another subject lower;
    the score is differentiable in the image, so DPG's direct actor and critic can use it."""
    reward = build_reward("dino_patch", models=TINY)
    own = reward(toy.images[:1], PROMPTS[:1], subject)
    assert own.item() == pytest.approx(1.0, abs=1e-5)
    assert reward(other.images[:1], PROMPTS[:1], subject).item() < own.item() - 1e-3
    pixels = as_tensor(other.images[:2]).requires_grad_(True)
    reward(pixels, PROMPTS[:2], subject).sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0
