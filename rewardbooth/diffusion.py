"""The one set of diffusion primitives every method builds on.

Notation follows docs/methods.md: x0 clean latent, eps noise, t timestep,
x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, c text embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _tokens(tokenizer, prompts: list[str], device) -> torch.Tensor:
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)


def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """Text embeddings (last hidden state), padded to the tokenizer's max length as SD does."""
    return text_encoder(_tokens(tokenizer, prompts, text_encoder.device))[0]


@dataclass
class TextConditioning:
    """What the U-Net is conditioned on. SD: the hidden states. SDXL adds the second encoder's
    pooled embedding and the size/crop micro-conditioning (`time_ids`). Z-Image conditions each image
    on its own prompt's tokens only: `mask` says which rows of `hidden` those are (the rest is padding)."""

    hidden: torch.Tensor  # (B, L, D) cross-attention input
    pooled: torch.Tensor | None = None  # (B, P) SDXL only
    time_ids: torch.Tensor | None = None  # (B, 6): original size, crop top-left, target size
    mask: torch.Tensor | None = None  # (B, L) bool: the prompt's own tokens (Z-Image); None: every row counts

    def added_cond_kwargs(self) -> dict[str, torch.Tensor] | None:
        return None if self.pooled is None else {"text_embeds": self.pooled, "time_ids": self.time_ids}

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def detach(self) -> "TextConditioning":
        return TextConditioning(*(None if v is None else v.detach() for v in self._fields()))

    def __getitem__(self, index) -> "TextConditioning":
        return TextConditioning(*(None if v is None else v[index] for v in self._fields()))

    @staticmethod
    def stack(rows: list["TextConditioning"]) -> "TextConditioning":
        """Rows as returned by indexing with an int, stacked into a batch."""
        parts = zip(*(r._fields() for r in rows))
        return TextConditioning(*(None if p[0] is None else torch.stack(p) for p in parts))

    def _fields(self) -> tuple[torch.Tensor | None, ...]:
        """The tensors, in the order of the fields."""
        return self.hidden, self.pooled, self.time_ids, self.mask


def encode_sdxl_prompts(tokenizers, text_encoders, prompts: list[str], size: int) -> TextConditioning:
    """SDXL's conditioning as its pipeline builds it: both encoders' penultimate hidden states,
    concatenated; the second encoder's projected pooled output; time ids for an uncropped
    `size` x `size` image (our training images are resized and center-cropped to that size)."""
    hidden, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        out = encoder(_tokens(tokenizer, prompts, encoder.device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # the last encoder is CLIPTextModelWithProjection: text_embeds
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], device=pooled.device, dtype=pooled.dtype).repeat(len(prompts), 1)
    return TextConditioning(torch.cat(hidden, dim=-1), pooled, time_ids)


def unet_output(unet, noisy: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor | TextConditioning) -> torch.Tensor:
    """One U-Net call; `text` is SD hidden states or a TextConditioning (SD or SDXL)."""
    if isinstance(text, TextConditioning):
        return unet(noisy, timesteps, text.hidden, added_cond_kwargs=text.added_cond_kwargs()).sample
    return unet(noisy, timesteps, text).sample


def alphas_cumprod(scheduler, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """abar_t for each timestep, shaped to broadcast over `like` (B, C, H, W)."""
    abar = scheduler.alphas_cumprod.to(device=timesteps.device)[timesteps].to(like.dtype)
    return abar.view(-1, *([1] * (like.ndim - 1)))


@dataclass
class NoisedBatch:
    x0: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    noisy: torch.Tensor


def add_noise(scheduler, x0: torch.Tensor, generator: torch.Generator | None = None, timesteps: torch.Tensor | None = None,
              noise: torch.Tensor | None = None, offset: float = 0.0) -> NoisedBatch:
    """Draw eps and t (uniform over the training steps) unless given, and form x_t.

    `offset` > 0: offset noise, eps + offset * N(0, 1) constant over each image's channel, so the
    model learns to shift mean brightness too (it is also the regression target).
    """
    if noise is None:
        device = generator.device if generator else x0.device
        noise = torch.randn(x0.shape, generator=generator, device=device)
        if offset:
            noise = noise + offset * torch.randn((*x0.shape[:2], 1, 1), generator=generator, device=device)
        noise = noise.to(device=x0.device, dtype=x0.dtype)
    if timesteps is None:
        n = scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, n, (x0.shape[0],), generator=generator, device=generator.device if generator else x0.device)
        timesteps = timesteps.to(x0.device)
    return NoisedBatch(x0, noise, timesteps, scheduler.add_noise(x0, noise, timesteps))


def training_target(scheduler, batch: NoisedBatch) -> torch.Tensor:
    """What the U-Net regresses to: eps, or v = sqrt(abar) eps - sqrt(1-abar) x0."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return batch.noise
    if kind == "v_prediction":
        return scheduler.get_velocity(batch.x0, batch.noise, batch.timesteps)
    raise ValueError(f"unsupported prediction type {kind!r}")


def predict_x0(scheduler, noisy: torch.Tensor, model_output: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Look-forward: the clean latent implied by one U-Net call (DPG's x0_hat)."""
    abar = alphas_cumprod(scheduler, timesteps, noisy)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (noisy - (1 - abar).sqrt() * model_output) / abar.sqrt()
    if kind == "v_prediction":
        return abar.sqrt() * noisy - (1 - abar).sqrt() * model_output
    raise ValueError(f"unsupported prediction type {kind!r}")


def predict_eps(scheduler, noisy: torch.Tensor, model_output: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The noise implied by one U-Net call (epsilon models predict it; v: eps = sqrt(abar) v + sqrt(1-abar) x_t)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return model_output
    if kind == "v_prediction":
        abar = alphas_cumprod(scheduler, timesteps, noisy)
        return abar.sqrt() * model_output + (1 - abar).sqrt() * noisy
    raise ValueError(f"unsupported prediction type {kind!r}")


def step_back(scheduler, noisy: torch.Tensor, model_output: torch.Tensor, timesteps: torch.Tensor, stride: int) -> torch.Tensor:
    """One deterministic (DDIM) step from t to t - stride: DPG's ablation without look-forward."""
    x0_hat = predict_x0(scheduler, noisy, model_output, timesteps)
    eps_hat = predict_eps(scheduler, noisy, model_output, timesteps)
    abar_prev = alphas_cumprod(scheduler, (timesteps - stride).clamp(min=0), noisy)
    return abar_prev.sqrt() * x0_hat + (1 - abar_prev).sqrt() * eps_hat


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio abar_t / (1 - abar_t) per timestep (shape B)."""
    abar = scheduler.alphas_cumprod.to(device=timesteps.device)[timesteps].float()
    return abar / (1 - abar)


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al., ICCV 2023) per timestep: min(SNR, gamma) / SNR for
    epsilon targets, min(SNR, gamma) / (SNR + 1) for v targets (the weights of x0-space MSE, capped)."""
    ratio = snr(scheduler, timesteps)
    capped = ratio.clamp(max=gamma)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return capped / ratio
    if kind == "v_prediction":
        return capped / (ratio + 1)
    raise ValueError(f"unsupported prediction type {kind!r}")


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per batch element (shape B), computed in float32."""
    return F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(1)


def denoising_error(unet, scheduler, batch: NoisedBatch, text: torch.Tensor | TextConditioning) -> torch.Tensor:
    """Per-sample ||U-Net(x_t, t, c) - target||^2, the loss of DreamBooth and RPO's e(.)."""
    prediction = unet_output(unet, batch.noisy, batch.timesteps, text)
    return per_sample_mse(prediction, training_target(scheduler, batch))


def sample_latents(moments: torch.Tensor, scaling: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample x0 from cached VAE posterior moments (mean, logvar concatenated on channels)."""
    mean, logvar = moments.chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    eps = torch.randn(mean.shape, generator=generator, device=generator.device if generator else mean.device)
    return (mean + std * eps.to(device=mean.device, dtype=mean.dtype)) * scaling


@torch.no_grad()
def encode_moments(vae, pixels: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """VAE posterior moments of images in [-1, 1]; cached so the VAE runs once per image. A video VAE (Qwen-Image's)
    gets each image as one frame, (B, 3, 1, H, W), and gives moments with that frame axis: the family's latent map drops it."""
    out = []
    for chunk in pixels.split(batch_size):
        chunk = chunk.unsqueeze(2) if is_video_vae(vae.config) else chunk
        out.append(vae.encode(chunk.to(device=vae.device, dtype=vae.dtype)).latent_dist.parameters)
    return torch.cat(out)


def is_video_vae(vae_config) -> bool:
    """Whether a VAE (by its config) takes and gives (B, C, frames, H, W) (diffusers' Wan-style video VAEs, Qwen-Image's
    among them)."""
    return "temperal_downsample" in vae_config


def vae_downsampling(vae_config) -> int:
    """Pixels per latent of a VAE, from its config: AutoencoderKL's levels; a video VAE's (Qwen-Image's) one spatial
    halving per `temperal_downsample` entry."""
    if is_video_vae(vae_config):
        return 2 ** len(vae_config["temperal_downsample"])
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def vae_latent_channels(vae_config) -> int | None:
    """Latent channels of a VAE, by its config: AutoencoderKL's latent_channels, a video VAE's z_dim (None: neither)."""
    return vae_config.get("latent_channels", vae_config.get("z_dim"))


def dummy_conditioning(unet, batch: int, dtype: torch.dtype, device) -> TextConditioning:
    """Zero text conditioning of the shapes `unet` takes (SDXL: pooled text and size ids too)."""
    config = unet.config
    hidden = torch.zeros(batch, 77, config.cross_attention_dim, dtype=dtype, device=device)
    if config.addition_embed_type != "text_time":
        return TextConditioning(hidden)
    pooled_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    return TextConditioning(hidden, torch.zeros(batch, pooled_dim, dtype=dtype, device=device),
                            torch.zeros(batch, 6, dtype=dtype, device=device))
