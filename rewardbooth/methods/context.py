"""Shared state a method sees during training (built by the loop), and the image sets it trains on."""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from rewardbooth import diffusion
from rewardbooth.config import RunConfig
from rewardbooth.data.images import load_image_folder, preprocess
from rewardbooth.models.family import ModelFamily
from rewardbooth.models.loading import Components, make_pipeline


@dataclass
class TrainContext:
    cfg: RunConfig
    run_dir: Path
    accelerator: Any
    components: Components
    resolution: int
    weight_dtype: torch.dtype
    unet: Any = None  # the trained denoiser, U-Net or transformer (wrapped by accelerate once training starts)
    text_encoders: list | None = None  # the trained text encoder(s), wrapped; None: the frozen ones
    progress: bool = True  # show progress bars for one-off work (class images, negatives)
    _prompt_cache: dict[str, diffusion.TextConditioning] = field(default_factory=dict)
    family: ModelFamily = None  # how this model noises, predicts, encodes prompts and samples (set from components)

    def __post_init__(self):
        if self.family is None:
            self.family = self.components.family(self.cfg.flow)

    @property
    def device(self) -> torch.device:
        device = self.accelerator.device  # "cpu:0" in accelerate's CPU processes, which fake tensors tell from "cpu"
        return torch.device("cpu") if device.type == "cpu" else device

    @property
    def latent_size(self) -> int:
        return self.resolution // self.family.latent_scale

    @property
    def noise_scheduler(self):
        return self.components.noise_scheduler

    @property
    def trains_text_encoder(self) -> bool:
        return self.cfg.adapter.train_text_encoder

    def _encode(self, prompts: list[str]) -> diffusion.TextConditioning:
        return self.family.encode_prompts(self.text_encoders or self.components.text_encoders, prompts, self.resolution)

    def encode_prompts(self, prompts: list[str]) -> diffusion.TextConditioning:
        """The U-Net's conditioning; cached per prompt unless the text encoder is being trained."""
        if self.trains_text_encoder:  # the encoder changes every step: nothing to cache
            return self._encode(prompts)
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            with torch.no_grad():
                encoded = self._encode(missing)
            self._prompt_cache.update((p, encoded[i]) for i, p in enumerate(missing))
        return diffusion.TextConditioning.stack([self._prompt_cache[p] for p in prompts])

    def add_noise(self, x0: torch.Tensor, generator: torch.Generator | None = None, timesteps: torch.Tensor | None = None,
                  noise: torch.Tensor | None = None) -> diffusion.NoisedBatch:
        """x_t for training (t and eps drawn unless given), with the run's offset noise."""
        return self.family.add_noise(x0, generator, timesteps=timesteps, noise=noise, offset=self.cfg.train.noise_offset)

    def denoising_error(self, denoiser, batch: diffusion.NoisedBatch, text: diffusion.TextConditioning) -> torch.Tensor:
        """Per-sample ||prediction - target||^2 of `denoiser` (the trained one, or a frozen reference)."""
        return self.family.denoising_error(denoiser, batch, text)

    def weight_errors(self, errors: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Per-sample denoising errors, weighted as the run asks: min-SNR-gamma (train.snr_gamma, U-Nets) or
        flow.loss_weighting (flow-matching models)."""
        weights = self.family.error_weights(timesteps, self.cfg.train.snr_gamma)
        return errors if weights is None else errors * weights.to(errors)

    def instance_images(self) -> list[Image.Image]:
        """The subject's reference images (data.instance_dir), checked as training checks them."""
        data = self.cfg.data
        min_size = data.min_image_size if data.min_image_size is not None else self.resolution // 2
        return load_image_folder(Path(data.instance_dir), min_size=min_size)

    def owned_backward(self, loss: torch.Tensor, optimizer, parameters, max_grad_norm: float | None = None) -> bool:
        """Backward of a method-owned loss (e.g. DPG's critic) and its optimizer's step, once per
        optimizer step: like the main loss, gradients accumulate over the micro-batches and the
        step comes on the one that syncs. Returns whether the optimizer stepped: a NaN/inf gradient is
        dropped, not stepped, so the module stays finite (the loop reports the NaN loss it logs)."""
        acc = self.accelerator
        (loss / acc.gradient_accumulation_steps).backward()
        if not acc.sync_gradients:
            return False
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm if max_grad_norm is not None else math.inf)
        if not torch.isfinite(norm):
            optimizer.zero_grad(set_to_none=True)
            return False
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return True

    def base_pipeline(self):
        """A sampling pipeline over the frozen base weights (used before adapters exist)."""
        return make_pipeline(self.components)  # already placed (pipe.to would refuse offloaded text encoders)


class LatentImageSet:
    """Training images as VAE posterior moments, encoded once.

    With center crops the VAE runs once per image (and once more for its mirror image when random
    flips are on); x0 is then sampled from the cached posterior each step, as diffusers' scripts
    do by re-encoding. Random crops change pixels every step, so those images are kept as PIL and
    re-encoded per batch.
    """

    def __init__(self, images: list[Image.Image], ctx: TrainContext, cache: Path | None = None):
        self.images = images
        self.ctx = ctx
        data = ctx.cfg.data
        self.random_flip = data.random_flip
        self.center_crop = data.center_crop
        self.moments = self.flipped_moments = None
        if self.center_crop:
            cached = _read_latent_cache(cache, images, ctx.resolution) if cache is not None else None
            if cached is not None:
                self.moments, self.flipped_moments = cached["moments"], cached.get("flipped")
            if self.moments is None or (self.random_flip and self.flipped_moments is None):
                pixels = preprocess(images, ctx.resolution, center_crop=True)
                self.moments = diffusion.encode_moments(ctx.components.vae, pixels)
                if self.random_flip:
                    self.flipped_moments = diffusion.encode_moments(ctx.components.vae, pixels.flip(-1))
                if cache is not None and ctx.accelerator.is_main_process:
                    _write_latent_cache(cache, images, ctx.resolution, self.moments, self.flipped_moments)

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
        x0 = self.ctx.family.latents_from_moments(moments.float(), generator)
        return x0.to(device=self.ctx.device, dtype=self.ctx.weight_dtype)


def _fingerprint(images: list[Image.Image], resolution: int) -> str:
    """Which images at which size the cached latents belong to (any changed pixel changes it)."""
    digest = hashlib.sha256(str(resolution).encode())
    for image in images:
        digest.update(f"{image.size}{image.mode}".encode())
        digest.update(image.tobytes())
    return digest.hexdigest()


def _read_latent_cache(path: Path, images: list[Image.Image], resolution: int) -> dict[str, torch.Tensor] | None:
    """The cached VAE moments of exactly these images, or None (missing, stale or unreadable)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("fingerprint") != _fingerprint(images, resolution):
                return None
            return {key: f.get_tensor(key) for key in f.keys()}
    except Exception:  # noqa: BLE001 - a damaged cache is re-encoded, never trusted
        return None


def _write_latent_cache(path: Path, images, resolution: int, moments: torch.Tensor, flipped: torch.Tensor | None) -> None:
    tensors = {"moments": moments.detach().cpu().contiguous()}
    if flipped is not None:
        tensors["flipped"] = flipped.detach().cpu().contiguous()
    staging = path.with_name(path.name + ".tmp")
    save_file(tensors, str(staging), metadata={"fingerprint": _fingerprint(images, resolution)})
    os.replace(staging, path)
