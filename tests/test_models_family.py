"""Model families: the flow-matching family (FLUX.1 on the offline tiny-flux preset) behind the same
interface as the U-Nets, trained by every method through the same loop."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import metric_series
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


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-sd3"])
def test_flow_noising_target_and_look_forward_are_flow_matching(model):
    flux = load_components(model)
    family = _family(flux)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 16, 8, 8, generator=g)
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
    # the denoiser sees (B, C, H, W) latents and returns the same shape (2x2 packing inside)
    text = family.encode_prompts(flux.text_encoders, ["a sks toy"] * 3, 64)
    assert family.predict(flux.unet, noised.noisy, noised.timesteps, text).shape == x0.shape


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


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-flux", "tiny-sd3"])
def test_flow_lora_loads_through_diffusers_and_reproduces_the_trained_model(tmp_path, tiny_overrides, model):
    cfg = load_config(overrides=_flux_overrides(tiny_overrides, model, **{"train.learning_rate": 5e-2}))
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
    assert after.tobytes() == trained.tobytes() and after.tobytes() != before.tobytes()
    assert result.weights.name == "pytorch_lora_weights.safetensors"
    assert json.loads((run / "result.json").read_text())["base_model"] == model


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-flux", "tiny-sd3"])
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


@pytest.mark.parametrize("model, flags, culprit", [
    ("tiny-flux", ["--snr-gamma", "5"], "train.snr_gamma"),
    ("tiny-sd3", ["--resolution", "72"], "data.resolution"),
    ("tiny", ["--set", "flow.guidance=3.5"], "flow.guidance"),
    ("tiny", ["--set", "flow.loss_weighting=cosmap"], "flow.loss_weighting"),
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
