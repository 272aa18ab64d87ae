"""Model families behind one interface: what a method asks of the model it trains.

A method never asks which model it trains: it noises latents, calls the denoiser for its
prediction, compares it with the family's target, looks forward to x0, and encodes prompts, all
through a `ModelFamily`. The U-Net families (SD 1.x/2.x, SDXL: epsilon or v, DDPM noising) and the
flow-matching transformers (FLUX.1: velocity, x_t = (1 - s) x0 + s eps) implement it. Latents are
(B, C, H, W) in both: FLUX's 2x2 token packing happens inside `predict`.

Timesteps: U-Nets take integer t in [0, T); flow families carry t = 1000 s (s = sigma in [0, 1]),
the scale the transformers and the DPG timestep weightings use.
"""

from __future__ import annotations

import math
import re

import torch
from torch._subclasses.fake_tensor import FakeTensor

from rewardbooth import diffusion, flow
from rewardbooth.config import FlowConfig
from rewardbooth.diffusion import NoisedBatch, TextConditioning
from rewardbooth.models.lora import UNET_ATTENTION_TARGETS, block_linear_targets

# diffusers is imported inside the functions that use it, so importing this module stays cheap.


class ModelFamily:
    name = ""
    flow_matching = False

    def __init__(self, components):
        self.components = components

    # --- latents ------------------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        """Channels of the latents the denoiser takes (the model space this interface works in)."""
        return int(diffusion.vae_latent_channels(self.components.vae.config))

    @property
    def latent_scale(self) -> int:
        """Pixels per latent of the model space: the VAE's downsampling (FLUX.2: twice that, patchified)."""
        return self.components.vae_scale_factor

    def latents_from_moments(self, moments: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """x0 from cached VAE posterior moments, in the model's latent space."""
        return diffusion.sample_latents(moments, self.components.latent_scaling, generator)

    def latents_to_vae(self, latents: torch.Tensor) -> torch.Tensor:
        """The VAE decoder's input for model-space latents."""
        return latents / self.components.latent_scaling

    # --- the regression -----------------------------------------------------------------------
    def add_noise(self, x0: torch.Tensor, generator: torch.Generator | None = None, timesteps: torch.Tensor | None = None,
                  noise: torch.Tensor | None = None, offset: float = 0.0) -> NoisedBatch:
        raise NotImplementedError

    def predict(self, denoiser, noisy: torch.Tensor, timesteps: torch.Tensor, text: TextConditioning) -> torch.Tensor:
        raise NotImplementedError

    def target(self, batch: NoisedBatch) -> torch.Tensor:
        raise NotImplementedError

    def predict_x0(self, noisy: torch.Tensor, prediction: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Look-forward: the clean latent one denoiser call implies (DPG's x0_hat)."""
        raise NotImplementedError

    def step_back(self, noisy: torch.Tensor, prediction: torch.Tensor, timesteps: torch.Tensor, stride: int) -> torch.Tensor:
        """One deterministic sampler step from t to t - stride (DPG's ablation without look-forward)."""
        raise NotImplementedError

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio per sample (shape B)."""
        raise NotImplementedError

    def error_weights(self, timesteps: torch.Tensor, snr_gamma: float | None) -> torch.Tensor | None:
        """Per-sample weights of the denoising errors (None: unweighted)."""
        raise NotImplementedError

    def denoising_error(self, denoiser, batch: NoisedBatch, text: TextConditioning) -> torch.Tensor:
        """Per-sample ||prediction - target||^2: DreamBooth's loss and RPO's e(.)."""
        return diffusion.per_sample_mse(self.predict(denoiser, batch.noisy, batch.timesteps, text), self.target(batch))

    # --- text ---------------------------------------------------------------------------------
    @property
    def text_dim(self) -> int:
        """Width of the text conditioning's hidden states."""
        raise NotImplementedError

    def encode_prompts(self, encoders: list, prompts: list[str], resolution: int) -> TextConditioning:
        raise NotImplementedError

    def dummy_conditioning(self, batch: int, dtype: torch.dtype, device) -> TextConditioning:
        raise NotImplementedError

    def probe(self, denoiser, batch: int, latent_size: int, dtype: torch.dtype, device):
        """One training forward of the denoiser at `batch` (loss included), for the memory estimate."""

        def run():
            noisy = torch.zeros(batch, self.latent_channels, latent_size, latent_size, dtype=dtype, device=device)
            timesteps = torch.full((batch,), 500, dtype=torch.long, device=device)
            prediction = self.predict(denoiser, noisy, timesteps, self.dummy_conditioning(batch, dtype, device))
            return diffusion.per_sample_mse(prediction, torch.zeros_like(prediction)).mean()

        return run

    # --- sampling -----------------------------------------------------------------------------
    def pipeline(self, denoiser=None, text_encoders: list | None = None, scheduler: str = "dpm"):
        raise NotImplementedError

    # --- adapters -----------------------------------------------------------------------------
    def lora_targets(self, preset: str) -> list[str]:
        """peft target names of an adapter.targets preset: "attention" or "all-linear" (in the blocks)."""
        return block_linear_targets(self.components.unet, attention_only=preset == "attention")


class UNetFamily(ModelFamily):
    """SD 1.x / 2.x and SDXL: DDPM noising, epsilon or v targets (diffusion.py)."""

    def __init__(self, components, sdxl: bool = False):
        super().__init__(components)
        self.sdxl = sdxl
        self.name = "sdxl" if sdxl else "sd"

    @property
    def scheduler(self):
        return self.components.noise_scheduler

    def add_noise(self, x0, generator=None, timesteps=None, noise=None, offset=0.0) -> NoisedBatch:
        return diffusion.add_noise(self.scheduler, x0, generator, timesteps=timesteps, noise=noise, offset=offset)

    def predict(self, denoiser, noisy, timesteps, text) -> torch.Tensor:
        return diffusion.unet_output(denoiser, noisy, timesteps, text)

    def target(self, batch) -> torch.Tensor:
        return diffusion.training_target(self.scheduler, batch)

    def predict_x0(self, noisy, prediction, timesteps) -> torch.Tensor:
        return diffusion.predict_x0(self.scheduler, noisy, prediction, timesteps)

    def step_back(self, noisy, prediction, timesteps, stride) -> torch.Tensor:
        return diffusion.step_back(self.scheduler, noisy, prediction, timesteps, stride)

    def snr(self, timesteps) -> torch.Tensor:
        return diffusion.snr(self.scheduler, timesteps)

    def error_weights(self, timesteps, snr_gamma) -> torch.Tensor | None:
        return None if snr_gamma is None else diffusion.min_snr_weights(self.scheduler, timesteps, snr_gamma)

    def lora_targets(self, preset) -> list[str]:
        # SD's attention list as diffusers' scripts name it (the same modules; names kept for existing runs)
        return list(UNET_ATTENTION_TARGETS) if preset == "attention" else super().lora_targets(preset)

    @property
    def text_dim(self) -> int:
        return int(self.components.unet.config.cross_attention_dim)  # SDXL: both encoders' widths

    def encode_prompts(self, encoders, prompts, resolution) -> TextConditioning:
        c = self.components
        if self.sdxl:
            return diffusion.encode_sdxl_prompts(c.tokenizers, encoders, prompts, resolution)
        return TextConditioning(diffusion.encode_prompts(c.tokenizer, encoders[0], prompts))

    def dummy_conditioning(self, batch, dtype, device) -> TextConditioning:
        return diffusion.dummy_conditioning(self.components.unet, batch, dtype, device)

    def pipeline(self, denoiser=None, text_encoders=None, scheduler="dpm"):
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

        c = self.components
        scheduler_cls = {"dpm": DPMSolverMultistepScheduler, "ddim": DDIMScheduler}[scheduler]
        encoders = text_encoders or c.text_encoders
        parts = dict(vae=c.vae, text_encoder=encoders[0], tokenizer=c.tokenizer, unet=denoiser if denoiser is not None else c.unet,
                     scheduler=scheduler_cls.from_config(c.noise_scheduler.config))
        if self.sdxl:
            return StableDiffusionXLPipeline(**parts, text_encoder_2=encoders[1], tokenizer_2=c.tokenizer_2,
                                             force_zeros_for_empty_prompt=c.force_zeros_for_empty_prompt, add_watermarker=False)
        return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


class FlowFamily(ModelFamily):
    """Flow-matching transformers: x_t = (1 - s) x0 + s eps, the velocity v = eps - x0 as target,
    sigma drawn by flow.weighting and shifted as the model samples, 16-channel latents with a shift."""

    flow_matching = True

    def __init__(self, components, settings: FlowConfig | None = None):
        super().__init__(components)
        self.settings = settings or FlowConfig()

    def latents_from_moments(self, moments, generator) -> torch.Tensor:
        shift = float(self.components.vae.config.shift_factor or 0.0)
        mean, logvar = moments.chunk(2, dim=1)
        moments = torch.cat([mean - shift, logvar], dim=1)  # (z - shift) * scale, sampled like SD's latents
        return diffusion.sample_latents(moments, self.components.latent_scaling, generator)

    def latents_to_vae(self, latents) -> torch.Tensor:
        return latents / self.components.latent_scaling + float(self.components.vae.config.shift_factor or 0.0)

    def shift_for(self, latents: torch.Tensor) -> float:
        """The shift k of s' = k s / (1 + (k - 1) s): flow.shift, else the model's own as it samples
        (FLUX.1: exp(mu), mu from the packed token count; SD3: its scheduler's fixed shift)."""
        if self.settings.shift is not None:
            return self.settings.shift
        config = self.components.noise_scheduler.config
        if not config.get("use_dynamic_shifting", False):
            return float(config.get("shift", 1.0))
        tokens = (latents.shape[-2] // 2) * (latents.shape[-1] // 2)
        mu = flow.flux_shift(tokens, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift)
        return math.exp(mu)

    def add_noise(self, x0, generator=None, timesteps=None, noise=None, offset=0.0) -> NoisedBatch:
        s = self.settings
        if noise is None and offset:
            device = generator.device if generator else x0.device
            noise = torch.randn(x0.shape, generator=generator, device=device)
            noise = (noise + offset * torch.randn((*x0.shape[:2], 1, 1), generator=generator, device=device)).to(x0)
        sigmas = None if timesteps is None else self.sigmas(timesteps)
        noised = flow.add_flow_noise(x0, generator, weighting=s.weighting, logit_mean=s.logit_mean, logit_std=s.logit_std,
                                     mode_scale=s.mode_scale, shift=self.shift_for(x0), sigmas=sigmas, noise=noise)
        return NoisedBatch(x0, noised.noise, noised.timesteps, noised.noisy)

    @staticmethod
    def sigmas(timesteps: torch.Tensor) -> torch.Tensor:
        return timesteps.float() / flow.NUM_TRAIN_TIMESTEPS

    def target(self, batch) -> torch.Tensor:
        return flow.flow_target(batch)  # the velocity eps - x0

    def predict_x0(self, noisy, prediction, timesteps) -> torch.Tensor:
        return flow.predict_x0_flow(noisy, prediction, self.sigmas(timesteps))

    def step_back(self, noisy, prediction, timesteps, stride) -> torch.Tensor:
        to = (timesteps.float() - stride).clamp(min=0)
        return flow.step_back_flow(noisy, prediction, self.sigmas(timesteps), self.sigmas(to))

    def snr(self, timesteps) -> torch.Tensor:
        return flow.flow_snr(self.sigmas(timesteps))

    def error_weights(self, timesteps, snr_gamma) -> torch.Tensor | None:
        if self.settings.loss_weighting == "none":
            return None
        return flow.loss_weights(self.sigmas(timesteps), self.settings.loss_weighting)

    @property
    def text_dim(self) -> int:
        return int(self.components.unet.config.joint_attention_dim)

    def _pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.components.pipeline_class)

    def _parts(self, denoiser, encoders: list) -> dict:
        c = self.components
        parts = dict(vae=c.vae, transformer=denoiser if denoiser is not None else c.unet)
        for i, (encoder, tokenizer) in enumerate(zip(encoders, c.tokenizers)):
            suffix = f"_{i + 1}" if i else ""
            parts[f"text_encoder{suffix}"], parts[f"tokenizer{suffix}"] = encoder, tokenizer
        return parts

    def _prompt_pipeline(self, encoders: list):
        """The family's pipeline over `encoders`, for its own `encode_prompt` (how it conditions, kept in one place)."""
        return self._pipeline_class()(scheduler=self.components.noise_scheduler, **self._parts(None, encoders))

    def embedded_guidance(self, batch: int, device) -> torch.Tensor | None:
        """flow.guidance for each sample where the transformer embeds a guidance value (FLUX.1-dev), else None. Read
        from the unwrapped transformer's config: the denoiser passed to predict may be a DDP wrapper without one."""
        if not self.components.unet.config.get("guidance_embeds", False):
            return None
        return torch.full((batch,), self.settings.guidance, device=device, dtype=torch.float32)

    def pipeline(self, denoiser=None, text_encoders=None, scheduler="dpm"):
        from diffusers import FlowMatchEulerDiscreteScheduler

        parts = self._parts(denoiser, text_encoders or self.components.text_encoders)
        return self._pipeline_class()(scheduler=FlowMatchEulerDiscreteScheduler.from_config(self.components.noise_scheduler.config),
                                      **parts)

    def dummy_conditioning(self, batch, dtype, device) -> TextConditioning:
        config = self.components.unet.config
        return TextConditioning(torch.zeros(batch, self.max_sequence_length, config.joint_attention_dim, dtype=dtype, device=device),
                                torch.zeros(batch, config.pooled_projection_dim, dtype=dtype, device=device))


class FluxFamily(FlowFamily):
    """FLUX.1 (dev, schnell): a velocity-predicting transformer over 2x2-packed 16-channel latents,
    CLIP pooled + T5 hidden text conditioning, an embedded guidance value on guidance-distilled models."""

    name = "flux"
    max_sequence_length = 512  # T5 tokens, as FluxPipeline encodes them

    def predict(self, denoiser, noisy, timesteps, text) -> torch.Tensor:
        b, c, h, w = noisy.shape
        guidance = self.embedded_guidance(b, noisy.device)
        out = denoiser(hidden_states=flow.pack_latents(noisy), timestep=self.sigmas(timesteps).to(noisy.dtype), guidance=guidance,
                       pooled_projections=text.pooled, encoder_hidden_states=text.hidden,
                       txt_ids=torch.zeros(text.hidden.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
                       img_ids=flow.latent_image_ids(h, w, noisy.device, noisy.dtype), return_dict=False)[0]
        return flow.unpack_latents(out, h, w, c)

    def encode_prompts(self, encoders, prompts, resolution) -> TextConditioning:
        pipe = self._prompt_pipeline(encoders)
        hidden, pooled, _ = pipe.encode_prompt(prompts, prompt_2=prompts, device=self.components.unet.device,
                                               max_sequence_length=self.max_sequence_length)
        return TextConditioning(hidden, pooled)


class Flux2Family(FlowFamily):
    """FLUX.2 [klein]: a velocity-predicting transformer over the 32-channel VAE's latents, patchified
    2x2 into 128 channels and normalised by the VAE's batch-norm statistics (that is the model space
    here: x0, noise and velocity all live in it); Qwen3 hidden states as the only text conditioning,
    no pooled vector; no guidance embedding on the base models (real classifier-free guidance)."""

    name = "flux2"
    max_sequence_length = 512  # Qwen3 tokens, as Flux2KleinPipeline encodes them

    @property
    def latent_channels(self) -> int:
        return 4 * int(self.components.vae.config.latent_channels)

    @property
    def latent_scale(self) -> int:
        return 2 * self.components.vae_scale_factor

    def _batch_norm(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vae = self.components.vae
        mean = vae.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
        return mean.to(like), std.to(like)

    def latents_from_moments(self, moments, generator) -> torch.Tensor:
        patches = self._pipeline_class()._patchify_latents(diffusion.sample_latents(moments, 1.0, generator))
        bn_mean, bn_std = self._batch_norm(patches)
        return (patches - bn_mean) / bn_std

    def latents_to_vae(self, latents) -> torch.Tensor:
        bn_mean, bn_std = self._batch_norm(latents)
        return self._pipeline_class()._unpatchify_latents(latents * bn_std + bn_mean)

    def shift_for(self, latents) -> float:
        """flow.shift, else the shift FLUX.2's pipeline samples with at this token count and 50 steps
        (its empirical mu depends on the step count too; 50 is the base models' default)."""
        if self.settings.shift is not None:
            return self.settings.shift
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        return math.exp(compute_empirical_mu(latents.shape[-2] * latents.shape[-1], num_steps=50))

    def predict(self, denoiser, noisy, timesteps, text) -> torch.Tensor:
        b, c, h, w = noisy.shape
        pipeline = self._pipeline_class()
        guidance = self.embedded_guidance(b, noisy.device)
        tokens = noisy.reshape(b, c, h * w).transpose(1, 2)  # raster order, as the pipeline packs them
        out = denoiser(hidden_states=tokens, timestep=self.sigmas(timesteps).to(noisy.dtype), guidance=guidance,
                       encoder_hidden_states=text.hidden, txt_ids=pipeline._prepare_text_ids(text.hidden).to(noisy.device),
                       img_ids=pipeline._prepare_latent_ids(noisy).to(noisy.device), return_dict=False)[0]
        return out[:, : h * w].transpose(1, 2).reshape(b, c, h, w)

    def encode_prompts(self, encoders, prompts, resolution) -> TextConditioning:
        pipe = self._prompt_pipeline(encoders)
        hidden, _ = pipe.encode_prompt(prompts, device=self.components.unet.device, max_sequence_length=self.max_sequence_length)
        return TextConditioning(hidden)

    def dummy_conditioning(self, batch, dtype, device) -> TextConditioning:
        width = self.components.unet.config.joint_attention_dim
        return TextConditioning(torch.zeros(batch, self.max_sequence_length, width, dtype=dtype, device=device))


# Z-Image's repeated blocks (the main layers and the image and text streams' refiners) and its attention modules.
_ZIMAGE_BLOCK = re.compile(r"^(?:layers|noise_refiner|context_refiner)\.\d+\.(?P<inner>.+)$")
_ZIMAGE_ATTENTION = re.compile(r"(?:^|\.)attention\.")


class ZImageFamily(FlowFamily):
    """Z-Image (Turbo, base): a single-stream transformer over FLUX.1's VAE latents (16 channels, shifted
    and scaled: the model space is the VAE's; its 2x2 patches are made inside), conditioned on one Qwen3
    hidden state (the second-to-last layer) of the chat-templated prompt, each prompt's padding dropped
    (`TextConditioning.mask`); no pooled vector, no guidance embedding (Turbo samples without CFG, base
    with real CFG). The transformer takes the time as 1 - sigma and predicts x0 - eps, the velocity's
    negative (ZImagePipeline negates it): `predict` turns both into this interface's convention."""

    name = "zimage"
    max_sequence_length = 512  # Qwen3 tokens a prompt is truncated to, as ZImagePipeline encodes them
    probe_tokens = 64  # text tokens of the memory estimate's forward: a long DreamBooth prompt with its chat template

    @property
    def text_dim(self) -> int:
        return int(self.components.unet.config.cap_feat_dim)

    def predict(self, denoiser, noisy, timesteps, text) -> torch.Tensor:
        hidden = list(text.hidden) if text.mask is None else [h[m] for h, m in zip(text.hidden, text.mask)]
        images = list(noisy.unsqueeze(2).unbind(0))  # one (C, frames = 1, H, W) latent per image, as the pipeline passes them
        time = 1 - self.sigmas(timesteps)  # float32 in any precision, as the pipeline passes it
        out = denoiser(images, time, hidden, return_dict=False)[0]
        return -torch.stack(out).squeeze(2)

    def encode_prompts(self, encoders, prompts, resolution) -> TextConditioning:
        pipe = self._prompt_pipeline(encoders)
        # a copy: the pipeline writes the chat-templated prompts into the list it is given
        per_prompt, _ = pipe.encode_prompt(list(prompts), device=self.components.unet.device, do_classifier_free_guidance=False,
                                           max_sequence_length=self.max_sequence_length)
        return fixed_width(per_prompt, self.max_sequence_length)

    def dummy_conditioning(self, batch, dtype, device) -> TextConditioning:
        return TextConditioning(torch.zeros(batch, self.probe_tokens, self.text_dim, dtype=dtype, device=device))

    def probe(self, denoiser, batch, latent_size, dtype, device):
        """The forward on fake tensors; the rotary table the transformer caches on first use is put back afterwards,
        so no fake tensor stays behind in it for the real steps."""
        run, rope = super().probe(denoiser, batch, latent_size, dtype, device), self.components.unet.rope_embedder

        def run_keeping_the_rotary_cache():
            cached = rope.freqs_cis
            try:
                return run()
            finally:
                rope.freqs_cis = cached

        return run_keeping_the_rotary_cache

    def lora_targets(self, preset) -> list[str]:
        return block_linear_targets(self.components.unet, attention_only=preset == "attention", block=_ZIMAGE_BLOCK,
                                    attention=_ZIMAGE_ATTENTION)


class QwenImageFamily(FlowFamily):
    """Qwen-Image: a velocity-predicting double-stream MMDiT over 2x2-packed 16-channel latents (packed as FLUX.1's, the
    time as s = t / 1000, the output the velocity itself: QwenImagePipeline steps with it unchanged), conditioned on the
    last Qwen2.5-VL hidden state of the chat-templated prompt with the template's system prefix dropped, each prompt's
    padding masked (`TextConditioning.mask`, passed as `encoder_hidden_states_mask`); no pooled vector, no guidance
    embedding (real CFG: `true_cfg_scale` with a negative prompt). Its VAE is a video VAE: latents carry a frame axis
    (B, C, 1, H, W) there and are normalised per channel by the VAE's latents_mean / latents_std; the model space is
    (z - mean) / std without that axis, which the latent maps drop and add."""

    name = "qwenimage"
    max_sequence_length = 512  # prompt tokens after the template prefix, QwenImagePipeline's default
    probe_tokens = 64  # text tokens of the memory estimate's forward: a long DreamBooth prompt and the template's tail

    def _statistics(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        config = self.components.vae.config
        mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1)
        std = torch.tensor(config.latents_std).view(1, -1, 1, 1)
        return mean.to(like), std.to(like)

    def latents_from_moments(self, moments, generator) -> torch.Tensor:
        z = diffusion.sample_latents(moments[:, :, 0], 1.0, generator)  # the video VAE's moments: (B, 2C, frames = 1, H, W)
        mean, std = self._statistics(z)
        return (z - mean) / std

    def latents_to_vae(self, latents) -> torch.Tensor:
        mean, std = self._statistics(latents)
        return (latents * std + mean).unsqueeze(2)  # the frame axis the video VAE decodes

    def predict(self, denoiser, noisy, timesteps, text) -> torch.Tensor:
        b, c, h, w = noisy.shape
        hidden, mask = text.hidden, text.mask
        # fake: the memory estimate's prompts, whose lengths are data it lacks; the trim would keep them whole
        if mask is not None and not isinstance(mask, FakeTensor):
            longest = int(mask.sum(1).max())  # the batch's longest prompt; past it every row is padding
            hidden, mask = hidden[:, :longest], mask[:, :longest]
            mask = None if bool(mask.all()) else mask  # as the pipeline passes a batch without padding
        out = denoiser(hidden_states=flow.pack_latents(noisy), timestep=self.sigmas(timesteps).to(noisy.dtype),
                       guidance=self.embedded_guidance(b, noisy.device), encoder_hidden_states=hidden,
                       encoder_hidden_states_mask=mask, img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
        return flow.unpack_latents(out, h, w, c)

    def encode_prompts(self, encoders, prompts, resolution) -> TextConditioning:
        pipe = self._prompt_pipeline(encoders)
        hidden, mask = pipe.encode_prompt(list(prompts), device=self.components.unet.device,
                                          max_sequence_length=self.max_sequence_length)
        # the pipeline pads each prompt on the right; None: no prompt of this call was padded
        return fixed_width(list(hidden) if mask is None else [h[m.bool()] for h, m in zip(hidden, mask)], self.max_sequence_length)

    def dummy_conditioning(self, batch, dtype, device) -> TextConditioning:
        """probe_tokens of text per image; a batch of several holds a shorter prompt too (DreamBooth's class prompt, RPO's
        negatives), whose padding is masked, so the estimate's step builds the attention mask a real one does. The first
        spans the whole width, so predict's trim to the longest prompt (which it cannot read from fake tensors) keeps
        them whole."""
        hidden = torch.zeros(batch, self.probe_tokens, self.text_dim, dtype=dtype, device=device)
        if batch == 1:
            return TextConditioning(hidden)
        mask = torch.ones(batch, self.probe_tokens, dtype=torch.bool, device=device)
        mask[1:, self.probe_tokens // 2 :] = False
        return TextConditioning(hidden, mask=mask)

    def probe(self, denoiser, batch, latent_size, dtype, device):
        """The forward on fake tensors; the rotary tables the transformer's position embedding memoises (per size and
        device, in functools caches) are dropped afterwards, so no fake tensor computed by the probe serves a real step."""
        run, rope = super().probe(denoiser, batch, latent_size, dtype, device), self.components.unet.pos_embed

        def run_forgetting_the_rotary_tables():
            try:
                return run()
            finally:
                for cache in _method_caches(type(rope)):
                    cache.cache_clear()

        return run_forgetting_the_rotary_tables


def fixed_width(rows: list[torch.Tensor], width: int) -> TextConditioning:
    """Each prompt's own tokens (L_i, D) padded to `width` rows with a mask of its own ones: cached prompts of any length
    then stack into any batch."""
    first = rows[0]
    hidden = first.new_zeros(len(rows), width, first.shape[-1])
    mask = torch.zeros(hidden.shape[:2], dtype=torch.bool, device=first.device)
    for i, tokens in enumerate(rows):
        hidden[i, : len(tokens)], mask[i, : len(tokens)] = tokens, True
    return TextConditioning(hidden, mask=mask)


def _method_caches(cls) -> list:
    """The functools.lru_cache objects behind a class's memoised methods (diffusers' lru_cache_unless_export keeps its
    cache in the closure of the function it returns)."""
    caches = []
    for function in vars(cls).values():
        if hasattr(function, "cache_clear"):
            caches.append(function)
        caches += [cell.cell_contents for cell in getattr(function, "__closure__", None) or ()
                   if hasattr(cell.cell_contents, "cache_clear")]
    return caches


class SD3Family(FlowFamily):
    """SD3 / SD3.5: a velocity-predicting MMDiT over 16-channel latents (patches made inside), two CLIP
    encoders' pooled outputs and their hidden states joined with T5's; a fixed scheduler shift."""

    name = "sd3"
    clip_tokens = 77

    @property
    def max_sequence_length(self) -> int:
        return sd3_t5_tokens(self.components.text_encoder_3)

    def _parts(self, denoiser, encoders) -> dict:
        return {"text_encoder_3": None, "tokenizer_3": None, **super()._parts(denoiser, encoders)}  # SD3 samples without T5 too

    def predict(self, denoiser, noisy, timesteps, text) -> torch.Tensor:
        return denoiser(hidden_states=noisy, timestep=timesteps.to(noisy.dtype), encoder_hidden_states=text.hidden,
                        pooled_projections=text.pooled, return_dict=False)[0]

    def encode_prompts(self, encoders, prompts, resolution) -> TextConditioning:
        pipe = self._prompt_pipeline(encoders)
        hidden, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, device=self.components.unet.device,
                                                  do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length)
        return TextConditioning(hidden, pooled)

    def dummy_conditioning(self, batch, dtype, device) -> TextConditioning:
        config = self.components.unet.config
        return TextConditioning(torch.zeros(batch, self.clip_tokens + self.max_sequence_length, config.joint_attention_dim,
                                            dtype=dtype, device=device),
                                torch.zeros(batch, config.pooled_projection_dim, dtype=dtype, device=device))


def sd3_t5_tokens(t5) -> int:
    """T5 tokens SD3 is conditioned on: 256, as StableDiffusion3Pipeline encodes them; none for a model without T5
    (mini-flow, trained without one: the pipeline would feed 256 zero tokens, 4.7x the cost of its train step)."""
    return 256 if t5 is not None else 0


def guidance_options(pipe, guidance: float, negative_prompt: str | None, count: int) -> dict:
    """A sampling call's guidance arguments. QwenImagePipeline's classifier-free guidance is `true_cfg_scale` with a
    negative prompt (its `guidance_scale` is for guidance-distilled models; this one ignores it): on above 1, with the
    model card's " " as the negative prompt where none is given; off (1, no negative prompt) otherwise."""
    negative = [negative_prompt] * count if negative_prompt else None
    if type(pipe).__name__ == "QwenImagePipeline":
        return {"true_cfg_scale": guidance, "negative_prompt": negative or [" "] * count} if guidance > 1 else {"true_cfg_scale": 1.0}
    return {"guidance_scale": guidance, **({"negative_prompt": negative} if negative else {})}


def pipeline_call_options(pipe) -> dict:
    """What a sampling call must add to the prompt so the pipeline conditions as the family trains (SD3 without T5)."""
    if type(pipe).__name__ == "StableDiffusion3Pipeline" and pipe.text_encoder_3 is None:
        return {"max_sequence_length": sd3_t5_tokens(None)}
    return {}


def pipeline_denoiser(pipe):
    """The denoiser of a sampling pipeline: its U-Net or its transformer."""
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def initial_latents(pipe, generators: list[torch.Generator], resolution: int | None) -> tuple[torch.Tensor, int]:
    """Starting noise for one sampler call, one CPU generator per image (the same image on any device),
    in the layout the pipeline takes (FLUX.1, Qwen-Image: 2x2-packed tokens; FLUX.2: its 2x2-patchified 128-channel
    latents); and the image side in pixels."""
    denoiser = pipeline_denoiser(pipe)
    # ZImagePipeline names no default size anywhere but in its __call__ (1024 px, FLUX.1's 128 latents)
    default = getattr(pipe, "default_sample_size", None) or denoiser.config.get("sample_size") or 128
    side = resolution or default * pipe.vae_scale_factor
    patchified = type(pipe).__name__.startswith("Flux2")
    scale = pipe.vae_scale_factor * (2 if patchified else 1)
    channels = diffusion.vae_latent_channels(pipe.vae.config)
    channels *= 4 if patchified else 1
    latents = torch.stack([torch.randn((channels, side // scale, side // scale), generator=g) for g in generators])
    if type(pipe).__name__ in ("FluxPipeline", "QwenImagePipeline"):
        latents = flow.pack_latents(latents)
    return latents.to(device=denoiser.device, dtype=denoiser.dtype), side
