"""Flow-matching primitives for rectified-flow transformers (FLUX.1, SD3 / SD3.5).

The counterpart of `rewardbooth.diffusion` (the U-Net / DDPM primitives). Notation: x0 clean latent,
eps noise, s = sigma in [0, 1] the noise level (s = 0 clean, s = 1 pure noise):

    x_s = (1 - s) x0 + s eps          the straight path from data to noise
    v   = dx_s / ds = eps - x0        what the transformer predicts (the velocity)
    x0  = x_s - s v                   the look-forward (DPG's x0_hat) implied by one call

Timesteps. Both transformers are fed t = 1000 s, but not in the same way: SD3's transformer takes
t = 1000 s directly (`FlowNoised.timesteps`); FLUX's transformer multiplies its `timestep` argument
by 1000 itself, so the FLUX pipeline passes `timestep / 1000`, i.e. the sigmas (`FlowNoised.sigmas`).

Shifts (both push s toward the noisy end; both fix 0 and 1):
  * SD3 / SD3.5 use the static shift  s' = k s / (1 + (k - 1) s)  (`shift_sigmas`, k = the
    scheduler's `shift`, 3.0 in their configs), at inference and, optionally, when sampling
    training noise levels (`add_flow_noise(..., shift=k)`).
  * FLUX.1-dev uses the resolution-dependent exponential time shift
    s' = e^mu / (e^mu + (1/s - 1))  (`time_shift_exponential`) with mu = `flux_shift(seq_len)`
    (the scheduler's `use_dynamic_shifting`). It is the static shift with k = e^mu, so training
    with `shift=math.exp(flux_shift(seq_len))` matches the inference schedule's resolution shift.

Only FLUX packs latents into 2x2 patches outside the model (`pack_latents`, `latent_image_ids`);
SD3's transformer patchifies internally and takes (B, C, H, W) latents.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rewardbooth.diffusion import per_sample_mse

NUM_TRAIN_TIMESTEPS = 1000

# Our names for the training-time sigma densities -> diffusers' `weighting_scheme` names.
SIGMA_DENSITIES = {"uniform": "none", "none": "none", "logit_normal": "logit_normal", "mode": "mode"}
LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


def _expand(sigmas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample sigmas (B,) shaped to broadcast over `like` (B, ...), in its dtype and device."""
    return sigmas.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.ndim - 1)))


@dataclass
class FlowNoised:
    """One noised batch. `timesteps` (= 1000 sigmas) is what SD3's transformer takes; FLUX's takes
    `sigmas` (its pipeline passes timestep / 1000)."""

    x0: torch.Tensor
    noise: torch.Tensor
    sigmas: torch.Tensor  # (B,) float32 in [0, 1]
    noisy: torch.Tensor
    timesteps: torch.Tensor | None = None  # (B,) float32, sigmas * 1000; filled in when omitted

    def __post_init__(self):
        if self.timesteps is None:
            self.timesteps = self.sigmas * NUM_TRAIN_TIMESTEPS


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's static shift s' = k s / (1 + (k - 1) s) (as FlowMatchEulerDiscreteScheduler(shift=k))."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flux_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
               base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's resolution-dependent mu: linear in the packed sequence length ((H/2)(W/2) of the
    latent), base_shift at base_seq_len, max_shift at max_seq_len. diffusers' own `calculate_shift`."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    return calculate_shift(image_seq_len, base_seq_len, max_seq_len, base_shift, max_shift)


def time_shift_exponential(mu: float, sigmas: torch.Tensor | float) -> torch.Tensor | float:
    """FLUX's dynamic shift s' = e^mu / (e^mu + (1/s - 1)) (the scheduler's exponential
    `time_shift` with exponent 1); maps 0 to 0 and 1 to 1. Equals `shift_sigmas(s, e^mu)`."""
    if not isinstance(sigmas, torch.Tensor):
        return float(time_shift_exponential(mu, torch.tensor(float(sigmas), dtype=torch.float64)))
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


def add_flow_noise(x0: torch.Tensor, generator: torch.Generator | None = None, *, weighting: str = "logit_normal",
                   logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29, shift: float = 1.0,
                   sigmas: torch.Tensor | float | None = None, noise: torch.Tensor | None = None) -> FlowNoised:
    """Draw eps and s unless given, and form x_s = (1 - s) x0 + s eps.

    s: u from diffusers' `compute_density_for_timestep_sampling` with the SD3 paper's densities,
    "uniform" (diffusers' "none"), "logit_normal" (sigmoid of N(logit_mean, logit_std)) or "mode"
    (mode_scale), then the static shift k s / (1 + (k - 1) s) with k = `shift` (1: none). Draws are
    continuous (not snapped to the scheduler's 1000 training sigmas as diffusers' scripts do), so a
    uniform draw can be exactly 0 (weight "sigma_sqrt" is then infinite). Given `sigmas` are used as
    they are (no shift). Noise is drawn first, then u, both from `generator` on its device.
    """
    if weighting not in SIGMA_DENSITIES:
        raise ValueError(f"unknown sigma density {weighting!r}; expected one of {sorted(SIGMA_DENSITIES)}")
    batch = x0.shape[0]
    device = generator.device if generator is not None else x0.device
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=device).to(device=x0.device, dtype=x0.dtype)
    if sigmas is None:
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling(
            weighting_scheme=SIGMA_DENSITIES[weighting], batch_size=batch, logit_mean=logit_mean,
            logit_std=logit_std, mode_scale=mode_scale, device=device, generator=generator)
        sigmas = shift_sigmas(u.float(), shift)
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32).to(x0.device)
    if sigmas.ndim == 0:
        sigmas = sigmas.expand(batch)
    if sigmas.shape != (batch,):
        raise ValueError(f"sigmas must have shape ({batch},), got {tuple(sigmas.shape)}")
    s = _expand(sigmas, x0)
    return FlowNoised(x0, noise, sigmas, (1 - s) * x0 + s * noise)


def flow_target(noised: FlowNoised) -> torch.Tensor:
    """What the transformer regresses to: the velocity v = eps - x0."""
    return noised.noise - noised.x0


def predict_x0_flow(noisy: torch.Tensor, velocity: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Look-forward: the clean latent implied by one transformer call, x_s - s v (DPG's x0_hat)."""
    return noisy - _expand(sigmas, noisy) * velocity


def step_back_flow(noisy: torch.Tensor, velocity: torch.Tensor, sigmas: torch.Tensor,
                   to_sigmas: torch.Tensor) -> torch.Tensor:
    """One Euler step x_{s'} = x_s + (s' - s) v (DPG's ablation without look-forward; s' < s denoises),
    the step FlowMatchEulerDiscreteScheduler takes."""
    return noisy + (_expand(to_sigmas, noisy) - _expand(sigmas, noisy)) * velocity


def loss_weights(sigmas: torch.Tensor, scheme: str = "none") -> torch.Tensor:
    """Per-sample loss weights from diffusers' `compute_loss_weighting_for_sd3`: "none" (1),
    "sigma_sqrt" (1 / s^2), "cosmap" (2 / (pi (1 - 2 s + 2 s^2))). Unknown names raise (diffusers
    silently falls back to ones)."""
    if scheme not in LOSS_WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {scheme!r}; expected one of {LOSS_WEIGHTINGS}")
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    return compute_loss_weighting_for_sd3(scheme, sigmas).float()


def flow_snr(sigmas: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio of x_s per sample, ((1 - s) / s)^2 (shape B), float32."""
    sigmas = sigmas.float()
    return ((1 - sigmas) / sigmas) ** 2


def flow_matching_error(prediction: torch.Tensor, noised: FlowNoised, scheme: str = "none") -> torch.Tensor:
    """Per-sample weighted ||prediction - v||^2 (shape B), float32: the flow-matching DreamBooth loss
    and RPO's e(.) for one transformer output."""
    return loss_weights(noised.sigmas, scheme).to(prediction.device) * per_sample_mse(prediction, flow_target(noised))


def _flux_pipeline():
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    return FluxPipeline


def _check_even(height: int, width: int) -> None:
    if height % 2 or width % 2:
        raise ValueError(f"FLUX packs 2x2 latent patches: latent height and width must be even, got {height}x{width}")


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents -> (B, (H/2)(W/2), 4C) tokens, FluxPipeline's layout: token i (W/2) + j
    holds the 2x2 patch at rows 2i.., columns 2j.., feature c*4 + 2 dy + dx."""
    batch, channels, height, width = latents.shape
    _check_even(height, width)
    return _flux_pipeline()._pack_latents(latents, batch, channels, height, width)


def unpack_latents(packed: torch.Tensor, height: int, width: int, channels: int) -> torch.Tensor:
    """Inverse of `pack_latents`: (B, (H/2)(W/2), 4C) -> (B, C, H, W), H and W in latent pixels
    (FluxPipeline._unpack_latents with a VAE scale factor of 1)."""
    _check_even(height, width)
    expected = ((height // 2) * (width // 2), 4 * channels)
    if tuple(packed.shape[1:]) != expected:
        raise ValueError(f"packed latents of shape {tuple(packed.shape)} do not hold {channels}x{height}x{width}")
    return _flux_pipeline()._unpack_latents(packed, height, width, 1)


def latent_image_ids(height: int, width: int, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """FLUX's positional ids for the packed tokens of an H x W latent (latent pixels, as
    `pack_latents` takes): ((H/2)(W/2), 3), row i (W/2) + j = (0, i, j). No batch dimension, as
    FluxPipeline passes them."""
    _check_even(height, width)
    return _flux_pipeline()._prepare_latent_image_ids(1, height // 2, width // 2, device, dtype)
