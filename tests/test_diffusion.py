"""The shared diffusion primitives."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from rewardbooth import diffusion


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_look_forward_recovers_x0_from_the_true_target(prediction_type):
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 4, 8, 8, generator=g)
    batch = diffusion.add_noise(scheduler, x0, g, timesteps=torch.tensor([0, 10, 200, 500, 800, 999]))
    perfect = diffusion.training_target(scheduler, batch)  # what an ideal U-Net would output
    torch.testing.assert_close(diffusion.predict_x0(scheduler, batch.noisy, perfect, batch.timesteps), x0, rtol=1e-4, atol=1e-3)
    # A wrong prediction moves x0_hat: the look-forward really depends on the U-Net output.
    assert not torch.allclose(diffusion.predict_x0(scheduler, batch.noisy, perfect + 0.1, batch.timesteps), x0, atol=1e-3)


def test_per_sample_mse_and_cached_latents():
    a, b = torch.zeros(3, 2, 2, 2), torch.ones(3, 2, 2, 2) * torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1, 1)
    assert diffusion.per_sample_mse(a, b).tolist() == [1.0, 4.0, 9.0]
    moments = torch.cat([torch.full((1, 4, 2, 2), 2.0), torch.full((1, 4, 2, 2), -60.0)], dim=1)  # mean 2, ~zero variance
    x0 = diffusion.sample_latents(moments, scaling=0.5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x0, torch.full((1, 4, 2, 2), 1.0), atol=1e-4, rtol=0)
