"""Shared state a method sees during training, and the image sets it trains on."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from rewardbooth import diffusion
from rewardbooth.config import RunConfig
from rewardbooth.data.images import preprocess
from rewardbooth.models.loading import Components, make_pipeline


@dataclass
class TrainContext:
    cfg: RunConfig
    run_dir: Path
    accelerator: Any
    components: Components
    resolution: int
    weight_dtype: torch.dtype
    unet: Any = None  # the trained U-Net (wrapped by accelerate once training starts)
    text_encoder: Any = None
    progress: bool = True  # show progress bars for one-off work (class images, negatives)
    _prompt_cache: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def noise_scheduler(self):
        return self.components.noise_scheduler

    @property
    def trains_text_encoder(self) -> bool:
        return self.cfg.adapter.train_text_encoder

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings; cached per prompt unless the text encoder is being trained."""
        text_encoder = self.text_encoder if self.text_encoder is not None else self.components.text_encoder
        if self.trains_text_encoder:  # the encoder changes every step: nothing to cache
            return diffusion.encode_prompts(self.components.tokenizer, text_encoder, prompts)
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            with torch.no_grad():
                embeddings = diffusion.encode_prompts(self.components.tokenizer, text_encoder, missing)
            self._prompt_cache.update(zip(missing, embeddings))
        return torch.stack([self._prompt_cache[p] for p in prompts])

    def base_pipeline(self):
        """A sampling pipeline over the frozen base weights (used before adapters exist)."""
        pipe = make_pipeline(self.components)
        return pipe.to(self.device)


class LatentImageSet:
    """Training images as VAE posterior moments, encoded once.

    With center crops the VAE runs once per image (and once more for its mirror image when random
    flips are on); x0 is then sampled from the cached posterior each step, as diffusers' scripts
    do by re-encoding. Random crops change pixels every step, so those images are kept as PIL and
    re-encoded per batch.
    """

    def __init__(self, images: list[Image.Image], ctx: TrainContext):
        self.images = images
        self.ctx = ctx
        data = ctx.cfg.data
        self.random_flip = data.random_flip
        self.center_crop = data.center_crop
        self.moments = self.flipped_moments = None
        if self.center_crop:
            pixels = preprocess(images, ctx.resolution, center_crop=True)
            self.moments = diffusion.encode_moments(ctx.components.vae, pixels)
            if self.random_flip:
                self.flipped_moments = diffusion.encode_moments(ctx.components.vae, pixels.flip(-1))

    def __len__(self) -> int:
        return len(self.images)

    def sample_indices(self, count: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, len(self.images), (count,), generator=generator)

    def latents(self, indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """x0 for the given images (scaled latents), with this set's augmentations."""
        flips = torch.rand(len(indices), generator=generator) < 0.5 if self.random_flip else torch.zeros(len(indices), dtype=torch.bool)
        if self.moments is not None:
            moments = torch.stack([
                (self.flipped_moments if flip else self.moments)[i] for i, flip in zip(indices.tolist(), flips.tolist())
            ])
        else:
            pixels = preprocess([self.images[i] for i in indices.tolist()], self.ctx.resolution, center_crop=False, generator=generator)
            pixels = torch.where(flips.view(-1, 1, 1, 1), pixels.flip(-1), pixels)
            moments = diffusion.encode_moments(self.ctx.components.vae, pixels)
        x0 = diffusion.sample_latents(moments.float(), self.ctx.components.latent_scaling, generator)
        return x0.to(device=self.ctx.device, dtype=self.ctx.weight_dtype)
