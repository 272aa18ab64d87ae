"""The trainer options users look for, each checked to do what it says: min-SNR-gamma weighting,
offset noise, EMA of the trained weights, optimizer choice (and a one-line error when its package
is missing), accelerate's trackers, and class latents cached on disk."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from rewardbooth import diffusion
from rewardbooth.errors import ConfigError
from rewardbooth.methods import load_config
from rewardbooth.methods.dreambooth import CLASS_LATENTS_NAME, DreamBooth
from rewardbooth.models.loading import load_components
from rewardbooth.training.loop import train


def _cfg(tiny_overrides, **extra):
    return load_config(overrides={**tiny_overrides, "data.resolution": 32, **extra})


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_min_snr_weights_follow_the_paper(prediction):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction)
    t = torch.tensor([0, 50, 200, 500, 999])
    abar = scheduler.alphas_cumprod[t].double()
    snr = abar / (1 - abar)
    expected = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / (snr if prediction == "epsilon" else snr + 1)
    weights = diffusion.min_snr_weights(scheduler, t, 5.0)
    torch.testing.assert_close(weights.double(), expected, rtol=1e-5, atol=1e-7)
    if prediction == "epsilon":  # low noise (high SNR) is down-weighted, high noise untouched
        assert weights[0] < 0.01 and weights[-1] == 1.0


class RecordingDreamBooth(DreamBooth):
    """Keeps what combine() was given and what it returned."""

    records: list

    def combine(self, ctx, errors, timesteps, b, instance_weight=1.0):
        loss, logs = super().combine(ctx, errors, timesteps, b, instance_weight)
        self.records.append((errors.detach(), timesteps, loss.detach(), ctx.noise_scheduler, ctx.cfg.prior.weight))
        return loss, logs


def test_snr_gamma_weights_dreambooths_instance_and_prior_losses(tmp_path, tiny_overrides):
    cfg = _cfg(tiny_overrides, **{"train.snr_gamma": 2.0, "train.steps": 2, "train.batch_size": 2})
    method = RecordingDreamBooth()
    method.records = []
    train(cfg, tmp_path / "run", progress=False, method=method)
    for errors, timesteps, loss, scheduler, prior_weight in method.records:
        w = diffusion.min_snr_weights(scheduler, timesteps, 2.0)
        expected = (w[:2] * errors[:2]).mean() + prior_weight * (w[2:] * errors[2:]).mean()
        torch.testing.assert_close(loss, expected)
        assert not torch.allclose(loss, errors[:2].mean() + prior_weight * errors[2:].mean())  # the weights changed it


def test_snr_gamma_is_refused_for_rpo(tiny_overrides):
    with pytest.raises(ConfigError, match="snr_gamma"):
        load_config(overrides={**tiny_overrides, "train.method": "rpo", "train.snr_gamma": 5.0})


@pytest.mark.slow
def test_noise_offset_shifts_each_channel_of_the_training_noise(tmp_path, tiny_overrides, monkeypatch):
    seen = []
    real = diffusion.add_noise

    def spy(*args, **kwargs):
        batch = real(*args, **kwargs)
        seen.append(batch.noise.detach())
        return batch

    monkeypatch.setattr(diffusion, "add_noise", spy)
    spreads = {}
    for offset in (0.0, 1.0):
        seen.clear()
        train(_cfg(tiny_overrides, **{"train.noise_offset": offset, "train.steps": 3, "train.batch_size": 2}),
              tmp_path / f"o{offset}", progress=False)
        channel_means = torch.cat([noise.mean(dim=(2, 3)).flatten() for noise in seen])
        spreads[offset] = channel_means.std().item()
    # plain noise: a channel mean of 256 N(0,1) values has std 1/16; offset 1 adds a N(0,1) per channel
    assert spreads[0.0] < 0.15 and spreads[1.0] > 0.5


class RecordingWeights(DreamBooth):
    """Records the trained U-Net's parameters each time loss() is called (before that step's update)."""

    snapshots: list

    def loss(self, ctx, generator):
        unet = ctx.accelerator.unwrap_model(ctx.unet)
        self.snapshots.append({n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad})
        return super().loss(ctx, generator)


def test_ema_of_the_trained_weights_is_the_result(tmp_path, tiny_overrides):
    from diffusers import UNet2DConditionModel

    steps, decay = 4, 0.5
    common = {"adapter.kind": "full", "train.steps": steps, "prior.enabled": False, "train.learning_rate": 1e-3}
    plain = train(_cfg(tiny_overrides, **common), tmp_path / "plain", progress=False)
    method = RecordingWeights()
    method.snapshots = []
    train(_cfg(tiny_overrides, **common, **{"train.ema_decay": decay}), tmp_path / "ema", progress=False, method=method)
    final = dict(UNet2DConditionModel.from_pretrained(plain.weights).named_parameters())  # EMA does not change training
    trajectory = [*method.snapshots, {n: final[n].detach() for n in method.snapshots[0]}]  # theta_0 .. theta_N
    # diffusers' EMAModel: decay at update n is min(decay, (1 + k) / (10 + k)), k = n - 1
    expected = {n: p.clone() for n, p in trajectory[0].items()}
    for n in range(1, steps + 1):
        d = min(decay, n / (9 + n))
        for name in expected:
            expected[name] = d * expected[name] + (1 - d) * trajectory[n][name]
    saved = dict(UNet2DConditionModel.from_pretrained(tmp_path / "ema" / "unet").named_parameters())
    name = next(n for n in expected if "attn1.to_q" in n)
    torch.testing.assert_close(saved[name].detach(), expected[name], rtol=0, atol=5e-6)  # float32 rounding over 4 updates
    assert (saved[name] - final[name]).abs().max() > 1e-4  # 80x the tolerance: the EMA is not the last weights


@pytest.mark.slow
def test_ema_resumes_to_the_same_result(tmp_path, tiny_overrides, straight_and_resumed):
    from safetensors.torch import load_file

    cfg = _cfg(tiny_overrides, **{"train.ema_decay": 0.9, "train.steps": 6, "train.checkpoint_every": 2, "prior.enabled": False})
    straight, resumed, _ = straight_and_resumed(cfg, tmp_path, DreamBooth, crash_at_call=4)
    a = load_file(str(straight / "pytorch_lora_weights.safetensors"))
    b = load_file(str(resumed / "pytorch_lora_weights.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key])


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("prodigyopt") is None, reason="prodigyopt not installed")
def test_prodigy_trains_and_differs_from_adamw(tmp_path, tiny_overrides):
    from safetensors.torch import load_file

    results = {}
    for optimizer, lr in (("adamw", 1e-3), ("prodigy", 1.0)):
        run = train(_cfg(tiny_overrides, **{"train.optimizer": optimizer, "train.learning_rate": lr, "prior.enabled": False}),
                    tmp_path / optimizer, progress=False)
        results[optimizer] = load_file(str(run.weights))
    key = next(k for k in results["adamw"] if "lora.up" in k)  # starts at zero: any training moves it
    assert results["prodigy"][key].abs().max() > 0
    assert not torch.allclose(results["prodigy"][key], results["adamw"][key])


@pytest.mark.parametrize("setting,value,module", [("optimizer", "adamw8bit", "bitsandbytes"), ("optimizer", "prodigy", "prodigyopt"),
                                                  ("report_to", "tensorboard", "tensorboard"), ("report_to", "wandb", "wandb")])
def test_a_missing_optional_package_is_one_line_before_anything_is_written(tmp_path, tiny_overrides, monkeypatch, capsys,
                                                                          setting, value, module):
    from rewardbooth.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    out = tmp_path / "run"
    args = ["train", "--output", str(out), "--model", "tiny", "--instance-dir", tiny_overrides["data.instance_dir"],
            "--class-noun", "toy", "--steps", "1", "--set", f"train.{setting}={value}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"rewardbooth[" in err[0] and module in err[0]
    assert not (out / "config.yaml").exists()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard not installed")
def test_report_to_tensorboard_logs_the_same_numbers_as_metrics_jsonl(tmp_path, tiny_overrides, metric_series):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(_cfg(tiny_overrides, **{"train.report_to": "tensorboard", "train.steps": 3}), tmp_path / "run", progress=False)
    events = list((tmp_path / "run" / "logs").rglob("events.out.tfevents.*"))
    assert events
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    logged = {e.step: e.value for e in accumulator.Scalars("loss")}
    expected = metric_series(tmp_path / "run", "loss")
    assert logged.keys() == expected.keys()
    for step, value in expected.items():
        assert logged[step] == pytest.approx(value, rel=1e-6)


@pytest.mark.slow
def test_class_latents_are_cached_on_disk_and_reused(tmp_path, tiny_overrides, monkeypatch, metric_series):
    extra = {"prior.num_class_images": 4, "train.steps": 3}
    train(_cfg(tiny_overrides, **extra), tmp_path / "plain", progress=False)
    train(_cfg(tiny_overrides, **extra, **{"data.cache_latents": True}), tmp_path / "cached", progress=False)
    cache = tmp_path / "cached" / CLASS_LATENTS_NAME
    assert cache.is_file()
    assert metric_series(tmp_path / "cached", "loss") == metric_series(tmp_path / "plain", "loss")

    # Same class images again: no VAE encoding; one image changed: encoded again.
    from rewardbooth.methods.context import LatentImageSet
    from rewardbooth.methods import context as context_module

    encoded = []
    real = diffusion.encode_moments
    monkeypatch.setattr(context_module.diffusion, "encode_moments", lambda vae, pixels, **kw: encoded.append(len(pixels)) or real(vae, pixels, **kw))
    cfg = _cfg(tiny_overrides, **extra, **{"data.cache_latents": True})
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in sorted((tmp_path / "cached" / "class_images").glob("*.png"))]
    ctx = _bare_context(cfg, tmp_path / "cached")
    reused = LatentImageSet(images, ctx, cache=cache)
    assert encoded == []
    fresh = LatentImageSet(images, ctx)
    torch.testing.assert_close(reused.moments, fresh.moments.cpu())
    images[0] = Image.new("RGB", images[0].size, (255, 0, 0))
    LatentImageSet(images, ctx, cache=cache)
    assert encoded == [len(images), len(images)]  # the plain set, then the stale cache re-encoded


def _bare_context(cfg, run_dir):
    from accelerate import Accelerator

    from rewardbooth.methods.context import TrainContext

    return TrainContext(cfg, run_dir, Accelerator(cpu=True), load_components("tiny"), resolution=32, weight_dtype=torch.float32)


def test_cli_flags_set_the_options(tmp_path):
    from rewardbooth.cli import build_parser, train_overrides

    args = build_parser().parse_args(["train", "--output", str(tmp_path), "--snr-gamma", "5", "--noise-offset", "0.05",
                                      "--ema-decay", "0.999", "--optimizer", "prodigy", "--report-to", "tensorboard", "--cache-latents",
                                      "--alpha", "8", "--vae", "madebyollin/sdxl-vae-fp16-fix"])
    cfg = load_config(overrides=train_overrides(args))
    t = cfg.train
    assert (t.snr_gamma, t.noise_offset, t.ema_decay, t.optimizer, t.report_to) == (5.0, 0.05, 0.999, "prodigy", "tensorboard")
    assert cfg.data.cache_latents and cfg.adapter.alpha == 8.0 and cfg.model.vae == "madebyollin/sdxl-vae-fp16-fix"
    json.dumps(cfg.to_dict())
