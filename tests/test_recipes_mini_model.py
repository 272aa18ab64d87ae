"""The mini base model: builds, learns on a fixed batch, saves and loads like a real checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rewardbooth.diffusion import add_noise, denoising_error, encode_prompts
from rewardbooth.mini import pretraining_batch
from rewardbooth.models.loading import load_components, make_pipeline
from rewardbooth.recipes.mini_model import (
    IDENTIFIER_TOKENS,
    MINI_PRESETS,
    build_mini_pipeline,
    check_word_tokens,
    world_words,
)
from rewardbooth.recipes.mini_pretrain import images_to_tensor


@pytest.fixture(scope="module")
def xs_pipeline():
    return build_mini_pipeline(MINI_PRESETS["xs"])


def test_world_words_are_single_tokens(xs_pipeline):
    tok = xs_pipeline.tokenizer
    assert check_word_tokens(tok) == []
    ids = tok("a big red checkered sks house upside down in the desert").input_ids
    assert len(ids) == 13 <= tok.model_max_length  # BOS + 11 words + EOS
    # Words outside the world still tokenize (byte fallback), not as unknown.
    ids = tok("a qqq ball", add_special_tokens=False).input_ids  # CLIP's unk is its EOS token
    assert len(ids) == 5 and tok.unk_token_id not in ids
    assert "sks" in IDENTIFIER_TOKENS and "ball" in world_words()


def test_pretrain_steps_save_and_load(xs_pipeline, tmp_path):
    torch.manual_seed(0)
    pipe = xs_pipeline
    images, captions, _ = pretraining_batch(0, 4, 32)
    x = images_to_tensor(images)
    with torch.no_grad():
        latents = pipe.vae.encode(x).latent_dist.mode() * pipe.vae.config.scaling_factor
    assert latents.shape == (4, 4, 16, 16)
    batch = add_noise(pipe.scheduler, latents, generator=torch.Generator().manual_seed(0))
    params = list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3)
    losses = []
    for _ in range(8):
        emb = encode_prompts(pipe.tokenizer, pipe.text_encoder, captions)
        loss = denoising_error(pipe.unet, pipe.scheduler, batch, emb).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses

    folder = tmp_path / "mini"
    pipe.save_pretrained(folder, safe_serialization=True)
    assert not list(folder.rglob("*.bin"))
    components = load_components(str(folder))
    assert components.native_resolution == 32
    assert components.tokenizer.model_max_length == 16
    assert check_word_tokens(components.tokenizer) == []
    for name in ("unet", "text_encoder"):
        a, b = getattr(pipe, name).state_dict(), getattr(components, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    out = make_pipeline(components)(
        "a red ball on the beach", height=32, width=32, num_inference_steps=2, guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0), output_type="np",
    ).images
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()
