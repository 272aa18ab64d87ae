"""Flow-matching primitives (FLUX.1, SD3.5): identities, and agreement with diffusers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_loss_weighting_for_sd3

from rewardbooth import flow

SIGMAS = torch.tensor([0.0, 1e-4, 0.02, 0.3, 0.5, 0.77, 0.98, 1 - 1e-4, 1.0])


def _noised(sigmas=SIGMAS, seed=0, shape=(4, 6, 6)):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(len(sigmas), *shape, generator=g)
    eps = torch.randn(len(sigmas), *shape, generator=g)
    return flow.add_flow_noise(x0, g, sigmas=sigmas, noise=eps)


def test_path_interpolates_x0_and_noise_and_timesteps_are_1000_sigma():
    n = _noised()
    torch.testing.assert_close(n.noisy[0], n.x0[0], rtol=0, atol=0)  # s = 0: clean
    torch.testing.assert_close(n.noisy[-1], n.noise[-1], rtol=0, atol=0)  # s = 1: pure noise
    torch.testing.assert_close(n.noisy[3], 0.7 * n.x0[3] + 0.3 * n.noise[3])
    torch.testing.assert_close(n.timesteps, SIGMAS * 1000)
    assert n.sigmas.dtype == torch.float32 and n.sigmas.shape == (len(SIGMAS),)
    # A scalar sigma is broadcast over the batch.
    one = flow.add_flow_noise(n.x0, sigmas=0.25, noise=n.noise)
    torch.testing.assert_close(one.noisy, 0.75 * n.x0 + 0.25 * n.noise)


def test_look_forward_recovers_x0_from_the_true_velocity():
    n = _noised()
    v = flow.flow_target(n)
    torch.testing.assert_close(v, n.noise - n.x0)
    torch.testing.assert_close(flow.predict_x0_flow(n.noisy, v, n.sigmas), n.x0, rtol=1e-5, atol=1e-5)
    # A wrong velocity moves x0_hat wherever s > 0: the look-forward uses the model output.
    moved = flow.predict_x0_flow(n.noisy, v + 0.1, n.sigmas) - n.x0
    assert torch.all(moved[1:].flatten(1).abs().amax(1) > 0)
    torch.testing.assert_close(moved[3], torch.full_like(moved[3], -0.03))


def test_euler_step_with_the_true_velocity_lands_on_the_path():
    n = _noised()
    v = flow.flow_target(n)
    for to in (torch.zeros_like(SIGMAS), SIGMAS * 0.5, (SIGMAS + 0.3).clamp(max=1), torch.ones_like(SIGMAS)):
        expected = flow.add_flow_noise(n.x0, sigmas=to, noise=n.noise).noisy
        torch.testing.assert_close(flow.step_back_flow(n.noisy, v, n.sigmas, to), expected, rtol=1e-5, atol=1e-5)
    # Stepping to the same sigma stays put; to 0 it is the look-forward.
    torch.testing.assert_close(flow.step_back_flow(n.noisy, v, n.sigmas, n.sigmas), n.noisy)


def test_euler_step_matches_the_scheduler_step():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(4)
    g = torch.Generator().manual_seed(1)
    sample, velocity = torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 4, 4, 4, generator=g)
    t = scheduler.timesteps[1]
    ours = flow.step_back_flow(sample, velocity, scheduler.sigmas[1:2], scheduler.sigmas[2:3])
    torch.testing.assert_close(ours, scheduler.step(velocity, t, sample).prev_sample)


@pytest.mark.parametrize("k", [0.5, 1.0, 3.0, 6.0])
def test_static_shift_matches_the_scheduler(k):
    ends = flow.shift_sigmas(torch.tensor([0.0, 1.0]), k)
    assert ends.tolist() == [0.0, 1.0]
    base = torch.linspace(1, 1000, 1000).flip(0) / 1000
    torch.testing.assert_close(flow.shift_sigmas(base, k), FlowMatchEulerDiscreteScheduler(shift=k).sigmas)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=k)
    grid = np.linspace(1.0, 1 / 28, 28)
    scheduler.set_timesteps(sigmas=grid)
    torch.testing.assert_close(flow.shift_sigmas(torch.tensor(grid, dtype=torch.float32), k), scheduler.sigmas[:-1])


@pytest.mark.parametrize("seq_len", [256, 1024, 4096])
def test_exponential_time_shift_matches_flux_dynamic_shifting(seq_len):
    mu = flow.flux_shift(seq_len)
    torch.testing.assert_close(torch.tensor(mu), torch.tensor(0.5 + (seq_len - 256) * 0.65 / 3840), rtol=0, atol=1e-9)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    grid = np.linspace(1.0, 1 / 28, 28)  # as FluxPipeline passes them
    scheduler.set_timesteps(sigmas=grid, mu=mu)
    ours = flow.time_shift_exponential(mu, torch.tensor(grid, dtype=torch.float32))
    torch.testing.assert_close(ours, scheduler.sigmas[:-1])
    # It fixes the ends, and it is the static shift with k = e^mu.
    assert flow.time_shift_exponential(mu, 0.0) == 0.0 and flow.time_shift_exponential(mu, 1.0) == 1.0
    torch.testing.assert_close(ours, flow.shift_sigmas(torch.tensor(grid, dtype=torch.float32), math.exp(mu)))


def test_flux_shift_passes_its_parameters_through():
    assert flow.flux_shift(256) == pytest.approx(0.5)
    assert flow.flux_shift(4096) == pytest.approx(1.15)
    assert flow.flux_shift(100, base_seq_len=100, max_seq_len=200, base_shift=0.2, max_shift=0.9) == pytest.approx(0.2)
    assert flow.flux_shift(200, base_seq_len=100, max_seq_len=200, base_shift=0.2, max_shift=0.9) == pytest.approx(0.9)


@pytest.mark.parametrize("weighting", ["uniform", "logit_normal", "mode"])
def test_seeded_generators_reproduce_sigmas_and_noise(weighting):
    x0 = torch.zeros(8, 2, 4, 4)

    def draw(seed):
        return flow.add_flow_noise(x0, torch.Generator().manual_seed(seed), weighting=weighting, shift=3.0)

    a, b, c = draw(7), draw(7), draw(8)
    assert torch.equal(a.sigmas, b.sigmas) and torch.equal(a.noise, b.noise) and torch.equal(a.noisy, b.noisy)
    assert not torch.equal(a.sigmas, c.sigmas) and not torch.equal(a.noise, c.noise)
    assert torch.all((a.sigmas >= 0) & (a.sigmas <= 1))
    torch.testing.assert_close(a.noisy, a.sigmas.view(-1, 1, 1, 1) * a.noise)  # x0 = 0


def _sigmas(n=4096, seed=0, **kwargs):
    return flow.add_flow_noise(torch.zeros(n, 1, 1, 1), torch.Generator().manual_seed(seed), **kwargs).sigmas


def test_sigma_densities_differ():
    logit, uniform, mode = _sigmas(weighting="logit_normal"), _sigmas(weighting="uniform"), _sigmas(weighting="mode")
    assert abs(logit.median() - 0.5) < 0.02 and abs(logit.std() - 0.21) < 0.02  # sigmoid(N(0, 1))
    assert abs(uniform.mean() - 0.5) < 0.02 and abs(uniform.std() - 1 / math.sqrt(12)) < 0.01
    assert abs(mode.median() - 0.5) < 0.03 and mode.std() < uniform.std() - 0.03  # mass toward the middle
    assert torch.equal(uniform, _sigmas(weighting="none"))  # diffusers' name for it
    # The density's parameters reach the draw.
    assert abs(_sigmas(weighting="logit_normal", logit_mean=1.0).median() - 1 / (1 + math.exp(-1))) < 0.02
    assert _sigmas(weighting="logit_normal", logit_std=0.5).std() < logit.std() - 0.05
    assert _sigmas(weighting="mode", mode_scale=0.0).std() > mode.std() + 0.03  # scale 0 is uniform
    # The shift moves the median of logit-normal to k/2 / (1 + (k - 1)/2): 0.75 for k = 3.
    assert abs(_sigmas(weighting="logit_normal", shift=3.0).median() - 0.75) < 0.02
    with pytest.raises(ValueError, match="sigma density"):
        _sigmas(weighting="logit-normal")


def test_pack_layout_and_round_trip_match_flux_pipeline():
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    b, c, h, w = 2, 3, 6, 10  # not square: a height/width swap shows
    latents = torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(0))
    packed = flow.pack_latents(latents)
    assert packed.shape == (b, (h // 2) * (w // 2), 4 * c)
    for i, j, ch, dy, dx in [(0, 0, 0, 0, 0), (1, 3, 2, 1, 0), (2, 4, 1, 0, 1), (2, 1, 2, 1, 1)]:
        assert packed[1, i * (w // 2) + j, ch * 4 + 2 * dy + dx] == latents[1, ch, 2 * i + dy, 2 * j + dx]
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, b, c, h, w))
    assert torch.equal(flow.unpack_latents(packed, h, w, c), latents)
    vae_scale = 8  # the pipeline unpacks from pixel sizes
    assert torch.equal(FluxPipeline._unpack_latents(packed, h * vae_scale, w * vae_scale, vae_scale), latents)
    with pytest.raises(ValueError):
        flow.unpack_latents(packed, w, h, c + 1)
    with pytest.raises(ValueError, match="even"):
        flow.pack_latents(torch.zeros(1, 4, 5, 6))

    ids = flow.latent_image_ids(h, w)
    assert ids.shape == (packed.shape[1], 3)
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32))
    assert ids[3 * (w // 2) - 1].tolist() == [0.0, 2.0, w // 2 - 1.0]  # token i (W/2) + j -> (0, i, j)
    assert ids[:, 0].eq(0).all() and ids[-1].tolist() == [0.0, h // 2 - 1.0, w // 2 - 1.0]


@pytest.mark.parametrize("scheme", ["none", "sigma_sqrt", "cosmap"])
def test_loss_weights_match_diffusers(scheme):
    s = torch.tensor([0.01, 0.2, 0.5, 0.8, 0.99])
    torch.testing.assert_close(flow.loss_weights(s, scheme), compute_loss_weighting_for_sd3(scheme, s).float())
    closed = {"none": torch.ones_like(s), "sigma_sqrt": s**-2, "cosmap": 2 / (math.pi * (1 - 2 * s + 2 * s**2))}[scheme]
    torch.testing.assert_close(flow.loss_weights(s, scheme), closed)


def test_unknown_loss_weighting_raises_and_weighted_error():
    with pytest.raises(ValueError, match="loss weighting"):
        flow.loss_weights(torch.tensor([0.5]), "logit_normal")
    n = _noised(sigmas=torch.tensor([0.2, 0.5]))
    v = flow.flow_target(n)
    assert flow.flow_matching_error(v, n).tolist() == [0.0, 0.0]
    err = flow.flow_matching_error(v + 1.0, n, "sigma_sqrt")
    torch.testing.assert_close(err, torch.tensor([25.0, 4.0]))
    torch.testing.assert_close(flow.flow_snr(torch.tensor([0.2, 0.5])), torch.tensor([16.0, 1.0]))
