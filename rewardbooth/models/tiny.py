"""The built-in `tiny` presets: Stable-Diffusion-shaped pipelines with seeded random weights.

They exist so every code path runs offline on a CPU. They are written once to a cache folder
with `save_pretrained` and then loaded back with `from_pretrained`, exactly like a real
checkpoint, so nothing downstream knows it is talking to a toy.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

# Bump when the architecture or the seed changes, so stale caches are rebuilt.
TINY_FORMAT_VERSION = 2


@dataclass(frozen=True)
class TinyPreset:
    name: str
    prediction_type: str  # "epsilon" (SD 1.x, SD 2 base) or "v_prediction" (SD 2.x 768)
    seed: int = 0


TINY_PRESETS = {
    "tiny": TinyPreset("tiny", "epsilon"),
    "tiny-v": TinyPreset("tiny-v", "v_prediction"),
}


def cache_root() -> Path:
    return Path(os.environ.get("REWARDBOOTH_CACHE", Path.home() / ".cache" / "rewardbooth"))


def _byte_level_vocab() -> dict[str, int]:
    """A CLIP-style byte-level vocabulary with no merges: every byte is a token.

    With an empty merges list the BPE never joins characters, so any prompt tokenizes into
    single characters (plus the end-of-word marker) and no vocabulary file is needed from a hub.
    """
    # GPT-2/CLIP byte-to-unicode table: printable bytes map to themselves, the rest are shifted
    # past 255 so every byte has a visible character.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(shifted))]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}


def build_tiny_pipeline(preset: TinyPreset):
    """Build a StableDiffusionPipeline with small components and seeded random weights."""

    with torch.random.fork_rng(devices=[]):  # seeded weights without disturbing the caller's RNG
        torch.manual_seed(preset.seed)
        return _build_tiny_pipeline(preset)


def _build_tiny_pipeline(preset: TinyPreset):
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    unet = UNet2DConditionModel(
        sample_size=16,  # latent size; with the VAE's /2 downsampling this is a 32 px model
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=32,
    )
    vocab = _byte_level_vocab()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        )
    )
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        prediction_type=preset.prediction_type,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_model_path(name: str) -> Path:
    """Return a from_pretrained folder for a tiny preset, building it on first use."""
    preset = TINY_PRESETS[name]
    folder = cache_root() / "models" / f"{name}-v{TINY_FORMAT_VERSION}"
    marker = folder / "rewardbooth_tiny.json"
    if marker.exists():
        return folder
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    build_tiny_pipeline(preset).save_pretrained(tmp, safe_serialization=True)
    (tmp / "rewardbooth_tiny.json").write_text(json.dumps({"preset": name, "version": TINY_FORMAT_VERSION}))
    # Atomic publish: concurrent test workers may race to build the same preset.
    try:
        tmp.rename(folder)
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return folder
