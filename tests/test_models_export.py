"""SDXL (tiny-sdxl preset) for every method, and LoRA files that other tools load (kohya layout)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rewardbooth.methods import load_config
from rewardbooth.models.export import KOHYA_WEIGHTS_NAME, sgm_module_name
from rewardbooth.models.loading import load_components, make_pipeline
from rewardbooth.models.lora import LORA_WEIGHTS_NAME
from rewardbooth.sampling import SampleSettings, generate
from rewardbooth.training.finished_run import export_lora, load_run_pipeline
from rewardbooth.training.loop import train

STEPS = 3


def _overrides(subject_dir: Path, model: str, method: str, kind: str, alpha: float | None = None) -> dict:
    return {
        "model.name": model, "data.instance_dir": str(subject_dir), "data.class_noun": "toy", "train.method": method,
        "train.steps": STEPS, "train.learning_rate": 5e-2 if kind == "lora" else 1e-3, "train.log_every": 1,
        "train.checkpoint_every": 0, "adapter.kind": kind, "adapter.rank": 4, "adapter.alpha": alpha,
        "adapter.train_text_encoder": True, "prior.num_class_images": 2, "prior.generation_steps": 2,
        "rpo.negatives_per_prompt": 1, "rpo.negative_steps": 2, "rpo.prompts": ["a {identifier} {class_noun} on a table"],
        # one validation at the end: the trained model's own samples, to compare loaded weights against
        "validation.every": STEPS, "validation.num_images": 1, "validation.steps": 3, "validation.guidance_scale": 3.0,
        "validation.prompts": ["a {identifier} {class_noun}"], "validation.select": False,
    }


def _validation_image(run: Path) -> np.ndarray:
    return np.asarray(Image.open(run / "samples" / f"step-{STEPS:06d}" / "00_00.png")).astype(np.int16)


def _sample_like_validation(pipe, cfg) -> np.ndarray:
    v = cfg.validation
    settings = SampleSettings(steps=v.steps, guidance_scale=v.guidance_scale, seed=cfg.train.seed, batch_size=v.batch_size)
    return np.asarray(generate(pipe, [cfg.format_prompt(v.prompts[0])], 1, settings)[0][0]).astype(np.int16)


def _diffusers_pipeline(model: str):
    """The pipeline class diffusers itself picks for the preset folder, via from_pretrained."""
    from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler

    from rewardbooth.models.loading import resolve_model_path

    pipe = DiffusionPipeline.from_pretrained(resolve_model_path(model))
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lora", "full"])
@pytest.mark.parametrize("method", ["dreambooth", "dpg", "rpo"])
def test_every_method_trains_and_generates_on_tiny_sdxl(subject_dir, tmp_path, method, kind):
    from diffusers import StableDiffusionXLPipeline

    cfg = load_config(None, _overrides(subject_dir, "tiny-sdxl", method, kind))
    result = train(cfg, tmp_path / "run", progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(losses) == STEPS and all(np.isfinite(losses))

    # The run's weights reproduce the trained model's own validation sample, and differ from the base model.
    cfg, pipe = load_run_pipeline(tmp_path / "run")
    assert isinstance(pipe, StableDiffusionXLPipeline)
    trained = _sample_like_validation(pipe, cfg)
    assert np.abs(trained - _validation_image(tmp_path / "run")).max() <= 1
    base = _sample_like_validation(make_pipeline(load_components("tiny-sdxl")), cfg)
    assert np.abs(trained - base).max() > 5

    if kind == "lora":  # diffusers' own SDXL pipeline loads the file, both text encoders included
        from safetensors import safe_open

        with safe_open(str(result.weights), "pt") as f:
            keys = list(f.keys())
        assert any(k.startswith("text_encoder_2.") for k in keys) and any(k.startswith("text_encoder.") for k in keys)
        official = _diffusers_pipeline("tiny-sdxl")
        assert isinstance(official, StableDiffusionXLPipeline)
        official.load_lora_weights(str(result.weights))
        assert np.abs(_sample_like_validation(official, cfg) - trained).max() <= 1


@pytest.mark.slow
@pytest.mark.parametrize("alpha", [4.0, 8.0])
@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl"])
def test_kohya_file_loads_through_diffusers_with_the_trained_strength(subject_dir, tmp_path, model, alpha):
    """alpha != rank is where tools disagree: the kohya file, loaded by diffusers' non-diffusers
    loader, must give the trained model's own validation image (same seed), as the diffusers file does."""
    from safetensors import safe_open

    cfg = load_config(None, {**_overrides(subject_dir, model, "dreambooth", "lora", alpha), "prior.enabled": False})
    train(cfg, tmp_path / "run", progress=False)
    kohya = tmp_path / "run" / KOHYA_WEIGHTS_NAME
    assert kohya.is_file()  # every LoRA run writes it
    reference = _validation_image(tmp_path / "run")
    for weights in (tmp_path / "run" / LORA_WEIGHTS_NAME, kohya):
        pipe = _diffusers_pipeline(model)
        pipe.load_lora_weights(str(weights))
        assert np.abs(_sample_like_validation(pipe, cfg) - reference).max() <= 1, weights.name
    assert np.abs(_sample_like_validation(_diffusers_pipeline(model), cfg) - reference).max() > 5  # the LoRA matters

    with safe_open(str(kohya), "pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
        alphas = {f.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
    assert alphas == {alpha}
    assert metadata["ss_network_dim"] == "4" and float(metadata["ss_network_alpha"]) == alpha
    assert metadata["rewardbooth_method"] == "dreambooth" and metadata["ss_sd_model_name"] == model
    te_prefixes = {k.split("_text_model_")[0] for k in keys if k.startswith("lora_te")}
    if model == "tiny-sdxl":
        assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
        assert te_prefixes == {"lora_te1", "lora_te2"}
        assert any(k.startswith("lora_unet_input_blocks_") for k in keys) and not any("down_blocks" in k for k in keys)
    else:
        assert metadata["ss_base_model_version"] == "sd_v1" and te_prefixes == {"lora_te"}
        assert any(k.startswith("lora_unet_down_blocks_") for k in keys)


def test_sgm_names_follow_the_sdxl_block_layout():
    # SDXL base: layers_per_block 2; down level 1's first transformer is input block 4, up level 0's last is output block 2.
    assert sgm_module_name("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 2) == "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    assert sgm_module_name("down_blocks.2.attentions.1.proj_in", 2) == "input_blocks.8.1.proj_in"
    assert sgm_module_name("mid_block.attentions.0.transformer_blocks.3.attn2.to_k", 2) == "middle_block.1.transformer_blocks.3.attn2.to_k"
    assert sgm_module_name("up_blocks.0.attentions.2.transformer_blocks.0.attn1.to_out.0", 2) == "output_blocks.2.1.transformer_blocks.0.attn1.to_out.0"
    assert sgm_module_name("up_blocks.1.attentions.0.proj_out", 2) == "output_blocks.3.1.proj_out"


@pytest.mark.slow
def test_export_command_converts_and_never_overwrites(subject_dir, tmp_path, capsys):
    from peft import PeftModel
    from safetensors import safe_open

    from rewardbooth.cli import main

    cfg = load_config(None, {**_overrides(subject_dir, "tiny", "dreambooth", "lora", 8.0), "prior.enabled": False, "validation.every": 0})
    train(cfg, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    assert main(["export", str(run), "--format", "kohya", "--dtype", "fp16"]) == 0
    half = run / "lora_kohya_fp16.safetensors"
    with safe_open(str(half), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys() if not k.endswith(".alpha")} == {torch.float16}
    assert main(["export", str(run), "--format", "kohya", "--dtype", "fp16"]) == 2  # exists: refused, file kept
    assert "already exists" in capsys.readouterr().err
    assert half.stat().st_size > 0

    # peft: the U-Net adapter folder loads with PeftModel and gives the run's U-Net output.
    assert main(["export", str(run), "--format", "peft"]) == 0
    _, pipe = load_run_pipeline(run)
    base_unet = load_components("tiny").unet
    peft_unet = PeftModel.from_pretrained(base_unet, str(run / "peft" / "unet"))
    latents, t, text = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(peft_unet(latents, t, text).sample, pipe.unet(latents, t, text).sample)

    full = load_config(None, {**_overrides(subject_dir, "tiny", "dreambooth", "full"), "prior.enabled": False, "validation.every": 0})
    train(full, tmp_path / "full", progress=False)
    assert main(["export", str(tmp_path / "full")]) == 2
    assert "fine-tuned the full model" in capsys.readouterr().err


def test_sdxl_training_conditions_the_unet_as_the_pipeline_does(subject_dir):
    """Hidden states (both encoders' penultimate layers), pooled embedding and size ids that
    training feeds the U-Net are those StableDiffusionXLPipeline feeds it when sampling."""
    from accelerate import Accelerator

    from rewardbooth.methods.context import TrainContext

    cfg = load_config(None, _overrides(subject_dir, "tiny-sdxl", "dreambooth", "lora"))
    components = load_components("tiny-sdxl")
    ctx = TrainContext(cfg, subject_dir, Accelerator(cpu=True), components, resolution=32, weight_dtype=torch.float32)
    prompts = ["a sks toy", "a toy on a table"]
    ours = ctx.encode_prompts(prompts)
    pipe = make_pipeline(components)
    hidden, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    time_ids = pipe._get_add_time_ids((32, 32), (0, 0), (32, 32), dtype=torch.float32,
                                      text_encoder_projection_dim=components.text_encoder_2.config.projection_dim)
    torch.testing.assert_close(ours.hidden, hidden)
    torch.testing.assert_close(ours.pooled, pooled)
    torch.testing.assert_close(ours.time_ids, time_ids.repeat(2, 1))
    torch.testing.assert_close(ctx.encode_prompts(prompts[::-1]).pooled, pooled.flip(0))  # the per-prompt cache keeps rows apart
