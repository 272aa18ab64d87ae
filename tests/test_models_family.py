"""Model families: the flow-matching family (FLUX.1 on the offline tiny-flux preset) behind the same
interface as the U-Nets, trained by every method through the same loop."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import metric_series
from rewardbooth import flow
from rewardbooth.methods import get_method, load_config
from rewardbooth.methods.context import TrainContext
from rewardbooth.models.loading import load_components
from rewardbooth.sampling import SampleSettings, generate
from rewardbooth.training.finished_run import load_run_pipeline
from rewardbooth.training.loop import train
from rewardbooth.training.run_dir import prepare_run_dir


@pytest.fixture(scope="module")
def flux():
    return load_components("tiny-flux")


def _family(components, **flow):
    from rewardbooth.config import FlowConfig

    return components.family(FlowConfig(**flow))


FLOW_MODELS = ["tiny-flux", "tiny-sd3", "tiny-flux2", "tiny-zimage", "tiny-qwenimage"]


@pytest.mark.parametrize("model", FLOW_MODELS)
def test_flow_noising_target_and_look_forward_are_flow_matching(model):
    flux = load_components(model)
    family = _family(flux)
    g = torch.Generator().manual_seed(0)
    side = 64 // family.latent_scale
    x0 = torch.randn(3, family.latent_channels, side, side, generator=g)
    noised = family.add_noise(x0, torch.Generator().manual_seed(1))
    s = (noised.timesteps / 1000).view(-1, 1, 1, 1)
    torch.testing.assert_close(noised.noisy, (1 - s) * x0 + s * noised.noise)
    velocity = family.target(noised)
    torch.testing.assert_close(velocity, noised.noise - x0)
    # look-forward with the true velocity lands on the true x0
    torch.testing.assert_close(family.predict_x0(noised.noisy, velocity, noised.timesteps), x0, atol=1e-5, rtol=1e-5)
    # given t and eps (RPO's shared pair), the same x_t is formed again
    again = family.add_noise(x0, timesteps=noised.timesteps, noise=noised.noise)
    torch.testing.assert_close(again.noisy, noised.noisy)
    # the denoiser sees (B, C, H, W) latents and returns the same shape (FLUX.1's 2x2 packing, FLUX.2's tokens inside)
    text = family.encode_prompts(flux.text_encoders, ["a sks toy"] * 3, 64)
    assert family.predict(flux.unet, noised.noisy, noised.timesteps, text).shape == x0.shape


@pytest.mark.parametrize("model", FLOW_MODELS)
def test_predict_calls_the_transformer_as_the_sampling_pipeline_does(model):
    """One pipeline step and family.predict on the same x_t, sigma and prompt give the same velocity:
    latent layout (FLUX.1's 2x2 packing, FLUX.2's patchified tokens), position ids, timestep scale,
    guidance embedding and text conditioning are the pipeline's. Z-Image: the velocity its sampler steps
    with (the pipeline turns the transformer's time and sign around), at both steps of the call. Qwen-Image: its 2x2
    packing, s = t / 1000, its unnegated output, the prompt with the template's prefix dropped and the image-size
    argument, and the training shift is exp(mu) of the pipeline's own mu at this token count."""
    import functools
    import math

    from rewardbooth.models.family import guidance_options, initial_latents
    from rewardbooth.models.loading import make_pipeline

    components = load_components(model)
    family = _family(components, guidance=1.0)
    pipe = make_pipeline(components)
    calls, steps = [], []
    hook = components.unet.register_forward_hook(lambda m, args, kwargs, out: calls.append(out[0]), with_kwargs=True)
    zimage, qwenimage, mus = model == "tiny-zimage", model == "tiny-qwenimage", []
    if qwenimage:
        real_set_timesteps = pipe.scheduler.set_timesteps
        pipe.scheduler.set_timesteps = functools.wraps(real_set_timesteps)(  # wrapped: the pipeline reads its signature
            lambda *a, **kw: mus.append(kw["mu"]) or real_set_timesteps(*a, **kw))
    if zimage:
        real_step = pipe.scheduler.step
        pipe.scheduler.step = lambda velocity, t, x_t, **kw: steps.append((velocity, x_t)) or real_step(velocity, t, x_t, **kw)
    latents, side = initial_latents(pipe, [torch.Generator().manual_seed(0)], 64)
    guidance = 0.0 if zimage else 1.0  # no CFG: Z-Image's guidance is added to the conditional prediction (0 is off)
    with torch.no_grad():
        pipe(prompt=["a sks toy"], num_inference_steps=2, latents=latents, height=side, width=side,
             **guidance_options(pipe, guidance, None, 1))
    hook.remove()
    text = family.encode_prompts(components.text_encoders, ["a sks toy"], 64)
    if zimage:
        for (velocity, x_t), sigma in zip(steps, pipe.scheduler.sigmas):  # sigma 1, then a shifted 0.5
            with torch.no_grad():
                torch.testing.assert_close(family.predict(components.unet, x_t, (sigma * 1000).view(1), text), velocity,
                                           atol=1e-5, rtol=1e-4)
        assert len(steps) == 2
        return
    sigma = pipe.scheduler.sigmas[:1]  # the first step's, as the call left its scheduler
    packed = model in ("tiny-flux", "tiny-qwenimage")
    x_t = flow.unpack_latents(latents, side // 8, side // 8, 16) if packed else latents
    with torch.no_grad():
        ours = family.predict(components.unet, x_t, sigma * 1000, text)
    theirs = calls[0]
    assert len(calls) == 2  # one call per step: no CFG at guidance 1
    theirs = flow.unpack_latents(theirs, side // 8, side // 8, 16) if packed else theirs
    theirs = theirs.transpose(1, 2).reshape(ours.shape) if theirs.ndim == 3 else theirs
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    if qwenimage:
        assert math.isclose(family.shift_for(x_t), math.exp(mus[0]), rel_tol=1e-6)


def test_qwenimage_samples_with_true_cfg_against_a_negative_prompt():
    """Qwen-Image's guidance is QwenImagePipeline's true CFG: above 1, two transformer calls a step, the second on the
    negative prompt (" " where none is given), at the same s = t / 1000; at 1, one call and no negative prompt."""
    from rewardbooth.models.loading import make_pipeline

    components = load_components("tiny-qwenimage")
    family, pipe = _family(components), make_pipeline(components)
    seen = []
    hook = components.unet.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((kwargs["encoder_hidden_states"], kwargs["timestep"])), with_kwargs=True)
    for guidance, negative, calls_per_step in ((4.0, None, 2), (4.0, "blurry", 2), (1.0, None, 1)):
        seen.clear()
        generate(pipe, ["a sks toy"], 1, SampleSettings(steps=2, guidance_scale=guidance, negative_prompt=negative, resolution=64))
        assert len(seen) == 2 * calls_per_step
        if calls_per_step == 2:
            text = family.encode_prompts(components.text_encoders, ["a sks toy", negative or " "], 64)
            for row, (hidden, timestep) in enumerate(seen[:2]):
                torch.testing.assert_close(hidden[0], text.hidden[row, : int(text.mask[row].sum())])
                torch.testing.assert_close(timestep, pipe.scheduler.sigmas[:1].to(timestep))
    hook.remove()


def test_qwenimage_model_space_decodes_as_its_pipeline_decodes():
    """The latents Qwen-Image's sampler ends with, unpacked and mapped by family.latents_to_vae, are what its pipeline hands
    its video VAE: de-normalised by latents_mean / latents_std, with the frame axis (B, C, 1, H, W)."""
    from rewardbooth.models.family import initial_latents
    from rewardbooth.models.loading import make_pipeline

    components = load_components("tiny-qwenimage")
    family, pipe = _family(components), make_pipeline(components)
    last, decoded = {}, []

    def keep_latents(pipeline, step, timestep, tensors):
        last["latents"] = tensors["latents"]
        return tensors

    real_decode = pipe.vae.decode
    pipe.vae.decode = lambda z, **kw: decoded.append(z) or real_decode(z, **kw)
    latents, side = initial_latents(pipe, [torch.Generator().manual_seed(0)], 64)
    with torch.no_grad():
        pipe(prompt="a sks toy", num_inference_steps=2, true_cfg_scale=1.0, latents=latents, height=side, width=side,
             output_type="np", callback_on_step_end=keep_latents)
    model_space = flow.unpack_latents(last["latents"], side // 8, side // 8, 16)
    assert decoded[0].shape == (1, 16, 1, side // 8, side // 8)
    torch.testing.assert_close(family.latents_to_vae(model_space), decoded[0])


@pytest.mark.parametrize("model", FLOW_MODELS)
def test_latents_go_between_the_vae_and_the_model_space_both_ways(model):
    """Cached VAE moments -> the model's latents (FLUX.1/SD3: shifted and scaled; FLUX.2: patchified and
    batch-normalised; Qwen-Image: normalised per channel, the video VAE's frame axis dropped) -> back to what the VAE
    decodes: the identity, at zero posterior variance. Qwen-Image's moments come from encode_moments on real pixels."""
    from rewardbooth import diffusion

    components = load_components(model)
    family = _family(components)
    video = diffusion.is_video_vae(components.vae.config)
    channels = components.vae.config.z_dim if video else components.vae.config.latent_channels
    mean = torch.randn(2, channels, *((1,) if video else ()), 8, 8, generator=torch.Generator().manual_seed(0))
    if video:  # what the VAE gives for images: (B, 2C, frames = 1, H, W)
        pixels = torch.rand(2, 3, 8 * components.vae_scale_factor, 8 * components.vae_scale_factor) * 2 - 1
        assert diffusion.encode_moments(components.vae, pixels).shape == (2, 2 * channels, 1, 8, 8)
    x0 = family.latents_from_moments(torch.cat([mean, torch.full_like(mean, -60.0)], dim=1), torch.Generator().manual_seed(1))
    side = 8 * components.vae_scale_factor // family.latent_scale
    assert x0.shape == (2, family.latent_channels, side, side)
    torch.testing.assert_close(family.latents_to_vae(x0), mean, atol=1e-4, rtol=1e-4)


def test_flux2_model_space_decodes_as_its_pipeline_decodes():
    """The latents FLUX.2's sampler ends with, mapped by family.latents_to_vae, are what its pipeline hands the VAE."""
    from rewardbooth.models.family import initial_latents
    from rewardbooth.models.loading import make_pipeline

    components = load_components("tiny-flux2")
    family, pipe = _family(components), make_pipeline(components)
    last = {}

    def keep_latents(pipeline, step, timestep, tensors):
        last["latents"] = tensors["latents"]
        return tensors

    latents, side = initial_latents(pipe, [torch.Generator().manual_seed(0)], 64)
    with torch.no_grad():
        vae_latents = pipe(prompt="a sks toy", num_inference_steps=2, guidance_scale=1.0, latents=latents, height=side, width=side,
                           output_type="latent", callback_on_step_end=keep_latents).images
    tokens = last["latents"]  # (B, tokens, 128) in raster order
    model_space = tokens.transpose(1, 2).reshape(1, family.latent_channels, side // 16, side // 16)
    torch.testing.assert_close(family.latents_to_vae(model_space), vae_latents)


@pytest.mark.parametrize("model", FLOW_MODELS)
def test_native_size_is_the_pipelines_default(model):
    """Without data.resolution a flow model trains and samples at its pipeline's default size: FLUX.1's, FLUX.2's and
    Z-Image's 1024 px (no config of theirs holds it), SD3's transformer sample_size (64 px on the tiny preset)."""
    from rewardbooth.models.family import initial_latents
    from rewardbooth.models.loading import make_pipeline, model_native_resolution

    components = load_components(model)
    side = 64 if model == "tiny-sd3" else 1024
    assert model_native_resolution(model) == components.native_resolution == side
    latents, sampled = initial_latents(make_pipeline(components), [torch.Generator().manual_seed(0)], None)
    assert sampled == side and (model != "tiny-zimage" or latents.shape == (1, 16, 128, 128))


@pytest.mark.parametrize("model", ["tiny-zimage", "tiny-qwenimage"])
def test_memory_estimate_leaves_the_transformer_as_it_found_it(model):
    """The estimate runs the forward on fake tensors before the first step; Z-Image's transformer caches its rotary
    table on first use (Qwen-Image's, per size and device, in functools caches), and a fake one left there would break
    every real step after it (or make them run on it)."""
    from rewardbooth.training import memory

    components = load_components(model)
    family = components.family()
    probe = family.probe(components.unet, 2, 8, torch.float32, torch.device("cpu"))
    assert memory.estimate(resident=[components.unet], trained=list(components.unet.parameters()), probes=[probe]).activations > 0
    text = family.encode_prompts(components.text_encoders, ["a sks toy", "a toy"], 64)
    x_t, t = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500.0, 250.0])
    with torch.no_grad():
        torch.testing.assert_close(family.predict(components.unet, x_t, t, text), family.predict(load_components(model).unet,
                                                                                                  x_t, t, text))


@pytest.mark.parametrize("batch", [1, 2])
def test_qwenimage_estimate_calls_the_transformer_as_a_real_step_on_its_prompts_does(batch):
    """Qwen-Image's predict trims the text to the batch's longest prompt, a length read from the mask's data, which the
    memory estimate's fake tensors do not have: there it passes the conditioning as it is. The estimate's prompts are
    ones the trim leaves as they are (the first spans the whole width; a single one has no mask), so its forward is
    the call a real step makes on them: the same text width and the same mask, or none."""
    from rewardbooth.training import memory

    components = load_components("tiny-qwenimage")
    family, seen = components.family(), []
    hook = components.unet.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((kwargs["encoder_hidden_states"], kwargs["encoder_hidden_states_mask"])),
        with_kwargs=True)
    memory.saved_activation_bytes([family.probe(components.unet, batch, 8, torch.float32, torch.device("cpu"))],
                                  [components.unet])
    text = family.dummy_conditioning(batch, torch.float32, torch.device("cpu"))  # the same prompts on real tensors
    with torch.no_grad():
        family.predict(components.unet, torch.zeros(batch, 16, 8, 8), torch.full((batch,), 500), text)
    hook.remove()
    (estimated_hidden, estimated_mask), (hidden, mask) = seen
    assert estimated_hidden.shape == hidden.shape == (batch, family.probe_tokens, family.text_dim)
    assert (estimated_mask is None) == (mask is None) == (batch == 1)
    if mask is not None:
        assert estimated_mask.shape == mask.shape and torch.equal(mask, text.mask)


def test_flux_timesteps_follow_the_resolution_dependent_shift(flux):
    family = _family(flux, weighting="uniform")
    small, large = torch.zeros(4096, 16, 8, 8), torch.zeros(64, 16, 64, 64)
    s_small = family.add_noise(small, torch.Generator().manual_seed(0)).timesteps / 1000
    s_large = family.add_noise(large, torch.Generator().manual_seed(0)).timesteps / 1000
    assert family.shift_for(large) > family.shift_for(small) >= 1.0
    assert s_large.mean() > s_small.mean()  # more tokens: noisier timesteps, as FLUX samples them
    fixed = _family(flux, weighting="uniform", shift=1.0)
    assert fixed.add_noise(small, torch.Generator().manual_seed(0)).timesteps.div(1000).mean().item() == pytest.approx(0.5, abs=0.02)


def _flux_overrides(tiny_overrides, model="tiny-flux", **extra):
    return dict(tiny_overrides, **{"model.name": model, "data.resolution": 64, "train.steps": 4, "train.checkpoint_every": 2, "prior.num_class_images": 2,
                                   "validation.steps": 2, "validation.every": 0, **extra})


@pytest.mark.parametrize("model", ["tiny", *FLOW_MODELS])
def test_lora_target_presets_pick_the_blocks_linear_layers(model):
    from peft import LoraConfig, inject_adapter_in_model

    components = load_components(model)
    family = components.family()
    adapted = {}
    for preset in ("attention", "all-linear"):
        denoiser = copy.deepcopy(components.unet)
        inject_adapter_in_model(LoraConfig(r=2, target_modules=family.lora_targets(preset)), denoiser)
        adapted[preset] = {name.rsplit(".lora_A", 1)[0] for name, _ in denoiser.named_modules() if name.endswith(".lora_A")}
    zimage = model == "tiny-zimage"  # blocks: layers.N and the two streams' refiners; attention modules: `attention`

    def in_block(name):
        return name.startswith(("layers.", "noise_refiner.", "context_refiner.")) if zimage else "blocks." in name or name.startswith("mid_block.")

    linear_in_blocks = {name for name, m in components.unet.named_modules() if isinstance(m, torch.nn.Linear) and in_block(name)}
    assert adapted["all-linear"] == linear_in_blocks  # every linear layer of the blocks, nothing outside them
    attention = ".attention." if zimage else ".attn"
    assert adapted["attention"] < adapted["all-linear"] and all(attention in name for name in adapted["attention"])
    if zimage:  # single stream: the text's own refiner and the joint layers
        assert {n.split(".")[0] for n in adapted["attention"]} == {"layers", "noise_refiner", "context_refiner"}
    elif model != "tiny":  # flow transformers: both streams' projections (the text stream's add_*_proj too)
        assert any("add_q_proj" in name for name in adapted["attention"])


@pytest.mark.slow
@pytest.mark.parametrize("model, targets", [*((m, "attention") for m in FLOW_MODELS), ("tiny-flux", "all-linear")])
def test_flow_lora_loads_through_diffusers_and_reproduces_the_trained_model(tmp_path, tiny_overrides, model, targets):
    cfg = load_config(overrides=_flux_overrides(tiny_overrides, model, **{"train.learning_rate": 5e-2, "adapter.targets": targets}))
    run = tmp_path / "run"
    prepare_run_dir(run, resume=False, overwrite=False)
    result = train(cfg, run, progress=False)
    keys = load_file(result.weights).keys()
    assert keys and all(k.startswith("transformer.") for k in keys)
    settings = SampleSettings(steps=2, guidance_scale=3.5, seed=0, resolution=64)
    _, ours = load_run_pipeline(run)
    trained = generate(ours, ["a sks toy"], 1, settings)[0][0]
    from diffusers import DiffusionPipeline

    base = DiffusionPipeline.from_pretrained(load_components(model).path)
    before = generate(base, ["a sks toy"], 1, settings)[0][0]
    base.load_lora_weights(str(result.weights))  # diffusers' own loader, as a user would
    after = generate(base, ["a sks toy"], 1, settings)[0][0]
    in_file = {k.removeprefix("transformer.").split(".lora_")[0] for k in keys}
    loaded = {name.rsplit(".lora_A", 1)[0] for name, _ in base.transformer.named_modules() if name.endswith(".lora_A")}
    assert loaded == in_file and len(in_file) >= (20 if targets == "all-linear" else 8)  # every trained module, none skipped
    assert after.tobytes() == trained.tobytes() and after.tobytes() != before.tobytes()
    assert result.weights.name == "pytorch_lora_weights.safetensors"
    assert (run / "lora_kohya.safetensors").is_file() == (model == "tiny-flux")  # kohya's layout exists for FLUX.1 only
    recorded = json.loads((run / "result.json").read_text())
    assert recorded["base_model"] == model and recorded["flow_matching"] is True  # the run report shows flow.* for it


@pytest.mark.slow
@pytest.mark.parametrize("model", FLOW_MODELS)
@pytest.mark.parametrize("method", ["dreambooth", "dpg", "rpo"])
def test_every_method_resumes_exactly_on_flow_models(tmp_path, tiny_overrides, straight_and_resumed, method, model):
    extra = {"train.method": method, "adapter.kind": "lora", "adapter.train_text_encoder": False, "data.resolution": 64,
             "rpo.negatives_per_prompt": 1, "rpo.negative_steps": 2, "dpg.reward": "dino", "dpg.critic_input": "features",
             "dpg.critic_optimizer": "adam", "dpg.critic_lr": 1e-3, "train.learning_rate": 1e-3}
    cfg = load_config(overrides=_flux_overrides(tiny_overrides, model, **extra))
    straight, broken, _ = straight_and_resumed(cfg, tmp_path, get_method(method), 3)
    assert metric_series(broken, "loss") == pytest.approx(metric_series(straight, "loss"), rel=1e-5)
    assert all(torch.isfinite(torch.tensor(v)) for v in metric_series(straight, "loss").values())
    a, b = load_file(straight / "pytorch_lora_weights.safetensors"), load_file(broken / "pytorch_lora_weights.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("model, method", [("tiny-flux", "dpg"), ("tiny-sd3", "rpo"), ("tiny-flux2", "dreambooth"),
                                           ("tiny-zimage", "dpg"), ("tiny-qwenimage", "rpo")])
def test_full_fine_tunes_resume_exactly_on_flow_models(tmp_path, tiny_overrides, straight_and_resumed, model, method):
    """The whole transformer trained (each family once, each method once): the same losses and weights after a resume."""
    extra = {"train.method": method, "adapter.kind": "full", "adapter.train_text_encoder": False, "train.learning_rate": 1e-4,
             "rpo.negatives_per_prompt": 1, "rpo.negative_steps": 2, "dpg.critic_optimizer": "adam", "dpg.critic_lr": 1e-3}
    cfg = load_config(overrides=_flux_overrides(tiny_overrides, model, **extra))
    straight, broken, _ = straight_and_resumed(cfg, tmp_path, get_method(method), 3)
    assert metric_series(broken, "loss") == pytest.approx(metric_series(straight, "loss"), rel=1e-5)
    a = load_file(straight / "transformer" / "diffusion_pytorch_model.safetensors")
    b = load_file(broken / "transformer" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("model, clip_folders, t5", [("tiny-flux", ["text_encoder"], "text_encoder_2"),
                                                    ("tiny-sd3", ["text_encoder", "text_encoder_2"], "text_encoder_3")])
def test_full_flow_fine_tune_trains_clip_not_t5_and_reloads(tmp_path, tiny_overrides, model, clip_folders, t5):
    cfg = load_config(overrides=_flux_overrides(tiny_overrides, model, **{"adapter.kind": "full", "adapter.train_text_encoder": True,
                                                                          "train.learning_rate": 1e-3}))
    run = tmp_path / "run"
    prepare_run_dir(run, resume=False, overwrite=False)
    result = train(cfg, run, progress=False)
    assert result.weights == run / "transformer" and all((run / f).is_dir() for f in clip_folders) and not (run / t5).exists()
    _, pipe = load_run_pipeline(run)
    base = load_components(model)
    assert any(not torch.equal(a, b) for a, b in zip(pipe.transformer.parameters(), base.unet.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(pipe.text_encoder.parameters(), base.text_encoder.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(getattr(pipe, t5).parameters(), getattr(base, t5).parameters()))  # T5 frozen


def test_rpo_on_flux_pairs_share_sigma_and_noise(tiny_overrides):
    """RPO's preference pair is noised with one sigma and one eps on the flow family too."""
    from accelerate import Accelerator

    cfg = load_config(overrides=_flux_overrides(tiny_overrides, **{"train.method": "rpo"}))
    ctx = TrainContext(cfg, None, Accelerator(cpu=True), load_components("tiny-flux"), 64, torch.float32)
    x0 = torch.randn(4, 16, 8, 8)
    one = ctx.add_noise(x0[:2], torch.Generator().manual_seed(0))
    pair = ctx.add_noise(x0, timesteps=one.timesteps.repeat(2), noise=one.noise.repeat(2, 1, 1, 1))
    torch.testing.assert_close(pair.timesteps[:2], pair.timesteps[2:])
    torch.testing.assert_close(pair.noise[:2], pair.noise[2:])
    torch.testing.assert_close(pair.noisy[:2], one.noisy)


@pytest.mark.parametrize("model", ["tiny-zimage", "tiny-qwenimage"])
def test_prompts_keep_their_own_tokens_through_the_prompt_cache(tiny_overrides, model):
    """Z-Image and Qwen-Image condition each image on its own prompt's tokens: the mask that says which they are survives
    the per-prompt cache that batches are stacked from, and a prompt's velocity does not depend on the longer prompts
    beside it."""
    from accelerate import Accelerator

    components = load_components(model)
    ctx = TrainContext(load_config(overrides=_flux_overrides(tiny_overrides, model)), None, Accelerator(cpu=True),
                       components, 64, torch.float32)
    prompts = ["a sks toy", "a sks toy on a long wooden table in the sun", "a sks toy"]
    cached, direct = ctx.encode_prompts(prompts), ctx.family.encode_prompts(components.text_encoders, prompts, 64)
    torch.testing.assert_close(cached.hidden, direct.hidden)
    assert torch.equal(cached.mask, direct.mask) and cached.mask.sum(1).tolist()[0] < cached.mask.sum(1).tolist()[1]
    x_t, t = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([900.0, 500.0, 100.0])
    with torch.no_grad():
        together = ctx.family.predict(components.unet, x_t, t, cached)
        alone = ctx.family.predict(components.unet, x_t[2:], t[2:], cached[2:])
    torch.testing.assert_close(together[2:], alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("model, flags, culprit", [
    ("tiny-flux", ["--snr-gamma", "5"], "train.snr_gamma"),
    ("tiny-sd3", ["--resolution", "72"], "data.resolution"),
    ("tiny", ["--set", "flow.guidance=3.5"], "flow.guidance"),
    ("tiny", ["--set", "flow.loss_weighting=cosmap"], "flow.loss_weighting"),
    ("tiny-sd3", ["--set", "flow.guidance=3.5"], "flow.guidance"),  # SD3 has no embedded guidance
    ("tiny-flux2", ["--set", "adapter.train_text_encoder=true"], "adapter.train_text_encoder"),  # Qwen3 stays frozen
    ("tiny-zimage", ["--set", "adapter.train_text_encoder=true"], "adapter.train_text_encoder"),  # here too
    ("tiny-zimage", ["--set", "flow.guidance=3.5"], "flow.guidance"),  # no embedded guidance
    ("tiny-qwenimage", ["--set", "adapter.train_text_encoder=true"], "adapter.train_text_encoder"),  # Qwen2.5-VL frozen
    ("tiny-qwenimage", ["--set", "flow.guidance=3.5"], "flow.guidance"),  # no embedded guidance: true CFG
])
def test_a_setting_of_the_other_family_is_refused_by_name(tmp_path, subject_dir, capsys, model, flags, culprit):
    from rewardbooth.cli import main

    code = main(["train", "--model", model, "--instance-dir", str(subject_dir), "--class-noun", "toy",
                 "--output", str(tmp_path / "run"), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and culprit in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.slow
def test_lora_on_an_int8_base_trains_close_to_the_full_precision_base(tmp_path, tiny_overrides):
    pytest.importorskip("torchao")
    losses = {}
    for quantize in (None, "int8"):
        cfg = load_config(overrides=_flux_overrides(tiny_overrides, **{"model.quantize": quantize, "train.steps": 3,
                                                                       "train.checkpoint_every": 0}))
        run = tmp_path / f"run-{quantize}"
        prepare_run_dir(run, resume=False, overwrite=False)
        result = train(cfg, run, progress=False)
        losses[quantize] = metric_series(run, "loss")
        assert result.weights.is_file()
    assert losses["int8"] != losses[None]  # the base really was quantized ...
    for step, loss in losses[None].items():  # ... and trains within a few percent of the bf16/fp32 base
        assert losses["int8"][step] == pytest.approx(loss, rel=0.05)


@pytest.mark.slow
def test_offloaded_t5_trains_the_same_and_leaves_no_weights_resident(tmp_path, tiny_overrides, monkeypatch):
    """T5 kept in CPU memory and streamed per call (on by default on a GPU; forced here on the CPU): the same
    losses as a resident T5, and its weights are not among the module's own tensors while training."""
    from rewardbooth.training import setup

    placed = []
    real_place = setup.place_frozen
    monkeypatch.setattr("rewardbooth.training.loop.place_frozen",
                        lambda components, *a: placed.append(components) or real_place(components, *a))
    losses = {}
    for offload in (False, True):
        cfg = load_config(overrides=_flux_overrides(tiny_overrides, **{"model.offload_text_encoders": offload, "train.steps": 2,
                                                                       "train.checkpoint_every": 0}))
        train(cfg, tmp_path / f"run-{offload}", progress=False)
        losses[offload] = metric_series(tmp_path / f"run-{offload}", "loss")
    t5_devices = [{p.device.type for p in c.text_encoder_2.parameters()} for c in placed]
    assert t5_devices == [{"cpu"}, {"meta"}]  # offloaded: the weights live in accelerate's CPU map, not on the module
    assert {p.device.type for p in placed[1].text_encoder.parameters()} == {"cpu"}  # CLIP stays resident
    assert losses[True] == losses[False]


def test_the_library_refuses_a_setting_of_the_other_family_too(tmp_path, tiny_overrides):
    from rewardbooth.errors import ConfigError

    cfg = load_config(overrides=_flux_overrides(tiny_overrides, "tiny-sd3", **{"flow.guidance": 3.5}))
    with pytest.raises(ConfigError, match="flow.guidance"):
        train(cfg, tmp_path / "run", progress=False)


def test_flow_models_sample_at_their_familys_guidance_unless_told(tmp_path, tiny_overrides):
    """FLUX.1-dev and SD3.5 are sampled at guidance 3.5, FLUX.2 [klein] base at 4, Z-Image-Turbo at 0 in 8 steps, Z-Image
    base (its scheduler's shift 6) at 5 in 50 (not SD's 7.5), wherever the user leaves it unset; a folder (not only a preset
    name) gets it."""
    import shutil

    from rewardbooth.models.presets import find_preset

    expected = {"tiny-flux": 3.5, "tiny-sd3": 3.5, "tiny-flux2": 4.0, "tiny-zimage": 0.0, "tiny-qwenimage": 4.0, "tiny": 7.5}
    for model, guidance in expected.items():
        folder = tmp_path / model
        shutil.copytree(find_preset(model).path(), folder)
        cfg = load_config(overrides={"model.name": str(folder)})
        assert (cfg.validation.guidance_scale, cfg.prior.generation_guidance, cfg.rpo.negative_guidance) == (guidance,) * 3, model
    assert load_config(overrides={"model.name": str(tmp_path / "tiny-zimage")}).validation.steps == 8
    assert load_config(overrides={"model.name": str(tmp_path / "tiny-qwenimage")}).validation.steps == 50
    scheduler = tmp_path / "tiny-zimage" / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "shift": 6.0}))  # as Z-Image base ships it
    base = load_config(overrides={"model.name": str(tmp_path / "tiny-zimage")})
    assert (base.validation.guidance_scale, base.validation.steps) == (5.0, 50)
    told = load_config(overrides={"model.name": str(tmp_path / "tiny-flux"), "validation.guidance_scale": 5.0})
    assert told.validation.guidance_scale == 5.0 and told.prior.generation_guidance == 3.5


def test_a_quantized_base_is_for_lora_only(tiny_overrides):
    from rewardbooth.errors import ConfigError

    with pytest.raises(ConfigError, match="model.quantize"):
        load_config(overrides=_flux_overrides(tiny_overrides, **{"model.quantize": "int8", "adapter.kind": "full"}))


@pytest.mark.slow
def test_cli_trains_sd3_at_its_native_size_and_export_keeps_the_diffusers_layout(tmp_path, subject_dir, capsys):
    from rewardbooth.cli import main

    run = tmp_path / "run"
    assert main(["train", "--model", "tiny-sd3", "--instance-dir", str(subject_dir), "--class-noun", "toy", "--output", str(run),
                 "--steps", "1", "--num-class-images", "1", "--set", "prior.generation_steps=1", "--set", "validation.every=0",
                 "--quiet"]) == 0
    assert json.loads((run / "result.json").read_text())["resolution"] == 64  # the preset's native size, read from transformer/
    capsys.readouterr()
    assert main(["export", str(run), "--format", "kohya"]) == 2
    assert "diffusers layout" in capsys.readouterr().err
    assert main(["export", str(run), "--format", "diffusers", "--dtype", "fp16"]) == 0
