"""The built-in `tiny` presets: Stable-Diffusion-shaped pipelines with seeded random weights.

They exist so every code path runs offline on a CPU. They are written once to a cache folder
with `save_pretrained` and then loaded back with `from_pretrained`, exactly like a real
checkpoint, so nothing downstream knows it is talking to a toy.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

# diffusers / transformers / peft / accelerate are imported inside the functions that use them, so importing this
# module (registries, --help, the web app) does not pay their start-up cost.

# Bump when the architecture or the seed changes, so stale caches are rebuilt.
TINY_FORMAT_VERSION = 3


@dataclass(frozen=True)
class TinyPreset:
    name: str
    prediction_type: str  # "epsilon" (SD 1.x, SD 2 base) or "v_prediction" (SD 2.x 768)
    seed: int = 0
    shape: str = "tiny"  # "tiny": toy sizes; "sd15": Stable Diffusion 1.5's real layer sizes (benchmarks)
    family: str = "sd"  # "sd" (one text encoder) or "sdxl" (two, pooled embeddings, size conditioning)


TINY_PRESETS = {
    "tiny": TinyPreset("tiny", "epsilon"),
    "tiny-v": TinyPreset("tiny-v", "v_prediction"),
    # Random weights at SD 1.5's shapes (860M-parameter U-Net, 512 px): for speed and memory
    # figures offline. About 4 GB on disk once built.
    "sd15-random": TinyPreset("sd15-random", "epsilon", shape="sd15"),
    # SDXL's component classes (two text encoders, text_time embedding) at toy sizes.
    "tiny-sdxl": TinyPreset("tiny-sdxl", "epsilon", family="sdxl"),
    # Random weights at SDXL base 1.0's shapes (2.6B-parameter U-Net, 1024 px): benchmarks and the
    # memory table, which builds it on fake tensors (no storage). About 14 GB on disk if ever built.
    "sdxl-random": TinyPreset("sdxl-random", "epsilon", shape="sdxl", family="sdxl"),
}

# (U-Net, VAE, text encoder) sizes per shape.
SHAPES = {
    "tiny": dict(sample_size=16, unet_channels=(32, 64), unet_layers=1, cross_attention_dim=32, head_dim=8,
                 vae_channels=(32, 64), vae_layers=1, vae_size=32, text_hidden=32, text_ffn=64, text_layers=2, text_heads=4),
    "sd15": dict(sample_size=64, unet_channels=(320, 640, 1280, 1280), unet_layers=2, cross_attention_dim=768, head_dim=8,
                 vae_channels=(128, 256, 512, 512), vae_layers=2, vae_size=512, text_hidden=768, text_ffn=3072,
                 text_layers=12, text_heads=12, vocab_size=49408),
    "sdxl": dict(sample_size=128, unet_channels=(320, 640, 1280), vae_channels=(128, 256, 512, 512), vae_layers=2,
                 vae_size=1024, text_hidden=768, text_ffn=3072, text_layers=12, text_heads=12, vocab_size=49408),
}
# SDXL's U-Net layout and its second (OpenCLIP bigG) text encoder, per shape.
SDXL_SHAPES = {
    "tiny": dict(transformer_layers=(1, 2), head_dim=(2, 4), time_embed_dim=8,
                 text_2=dict(text_hidden=32, text_ffn=64, text_layers=2, text_heads=4)),
    "sdxl": dict(transformer_layers=(1, 2, 10), head_dim=(5, 10, 20), time_embed_dim=256,
                 text_2=dict(text_hidden=1280, text_ffn=5120, text_layers=32, text_heads=20, vocab_size=49408)),
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


def _tiny_text_encoder(size: dict, vocab: dict[str, int], with_projection: bool = False):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    config = clip_text_config(size, vocab)
    return CLIPTextModelWithProjection(config) if with_projection else CLIPTextModel(config)


def clip_text_config(size: dict, vocab: dict[str, int]):
    """A CLIPTextConfig of the given sizes whose special ids are the byte vocabulary's."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=size.get("vocab_size", len(vocab)),  # real shapes: CLIP's 49408 rows, of which the byte vocabulary uses the first
        hidden_size=size["text_hidden"],
        intermediate_size=size["text_ffn"],
        num_hidden_layers=size["text_layers"],
        num_attention_heads=size["text_heads"],
        max_position_embeddings=77,
        projection_dim=size["text_hidden"],
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
        hidden_act=size.get("text_act", "quick_gelu"),  # CLIP ViT-L's; OpenCLIP bigG uses "gelu"
    )


def _tiny_vae(size: dict, scaling_factor: float = 0.18215):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**vae_config(size, scaling_factor))


def vae_config(size: dict, scaling_factor: float) -> dict:
    """AutoencoderKL keyword arguments for the given sizes (4 latent channels: SD 1.x/2.x/XL)."""
    depth = len(size["vae_channels"])
    return dict(
        in_channels=3,
        out_channels=3,
        block_out_channels=size["vae_channels"],
        down_block_types=("DownEncoderBlock2D",) * depth,
        up_block_types=("UpDecoderBlock2D",) * depth,
        latent_channels=4,
        layers_per_block=size["vae_layers"],
        norm_num_groups=32,
        sample_size=size["vae_size"],
        scaling_factor=scaling_factor,
    )


def _build_tiny_pipeline(preset: TinyPreset):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTokenizer

    size = SHAPES[preset.shape]
    vocab = _byte_level_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    if preset.family == "sdxl":
        return _build_tiny_sdxl_pipeline(preset, size, vocab, tokenizer)
    depth = len(size["unet_channels"])
    unet = UNet2DConditionModel(
        sample_size=size["sample_size"],  # latent size; times the VAE factor gives the image size
        in_channels=4,
        out_channels=4,
        block_out_channels=size["unet_channels"],
        layers_per_block=size["unet_layers"],
        down_block_types=("CrossAttnDownBlock2D",) * (depth - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (depth - 1),
        cross_attention_dim=size["cross_attention_dim"],
        attention_head_dim=size["head_dim"],
        norm_num_groups=32,
    )
    return assemble_pipeline(unet, _tiny_vae(size), _tiny_text_encoder(size, vocab), tokenizer, preset.prediction_type)


def _build_tiny_sdxl_pipeline(preset: TinyPreset, size: dict, vocab: dict[str, int], tokenizer):
    """SDXL's layout at toy widths: no attention in the first level, deeper transformers below,
    cross-attention over both encoders' concatenated states, pooled text + 6 size ids embedded."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer

    layout = SDXL_SHAPES[preset.shape]
    time_embed_dim = layout["time_embed_dim"]
    text_2 = {**size, **layout["text_2"]}
    depth = len(size["unet_channels"])  # no attention in the first level, as SDXL
    unet = UNet2DConditionModel(
        sample_size=size["sample_size"],
        in_channels=4,
        out_channels=4,
        block_out_channels=size["unet_channels"],
        layers_per_block=2,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (depth - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (depth - 1) + ("UpBlock2D",),
        transformer_layers_per_block=layout["transformer_layers"],
        attention_head_dim=layout["head_dim"],
        use_linear_projection=True,
        cross_attention_dim=size["text_hidden"] + text_2["text_hidden"],
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=text_2["text_hidden"] + 6 * time_embed_dim,
        norm_num_groups=32,
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                                       prediction_type=preset.prediction_type, steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(
        vae=_tiny_vae(size, scaling_factor=0.13025),  # SDXL's VAE scale
        text_encoder=_tiny_text_encoder(size, vocab),
        text_encoder_2=_tiny_text_encoder(text_2, vocab, with_projection=True),
        tokenizer=tokenizer,
        tokenizer_2=CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77),
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )


def assemble_pipeline(unet, vae, text_encoder, tokenizer, prediction_type: str):
    """A StableDiffusionPipeline with SD 1.x's noise schedule around the given components."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        prediction_type=prediction_type,
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
    folder = cache_root() / "models" / f"{name}-v{TINY_FORMAT_VERSION}"
    return save_once(folder, lambda: build_tiny_pipeline(TINY_PRESETS[name]), {"preset": name, "version": TINY_FORMAT_VERSION})


def save_once(folder: Path, build, stamp: dict) -> Path:
    """Write `build()`'s pipeline to `folder` with save_pretrained unless a finished copy is there.

    `stamp` is written beside it as the marker of a finished copy."""
    marker = folder / "rewardbooth_tiny.json"
    if marker.exists():
        return folder
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    build().save_pretrained(tmp, safe_serialization=True)
    (tmp / "rewardbooth_tiny.json").write_text(json.dumps(stamp))
    # Atomic publish: concurrent test workers may race to build the same preset.
    try:
        tmp.rename(folder)
    except OSError:

        shutil.rmtree(tmp, ignore_errors=True)
    return folder
